"""The TLB rules: what a processor may cache from page walks, and when it must stop using it.

Intel SDM Vol. 3A 4.10 (TLBs, paging-structure caches, invalidation), AMD APM
Vol. 2 5.5 (translation-lookaside buffer) and 15.16 (SVM TLB control, ASIDs).
The spec CPU itself walks on every access (a processor without TLBs is
architecturally valid, SDM 4.10.2.2); this module states the caching rules as
code so that a VMM (shadow paging is a software TLB) and tests can check
themselves against them.  :class:`ModelTLB` is one processor that caches as
much as these rules allow and no more.

What a processor may cache (SDM 4.10.2, 4.10.3)
------------------------------------------------
* **Only translations.**  A TLB entry for a page number exists only if the walk
  found P=1 and no reserved bit set in every entry it used: a not-present or
  reserved-bit fault is never cached, so setting P from 0 to 1 needs no
  invalidation (4.10.2.3, 4.10.4.3).
* **Only once accessed.**  The processor sets the A flag of every entry used
  before caching (4.10.2.3).  The walker of :mod:`spec.paging` does so on every
  successful walk; this model caches only successful walks (a processor may also
  cache a translation whose access was refused -- its rights then refuse again --
  but this model does not).
* **What an entry holds** (4.10.2.2): the page number and page size, the
  physical frame, the AND of the R/W flags, the AND of the U/S flags, the OR of
  the XD flags (with NXE), the protection key (IA-32e paging with CR4.PKE), the
  leaf's dirty flag, global (leaf G=1 with CR4.PGE=1), the PCID (CR3[11:0] with
  CR4.PCIDE=1, else 0) and -- with SVM -- the ASID (APM 15.16).
* **Rights are re-evaluated at every use** from the cached paging-structure
  rights and the *current* CPL, implicit/explicit access, CR0.WP, CR4.SMEP/SMAP,
  RFLAGS.AC and PKRU (none of AC, CPL or PKRU changes invalidate anything).
* **Dirty.**  A write may use a cached entry only if its dirty flag is 1: the
  first write to a page must set D in memory (4.8), so a write through an entry
  cached with D=0 walks again.  Hence "writable" is usable only when D was
  already set or the caching access itself set it.
* **A refused access re-walks.**  A cached entry that does not permit the access
  is not used to fault: the lookup misses and the walk over memory decides.
  (Intel may instead raise a "spurious" #PF from stale rights and then drop the
  entry, 4.10.4.3; AMD re-walks first, APM 5.5.  Re-walking is always allowed,
  since a processor may drop any entry at any time, 4.10.2.2.)
* **Paging-structure caches** (4.10.3): for each non-leaf entry used (PML5E,
  PML4E, PDPTE, PDE referencing a table; not the PAE PDPTE registers), keyed by
  the linear-address bits that select it, the entry values of the path down to
  it (their rights included).  A later walk may start from the deepest cached
  one instead of reading those entries from memory.

When it must stop using them (SDM 4.10.4.1; APM 5.5.2, 5.5.3, 15.16)
--------------------------------------------------------------------
==================================  ==============================================================
event                               entries that must go (this model)
==================================  ==============================================================
MOV to CR3, CR4.PCIDE=0              non-global TLB entries of PCID 0; paging-structure caches of PCID 0
MOV to CR3, PCIDE=1, bit 63=0        non-global entries and structure caches of the new PCID
MOV to CR3, PCIDE=1, bit 63=1        nothing
MOV to CR4 changing PGE, PAE, PSE,   everything of the current ASID, global entries included (the SDM
SMEP, SMAP, PKE, LA57 or PCIDE       minimum is less: PGE or PCIDE 1->0 all; PAE or SMEP 0->1 the
                                     current PCID; flushing more is always allowed)
MOV to CR0 changing PG or WP         everything of the current ASID (SDM minimum: PG 1->0)
EFER write changing NXE or LME       everything of the current ASID
INVLPG linear                        entries for the page containing it (any page size), of the
                                     current PCID or global; all structure caches of the current PCID
INVPCID type 0 / 1 / 2 / 3           address+PCID non-global / PCID non-global / all / all non-global
#PF on linear                        entries for that page (current PCID, global too) and the
                                     structure-cache entries used for it (4.10.4.1)
SVM TLB_CONTROL 1 / 3 / 7            all ASIDs / one ASID / one ASID's non-global entries
INVLPGA linear, asid                 that page's entries of that ASID (global ones too) and that
                                     ASID's structure caches
==================================  ==============================================================

Entries of another ASID are never used (global ones included): a guest's
translations are never visible to the host or to another guest (APM 15.16.1).
Switching ASID (VMRUN, #VMEXIT) invalidates nothing.

Nested paging (APM 15.25): a guest TLB and a nested TLB
-------------------------------------------------------
With nested paging a guest access is translated twice: guest-linear ->
guest-physical by the guest's tables (themselves read through the nested
tables), then guest-physical -> host-physical by the nested tables.  A
processor may cache the composition (APM 15.25.9 lets the TLB hold guest-linear
-> system-physical translations); this model keeps the two halves apart, which
caches no more than the composition would:

* guest entries (guest-linear -> guest-physical) are the ordinary entries above,
  tagged with the guest's ASID, and invalidated by the guest's own MOV CR3,
  INVLPG, CR0/CR4/EFER changes exactly as in the table;
* nested entries (guest-physical -> host-physical) live in :attr:`ModelTLB.nested`,
  a second cache with the same rules applied to the nested walk (user-level
  accesses, the dirty rule, no caching of faults), tagged with the same ASID and
  never global.  Nothing the guest does invalidates them (they do not depend on
  guest state); TLB_CONTROL 1/3/7 drops them with the guest entries.  INVLPGA
  names a guest-linear page and drops that page's guest entries only.

So a VMM that edits nested tables must flush the ASID with TLB_CONTROL before the
next VMRUN (what APM 15.16.1 requires of it); if it forgets, the guest keeps using
the old host frames -- a visible bug, which is the point of modelling the TLB.

Wiring (SVM guest mode): :class:`spec.mmu.GuestMMU` translates through
:meth:`ModelTLB.translate`; the guest's instructions report MOV CR3, INVLPG and
CR0/CR4/EFER writes in ``state.tlb_events`` (:mod:`spec.isa.system`), which is then a
:class:`HardwareTLBEvents` sink applying each one with :func:`apply_event`.  The
re-check of a cached entry's rights (:func:`permits`) is the walker's own rule,
memoized on exactly the inputs it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from spec.domain.base import Domain
from spec.domain.concrete import CONCRETE
from spec.memory import AccessKind
from spec.paging import (
    ACCESSED,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    DIRTY,
    EFER_NXE,
    LEVEL4,
    LEVEL5,
    PAE,
    Access,
    PagingControl,
    PagingMode,
    PhysAccess,
    Walk,
    _denied,
    paging_mode,
    walk,
)

CR0_PG = 1 << 31
CR4_PCIDE = 1 << 17
EFER_LME = 1 << 8
CR3_NOFLUSH = 1 << 63

# SVM VMCB TLB_CONTROL values (APM 15.16.1).
TLB_CONTROL_NOTHING, TLB_CONTROL_ALL, TLB_CONTROL_ASID, TLB_CONTROL_ASID_NONGLOBAL = 0, 1, 3, 7

CR4_FLUSH_ALL = CR4_PGE | CR4_PAE | CR4_PSE | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_LA57 | CR4_PCIDE
CR0_FLUSH_ALL = CR0_PG | CR0_WP
EFER_FLUSH_ALL = EFER_NXE | EFER_LME


def current_pcid(ctl: PagingControl, mode: PagingMode | None = None) -> int:
    """The PCID translations are associated with (SDM 4.10.1): CR3[11:0] with CR4.PCIDE=1 (IA-32e), else 0."""
    if ctl.cr4 & CR4_PCIDE and mode in (None, LEVEL4, LEVEL5):
        return ctl.cr3 & 0xFFF
    return 0


@dataclass(frozen=True)
class TLBEntry:
    """One cached translation (SDM 4.10.2.2)."""

    vpn: int  # linear page number at this entry's page size (linear >> page_shift)
    page_shift: int  # 12 (4 KiB), 21 (2 MiB), 22 (4 MiB), 30 (1 GiB)
    frame: int  # physical base of the page
    user: bool  # AND of the U/S flags
    writable: bool  # AND of the R/W flags
    executable: bool  # not (OR of the XD flags) -- always true without NXE
    pkey: int  # protection key of the leaf (IA-32e paging with CR4.PKE), else 0
    mode: PagingMode  # the paging mode of the walk (whether keys apply)
    dirty: bool  # the leaf's D flag after the caching walk
    global_page: bool  # leaf G=1 with CR4.PGE=1
    pcid: int
    asid: int

    def covers(self, linear: int) -> bool:
        return linear >> self.page_shift == self.vpn

    def physical(self, linear: int) -> int:
        return self.frame | (linear & ((1 << self.page_shift) - 1))


def may_cache(w: Walk, linear: int, acc: Access, ctl: PagingControl, asid: int = 0) -> TLBEntry | None:
    """The TLB entry a processor may create from a concrete walk, or None when it may cache nothing.

    Only successful walks are cached here (see the module docstring); the walk
    has then set every A flag, and D in the leaf if ``acc`` was a write.
    """
    if w.fault is not None:
        return None
    leaf = w.leaf
    shift = w.page_shift
    keys = w.mode.pk_capable and bool(ctl.cr4 & CR4_PKE)
    return TLBEntry(
        vpn=linear >> shift, page_shift=shift, frame=w.phys & ~((1 << shift) - 1),
        user=bool(w.user), writable=bool(w.writable), executable=bool(w.executable),
        pkey=(leaf >> 59) & 0xF if keys else 0, mode=w.mode,
        dirty=bool(leaf & DIRTY) or acc.write,
        global_page=bool(ctl.cr4 & CR4_PGE) and bool(w.global_page),
        pcid=current_pcid(ctl, w.mode), asid=asid)


def permits(e: TLBEntry, acc: Access, ctl: PagingControl) -> bool:
    """Whether a cached entry allows ``acc`` now: the access rules of SDM 4.6 on the cached rights, with the
    current CPL, CR0.WP, SMEP, SMAP, RFLAGS.AC and PKRU -- and, for a write, a known-dirty page (4.8)."""
    if acc.write and not e.dirty:
        return False
    return _rights_allow(e.mode.pk_capable, e.user, e.writable, e.executable, e.pkey, acc.kind, acc.cpl,
                         acc.implicit, ctl.cr0 & CR0_WP, ctl.cr4 & _RIGHTS_CR4, ctl.ac, ctl.pkru)


_RIGHTS_CR4 = CR4_SMEP | CR4_SMAP | CR4_PKE  # the CR4 bits the access rules read (besides CR0.WP, AC, PKRU)


@lru_cache(maxsize=4096)
def _rights_allow(pk_capable: bool, user: bool, writable: bool, executable: bool, pkey: int, kind: int, cpl: int,
                  implicit: bool, wp: int, cr4: int, ac: bool, pkru: int) -> bool:
    """The walker's own rule (:func:`spec.paging._denied`) on cached rights, memoized: a pure function of exactly
    these arguments (of the paging mode it reads only ``pk_capable``; of the control state, the bits passed)."""
    ctl = PagingControl(cr0=wp, cr4=cr4, ac=ac, pkru=pkru)
    mode = LEVEL4 if pk_capable else PAE
    deny, pk = _denied(CONCRETE, mode, ctl, Access(AccessKind(kind), cpl, implicit), pkey << 59, user, writable,
                       not executable)
    return not (deny or pk)


@dataclass
class Translation:
    """What :meth:`ModelTLB.translate` did: a physical address or a #PF error code, and whether it hit."""

    fault: int | None
    phys: int | None
    hit: bool
    entry: TLBEntry | None = None
    walk: Walk | None = None


class _CachedPath:
    """A physical-memory view for one walk whose first reads are answered by a paging-structure-cache entry."""

    def __init__(self, mem: PhysAccess, values: tuple[int, ...]) -> None:
        self.mem, self.values, self.reads = mem, values, 0

    def read(self, addr: Any, n: int) -> Any:
        k = self.reads
        self.reads += 1
        if k < len(self.values):
            return self.values[k] & ((1 << (8 * n)) - 1)
        return self.mem.read(addr, n)

    def write(self, addr: Any, n: int, value: Any) -> None:
        self.mem.write(addr, n, value)


GLOBAL = -1  # the PCID tag of global entries: usable whatever the current PCID (SDM 4.10.2.4)


class ModelTLB:
    """A TLB plus paging-structure caches that follow the rules of the module docstring exactly.

    Entries are tagged with (ASID, PCID); ``asid`` is the current address-space
    identifier (0 = the host; SVM guests use others).  Every method takes the
    control state it depends on explicitly.
    """

    def __init__(self, asid: int = 0) -> None:
        self.asid = asid
        self.entries: dict[tuple[int, int, int, int], TLBEntry] = {}  # (asid, pcid or GLOBAL, shift, vpn)
        self.psc: dict[tuple[int, int, int, int], tuple[int, ...]] = {}  # (asid, pcid, level, prefix) -> path
        self._nested: ModelTLB | None = None

    @property
    def nested(self) -> ModelTLB:
        """The nested TLB: guest-physical -> host-physical translations of nested walks (APM 15.25), same ASID."""
        n = self._nested
        if n is None:
            n = self._nested = ModelTLB(self.asid)
        return n

    # -- use -----------------------------------------------------------------------
    def lookup(self, linear: int, acc: Access, ctl: PagingControl, mode: PagingMode | None = None) -> TLBEntry | None:
        """A cached translation usable for ``acc`` now, or None (a miss: the processor walks)."""
        pcid = current_pcid(ctl, mode)
        for shift in (12, 21, 22, 30):
            vpn = linear >> shift
            for tag in (pcid, GLOBAL):
                e = self.entries.get((self.asid, tag, shift, vpn))
                if e is not None and permits(e, acc, ctl):
                    return e
        return None

    def fill(self, w: Walk, linear: int, acc: Access, ctl: PagingControl) -> TLBEntry | None:
        """Cache what the rules allow from a concrete walk (TLB entry and paging-structure-cache entries)."""
        e = may_cache(w, linear, acc, ctl, self.asid)
        if e is None:
            return None
        self.entries[(self.asid, GLOBAL if e.global_page else e.pcid, e.page_shift, e.vpn)] = e
        in_memory = [(lv, v | ACCESSED) for lv, addr, v in w.entries if addr is not None]
        for k, (lv, _) in enumerate(in_memory):
            if lv == w.level:
                break  # the leaf goes to the TLB, not to a structure cache
            path = tuple(v for _, v in in_memory[: k + 1])
            self.psc[(self.asid, e.pcid, lv, linear >> w.mode.index_shift(lv))] = path
        return e

    def translate(self, D: Domain, mem: PhysAccess, mode: PagingMode, ctl: PagingControl, linear: int,
                  acc: Access) -> Translation:
        """Translate through the TLB: a usable entry, else a walk (from the deepest structure-cache entry)."""
        e = self.lookup(linear, acc, ctl, mode)
        if e is not None:
            return Translation(None, e.physical(linear), True, e)
        pcid = current_pcid(ctl, mode)
        cached: tuple[int, ...] = ()
        for lv in range(2, mode.levels + 1):
            path = self.psc.get((self.asid, pcid, lv, linear >> mode.index_shift(lv)))
            if path is not None:
                cached = path
                break
        w = walk(D, _CachedPath(mem, cached) if cached else mem, mode, ctl, linear, acc)
        if w.fault is not None:
            self.page_fault(linear, ctl, mode)  # SDM 4.10.4.1: a #PF drops what led to it
            return Translation(w.fault, None, False, None, w)
        return Translation(None, w.phys, False, self.fill(w, linear, acc, ctl), w)

    # -- invalidation --------------------------------------------------------------
    def drop(self, *, asid: int | None, pcid: int | None = None, include_global: bool = True,
             linear: int | None = None) -> None:
        """Drop TLB entries: of ``asid`` (None: all), of ``pcid`` (None: all) -- global entries iff
        ``include_global`` -- for the page containing ``linear`` (None: all pages)."""
        for key, e in list(self.entries.items()):
            a, tag, _, _ = key
            if asid is not None and a != asid:
                continue
            if linear is not None and not e.covers(linear):
                continue
            if (include_global if tag == GLOBAL else (pcid is None or tag == pcid)):
                del self.entries[key]

    def drop_structure_caches(self, *, asid: int | None, pcid: int | None = None, linear: int | None = None,
                              mode: PagingMode = LEVEL4) -> None:
        """Drop paging-structure-cache entries of ``asid``/``pcid`` (None: all); with ``linear``, only
        those that would be used to translate it."""
        for key in list(self.psc):
            a, p, lv, prefix = key
            if asid is not None and a != asid:
                continue
            if pcid is not None and p != pcid:
                continue
            if linear is not None and linear >> mode.index_shift(lv) != prefix:
                continue
            del self.psc[key]

    def flush_all(self) -> None:
        """Everything, every ASID, nested translations included (SVM TLB_CONTROL=1; always allowed)."""
        self.entries.clear()
        self.psc.clear()
        if self._nested is not None:
            self._nested.flush_all()

    def _flush_asid(self) -> None:
        self.drop(asid=self.asid)
        self.drop_structure_caches(asid=self.asid)

    def mov_cr3(self, value: int, ctl: PagingControl) -> None:
        """MOV to CR3 with source ``value``, CR4 being ``ctl.cr4`` (SDM 4.10.4.1)."""
        if not ctl.cr4 & CR4_PCIDE:
            pcid = 0
        elif value & CR3_NOFLUSH:
            return
        else:
            pcid = value & 0xFFF
        self.drop(asid=self.asid, pcid=pcid, include_global=False)
        self.drop_structure_caches(asid=self.asid, pcid=pcid)

    def mov_cr4(self, old: int, new: int) -> None:
        if (old ^ new) & CR4_FLUSH_ALL:
            self._flush_asid()

    def mov_cr0(self, old: int, new: int) -> None:
        if (old ^ new) & CR0_FLUSH_ALL:
            self._flush_asid()

    def write_efer(self, old: int, new: int) -> None:
        if (old ^ new) & EFER_FLUSH_ALL:
            self._flush_asid()

    def invlpg(self, linear: int, ctl: PagingControl, mode: PagingMode | None = None) -> None:
        """INVLPG: the page's entries of the current PCID and its global entries; every structure-cache entry
        of the current PCID (SDM 4.10.4.1)."""
        pcid = current_pcid(ctl, mode)
        self.drop(asid=self.asid, pcid=pcid, include_global=True, linear=linear)
        self.drop_structure_caches(asid=self.asid, pcid=pcid)

    def invpcid(self, kind: int, pcid: int = 0, linear: int = 0) -> None:
        """INVPCID types 0-3 (SDM Vol. 2A INVPCID; 4.10.4.1)."""
        if kind == 0:  # individual address: non-global, this PCID
            self.drop(asid=self.asid, pcid=pcid, include_global=False, linear=linear)
            self.drop_structure_caches(asid=self.asid, pcid=pcid)
        elif kind == 1:  # single context, non-global
            self.drop(asid=self.asid, pcid=pcid, include_global=False)
            self.drop_structure_caches(asid=self.asid, pcid=pcid)
        elif kind == 2:  # all contexts, global included
            self._flush_asid()
        elif kind == 3:  # all contexts, non-global
            self.drop(asid=self.asid, include_global=False)
            self.drop_structure_caches(asid=self.asid)
        else:
            raise ValueError(f"INVPCID type {kind}")

    def page_fault(self, linear: int, ctl: PagingControl, mode: PagingMode | None = None) -> None:
        """A #PF for ``linear`` drops that page's TLB entries and the structure-cache entries used for it."""
        pcid = current_pcid(ctl, mode)
        self.drop(asid=self.asid, pcid=pcid, include_global=True, linear=linear)
        self.drop_structure_caches(asid=self.asid, pcid=pcid, linear=linear, mode=mode or LEVEL4)

    # -- SVM -----------------------------------------------------------------------
    def switch_asid(self, asid: int) -> None:
        """VMRUN / #VMEXIT: run with another ASID; nothing is invalidated (APM 15.16)."""
        self.asid = asid
        if self._nested is not None:
            self._nested.asid = asid

    def tlb_control(self, code: int, asid: int) -> None:
        """The VMCB TLB_CONTROL field at VMRUN (APM 15.16.1): 0 nothing, 1 all, 3 the ASID, 7 its non-global."""
        if code == TLB_CONTROL_NOTHING:
            return
        if code == TLB_CONTROL_ALL:
            self.flush_all()
            return
        if code not in (TLB_CONTROL_ASID, TLB_CONTROL_ASID_NONGLOBAL):
            raise ValueError(f"reserved TLB_CONTROL value {code}")
        self.drop(asid=asid, include_global=code == TLB_CONTROL_ASID)
        self.drop_structure_caches(asid=asid)
        if self._nested is not None:  # nested translations of the ASID (never global) go too
            self._nested.drop(asid=asid)
            self._nested.drop_structure_caches(asid=asid)

    def invlpga(self, linear: int, asid: int) -> None:
        """INVLPGA: the page's entries (global ones included) of one ASID, and its structure caches.

        ``linear`` is a guest-linear address: nested (guest-physical) translations are not touched."""
        self.drop(asid=asid, linear=linear)
        self.drop_structure_caches(asid=asid)


# -- the CPU's TLB events (spec/isa/system.py) applied to a hardware TLB ----------------------------

def apply_event(tlb: ModelTLB, event: tuple, ctl: PagingControl, mode: PagingMode | None) -> None:
    """Apply one event of ``state.tlb_events`` (see :mod:`spec.isa.system`) to ``tlb``.

    ``ctl``/``mode`` are the paging control after the instruction (MOV CR3 needs
    CR4.PCIDE, INVLPG the current PCID).  ``cr3_keep`` (PCIDE with bit 63 set)
    invalidates nothing (SDM Vol. 3A 4.10.4.1).
    """
    kind = event[0]
    if kind == "cr3":
        tlb.mov_cr3(event[1], ctl)
    elif kind == "invlpg":
        tlb.invlpg(event[1], ctl, mode)
    elif kind == "cr0":
        tlb.mov_cr0(event[1], event[2])
    elif kind == "cr4":
        tlb.mov_cr4(event[1], event[2])
    elif kind == "efer":
        tlb.write_efer(event[1], event[2])
    elif kind != "cr3_keep":
        raise ValueError(f"unknown TLB event {event!r}")


class HardwareTLBEvents:
    """A ``state.tlb_events`` sink: every event the guest's instructions emit is applied to the hardware TLB.

    Installed by :func:`spec.svm.nested.attach_guest_memory` while a guest runs
    with a :class:`ModelTLB`: guest MOV CR3, INVLPG and CR0/CR4/EFER writes that
    execute in hardware (not intercepted) invalidate the guest's entries of the
    current ASID as the rules above say.  Events are not kept; ``forward`` (a
    list that was recording before) still receives them.
    """

    def __init__(self, state: Any, tlb: ModelTLB, forward: list[tuple] | None = None) -> None:
        self.state, self.tlb, self.forward = state, tlb, forward

    def append(self, event: tuple) -> None:
        s = self.state
        ctl = PagingControl(cr0=s.cr0, cr3=s.cr3, cr4=s.cr4, efer=s.efer, maxphyaddr=s.model.maxphyaddr)
        apply_event(self.tlb, event, ctl, paging_mode(s.cr0, s.cr4, s.efer))
        if self.forward is not None:
            self.forward.append(event)
