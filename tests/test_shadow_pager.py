"""The shadow pager's core without the SVM processor: the decision, the tables, the real registers.

The central property (:func:`test_virtual_tlb_agrees_with_the_bare_walk`) simulates
the virtual TLB in software: a guest access is translated by the spec's walker over
the *shadow* tables with the *real* control registers; on a fault the pager decides
(:func:`refvmm.paging.shadow.decide`, fed by the hardware error code through
:func:`~refvmm.paging.shadow.faulting_access`) and fills or reports the guest's fault.
Every access must end as the bare walk over the guest's tables ends -- same physical
address or same #PF error code -- and leave the guest's page tables (A/D flags) byte
for byte as the bare walk leaves them.  Guest entries are random (any rights, A/D,
XD, reserved bits, large pages, not-present levels), as are the accesses (read,
write, fetch at CPL 0 and 3, implicit supervisor) and the control bits (WP, SMEP,
SMAP, NXE, AC).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refvmm.guest_memory import GUEST_BASE, GuestMemory, PageAllocator
from refvmm.paging.shadow import (
    Emulate,
    Fill,
    GuestFault,
    GuestPaging,
    ShadowRights,
    ShadowTables,
    decide,
    faulting_access,
    real_control,
)
from spec.domain.concrete import CONCRETE
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.paging import BITS32, LEVEL4, PAE, Access, PagingMode, walk

R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
PG, PE, WP = 1 << 31, 1, 1 << 16
PSE, PAE_BIT, SMEP, SMAP = 1 << 4, 1 << 5, 1 << 20, 1 << 21
NXE, LME, LMA = 1 << 11, 1 << 8, 1 << 10
ROOT = 0x10000  # guest-physical address of the guest's top table (PAE: the PDPT)
FRAMES = (0x20000, 0x21000, 0x400000)  # guest frames the leaves point to
TABLE_PAGES = tuple(ROOT + PAGE * k for k in range(5))


class Machine:
    """Host memory with guest RAM at GUEST_BASE, an allocator, the guest registers and the shadow tables."""

    def __init__(self, guest: GuestPaging) -> None:
        self.host = PhysicalMemory()
        self.memory = GuestMemory(self.host)
        for gpa in (*TABLE_PAGES, *FRAMES):
            self.memory.add_ram(gpa, PAGE)
        self.alloc = PageAllocator(self.host)
        self.guest = guest
        self.real = real_control(guest)
        self.tables = ShadowTables(self.host, self.alloc.alloc, self.alloc.free, self.real.mode)

    def access(self, linear: int, acc: Access, *, ac: bool = False) -> tuple[str, int]:
        """Translate through the shadow tables, filling on misses: ('ok', gpa) | ('pf', code) | ('emulate', 0)."""
        rctl = self.real.control(self.tables.root, ac=ac, maxphyaddr=48, pdptes=self.tables.pdptes)
        for _ in range(4):
            w = walk(CONCRETE, self.host, self.real.mode, rctl, linear, acc)
            if w.fault is None:
                assert self.memory.host_owned(w.phys & ~0xFFF), "a shadow leaf maps a VMM page"
                return "ok", w.phys - GUEST_BASE
            seen = faulting_access(w.fault, acc.cpl)
            assert (seen.kind, seen.user) == (acc.kind, acc.user)
            d = decide(self.memory.view(), self.guest, linear, seen, ac=ac)
            if isinstance(d, GuestFault):
                return "pf", d.error_code
            if isinstance(d, Emulate):
                return "emulate", 0
            assert isinstance(d, Fill)
            hpa = self.memory.gpa_to_hpa(d.gpa)
            if hpa is None:
                return "hole", d.gpa | linear & 0xFFF  # not RAM: never mapped, the VMM emulates the access
            self.tables.map(d.linear, hpa, d.rights, d.guest_page, d.guest_shift)
        raise AssertionError(f"no progress translating {linear:#x} for {acc}")


def guest_for(mode: PagingMode, *, wp: bool, smep: bool, smap: bool, nxe: bool) -> GuestPaging:
    cr4 = {BITS32: PSE, PAE: PAE_BIT, LEVEL4: PAE_BIT}[mode] | (SMEP if smep else 0) | (SMAP if smap else 0)
    efer = (NXE if nxe and mode is not BITS32 else 0) | (LME | LMA if mode is LEVEL4 else 0)
    return GuestPaging(cr0=PE | PG | (WP if wp else 0), cr3=ROOT, cr4=cr4, efer=efer, maxphyaddr=48)


def entry_values(mode: PagingMode) -> st.SearchStrategy[int]:
    """A paging-structure entry: mostly valid rights combinations, sometimes XD or a reserved bit."""
    low = st.integers(0, 0x7F).map(lambda v: v | 1) | st.integers(0, 0x1FF)
    if mode.entry_bytes == 4:
        return low
    high = st.sampled_from([0, 0, 0, 1 << 63, 1 << 51])
    return st.tuples(low, high).map(lambda t: t[0] | t[1])


@st.composite
def guest_tables(draw: st.DrawFn, mode: PagingMode) -> dict[int, int]:
    """Entry address -> value for the paths of three linear pages (frame bits set by the builder)."""
    tables: dict[int, int] = {}
    eb = mode.entry_bytes
    pages = list(TABLE_PAGES)
    for k, frame in enumerate(FRAMES[:2]):
        linear = 0x40_0000 * k + 0x3000 * (k + 1)
        table = ROOT
        for level in range(mode.levels, 0, -1):
            idx = (linear >> mode.index_shift(level)) & ((1 << mode.index_bits[level - 1]) - 1)
            addr = table + eb * idx
            if mode is PAE and level == 3:
                value = draw(st.sampled_from([1, 1, 1, 0, 1 | 1 << 1]))  # PDPTE: P, sometimes reserved bits
            else:
                value = draw(entry_values(mode))
            nxt = pages[mode.levels - level + 1] if level > 1 else frame
            large = level in mode.large_levels and value & 0x80
            if level > 1 and not large:
                tables[addr] = (value & ~0x80) | nxt
                table = nxt
            else:
                tables[addr] = value | (frame & ~((1 << mode.page_shift(level)) - 1) if large else frame)
                break
    return tables


ACCESSES = [Access(k, c) for k in (R, W, X) for c in (0, 3)] + [Access(R, 3, implicit=True),
                                                                  Access(W, 3, implicit=True)]


@pytest.mark.parametrize("mode", [BITS32, PAE, LEVEL4], ids=lambda m: m.name)
@given(data=st.data())
def test_virtual_tlb_agrees_with_the_bare_walk(mode: PagingMode, data: st.DataObject) -> None:
    tables = data.draw(guest_tables(mode))
    flags = data.draw(st.fixed_dictionaries({k: st.booleans() for k in ("wp", "smep", "smap", "nxe")}))
    guest = guest_for(mode, **flags)
    m = Machine(guest)
    bare = PhysicalMemory()
    for gpa in (*TABLE_PAGES, *FRAMES):
        bare.map_page(gpa)
    for addr, value in tables.items():
        m.memory.write(addr, mode.entry_bytes, value)
        bare.write(addr, mode.entry_bytes, value)
    if mode is PAE:
        pdptes = tuple(bare.read(ROOT + 8 * k, 8) for k in range(4))
        guest = GuestPaging(guest.cr0, guest.cr3, guest.cr4, guest.efer, pdptes, 48)
        m.guest = guest
    steps = data.draw(st.lists(st.tuples(st.sampled_from([0x3000, 0x3FFF, 0x406000, 0x407000]),
                                         st.sampled_from(ACCESSES), st.booleans()), min_size=1, max_size=8))
    for linear, acc, ac in steps:
        w = walk(CONCRETE, bare, mode, guest.control(ac=ac), linear, acc)
        got, value = m.access(linear, acc, ac=ac)
        if got == "emulate":
            # Only a supervisor write the guest allows through CR0.WP = 0: the VMM emulates it (the bare walk here).
            assert w.fault is None and acc.write and not acc.user and not flags["wp"]
            walk(CONCRETE, m.memory.view(), mode, guest.control(ac=ac), linear, acc)
        elif w.fault is not None:
            assert (got, value) == ("pf", w.fault), f"{linear:#x} {acc}: bare #PF {w.fault:#x}, shadow {got} {value:#x}"
        elif got == "hole":
            assert value == w.phys and not m.memory.is_ram(w.phys)
        else:
            assert (got, value) == ("ok", w.phys), f"{linear:#x} {acc}: bare {w.phys:#x}, shadow {got} {value:#x}"
        for gpa in TABLE_PAGES:
            assert m.memory.read_bytes(gpa, PAGE) == bare.read_bytes(gpa, PAGE), f"A/D flags differ in {gpa:#x}"


def test_paging_off_maps_identity_with_every_right() -> None:
    guest = GuestPaging(cr0=PE, cr3=0, cr4=0, efer=0)
    d = decide(PhysicalMemory(), guest, 0x12345, Access(W, 3))
    assert isinstance(d, Fill) and d.gpa == 0x12000 and d.rights == ShadowRights(True, True, True)
    real = real_control(guest)
    assert real.cr0 & PG and real.cr0 & WP and real.cr4 & PAE_BIT and real.efer & NXE and real.mode is PAE
    assert not real.cr4 & (SMEP | SMAP)  # no paging, no SMEP/SMAP: every shadow leaf is a user page


def test_real_registers_follow_the_guest_mode() -> None:
    long = real_control(GuestPaging(cr0=PE | PG | WP, cr3=0, cr4=PAE_BIT | SMEP | (1 << 7), efer=LME | LMA))
    assert long.mode is LEVEL4 and long.efer & (LME | LMA) == LME | LMA and long.cr4 & SMEP
    assert not long.cr4 & (1 << 7)  # PGE: shadow leaves are never global
    legacy = real_control(GuestPaging(cr0=PE | PG, cr3=0, cr4=PSE, efer=LME))  # LME set, paging not long
    assert legacy.mode is PAE and not legacy.efer & (LME | LMA) and legacy.cr0 & WP and not legacy.cr4 & PSE


def test_read_fill_is_read_only_until_the_guest_leaf_is_dirty() -> None:
    guest = guest_for(LEVEL4, wp=True, smep=False, smap=False, nxe=True)
    m = Machine(guest)
    # PML4 -> PDPT -> PD -> PT, the page at 0x3000 -> frame 0x20000, writable, clean.
    for table in (ROOT, ROOT + PAGE, ROOT + 2 * PAGE):
        m.memory.write(table, 8, (table + PAGE) | 0x7)
    pte = ROOT + 3 * PAGE + 8 * 3
    m.memory.write(pte, 8, FRAMES[0] | 0x7)
    assert m.access(0x3000, Access(R, 0)) == ("ok", FRAMES[0])
    assert m.tables.lookup(0x3000).rights.writable is False
    assert m.memory.read(pte, 8) & 0x60 == 0x20  # A set, D clear
    assert m.access(0x3004, Access(W, 0)) == ("ok", FRAMES[0] + 4)
    assert m.memory.read(pte, 8) & 0x60 == 0x60  # the write's walk set D
    assert m.tables.lookup(0x3000).rights.writable is True


def test_tables_invalidate_every_piece_of_a_large_guest_page_and_free_pages() -> None:
    host = PhysicalMemory()
    alloc = PageAllocator(host)
    t = ShadowTables(host, alloc.alloc, alloc.free, LEVEL4)
    rights = ShadowRights(True, False, True)
    for k in range(3):
        t.map(0x20_0000 + k * PAGE, GUEST_BASE + k * PAGE, rights, 0x20_0000, 21)
    t.map(0x40_0000, GUEST_BASE, rights, 0x40_0000, 12)
    assert sorted(t.invalidate(0x3F_FFFF)) == [0x20_0000, 0x20_1000, 0x20_2000]
    assert t.lookup(0x40_0000) is not None
    used = len(alloc.allocated)
    t.clear()
    assert not t.leaves and len(alloc.allocated) == 1 and used > 1  # only the root is left
    pae = ShadowTables(host, alloc.alloc, alloc.free, PAE)
    pdptes = [host.read(pae.root + 8 * k, 8) for k in range(4)]
    pae.map(0xC000_1000, GUEST_BASE, rights, 0xC000_1000, 12)
    pae.clear()
    assert [host.read(pae.root + 8 * k, 8) for k in range(4)] == pdptes  # PDPTE registers never go stale


def test_five_level_guest_paging_fails_stop() -> None:
    """The shadow tables are 4-level: a guest with CR4.LA57 stops the VM with a reason at the first miss."""
    from refvmm.config import MemoryConfig, VMConfig
    from refvmm.vm import VM
    from spec.machine import flat_machine

    st = flat_machine("long64", b"\x90\xf4")
    st.cr4 |= 1 << 12  # LA57 (the tables are not 5-level, but the guest never gets to use them)
    vm = VM(VMConfig(paging="shadow", memory=MemoryConfig(size=0), devices=[]), entry=st)
    result = vm.run(10)
    assert result.reason == "error" and "5-level" in result.detail
