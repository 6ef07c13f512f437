"""The MMU: linear -> physical translation for the CPU, from the live machine state.

Paging disabled: physical = linear, with bit 20 forced to 0 when the A20 gate
is closed (a PC platform feature the spec models as a machine setting;
it never applies in long mode).  Paging enabled: the walker of
:mod:`spec.paging` in the mode CR0/CR4/EFER select; a failed walk raises
#PF with its error code and the faulting linear address (delivery writes
CR2, SDM Vol. 3A 4.7).

The spec walks on every access: a processor without a TLB is architecturally
valid.  The rules for what a TLB may cache live in :mod:`spec.tlb`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spec import flags as F
from spec.faults import Fault, Vector
from spec.memory import AccessKind, LinearMemory
from spec.paging import Access, PagingControl, paging_mode, walk

if TYPE_CHECKING:
    from spec.state import MachineState

A20_MASK = ~(1 << 20)


class MMU(LinearMemory):
    """Linear memory of a machine: translates with the state's control registers."""

    state: MachineState | None = None

    def control(self) -> PagingControl:
        s = self.state
        assert s is not None
        return PagingControl(cr0=s.cr0, cr3=s.cr3, cr4=s.cr4, efer=s.efer, pdptes=tuple(s.pdptes), pkru=s.pkru,
                             ac=bool(s.rflags_sys >> F.AC & 1))

    def translate(self, linear: Any, kind: AccessKind, user: bool, implicit: bool = False) -> Any:
        s = self.state
        if s is None:
            return linear
        mode = paging_mode(s.cr0, s.cr4, s.efer)
        if mode is None:
            if not s.a20 and isinstance(linear, int):
                return linear & A20_MASK
            return linear
        acc = Access(kind, 3 if user else 0, implicit)
        w = walk(self.D, self.phys, mode, self.control(), linear, acc)
        if w.fault is not None:
            cr2 = linear if isinstance(linear, int) else None
            raise Fault(Vector.PF, w.fault, cr2=cr2)
        phys = w.phys
        return self.D.concrete(phys) if self.D.is_concrete(phys) else phys
