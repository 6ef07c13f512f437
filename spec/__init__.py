"""refvmm's executable specification of x86 and its virtualization extension.

The semantics are written once over a bit-vector domain (:mod:`spec.domain`)
and run concretely (the reference interpreter, :class:`spec.cpu.SpecCPU`),
symbolically under Z3, and (later) staged into generated code.  This package
performs no I/O and knows nothing of the VMM or of other emulators.
"""
