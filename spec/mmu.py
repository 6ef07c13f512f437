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

Guest mode (SVM, APM Vol. 2 15.16, 15.25): :class:`GuestMMU` is the MMU of a
guest running under :mod:`spec.svm`.  It translates through the processor's
hardware TLB (:class:`spec.tlb.ModelTLB`, current ASID) instead of the memo, so a
translation is cached exactly as far as :mod:`spec.tlb` allows and a stale one is
used until the guest or the VMM invalidates it.  Its physical memory is either
host memory (no nested paging: the guest's CR3 is a VMM-built shadow table) or a
guest-physical view (:class:`spec.svm.nested.NestedMemory`), whose ``tables``
view carries the guest's page-table accesses and whose ``check_final`` checks the
final guest-physical address for the access's kind (NX for fetches, writability
for writes) before the access; its own ``read``/``write`` translate again (cached).
A plain :class:`MMU` (``tlb`` is ``None``) is unchanged by all this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from spec import flags as F
from spec.faults import Fault, Vector
from spec.memory import AccessKind, LinearMemory
from spec.paging import Access, PagingControl, PhysAccess, paging_mode, walk

if TYPE_CHECKING:
    from spec.domain.base import Domain
    from spec.state import MachineState
    from spec.tlb import ModelTLB

A20_MASK = ~(1 << 20)


MEMO_LIMIT = 4096


class MMU(LinearMemory):
    """Linear memory of a machine: translates with the state's control registers."""

    state: MachineState | None = None
    _memo: dict | None = None
    tlb: ModelTLB | None = None  # the hardware TLB (guest mode, :class:`GuestMMU`); None: walk (and memo)
    asid: int = 0

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


class GuestPhysicalMemory(Protocol):
    """Guest-physical memory behind nested paging (:class:`spec.svm.nested.NestedMemory`), as the MMU uses it."""

    tables: PhysAccess  # the guest's page-table reads and A/D updates (nested: guest page-table accesses)

    def check_final(self, gpa: int, kind: AccessKind) -> None:
        """Translate ``gpa``, the final guest-physical address of an access of ``kind`` (may raise #NPF)."""
        ...


class GuestMMU(MMU):
    """The MMU of a guest in SVM guest mode: the hardware TLB of ``asid``, over host or nested memory.

    ``phys`` is host physical memory (no nested paging) or a
    :class:`GuestPhysicalMemory`.  Translation (APM 15.25.5, 15.25.6): the
    guest's walk (through the TLB) reads its tables through ``phys.tables``
    (a nested page fault there is reported as such, before any guest #PF of a
    later level); a guest #PF is raised as usual; then the final guest-physical
    address is checked for the access's kind (``check_final``), so that a
    nested fault on it comes after the guest walk succeeded.  The data access
    itself then goes to ``phys`` with the guest-physical address.  Without
    ``tlb`` every access walks (a processor without TLB).  Concrete domain only.
    """

    def __init__(self, D: Domain, phys: Any, *, tlb: ModelTLB | None = None, asid: int = 0) -> None:
        super().__init__(D, phys)
        self.tlb = tlb
        self.asid = asid
        self.tables: PhysAccess = getattr(phys, "tables", phys)
        self.check_final = getattr(phys, "check_final", None)

    def translate(self, linear: Any, kind: AccessKind, user: bool, implicit: bool = False) -> Any:
        s = self.state
        if s is None:
            return linear
        mode = paging_mode(s.cr0, s.cr4, s.efer)
        if mode is None:
            phys = linear & A20_MASK if not s.a20 else linear
        else:
            acc = Access(kind, 3 if user else 0, implicit)
            ctl = self.control()
            tlb = self.tlb
            if tlb is not None:
                if tlb.asid != self.asid:
                    tlb.switch_asid(self.asid)
                t = tlb.translate(self.D, self.tables, mode, ctl, linear, acc)
                fault, phys = t.fault, t.phys
            else:
                w = walk(self.D, self.tables, mode, ctl, linear, acc)
                fault, phys = w.fault, w.phys
            if fault is not None:
                raise Fault(Vector.PF, fault, cr2=linear)
        check = self.check_final
        if check is not None:
            check(phys, kind)
        return phys
