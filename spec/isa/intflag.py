"""The interrupt flag: CLI and STI (SDM Vol. 2A CLI, Vol. 2B STI; Vol. 3A 20.3/20.4 (VME, PVI);
APM Vol. 3 CLI, STI; APM Vol. 2 8.10 (virtual interrupts)).

Both instructions are IOPL-sensitive.  What they change, from the manuals'
"Operation" sections (CLI clears, STI sets):

==============================  ==============================================
mode                            effect
==============================  ==============================================
real-address (CR0.PE = 0)       IF
protected, CPL <= IOPL          IF
protected, CPL > IOPL, CPL = 3, VIF (STI: only if VIP = 0, else #GP(0))
CR4.PVI = 1
protected, otherwise            #GP(0)
virtual-8086, IOPL = 3          IF
virtual-8086, IOPL < 3,         VIF (STI: only if VIP = 0, else #GP(0))
CR4.VME = 1
virtual-8086, otherwise         #GP(0)
==============================  ==============================================

"Protected" includes compatibility and 64-bit mode: the SDM's pseudocode
makes no exception for IA-32e mode, so PVI applies there too.

STI and the interrupt shadow (SDM Vol. 2B STI): when STI sets IF from 0,
maskable interrupts (and NMIs, on some processors) stay blocked until the
instruction after STI completes; with IF already 1 there is no shadow.  The
shadow is recorded through :func:`spec.interrupts.set_sti_shadow`; setting
VIF creates none (it does not enable interrupts at the processor).
No status flag is affected.
"""

from __future__ import annotations

import spec.interrupts as interrupts  # module import: spec.interrupts itself imports spec.isa (cycle-safe)
from spec import flags as F
from spec.decode.insn import Insn
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction
from spec.state import CR0_PE

_IF, _VM, _VIF, _VIP = 1 << F.IF, 1 << F.VM, 1 << F.VIF, 1 << F.VIP
CR4_VME, CR4_PVI = 1 << 0, 1 << 1  # SDM Vol. 3A 2.5


def _target(x: Exec, sti: bool) -> int:
    """The RFLAGS bit CLI/STI changes (IF or VIF) in the current mode, or raise #GP(0) (table above)."""
    s = x.s
    if not s.cr0 & CR0_PE:
        return _IF
    rf = s.rflags_sys
    iopl = (rf >> F.IOPL_SHIFT) & 3
    blocked = sti and rf & _VIP  # STI with a virtual interrupt pending: let the monitor deliver it
    if not rf & _VM:
        cpl = s.cpl
        if cpl <= iopl:
            return _IF
        if cpl == 3 and s.cr4 & CR4_PVI and not blocked:
            return _VIF
    else:
        if iopl == 3:
            return _IF
        if s.cr4 & CR4_VME and not blocked:
            return _VIF
    raise x.fault(Vector.GP, 0)


@instruction("CLI", ref="SDM Vol. 2A CLI; APM Vol. 3 CLI")
def cli(x: Exec, i: Insn) -> None:
    """Clear IF (or VIF: module docstring)."""
    bit = _target(x, False)
    x.s.rflags_sys &= ~bit


@instruction("STI", ref="SDM Vol. 2B STI; APM Vol. 3 STI")
def sti(x: Exec, i: Insn) -> None:
    """Set IF (or VIF); from IF = 0 the next instruction runs in the interrupt shadow."""
    bit = _target(x, True)
    s = x.s
    if bit == _IF:
        interrupts.set_sti_shadow(s)
    s.rflags_sys |= bit


__all__ = ["CR4_PVI", "CR4_VME"]
