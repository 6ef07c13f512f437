"""The TLB rules of spec/tlb.py (SDM Vol. 3A 4.10; AMD APM Vol. 2 5.5, 15.16).

Setting: 4-level paging; CR3 -> PML4 -> PDPT -> PD; PD[2] -> a page table
mapping eight 4 KiB pages at 0x400000 + k*4K; PD[3] a 2 MiB page at 0x600000.
A stale translation is made by rewriting page-table entries without
invalidating; after an event, every page the event must invalidate is
translated again and compared with a fresh walk over the current memory
("no stale translation"), and every page it need not invalidate is checked to
still give the cached (old) translation -- which shows the TLB really caches
and that global entries survive CR3 writes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spec.domain.concrete import CONCRETE as D
from spec.memory import AccessKind, PhysicalMemory
from spec.paging import LEVEL4, Access, PagingControl, walk
from spec.tlb import CR3_NOFLUSH, CR4_PCIDE, ModelTLB, Translation, may_cache, permits

P, RW, US, A, DIRTY, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
PG, PAE, PGE, LME, WP = 1 << 31, 1 << 5, 1 << 7, 1 << 8, 1 << 16
SMEP, SMAP, PKE, NXE = 1 << 20, 1 << 21, 1 << 22, 1 << 11
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
PML4, PDPT, PD, PT, PT2 = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
PAGES = [0x40_0000 + k * 0x1000 for k in range(8)]
LARGE = 0x60_0000
ALL = [*PAGES, LARGE + 0x1234]  # index 8: an address in the 2 MiB page


def frame(k: int, gen: int = 0) -> int:
    """Physical frame of page k in mapping generation ``gen``."""
    return (0x0100_0000 if k < 8 else 0x4000_0000) + (k << (12 if k < 8 else 21)) + gen * 0x0800_0000


def build(global_mask: int = 0, flags: int = P | RW | US) -> PhysicalMemory:
    mem = PhysicalMemory()
    for a in (PML4, PDPT, PD, PT, PT2):
        mem.map_page(a)
    mem.write(PML4, 8, PDPT | P | RW | US)
    mem.write(PDPT, 8, PD | P | RW | US)
    mem.write(PD + 16, 8, PT | P | RW | US)
    for k in range(8):
        mem.write(PT + 8 * k, 8, frame(k) | flags | (G if global_mask >> k & 1 else 0))
        mem.write(PT2 + 8 * k, 8, frame(k, 2) | flags)  # an alternative page table
    mem.write(PD + 24, 8, frame(8) | flags | PS | (G if global_mask >> 8 & 1 else 0))
    return mem


def remap(mem: PhysicalMemory, k: int, gen: int = 1) -> None:
    """Point page k at another frame, keeping its other bits -- without any invalidation."""
    slot = PT + 8 * k if k < 8 else PD + 24
    old = mem.read(slot, 8)
    size_mask = ((1 << 12) - 1) if k < 8 else ((1 << 21) - 1)
    mem.write(slot, 8, (old & (size_mask | (0xFFF << 52))) | frame(k, gen))


def control(pcid: int = 0, *, pcide: bool = False, cr4: int = 0, **kw: object) -> PagingControl:
    return PagingControl(cr0=PG | WP, cr3=PML4 | pcid, cr4=PAE | PGE | (CR4_PCIDE if pcide else 0) | cr4,
                         efer=LME | NXE, **kw)  # type: ignore[arg-type]


READ0 = Access(R)


def fresh(mem: PhysicalMemory, ctl: PagingControl, linear: int, acc: Access = READ0) -> int | None:
    """The translation a processor without TLBs would give now (walked on a copy: no A/D side effects)."""
    w = walk(D, mem.copy(), LEVEL4, ctl, linear, acc)
    return w.phys if w.ok else None


def translate(tlb: ModelTLB, mem: PhysicalMemory, ctl: PagingControl, linear: int,
              acc: Access = READ0) -> Translation:
    return tlb.translate(D, mem, LEVEL4, ctl, linear, acc)


def fill_all(tlb: ModelTLB, mem: PhysicalMemory, ctl: PagingControl) -> None:
    for a in ALL:
        t = translate(tlb, mem, ctl, a)
        assert t.fault is None and not t.hit
        assert translate(tlb, mem, ctl, a).hit


# ---------------------------------------------------------------------------
# What may be cached (SDM 4.10.2)
# ---------------------------------------------------------------------------

def test_may_cache_fields() -> None:
    mem = build(global_mask=0b1)
    ctl = control()
    w = walk(D, mem, LEVEL4, ctl, PAGES[0] + 0x10, Access(R))
    e = may_cache(w, PAGES[0] + 0x10, Access(R), ctl)
    assert e is not None and e.frame == frame(0) and e.page_shift == 12 and e.vpn == PAGES[0] >> 12
    assert e.user and e.writable and e.executable and e.global_page and not e.dirty and e.pcid == 0
    # Without CR4.PGE the G flag does not make the entry global (4.10.2.4).
    ctl_nopge = replace(ctl, cr4=ctl.cr4 & ~PGE)
    assert not may_cache(walk(D, mem, LEVEL4, ctl_nopge, PAGES[0], Access(R)), PAGES[0], Access(R),
                         ctl_nopge).global_page  # type: ignore[union-attr]
    # A write sets D: the entry knows the page is dirty.
    w = walk(D, mem, LEVEL4, ctl, PAGES[1], Access(W))
    assert may_cache(w, PAGES[1], Access(W), ctl).dirty  # type: ignore[union-attr]
    # A later read of that page sees D=1 in the leaf.
    w = walk(D, mem, LEVEL4, ctl, PAGES[1], Access(R))
    assert may_cache(w, PAGES[1], Access(R), ctl).dirty  # type: ignore[union-attr]
    # The 2 MiB page: one entry for the whole page; its PCID comes from CR3 with PCIDE.
    ctl_p = control(5, pcide=True)
    w = walk(D, mem, LEVEL4, ctl_p, LARGE + 0x1234, Access(R))
    e = may_cache(w, LARGE + 0x1234, Access(R), ctl_p)
    assert e is not None and e.page_shift == 21 and e.frame == frame(8) and e.pcid == 5 and e.covers(LARGE + 0x1F_FFFF)


def test_nothing_cached_from_faults() -> None:
    """Not-present, reserved-bit and rights faults leave no TLB entry (4.10.2.3: no translation, no entry)."""
    mem = build()
    ctl = control()
    mem.write(PT, 8, 0)  # page 0 not present
    mem.write(PT + 8, 8, frame(1) | P | RW | US | (1 << 50))  # page 1: reserved bit (MAXPHYADDR 48)
    mem.write(PT + 16, 8, frame(2) | P | US)  # page 2: read-only
    tlb = ModelTLB()
    for k, acc in ((0, Access(R)), (1, Access(R)), (2, Access(W))):
        w = walk(D, mem, LEVEL4, ctl, PAGES[k], acc)
        assert w.fault is not None and may_cache(w, PAGES[k], acc, ctl) is None
        assert translate(tlb, mem, ctl, PAGES[k], acc).fault == w.fault
    assert not tlb.entries and not tlb.psc
    # Making page 0 present needs no invalidation: the next access sees it (4.10.4.3).
    mem.write(PT, 8, frame(0) | P | RW | US)
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0)


# ---------------------------------------------------------------------------
# Rights are re-checked at every use; a refused access re-walks (4.10.2.3, 4.10.4.3)
# ---------------------------------------------------------------------------

def test_cpl_change_rechecks_rights() -> None:
    mem = build()
    mem.write(PT, 8, frame(0) | P | RW)  # supervisor page
    ctl = control()
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0)
    assert tlb.lookup(PAGES[0], Access(R, 0), ctl) is not None
    assert tlb.lookup(PAGES[0], Access(R, 3), ctl) is None
    t = translate(tlb, mem, ctl, PAGES[0], Access(R, 3))
    assert t.fault == P | 4 and not t.hit
    assert tlb.lookup(PAGES[0], Access(R, 0), ctl) is None  # the #PF dropped the page's entry (4.10.4.1)


def test_smap_ac_and_pkru_are_rechecked() -> None:
    """RFLAGS.AC and PKRU changes invalidate nothing, so the cached rights are re-evaluated with them."""
    mem = build()
    mem.write(PT, 8, frame(0) | P | RW | US | (1 << 59))  # user page, protection key 1
    ctl = control(cr4=SMAP | PKE, ac=True)
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0)  # explicit supervisor read, AC=1
    assert tlb.lookup(PAGES[0], Access(R), replace(ctl, ac=False)) is None
    assert translate(tlb, mem, replace(ctl, ac=False), PAGES[0]).fault == P
    assert translate(tlb, mem, ctl, PAGES[0], Access(R, 3)).phys == frame(0)
    assert tlb.lookup(PAGES[0], Access(R, 3), replace(ctl, pkru=0b0100)) is None  # AD1
    assert translate(tlb, mem, replace(ctl, pkru=0b0100), PAGES[0], Access(R, 3)).fault == P | 4 | 32


def test_write_needs_known_dirty() -> None:
    """A write through an entry cached with D=0 walks again and sets D in memory (4.8)."""
    mem = build()
    ctl = control()
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, PAGES[3]).phys == frame(3)
    assert not mem.read(PT + 24, 8) & DIRTY
    assert tlb.lookup(PAGES[3], Access(W), ctl) is None
    t = translate(tlb, mem, ctl, PAGES[3], Access(W))
    assert not t.hit and t.phys == frame(3) and mem.read(PT + 24, 8) & DIRTY
    assert translate(tlb, mem, ctl, PAGES[3], Access(W)).hit


def test_relaxed_rights_need_no_invalidation() -> None:
    """R/W 0 -> 1 without INVLPG: the stale read-only entry does not fault a write, the walk allows it."""
    mem = build(flags=P | US)
    ctl = control()
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, PAGES[0], Access(R, 3)).phys == frame(0)
    mem.write(PT, 8, frame(0) | P | RW | US)
    t = translate(tlb, mem, ctl, PAGES[0], Access(W, 3))
    assert t.fault is None and t.phys == frame(0) and not t.hit


def test_paging_structure_cache_is_used_and_dropped_by_invlpg() -> None:
    """A PDE-cache entry may keep serving a changed PDE for pages never cached in the TLB (4.10.3); INVLPG of
    any address drops every structure-cache entry of the current PCID (4.10.4.1)."""
    mem = build()
    ctl = control()
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0)
    mem.write(PD + 16, 8, PT2 | P | RW | US)  # switch the page table under the cached PDE
    assert translate(tlb, mem, ctl, PAGES[5]).phys == frame(5)  # stale PDE from the structure cache
    assert fresh(mem, ctl, PAGES[5]) == frame(5, 2)
    tlb.invlpg(LARGE, ctl)  # an unrelated page
    assert translate(tlb, mem, ctl, PAGES[6]).phys == frame(6, 2)
    assert translate(tlb, mem, ctl, PAGES[5]).phys == frame(5)  # still in the TLB: INVLPG was for another page


# ---------------------------------------------------------------------------
# After each invalidating event: no stale translation for the pages it affects
# ---------------------------------------------------------------------------

ASID = 1


def event_cr3(tlb: ModelTLB, ctl: PagingControl, target: int) -> None:
    tlb.mov_cr3(ctl.cr3, ctl)


def event_cr3_noflush(tlb: ModelTLB, ctl: PagingControl, target: int) -> None:
    tlb.mov_cr3(ctl.cr3 | CR3_NOFLUSH, ctl)


def toggle_cr4(bit: int):  # type: ignore[no-untyped-def]
    def ev(tlb: ModelTLB, ctl: PagingControl, target: int) -> None:
        tlb.mov_cr4(ctl.cr4, ctl.cr4 ^ bit)
        tlb.mov_cr4(ctl.cr4 ^ bit, ctl.cr4)
    return ev


def event_wp(tlb: ModelTLB, ctl: PagingControl, target: int) -> None:
    tlb.mov_cr0(ctl.cr0, ctl.cr0 ^ WP)
    tlb.mov_cr0(ctl.cr0 ^ WP, ctl.cr0)


def event_nxe(tlb: ModelTLB, ctl: PagingControl, target: int) -> None:
    tlb.write_efer(ctl.efer, ctl.efer ^ NXE)
    tlb.write_efer(ctl.efer ^ NXE, ctl.efer)


# event -> (what it does, whether page k must be fresh afterwards: f(is_target, is_global, pcide))
EVENTS = {
    "mov-cr3": (event_cr3, lambda t, g, pcide: not g),
    # Bit 63 keeps the TLB only with PCIDE=1 (with PCIDE=0 the bit is reserved; the model then just flushes).
    "mov-cr3-noflush": (event_cr3_noflush, lambda t, g, pcide: not pcide and not g),
    "cr4-pge": (toggle_cr4(PGE), lambda t, g, pcide: True),
    "cr4-smep": (toggle_cr4(SMEP), lambda t, g, pcide: True),
    "cr4-smap": (toggle_cr4(SMAP), lambda t, g, pcide: True),
    "cr4-pke": (toggle_cr4(PKE), lambda t, g, pcide: True),
    "cr0-wp": (event_wp, lambda t, g, pcide: True),
    "efer-nxe": (event_nxe, lambda t, g, pcide: True),
    "invlpg": (lambda tlb, ctl, a: tlb.invlpg(a, ctl), lambda t, g, pcide: t),
    "invpcid-address": (lambda tlb, ctl, a: tlb.invpcid(0, ctl.cr3 & 0xFFF, a), lambda t, g, pcide: t and not g),
    "invpcid-context": (lambda tlb, ctl, a: tlb.invpcid(1, ctl.cr3 & 0xFFF), lambda t, g, pcide: not g),
    "invpcid-all": (lambda tlb, ctl, a: tlb.invpcid(2), lambda t, g, pcide: True),
    "invpcid-all-nonglobal": (lambda tlb, ctl, a: tlb.invpcid(3), lambda t, g, pcide: not g),
    "page-fault": (lambda tlb, ctl, a: tlb.page_fault(a, ctl), lambda t, g, pcide: t),
    "tlb-control-all": (lambda tlb, ctl, a: tlb.tlb_control(1, 7), lambda t, g, pcide: True),
    "tlb-control-asid": (lambda tlb, ctl, a: tlb.tlb_control(3, ASID), lambda t, g, pcide: True),
    "tlb-control-nonglobal": (lambda tlb, ctl, a: tlb.tlb_control(7, ASID), lambda t, g, pcide: not g),
    "tlb-control-other-asid": (lambda tlb, ctl, a: tlb.tlb_control(3, ASID + 1), lambda t, g, pcide: False),
    "invlpga": (lambda tlb, ctl, a: tlb.invlpga(a, ASID), lambda t, g, pcide: t),
    "invlpga-other-asid": (lambda tlb, ctl, a: tlb.invlpga(a, ASID + 1), lambda t, g, pcide: False),
}


@settings(max_examples=120, deadline=None)
@given(event=st.sampled_from(sorted(EVENTS)), global_mask=st.integers(0, 511), moved=st.integers(0, 511),
       target=st.integers(0, 8), offset=st.integers(0, 0xFFF), new_table=st.booleans(), pcid=st.integers(0, 3))
def test_no_stale_translation_after_events(event: str, global_mask: int, moved: int, target: int, offset: int,
                                           new_table: bool, pcid: int) -> None:
    do, must_be_fresh = EVENTS[event]
    mem = build(global_mask)
    ctl = control(pcid, pcide=pcid != 0)
    tlb = ModelTLB(asid=ASID)
    fill_all(tlb, mem, ctl)
    cached = [translate(tlb, mem, ctl, a).phys for a in ALL]
    for k in range(9):
        if moved >> k & 1:
            remap(mem, k)
    if new_table:  # change an upper level too: stale structure-cache entries must go with the TLB entries
        mem.write(PD + 16, 8, PT2 | P | RW | US)
    do(tlb, ctl, ALL[target] + (offset if target < 8 else 0))
    for k, a in enumerate(ALL):
        got = translate(tlb, mem, ctl, a).phys
        if must_be_fresh(k == target, bool(global_mask >> k & 1), pcid != 0):
            assert got == fresh(mem, ctl, a), (event, k)
        else:
            assert got == cached[k], (event, k)  # kept: the model caches all it may (globals survive CR3)


def test_global_survives_cr3_but_not_invlpg_or_pge() -> None:
    mem = build(global_mask=0b11)
    ctl = control()
    tlb = ModelTLB()
    fill_all(tlb, mem, ctl)
    for k in range(3):
        remap(mem, k)
    tlb.mov_cr3(ctl.cr3, ctl)
    assert [translate(tlb, mem, ctl, PAGES[k]).phys for k in range(3)] == [frame(0), frame(1), frame(2, 1)]
    tlb.invlpg(PAGES[0], ctl)
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0, 1)
    assert translate(tlb, mem, ctl, PAGES[1]).phys == frame(1)
    tlb.mov_cr4(ctl.cr4, ctl.cr4 & ~PGE)
    assert translate(tlb, mem, ctl, PAGES[1]).phys == frame(1, 1)


def test_large_page_invalidated_by_any_address_in_it() -> None:
    mem = build()
    ctl = control()
    tlb = ModelTLB()
    assert translate(tlb, mem, ctl, LARGE).phys == frame(8)
    remap(mem, 8)
    assert translate(tlb, mem, ctl, LARGE + 0x1F_F000).phys == frame(8) + 0x1F_F000  # one entry, whole page
    tlb.invlpg(LARGE + 0x1_2345, ctl)
    assert translate(tlb, mem, ctl, LARGE).phys == frame(8, 1)


def test_pcid_isolation_and_retention() -> None:
    """With PCIDE=1 entries belong to a PCID: another PCID never uses them; MOV CR3 with bit 63 keeps them."""
    mem = build()
    c1, c2 = control(1, pcide=True), control(2, pcide=True)
    tlb = ModelTLB()
    fill_all(tlb, mem, c1)
    remap(mem, 0)
    tlb.mov_cr3(c2.cr3, c2)  # switch to PCID 2, flushing PCID 2 only
    assert translate(tlb, mem, c2, PAGES[0]).phys == frame(0, 1)  # PCID 1's stale entry is not used
    tlb.mov_cr3(c1.cr3 | CR3_NOFLUSH, c1)  # back to PCID 1 without flushing
    assert translate(tlb, mem, c1, PAGES[0]).phys == frame(0)  # retained (allowed) stale translation
    tlb.mov_cr3(c1.cr3, c1)
    assert translate(tlb, mem, c1, PAGES[0]).phys == frame(0, 1)


@pytest.mark.parametrize("code", [1, 3, 7])
def test_tlb_control_values(code: int) -> None:
    mem = build(global_mask=0b1)
    ctl = control()
    tlb = ModelTLB(asid=ASID)
    fill_all(tlb, mem, ctl)
    remap(mem, 0)
    remap(mem, 1)
    tlb.tlb_control(code, ASID)
    got = [translate(tlb, mem, ctl, PAGES[k]).phys for k in (0, 1)]
    assert got == [frame(0) if code == 7 else frame(0, 1), frame(1, 1)]
    with pytest.raises(ValueError):
        tlb.tlb_control(2, ASID)


# ---------------------------------------------------------------------------
# ASIDs: entries of another ASID are never returned
# ---------------------------------------------------------------------------

class AsidMachine(RuleBasedStateMachine):
    """Random sequences of ASID switches, PCID switches, accesses and remappings.

    Invariant: every translation the TLB returns comes from an entry of the current ASID and of the current
    PCID (or global), and a page remapped since the current (ASID, PCID) last cached it -- without an
    invalidation of that context -- is the only way a result can differ from a fresh walk.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mem = build(global_mask=0b1000_0001)
        self.tlb = ModelTLB(asid=1)
        self.pcid = 0
        self.gen = [0] * 9
        # (asid, pcid or "G", page) -> generation cached; what a stale answer may legally be.
        self.cached: dict[tuple[int, object, int], int] = {}

    def ctl(self) -> PagingControl:
        return control(self.pcid, pcide=True)

    @rule(asid=st.integers(1, 3))
    def switch_asid(self, asid: int) -> None:
        self.tlb.switch_asid(asid)

    @rule(pcid=st.integers(0, 2), noflush=st.booleans())
    def mov_cr3(self, pcid: int, noflush: bool) -> None:
        self.pcid = pcid
        self.tlb.mov_cr3(self.ctl().cr3 | (CR3_NOFLUSH if noflush else 0), self.ctl())
        if not noflush:
            for key in [k for k in self.cached if k[0] == self.tlb.asid and k[1] == pcid]:
                del self.cached[key]

    @rule(k=st.integers(0, 8))
    def remap(self, k: int) -> None:
        self.gen[k] += 1
        remap(self.mem, k, self.gen[k] % 4)

    @rule(k=st.integers(0, 8))
    def access(self, k: int) -> None:
        t = translate(self.tlb, self.mem, self.ctl(), ALL[k])
        assert t.fault is None
        if t.hit:
            e = t.entry
            assert e is not None and e.asid == self.tlb.asid
            assert e.global_page or e.pcid == self.pcid
            tag = "G" if e.global_page else self.pcid
            assert t.phys == e.physical(ALL[k])
            assert (self.tlb.asid, tag, k) in self.cached
            assert self.cached[(self.tlb.asid, tag, k)] % 4 == (t.phys - frame(k)) // 0x0800_0000 % 4
        else:
            assert t.phys == fresh(self.mem, self.ctl(), ALL[k])
            tag = "G" if t.entry is not None and t.entry.global_page else self.pcid
            self.cached[(self.tlb.asid, tag, k)] = self.gen[k]

    @precondition(lambda self: True)
    @invariant()
    def entries_tagged(self) -> None:
        for (asid, tag, _, _), e in self.tlb.entries.items():
            assert e.asid == asid and (tag == -1) == e.global_page


TestAsidMachine = AsidMachine.TestCase
TestAsidMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_other_asid_never_used() -> None:
    mem = build(global_mask=0b1)
    ctl = control()
    tlb = ModelTLB(asid=1)
    fill_all(tlb, mem, ctl)
    remap(mem, 0)
    tlb.switch_asid(2)
    t = translate(tlb, mem, ctl, PAGES[0])
    assert not t.hit and t.phys == frame(0, 1)  # the global entry of ASID 1 is not visible to ASID 2
    tlb.switch_asid(1)
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0)  # switching ASIDs flushes nothing
    tlb.invlpga(PAGES[0], 1)
    assert translate(tlb, mem, ctl, PAGES[0]).phys == frame(0, 1)


def test_permits_matches_walk_rights() -> None:
    """The re-check of a cached entry uses the walker's own rule function: spot checks."""
    mem = build(flags=P | US)
    ctl = control()
    w = walk(D, mem, LEVEL4, ctl, PAGES[0], Access(R, 3))
    e = may_cache(w, PAGES[0], Access(R, 3), ctl)
    assert e is not None
    assert permits(e, Access(R, 3), ctl) and not permits(e, Access(W, 3), ctl)
    assert not permits(e, Access(X, 0), replace(ctl, cr4=ctl.cr4 | SMEP))
    assert permits(e, Access(X, 0), ctl)
