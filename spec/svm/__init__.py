"""AMD SVM (Secure Virtual Machine), the virtualization extension of the spec (AMD APM Vol. 2 chapter 15).

* :mod:`spec.svm.exitcodes` -- #VMEXIT codes and the EXITINFO encodings (Appendix C);
* :mod:`spec.svm.vmcb` -- the VMCB as a typed view over physical memory, EVENTINJ, IOPM/MSRPM (Appendix B);
* :mod:`spec.svm.intercepts` -- the decoded control area a running guest consults (``state.svm``),
  and :class:`~spec.svm.intercepts.VMExit`, the signal an intercepted event raises;
* :mod:`spec.svm.processor` -- :class:`~spec.svm.processor.SVMProcessor`: VMRUN executed by host
  software, the guest run, #VMEXIT;
* :mod:`spec.svm.nested` -- nested paging (guest-physical memory through nCR3).

Only the first two are imported here: the others depend on the CPU, which depends on this package.
"""

from spec.svm.exitcodes import ExitCode
from spec.svm.vmcb import VMCB, EventInj, EventType

__all__ = ["VMCB", "EventInj", "EventType", "ExitCode"]
