"""What a running guest consults: the decoded VMCB controls, and the #VMEXIT signal.

While the processor runs a guest (AMD APM Vol. 2 15.5-15.7), the guest's
:class:`~spec.state.MachineState` carries ``state.svm``, a
:class:`GuestControls`: the control-area fields VMRUN loaded (the intercept
vector, IOPM/MSRPM bases over host physical memory, TSC_OFFSET, ASID,
nested paging, the virtual-interrupt fields, the PAUSE filter).  Plain
machines have ``state.svm is None`` and nothing here runs.

An intercepted event raises :class:`VMExit` -- a Python exception distinct
from :class:`spec.faults.Fault`: it is not an architectural exception of the
guest but the end of guest execution.  The CPU (:class:`spec.cpu.SpecCPU`)
catches it, undoes the instruction (intercepted instructions have no effect,
APM 15.9), and returns a ``vmexit`` stop event; the processor
(:mod:`spec.svm.processor`) then writes the VMCB.

Where instruction semantics check an intercept (APM 15.9 "Instruction
Intercepts", and the priorities KVM's emulator encodes from it): *after*
the simple exceptions -- #UD for an invalid mode or prefix, #GP for CPL or
CR4-controlled privilege (RDTSC with TSD, RDPMC with PCE, UMIP), the I/O
permission check of IN/OUT/INS/OUTS (IOPL, TSS bitmap), DR4/DR5 with CR4.DE
and DR7.GD -- and *before* memory operands are accessed and before
exceptions that depend on operand values (a reserved CR/MSR bit, an unknown
MSR, an invalid counter index).  CPUID, PUSHF, POPF, IRET, INTn, ICEBP,
PAUSE and RSM are intercepted before any exception check (they have none of
the simple kind except IOPL-sensitive ones in virtual-8086 mode, which the
intercept precedes).  :meth:`spec.isa.context.Exec.intercept` is the one
call semantics make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spec.svm.exitcodes import INTERCEPT_BITS, ExitCode
from spec.svm.vmcb import VMCB, iopm_intercepts, msrpm_intercepts

_IOIO_BIT = 1 << ExitCode.IOIO
_MSR_BIT = 1 << ExitCode.MSR
_PAUSE_BIT = 1 << ExitCode.PAUSE


class VMExit(Exception):
    """#VMEXIT: guest execution ends with ``code`` (an :class:`ExitCode`) and its EXITINFOs.

    ``nrip`` is the next sequential RIP for exits caused by an instruction
    (APM 15.7.1), 0 otherwise; ``intinfo`` the EXITINTINFO value (an event
    whose delivery was interrupted by this exit, APM 15.7.2; 0 if none).
    ``trap`` marks the trap-like exits (EFER and CRn write traps, APM 15.8.1)
    raised *after* the instruction completed: the CPU retires it instead of
    undoing it.
    """

    def __init__(self, code: int, info1: int = 0, info2: int = 0, *, nrip: int = 0, intinfo: int = 0,
                 trap: bool = False) -> None:
        super().__init__(code, info1, info2)
        self.code = int(code)
        self.info1 = info1 & ((1 << 64) - 1)
        self.info2 = info2 & ((1 << 64) - 1)
        self.nrip = nrip
        self.intinfo = intinfo
        self.trap = trap

    def __repr__(self) -> str:
        try:
            name = ExitCode(self.code).name
        except ValueError:
            name = f"{self.code:#x}"
        return f"#VMEXIT({name}, info1={self.info1:#x}, info2={self.info2:#x})"

    __str__ = __repr__


@dataclass(slots=True)
class GuestControls:
    """The control-area state of the running guest (loaded by VMRUN from the VMCB control area)."""

    vector: int = 0  # the 192-bit intercept vector: bit k intercepts exit code k
    phys: Any = None  # host physical memory (the IOPM and MSRPM live there)
    iopm_base: int = 0
    msrpm_base: int = 0
    tsc_offset: int = 0
    asid: int = 1
    np_enable: bool = False
    ncr3: int = 0
    v_tpr: int = 0
    v_irq: bool = False
    v_intr_prio: int = 0
    v_ign_tpr: bool = False
    v_intr_masking: bool = False
    v_intr_vector: int = 0
    pause_filter_count: int = 0  # 0: every PAUSE is intercepted (filter off)
    pause_remaining: int = 0  # the internal PAUSE counter (APM 15.14.4)

    @classmethod
    def from_vmcb(cls, vmcb: VMCB) -> GuestControls:
        """The controls VMRUN loads (the IOPM/MSRPM bases ignore bits 11:0, APM 15.10.1, 15.11)."""
        count = vmcb.pause_filter_count
        return cls(
            vector=vmcb.intercept_vector(), phys=vmcb.phys, iopm_base=vmcb.iopm_base_pa & ~0xFFF,
            msrpm_base=vmcb.msrpm_base_pa & ~0xFFF, tsc_offset=vmcb.tsc_offset, asid=vmcb.guest_asid,
            np_enable=bool(vmcb.np_enable), ncr3=vmcb.n_cr3, v_tpr=vmcb.v_tpr & 0xF, v_irq=bool(vmcb.v_irq),
            v_intr_prio=vmcb.v_intr_prio, v_ign_tpr=bool(vmcb.v_ign_tpr),
            v_intr_masking=bool(vmcb.v_intr_masking), v_intr_vector=vmcb.v_intr_vector,
            pause_filter_count=count, pause_remaining=count)

    def intercepts(self, code: int) -> bool:
        """Is exit ``code`` intercepted (its bit in the intercept vector set)?"""
        return 0 <= code < INTERCEPT_BITS and bool(self.vector >> code & 1)

    def exception_intercepted(self, vector: int) -> bool:
        return bool(self.vector >> (ExitCode.EXCP0 + vector) & 1)

    def io_intercepted(self, port: int, size: int) -> bool:
        """IOIO_PROT and any of the ports' IOPM bits set (APM 15.10.1)."""
        return bool(self.vector & _IOIO_BIT) and iopm_intercepts(self.phys, self.iopm_base, port, size)

    def msr_intercepted(self, msr: int, write: bool) -> bool:
        """MSR_PROT and the MSRPM bit set, or an MSR outside the map (APM 15.11)."""
        return bool(self.vector & _MSR_BIT) and msrpm_intercepts(self.phys, self.msrpm_base, msr, write)

    def pause_exits(self) -> bool:
        """One PAUSE executes: does it #VMEXIT (APM 15.14.4)?

        With a filter count the internal counter is decremented and the
        intercept fires when it reaches zero; a count of 0 intercepts every
        PAUSE.  The cycle threshold (PAUSE_FILTER_THRESHOLD) is not modeled:
        the counter is never reset between PAUSEs (the model has no clock).
        """
        if not self.vector & _PAUSE_BIT:
            return False
        if self.pause_filter_count == 0:
            return True
        self.pause_remaining = max(self.pause_remaining - 1, 0)
        return self.pause_remaining == 0


__all__ = ["GuestControls", "VMExit"]
