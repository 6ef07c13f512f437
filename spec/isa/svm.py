"""The SVM instructions: VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA
(AMD APM Vol. 3 per-instruction pages; APM Vol. 2 15.5, 15.9, 15.16, 15.17, 15.27).

Common checks, in order (APM Vol. 3 exception tables; KVM's emulator uses the
same order): #UD when EFER.SVME = 0 or outside protected mode (real and
virtual-8086 mode) -- STGI and SKINIT are also valid with SVME = 0 on
processors with SKINIT, which the model does not advertise -- then #GP(0) at
CPL > 0; then, in guest mode, the instruction's intercept (APM 15.9); then
the operand checks (rAX a 4 KiB-aligned physical address below 2^MAXPHYADDR,
else #GP(0)).  rAX is read at the address size (EAX outside 64-bit mode).

* **VMMCALL** has no checks of its own: intercepted, it exits; otherwise it
  is #UD at any CPL, in or out of guest mode (APM Vol. 3 VMMCALL).
* **VMLOAD / VMSAVE** move the state VMRUN/#VMEXIT leave alone -- FS, GS,
  TR, LDTR with their hidden parts, KernelGSBase, STAR, LSTAR, CSTAR, SFMASK,
  SYSENTER_CS/ESP/EIP -- between the processor and the VMCB at physical rAX
  (:func:`spec.svm.vmcb.vmload_state` / :func:`~spec.svm.vmcb.vmsave_state`).
  In guest mode without the intercept the address is guest-physical (the
  model's physical memory of the guest: with nested paging that is the
  virtualized VMLOAD/VMSAVE of APM 15.33.1).
* **STGI / CLGI** set and clear the global interrupt flag (``state.gif``,
  APM 15.17): GIF = 0 holds NMI and INTR.
* **INVLPGA** invalidates the TLB mapping of the linear address rAX in the
  ASID ECX (APM 15.16.3): applied to the hardware TLB when the MMU has one
  (guest mode, :mod:`spec.svm.nested`), else recorded as the TLB event
  ``("invlpga", linear, asid)``.
* **VMRUN** executed by x86 code: the checks above (and the VMRUN intercept
  in guest mode) are modeled; the world switch itself is not -- it raises
  :class:`~spec.faults.Unimplemented`.  The processor's VMRUN is
  :meth:`spec.svm.processor.SVMProcessor.vmrun`, executed by host software.
* **SKINIT** (secure loader launch, APM 15.27): checks and intercept, then
  :class:`~spec.faults.Unimplemented` (a processor re-initialization).
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import Insn
from spec.faults import Fault, Unimplemented, Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.system import emit
from spec.state import CR0_PE, EFER_SVME, MachineState
from spec.svm.exitcodes import ExitCode
from spec.svm.vmcb import VMCB, vmload_state, vmsave_state

_VM = 1 << F.VM
_RAX, _RCX = 0, 1
_M32, _M64 = 0xFFFF_FFFF, (1 << 64) - 1


def _svm_checks(x: Exec, exitcode: int) -> None:
    """#UD unless EFER.SVME = 1 in protected mode, #GP(0) at CPL > 0, then the intercept (APM 15.9)."""
    s = x.s
    if not s.efer & EFER_SVME or not s.cr0 & CR0_PE or s.rflags_sys & _VM:
        raise Fault(Vector.UD)
    if s.cpl:
        raise Fault(Vector.GP, 0)
    x.intercept(exitcode)


def _rax(x: Exec, i: Insn) -> int:
    return x.D.concrete(x.s.read_gpr(_RAX, i.addrsize))


def _vmcb_address(x: Exec, i: Insn) -> int:
    """rAX as a VMCB physical address: 4 KiB aligned and below 2^MAXPHYADDR, else #GP(0) (APM Vol. 3 VMLOAD)."""
    pa = _rax(x, i)
    if pa & 0xFFF or pa >> x.s.model.maxphyaddr:
        raise Fault(Vector.GP, 0)
    return pa


def _vmcb(s: MachineState, pa: int) -> VMCB:
    return VMCB(s.mem.phys, pa)


@instruction("VMRUN", ref="APM Vol. 3 VMRUN; APM Vol. 2 15.5")
def vmrun(x: Exec, i: Insn) -> None:
    """Checks and intercept; the x86-executed world switch is outside the model (module docstring)."""
    _svm_checks(x, ExitCode.VMRUN)
    _vmcb_address(x, i)
    raise Unimplemented("VMRUN executed by x86 code: the world switch is modeled only for host software "
                        "(spec.svm.processor.SVMProcessor.vmrun)")


@instruction("VMMCALL", ref="APM Vol. 3 VMMCALL; APM Vol. 2 15.9")
def vmmcall(x: Exec, i: Insn) -> None:
    """A call to the VMM: #VMEXIT when intercepted, else #UD (APM Vol. 3 VMMCALL)."""
    x.intercept(ExitCode.VMMCALL)
    raise Fault(Vector.UD)


@instruction("VMLOAD", ref="APM Vol. 3 VMLOAD; APM Vol. 2 15.5.2")
def vmload(x: Exec, i: Insn) -> None:
    _svm_checks(x, ExitCode.VMLOAD)
    s = x.s
    vmload_state(_vmcb(s, _vmcb_address(x, i)), s)


@instruction("VMSAVE", ref="APM Vol. 3 VMSAVE; APM Vol. 2 15.5.2")
def vmsave(x: Exec, i: Insn) -> None:
    _svm_checks(x, ExitCode.VMSAVE)
    s = x.s
    vmsave_state(s, _vmcb(s, _vmcb_address(x, i)))


@instruction("STGI", ref="APM Vol. 3 STGI; APM Vol. 2 15.17")
def stgi(x: Exec, i: Insn) -> None:
    _svm_checks(x, ExitCode.STGI)
    x.s.gif = True


@instruction("CLGI", ref="APM Vol. 3 CLGI; APM Vol. 2 15.17")
def clgi(x: Exec, i: Insn) -> None:
    _svm_checks(x, ExitCode.CLGI)
    x.s.gif = False


@instruction("INVLPGA", ref="APM Vol. 3 INVLPGA; APM Vol. 2 15.16.3")
def invlpga(x: Exec, i: Insn) -> None:
    """Invalidate the TLB mapping of linear rAX for ASID ECX (global pages too)."""
    _svm_checks(x, ExitCode.INVLPGA)
    s = x.s
    linear = _rax(x, i)
    asid = x.D.concrete(s.read_gpr(_RCX, 32))
    tlb = getattr(s.mem, "tlb", None)
    if tlb is not None:
        tlb.invlpga(linear, asid)
    else:
        emit(s, ("invlpga", linear, asid))


@instruction("SKINIT", ref="APM Vol. 3 SKINIT; APM Vol. 2 15.27")
def skinit(x: Exec, i: Insn) -> None:
    _svm_checks(x, ExitCode.SKINIT)
    raise Unimplemented("SKINIT (secure loader launch, APM Vol. 2 15.27) is outside the model")


__all__: list[str] = []
