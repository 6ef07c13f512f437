"""Miscellaneous instructions: NOP forms, PAUSE, WAIT, UD2/UD0/UD1, HLT, RSM (SDM Vol. 2)."""

from __future__ import annotations

from spec.decode.insn import Insn
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction
from spec.svm.exitcodes import ExitCode
from spec.svm.intercepts import VMExit


@instruction("NOP", "WAIT", "PREFETCH", "PREFETCHNTA", "PREFETCHT0", "PREFETCHT1", "PREFETCHT2",
             ref="SDM Vol. 2B NOP (0F 1F /0 multi-byte form, 0F 18-1F hint space), PAUSE, PREFETCHh")
def nop(x: Exec, i: Insn) -> None:
    """No architectural effect.  The memory operand of a NOP/PREFETCH is never accessed.

    WAIT/FWAIT checks for pending x87 exceptions; with no x87 state modeled
    (CR0.TS/MP checks aside) it has nothing to do.
    """


@instruction("HLT", ref="SDM Vol. 2A HLT; APM Vol. 3 HLT")
def hlt(x: Exec, i: Insn) -> None:
    """Halt until an interrupt: privileged, #GP(0) at CPL > 0 (SDM Vol. 2A HLT "Operation").

    CPL is 0 in real-address mode and 3 in virtual-8086 mode, so HLT always
    halts in the former and always faults in the latter.  RIP is left past the
    HLT (the CPU records the halted state).
    """
    if x.s.cpl:
        raise x.fault(Vector.GP, 0)
    x.intercept(ExitCode.HLT)  # APM 15.9: after the CPL check
    x.halt()


@instruction("PAUSE", ref="SDM Vol. 2B PAUSE; APM Vol. 3 PAUSE; APM Vol. 2 15.14.4 (PAUSE intercept filter)")
def pause(x: Exec, i: Insn) -> None:
    """A spin-loop hint: no architectural effect, except the SVM PAUSE intercept and its filter count."""
    svm = x.s.svm
    if svm is not None and svm.pause_exits():
        raise VMExit(ExitCode.PAUSE, nrip=x.next_rip)


@instruction("RSM", ref="APM Vol. 3 RSM; SDM Vol. 2B RSM; APM Vol. 2 15.9 (RSM intercept)")
def rsm(x: Exec, i: Insn) -> None:
    """Resume from system-management mode: #UD outside SMM.  The model has no SMM, so RSM is always
    #UD -- after the SVM RSM intercept, which precedes every exception check (APM 15.9)."""
    x.intercept(ExitCode.RSM)
    raise x.fault(Vector.UD)
