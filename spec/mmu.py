"""The MMU: linear -> physical translation for the CPU, from the live machine state.

Paging disabled: physical = linear, with bit 20 forced to 0 when the A20 gate
is closed (a PC platform feature the spec models as a machine setting;
it never applies in long mode).  Paging enabled: the walker of
:mod:`spec.paging` in the mode CR0/CR4/EFER select; a failed walk raises
#PF with its error code and the faulting linear address (delivery writes
CR2, SDM Vol. 3A 4.7).

The spec walks on every access: a processor without a TLB is architecturally
valid.  The rules for what a TLB may cache live in :mod:`spec.tlb`.

Walk memo (concrete domain only): a successful walk is remembered together
with the bytes of every paging-structure entry it read, as they are *after*
its accessed/dirty updates, and the control state it ran under.  A later
access to the same page with the same kind and privilege reuses it only if
all those bytes are still equal: a fresh walk would then read the same
entries, set no bit (A and, for writes, D are already set) and reach the same
result.  The memo is therefore observationally identical to walking -- it is
not a TLB and never returns a stale translation.
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


MEMO_LIMIT = 4096


class MMU(LinearMemory):
    """Linear memory of a machine: translates with the state's control registers."""

    state: MachineState | None = None
    _memo: dict | None = None

    def control(self) -> PagingControl:
        s = self.state
        assert s is not None
        return PagingControl(cr0=s.cr0, cr3=s.cr3, cr4=s.cr4, efer=s.efer, maxphyaddr=s.model.maxphyaddr,
                             pdptes=tuple(s.pdptes), pkru=s.pkru, ac=bool(s.rflags_sys >> F.AC & 1))

    def translate(self, linear: Any, kind: AccessKind, user: bool, implicit: bool = False) -> Any:
        s = self.state
        if s is None:
            return linear
        mode = paging_mode(s.cr0, s.cr4, s.efer)
        if mode is None:
            if not s.a20 and isinstance(linear, int):
                return linear & A20_MASK
            return linear
        concrete = isinstance(linear, int) and self.D.name == "concrete"
        if concrete:
            ctl_key = (s.cr0, s.cr3, s.cr4, s.efer, s.pkru, s.rflags_sys >> F.AC & 1, *s.pdptes)
            key = (linear >> 12, kind, user, implicit)
            memo = self._memo
            if memo is None:
                memo = self._memo = {}
            hit = memo.get(key)
            if hit is not None and hit[0] == ctl_key:
                pages = self.phys.pages
                for idx, off, data in hit[1]:
                    page = pages.get(idx)
                    if page is None or page[off:off + len(data)] != data:
                        break
                else:
                    return hit[2] | (linear & hit[3])
        acc = Access(kind, 3 if user else 0, implicit)
        w = walk(self.D, self.phys, mode, self.control(), linear, acc)
        if w.fault is not None:
            cr2 = linear if isinstance(linear, int) else None
            raise Fault(Vector.PF, w.fault, cr2=cr2)
        phys = w.phys
        if not concrete:
            return self.D.concrete(phys) if self.D.is_concrete(phys) else phys
        self._remember(key, ctl_key, w, mode.entry_bytes)
        return phys

    def _remember(self, key: tuple, ctl_key: tuple, w: Any, eb: int) -> None:
        """Record a successful concrete walk with its entries' current (post-A/D) bytes."""
        checks = []
        pages = self.phys.pages
        for _level, addr, _value in w.entries:
            if addr is None:
                continue  # a PAE PDPTE register: part of the control key
            page = pages.get(addr >> 12)
            off = addr & 0xFFF
            if page is None or off + eb > 0x1000:
                return  # an entry on the bus (not RAM): never memoize
            checks.append((addr >> 12, off, bytes(page[off:off + eb])))
        memo = self._memo
        assert memo is not None
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        # Keyed by the 4 KiB linear page, so the frame is the 4 KiB frame even inside a large page.
        memo[key] = (ctl_key, tuple(checks), w.phys & ~0xFFF, 0xFFF)
