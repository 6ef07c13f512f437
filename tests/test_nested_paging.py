"""Nested paging in the spec (spec/svm/nested.py; AMD APM Vol. 2 15.25).

The central property: a guest running under nested paging with an identity-like
nested map (gPA -> GUEST_BASE + gPA) computes exactly what the bare spec computes
with the guest's memory at gPA -- values read, #PF error codes and CR2, and every
byte of guest memory afterwards, the accessed/dirty bits of the guest's own page
tables included.  Hypothesis draws the guest's paging mode (32-bit, PAE, 4-level),
control bits, page tables (random flags, large pages, reserved bits, shared
tables) and a sequence of accesses (sizes, page-crossing offsets, kinds, CPL),
with page-table edits followed by the INVLPGs a TLB-correct guest executes.  The
same property holds over host memory without nested paging (the shadow setting)
and without a TLB.

Then the #NPF error codes (EXITINFO1 P/RW/US/RSV/ID + bit 32 final translation /
bit 33 guest page-table access, EXITINFO2 = the guest-physical address), the fault
order of the two-dimensional walk, nested A/D bits, PAE PDPTE loads through the
nested tables, and the CPU path (an NPF rolls the instruction back).

Helpers here (``HostTables``, ``GuestSetup``) are shared with tests/test_mmu_tlb.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.cpu import SpecCPU
from spec.domain.concrete import CONCRETE
from spec.faults import Fault, Vector
from spec.machine import CODE, flat_machine
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.mmu import MMU, GuestMMU
from spec.paging import BITS32, LEVEL4, PAE, PagingControl, PagingMode
from spec.state import CR0_PE, CR0_PG, CR0_WP, EFER_LMA, EFER_LME, EFER_NXE, MachineState
from spec.svm.exitcodes import NPF_FINAL_TRANSLATION, NPF_GUEST_PAGE_TABLE, ExitCode
from spec.svm.intercepts import VMExit
from spec.svm.nested import (
    NestedMemory,
    NestedPageFault,
    attach_guest_memory,
    detach_guest_memory,
    load_guest_pdptes,
)
from spec.tlb import HardwareTLBEvents, ModelTLB

R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
P, RW, US, PWT, A, DIRTY, PS, G = 1, 2, 4, 8, 0x20, 0x40, 0x80, 0x100
XD = 1 << 63
CR4_PSE, CR4_PAE, CR4_PGE, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 7, 1 << 20, 1 << 21
NPF_P, NPF_RW, NPF_US, NPF_RSV, NPF_ID = 1, 2, 4, 8, 16

GUEST_BASE = 0x1_0000_0000
HOST_TABLES = 0x20_0000  # host pages for the nested tables (below guest RAM)
HOST_CTL = PagingControl(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=0, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NXE)
SMALL_LIMIT = 0x20_0000  # nested 4 KiB pages below 2 MiB, 2 MiB pages above
NESTED_LIMIT = 1 << 32  # the identity-like nested map covers guest-physical 0 .. 4 GiB
ASID = 1


class HostTables:
    """4-level nested tables in host memory, built page by page from a bump allocator (test-side builder)."""

    def __init__(self, host: PhysicalMemory, base: int = HOST_TABLES) -> None:
        self.host, self.next = host, base
        self.root = self.alloc()

    def alloc(self) -> int:
        a = self.next
        self.next += PAGE
        self.host.map_page(a)
        return a

    def slot(self, gpa: int, level: int, *, create: bool = True) -> int:
        """Host address of the nested entry for ``gpa`` at ``level`` (4 = PML4E .. 1 = PTE)."""
        table = self.root
        for lv in range(4, level, -1):
            addr = table + 8 * ((gpa >> (12 + 9 * (lv - 1))) & 0x1FF)
            e = self.host.read(addr, 8)
            if not e & P:
                assert create, f"no level-{lv} nested entry for {gpa:#x}"
                e = self.alloc() | P | RW | US
                self.host.write(addr, 8, e)
            table = e & 0xF_FFFF_FFFF_F000
        return table + 8 * ((gpa >> (12 + 9 * (level - 1))) & 0x1FF)

    def map(self, gpa: int, hpa: int, flags: int = P | RW | US, *, large: bool = False) -> None:
        self.host.write(self.slot(gpa, 2 if large else 1), 8, hpa | flags | (PS if large else 0))

    def entry(self, gpa: int, level: int) -> int:
        return self.host.read(self.slot(gpa, level, create=False), 8)

    def set_entry(self, gpa: int, level: int, value: int) -> None:
        self.host.write(self.slot(gpa, level, create=False), 8, value)


def identity_like(host: PhysicalMemory) -> HostTables:
    """gPA -> GUEST_BASE + gPA for 0 .. 4 GiB: 4 KiB nested pages below 2 MiB, 2 MiB pages above."""
    t = HostTables(host)
    for gpa in range(0, SMALL_LIMIT, PAGE):
        t.map(gpa, GUEST_BASE + gpa)
    for gpa in range(SMALL_LIMIT, NESTED_LIMIT, 1 << 21):
        t.map(gpa, GUEST_BASE + gpa, large=True)
    return t


def host_copy(guest: PhysicalMemory, host: PhysicalMemory) -> None:
    """Place the guest's RAM pages at GUEST_BASE + gPA in host memory."""
    for gpn, page in guest.pages.items():
        host.map_page(GUEST_BASE + (gpn << 12), bytes(page))


def guest_pages_of(host: PhysicalMemory, gpns: Any) -> dict[int, bytes]:
    return {gpn: bytes(host.pages[(GUEST_BASE >> 12) + gpn]) for gpn in gpns}


@dataclass
class GuestSetup:
    """One guest two ways: the bare spec over ``bare`` (gPA = physical), and in guest mode over ``host``."""

    bare: MachineState
    guest: MachineState
    host: PhysicalMemory
    tables: HostTables | None
    tlb: ModelTLB | None
    nested: bool
    gpns: list[int] = field(default_factory=list)

    def guest_memory(self) -> dict[int, bytes]:
        if self.nested:
            return guest_pages_of(self.host, self.gpns)
        return {gpn: bytes(self.host.pages[gpn]) for gpn in self.gpns}

    def bare_memory(self) -> dict[int, bytes]:
        return {gpn: bytes(self.bare.mem.phys.pages[gpn]) for gpn in self.gpns}


def make_setup(guest_phys: PhysicalMemory, *, cr0: int, cr3: int, cr4: int, efer: int, nested: bool = True,
               tlb: bool = True, rflags_sys: int | None = None) -> GuestSetup:
    """The bare machine over ``guest_phys`` and the guest attached to a copy (nested: at GUEST_BASE + gPA)."""
    gpns = sorted(guest_phys.pages)
    host = PhysicalMemory()
    tables = None
    if nested:
        host_copy(guest_phys, host)
        tables = identity_like(host)
    else:
        host = guest_phys.copy()
    states = []
    for phys in (guest_phys, PhysicalMemory()):
        s = MachineState.concrete(phys)
        s.cr0, s.cr3, s.cr4, s.efer = cr0, cr3, cr4, efer
        if rflags_sys is not None:
            s.rflags_sys = rflags_sys
        states.append(s)
    bare, guest = states
    load_guest_pdptes(bare)
    hw = ModelTLB() if tlb else None
    attach_guest_memory(guest, host, np_enable=nested, ncr3=tables.root if tables else 0, host_ctl=HOST_CTL,
                        tlb=hw, asid=ASID)
    return GuestSetup(bare, guest, host, tables, hw, nested, gpns)


def outcome(fn: Any) -> tuple:
    try:
        return ("ok", fn())
    except Fault as f:
        return ("fault", int(f.vector), f.error_code, f.cr2)
    except NestedPageFault as e:
        return ("npf", e.info1, e.info2)


# ---------------------------------------------------------------------------
# Random guest page tables
# ---------------------------------------------------------------------------

GUEST_PAGES = 48  # guest RAM: gPA 0 .. 0x30000
TABLE_GPA = {5: 0x5000, 4: 0x4000, 3: 0x3000, 2: 0x2000, 1: 0x1000}  # one table per level (shared by all paths)
PAE_PDPT = 0x3000


@dataclass(frozen=True)
class PathSpec:
    """The entries on the path of one linear address: per level, flags and (for the leaf) the frame."""

    indices: tuple[int, ...]  # per level, top first
    flags: tuple[int, ...]  # per level, top first
    leaf_level: int
    frame: int


def _mode_of(name: str) -> PagingMode:
    return {"32": BITS32, "pae": PAE, "4l": LEVEL4}[name]


def linear_of(mode: PagingMode, indices: tuple[int, ...]) -> int:
    lin = 0
    for level, idx in zip(range(mode.levels, 0, -1), indices):
        lin |= idx << mode.index_shift(level)
    return lin


@st.composite
def entry_flags(draw: Any, mode: PagingMode, level: int, leaf: bool) -> int:
    if mode is PAE and level == 3:  # a PDPTE register: P, PWT/PCD; rarely a reserved bit
        f = P if draw(st.integers(0, 9)) else 0
        return f | (draw(st.sampled_from([0, 0, 0, 2, 1 << 55])) if f else 0)
    f = P if draw(st.integers(0, 11)) else 0
    f |= draw(st.sampled_from([RW | US] * 5 + [RW, US, 0]))
    f |= draw(st.sampled_from([0, A, A | DIRTY, DIRTY])) | draw(st.sampled_from([0, 0, PWT]))
    if leaf:
        f |= draw(st.sampled_from([0, 0, G]))
    if mode.entry_bytes == 8:
        f |= draw(st.sampled_from([0, 0, 0, XD]))
        f |= draw(st.sampled_from([0] * 12 + [1 << 51]))  # reserved (MAXPHYADDR 48)
    return f


@st.composite
def path_specs(draw: Any, mode: PagingMode) -> PathSpec:
    levels = mode.levels
    indices = []
    for level in range(levels, 0, -1):
        bits = mode.index_bits[level - 1]
        hi = (1 << bits) - 1
        if mode is LEVEL4 and level == 4:
            hi = 255  # canonical lower half
        indices.append(draw(st.sampled_from([0, 1, 2, 3, hi]) | st.integers(0, hi)))
    large_levels = sorted(mode.large_levels)
    leaf_level = draw(st.sampled_from([1, 1, 1, *large_levels]))
    flags = [draw(entry_flags(mode, lv, lv == leaf_level)) for lv in range(levels, leaf_level - 1, -1)]
    if leaf_level == 1:
        frame = draw(st.integers(8, GUEST_PAGES - 1)) << 12
        if not draw(st.integers(0, 15)):
            frame = draw(st.sampled_from([0x1000, 0x2000, 0x4000]))  # a page table page itself
    elif leaf_level == 3:
        frame = draw(st.sampled_from([0, 1 << 30]))  # a 1 GiB page inside the nested map
    else:
        size = 1 << mode.page_shift(2)
        frame = draw(st.integers(0, NESTED_LIMIT // size - 1)) * size
    return PathSpec(tuple(indices), tuple(flags), leaf_level, frame)


def write_path(mem: PhysicalMemory, mode: PagingMode, p: PathSpec) -> None:
    eb = mode.entry_bytes
    for k, level in enumerate(range(mode.levels, p.leaf_level - 1, -1)):
        if mode is PAE and level == 3:
            table = PAE_PDPT
        else:
            table = TABLE_GPA[level]
        addr = table + eb * p.indices[k]
        if level == p.leaf_level:
            value = p.frame | p.flags[k] | (PS if level > 1 else 0)
        else:
            value = TABLE_GPA[level - 1] | p.flags[k]
        mem.write(addr, eb, value & ((1 << (8 * eb)) - 1))


def leaf_slot(mode: PagingMode, p: PathSpec) -> int:
    level = p.leaf_level
    table = PAE_PDPT if (mode is PAE and level == 3) else TABLE_GPA[level]
    return table + mode.entry_bytes * p.indices[mode.levels - level]


@dataclass(frozen=True)
class Op:
    kind: str  # "read" | "write" | "fetch" | "edit"
    path: int
    offset: int
    size: int
    user: bool
    value: int
    new_leaf: PathSpec | None = None


@st.composite
def scenarios(draw: Any) -> tuple[str, dict[str, int], list[PathSpec], list[Op]]:
    name = draw(st.sampled_from(["32", "pae", "4l"]))
    mode = _mode_of(name)
    cr4 = {"32": 0, "pae": CR4_PAE, "4l": CR4_PAE}[name]
    efer = EFER_LME | EFER_LMA if name == "4l" else 0
    if name != "32" and draw(st.booleans()):
        efer |= EFER_NXE
    if name == "32" and draw(st.booleans()):
        cr4 |= CR4_PSE
    cr4 |= draw(st.sampled_from([0, CR4_PGE, CR4_SMEP, CR4_SMAP, CR4_SMEP | CR4_SMAP | CR4_PGE]))
    cr0 = CR0_PG | CR0_PE | draw(st.sampled_from([0, CR0_WP]))
    ctl = {"cr0": cr0, "cr4": cr4, "efer": efer, "ac": draw(st.booleans())}
    paths = draw(st.lists(path_specs(mode), min_size=1, max_size=4))
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        k = draw(st.integers(0, len(paths) - 1))
        kind = draw(st.sampled_from(["read", "read", "write", "write", "fetch", "edit"]))
        new_leaf = None
        if kind == "edit":
            new_leaf = draw(path_specs(mode))
            old = paths[k]
            new_leaf = PathSpec(old.indices, old.flags[: len(old.flags) - 1] + new_leaf.flags[-1:], old.leaf_level,
                                new_leaf.frame if new_leaf.leaf_level == old.leaf_level else old.frame)
        size = draw(st.sampled_from([1, 2, 4, 8]))
        offset = draw(st.sampled_from([0, 0x10, 0xFF8, 0xFFC, 0xFFE, 0xFFF]) | st.integers(0, 0xFFF))
        ops.append(Op(kind, k, offset, size, draw(st.booleans()), draw(st.integers(0, (1 << 64) - 1)), new_leaf))
    return name, ctl, paths, ops


def build_guest(name: str, paths: list[PathSpec]) -> tuple[PhysicalMemory, int]:
    mode = _mode_of(name)
    mem = PhysicalMemory()
    for gpn in range(GUEST_PAGES):
        mem.map_page(gpn << 12, bytes([gpn]) * 64)  # recognizable page contents
    for a in (*TABLE_GPA.values(), PAE_PDPT):
        mem.write_bytes(a, bytes(PAGE))
    for p in paths:
        write_path(mem, mode, p)
    cr3 = PAE_PDPT if mode is PAE else TABLE_GPA[mode.levels]
    return mem, cr3


def access(s: MachineState, op: Op, lin: int) -> Any:
    if op.kind == "write":
        return s.mem.write(lin, op.size, op.value & ((1 << (8 * op.size)) - 1), op.user)
    return s.mem.read(lin, op.size, R if op.kind == "read" else X, op.user)


def run_scenario(setup: GuestSetup, mode: PagingMode, paths: list[PathSpec], ops: list[Op]) -> None:
    """Run ``ops`` on both machines, comparing every outcome, then all guest memory."""
    lins = [linear_of(mode, p.indices) for p in paths]
    for n, op in enumerate(ops):
        lin = lins[op.path] + op.offset
        if op.kind == "edit":
            assert op.new_leaf is not None
            slot = leaf_slot(mode, op.new_leaf)
            leaf = op.new_leaf
            value = leaf.frame | leaf.flags[-1] | (PS if leaf.leaf_level > 1 else 0)
            eb = mode.entry_bytes
            value &= (1 << (8 * eb)) - 1
            setup.bare.mem.phys.write(slot, eb, value)
            if setup.nested:
                setup.host.write(GUEST_BASE + slot, eb, value)
            else:
                setup.host.write(slot, eb, value)
            # A TLB-correct guest: INVLPG every page that may use the edited entry (and the next pages).
            events = setup.guest.tlb_events
            for base in lins:
                for page in (base, base + PAGE):
                    if events is not None:
                        events.append(("invlpg", page))
            continue
        results = [outcome(lambda s=s, op=op, lin=lin: access(s, op, lin)) for s in (setup.bare, setup.guest)]
        assert results[0] == results[1], f"op {n} {op}: bare {results[0]} vs guest {results[1]}"
    assert setup.bare_memory() == setup.guest_memory()


@pytest.mark.parametrize("variant", ["nested+tlb", "nested", "host+tlb"])
@settings(max_examples=60)
@given(scenario=scenarios())
def test_guest_equals_bare_machine(variant: str, scenario: tuple) -> None:
    """Guest mode (nested paging and/or the hardware TLB) = the bare spec, guest page-table A/D bits included."""
    name, ctl, paths, ops = scenario
    mode = _mode_of(name)
    mem, cr3 = build_guest(name, paths)
    rflags = 2 | (1 << 18 if ctl["ac"] else 0)
    setup = make_setup(mem, cr0=ctl["cr0"], cr3=cr3, cr4=ctl["cr4"], efer=ctl["efer"],
                       nested=variant.startswith("nested"), tlb=variant.endswith("tlb"), rflags_sys=rflags)
    assert setup.bare.pdptes == setup.guest.pdptes
    run_scenario(setup, mode, paths, ops)


def test_property_catches_a_broken_nested_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation check: a nested memory that drops guest A/D updates is caught by the equivalence property."""
    mem, cr3 = build_guest("4l", [PathSpec((0, 0, 0, 9), (P | RW | US,) * 4, 1, 0x9000)])
    setup = make_setup(mem, cr0=CR0_PG | CR0_PE, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA)
    monkeypatch.setattr("spec.svm.nested._GuestTableAccess.write", lambda self, gpa, n, value: None)
    with pytest.raises(AssertionError):
        run_scenario(setup, LEVEL4, [PathSpec((0, 0, 0, 9), (P | RW | US,) * 4, 1, 0x9000)],
                     [Op("write", 0, 0, 8, False, 0x1234)])


# ---------------------------------------------------------------------------
# #NPF: error codes and bit 32 / bit 33 (APM 15.25.6)
# ---------------------------------------------------------------------------

DATA_LIN = 0x40_0000 + 0x7000  # guest linear page used by the NPF tests
DATA_GPA = 0x9000
PT_GPA = TABLE_GPA[1]


def simple_guest(*, nested_flags: dict[tuple[int, int], int] | None = None, leaf: int = P | RW | US,
                 host_nxe: bool = True) -> GuestSetup:
    """A 4-level guest mapping DATA_LIN -> DATA_GPA through the shared tables; nested entries overridden."""
    indices = ((DATA_LIN >> 39) & 0x1FF, (DATA_LIN >> 30) & 0x1FF, (DATA_LIN >> 21) & 0x1FF, (DATA_LIN >> 12) & 0x1FF)
    mem, cr3 = build_guest("4l", [PathSpec(indices, (P | RW | US,) * 3 + (leaf,), 1, DATA_GPA)])
    setup = make_setup(mem, cr0=CR0_PG | CR0_PE | CR0_WP, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NXE)
    assert setup.tables is not None
    for (gpa, level), value in (nested_flags or {}).items():
        setup.tables.set_entry(gpa, level, value)
    if not host_nxe:
        nm = setup.guest.mem.phys
        assert isinstance(nm, NestedMemory)
        nm.ctl = PagingControl(cr0=nm.ctl.cr0, cr3=nm.ctl.cr3, cr4=nm.ctl.cr4, efer=nm.ctl.efer & ~EFER_NXE)
    return setup


def npf(setup: GuestSetup, kind: AccessKind, lin: int = DATA_LIN, user: bool = False) -> NestedPageFault:
    m = setup.guest.mem
    with pytest.raises(NestedPageFault) as e:
        if kind == W:
            m.write(lin, 4, 0xAABBCCDD, user)
        else:
            m.read(lin, 4, kind, user)
    return e.value


@pytest.mark.parametrize("kind, code", [(R, NPF_US), (W, NPF_US | NPF_RW), (X, NPF_US | NPF_ID)])
def test_npf_final_not_present(kind: AccessKind, code: int) -> None:
    s = simple_guest(nested_flags={(DATA_GPA, 1): 0})
    e = npf(s, kind, DATA_LIN + 0x123)
    assert (e.info1, e.info2) == (code | NPF_FINAL_TRANSLATION, DATA_GPA + 0x123)
    assert e.code == ExitCode.NPF and isinstance(e, VMExit)


@pytest.mark.parametrize("entry, kind, code", [
    (GUEST_BASE + DATA_GPA | P | US, W, NPF_P | NPF_RW | NPF_US),  # read-only nested page
    (GUEST_BASE + DATA_GPA | P | RW, R, NPF_P | NPF_US),  # supervisor nested page: nested accesses are user
    (GUEST_BASE + DATA_GPA | P | RW | US | XD, X, NPF_P | NPF_US | NPF_ID),  # nested NX
    (GUEST_BASE + DATA_GPA | P | RW | US | 1 << 51, R, NPF_P | NPF_US | NPF_RSV),  # reserved bit
])
def test_npf_final_rights(entry: int, kind: AccessKind, code: int) -> None:
    s = simple_guest(nested_flags={(DATA_GPA, 1): entry})
    e = npf(s, kind)
    assert (e.info1, e.info2) == (code | NPF_FINAL_TRANSLATION, DATA_GPA)


def test_nested_xd_reserved_without_host_nxe() -> None:
    """The nested walk uses the host's EFER.NXE: without it XD is a reserved bit (APM 15.25.5, 5.3)."""
    s = simple_guest(nested_flags={(DATA_GPA, 1): GUEST_BASE + DATA_GPA | P | RW | US | XD}, host_nxe=False)
    e = npf(s, R)
    assert e.info1 == NPF_P | NPF_US | NPF_RSV | NPF_FINAL_TRANSLATION


def test_supervisor_guest_access_still_user_at_nested_level() -> None:
    """A CPL-0 guest write to a nested read-only page: RW and US set (every nested access is user, APM 15.25.5)."""
    s = simple_guest(nested_flags={(DATA_GPA, 1): GUEST_BASE + DATA_GPA | P | US})
    assert npf(s, W, user=False).info1 == NPF_P | NPF_RW | NPF_US | NPF_FINAL_TRANSLATION
    s.guest.mem.read(DATA_LIN, 4)  # reads are fine


def test_npf_guest_pte_read_not_present() -> None:
    """The guest PTE's page is not mapped by the nested tables: bit 33, RW (a table access is a nested write)."""
    s = simple_guest(nested_flags={(PT_GPA, 1): 0})
    e = npf(s, R)
    pte = PT_GPA + 8 * ((DATA_LIN >> 12) & 0x1FF)
    assert (e.info1, e.info2) == (NPF_RW | NPF_US | NPF_GUEST_PAGE_TABLE, pte)


def test_npf_guest_ad_update_on_read_only_nested_page() -> None:
    """Guest page tables mapped read-only by the nested tables: the A/D-updating walk faults (P, RW, bit 33)."""
    s = simple_guest(nested_flags={(PT_GPA, 1): GUEST_BASE + PT_GPA | P | US})
    e = npf(s, W)
    assert e.info1 == NPF_P | NPF_RW | NPF_US | NPF_GUEST_PAGE_TABLE
    assert e.info2 == PT_GPA + 8 * ((DATA_LIN >> 12) & 0x1FF)
    # The guest entries before the PTE did get their A bits (the walk went that far); the PTE did not.
    assert s.host.read(GUEST_BASE + TABLE_GPA[2] + 8 * ((DATA_LIN >> 21) & 0x1FF), 8) & A
    assert not s.host.read(GUEST_BASE + e.info2, 8) & A


def test_npf_guest_table_even_when_ad_already_set() -> None:
    """Guest page-table accesses are nested writes even when no A/D bit changes (APM 15.25.5)."""
    s = simple_guest(nested_flags={(PT_GPA, 1): GUEST_BASE + PT_GPA | P | US})
    pte = PT_GPA + 8 * ((DATA_LIN >> 12) & 0x1FF)
    s.host.write(GUEST_BASE + pte, 8, s.host.read(GUEST_BASE + pte, 8) | A | DIRTY)
    assert npf(s, R).info1 == NPF_P | NPF_RW | NPF_US | NPF_GUEST_PAGE_TABLE


def test_fault_order_guest_walk_before_guest_pf_before_final() -> None:
    """APM 15.25.6: a nested fault on an upper guest table comes first; a guest #PF beats the final translation."""
    # Guest PTE not present AND the data page unmapped in the nested tables: the guest's #PF wins (no NPF).
    s = simple_guest(nested_flags={(DATA_GPA, 1): 0}, leaf=0)
    with pytest.raises(Fault) as f:
        s.guest.mem.read(DATA_LIN, 4)
    assert f.value.vector == Vector.PF and f.value.error_code == 0 and f.value.cr2 == DATA_LIN
    # Guest PTE not present AND the PD page unmapped in the nested tables: the nested fault on the PDE wins.
    s = simple_guest(nested_flags={(TABLE_GPA[2], 1): 0}, leaf=0)
    e = npf(s, R)
    assert e.info1 & NPF_GUEST_PAGE_TABLE and e.info2 == TABLE_GPA[2] + 8 * ((DATA_LIN >> 21) & 0x1FF)
    # Guest supervisor page at CPL 3 and the data page unmapped: the guest's #PF (P, U) wins.
    s = simple_guest(nested_flags={(DATA_GPA, 1): 0}, leaf=P | RW)
    with pytest.raises(Fault) as f:
        s.guest.mem.read(DATA_LIN, 4, R, True)
    assert f.value.error_code == 5


def test_nested_accessed_dirty_bits() -> None:
    """The nested walk sets A in every nested entry it uses and D in the leaf on a write (APM 15.25.5)."""
    s = simple_guest()
    assert s.tables is not None
    assert not s.tables.entry(DATA_GPA, 1) & (A | DIRTY)
    s.guest.mem.read(DATA_LIN, 4)
    assert s.tables.entry(DATA_GPA, 1) & (A | DIRTY) == A
    assert s.tables.entry(DATA_GPA, 2) & A and s.tables.entry(DATA_GPA, 4) & A
    # The guest page-table pages were accessed as nested writes: their nested leaves are dirty.
    assert s.tables.entry(PT_GPA, 1) & (A | DIRTY) == A | DIRTY
    s.guest.mem.write(DATA_LIN, 4, 1)
    assert s.tables.entry(DATA_GPA, 1) & DIRTY


def test_gpa_beyond_nested_width_faults() -> None:
    nm = NestedMemory(PhysicalMemory(), HOST_TABLES, HOST_CTL)
    with pytest.raises(NestedPageFault) as e:
        nm.read(1 << 48, 1)
    assert e.value.info1 == NPF_US | NPF_FINAL_TRANSLATION and e.value.info2 == 1 << 48


def test_host_paging_required() -> None:
    with pytest.raises(ValueError, match="host paging"):
        NestedMemory(PhysicalMemory(), 0, PagingControl(cr0=0))


def test_nested_memory_interface() -> None:
    """read/write/save/restore/bytes/copy across a page boundary, through two different host pages."""
    host = PhysicalMemory()
    t = HostTables(host)
    host.map_page(0x800_0000)
    host.map_page(0x900_0000)
    t.map(0x5000, 0x900_0000)
    t.map(0x4000, 0x800_0000)
    nm = NestedMemory(host, t.root, HOST_CTL, ModelTLB(ASID), ASID)
    nm.write(0x4FFE, 4, 0x11223344)
    assert host.read(0x800_0FFE, 2) == 0x3344 and host.read(0x900_0000, 2) == 0x1122
    assert nm.read(0x4FFE, 4) == 0x11223344
    saved = nm.save(0x5000, 2)
    nm.write_bytes(0x5000, b"\xaa\xbb")
    assert nm.read_bytes(0x4FFF, 3) == b"\x33\xaa\xbb"
    nm.restore(saved)
    assert nm.read(0x5000, 2) == 0x1122
    c = nm.copy()
    c.write(0x4000, 1, 0x77)
    assert nm.read(0x4000, 1) == 0 and c.read(0x4000, 1) == 0x77
    # A page-crossing write whose second page is not mapped writes nothing.
    t.map(0x5000, 0x900_0000, P | US)
    nm.tlb.flush_all()  # type: ignore[union-attr]
    with pytest.raises(NestedPageFault):
        nm.write(0x4FFF, 2, 0xFFFF)
    assert nm.read(0x4FFF, 1) == 0x33


# ---------------------------------------------------------------------------
# PAE guests: PDPTEs through the nested tables
# ---------------------------------------------------------------------------

def test_pae_pdptes_loaded_through_nested_tables() -> None:
    p = PathSpec((0, 1, 5), (P, P | RW | US, P | RW | US), 1, 0x9000)
    mem, cr3 = build_guest("pae", [p])
    s = make_setup(mem, cr0=CR0_PG | CR0_PE, cr3=cr3, cr4=CR4_PAE, efer=0)
    assert s.guest.pdptes[0] == TABLE_GPA[2] | P and s.guest.pdptes == s.bare.pdptes
    assert s.guest.mem.read(linear_of(PAE, p.indices), 1) == 9
    # The PDPT page not mapped by the nested tables: attaching (VMRUN) raises the NPF, bit 33.
    s = make_setup(mem, cr0=CR0_PG | CR0_PE, cr3=cr3, cr4=CR4_PAE, efer=0)
    assert s.tables is not None
    s.tables.set_entry(PAE_PDPT, 1, 0)
    detach_guest_memory(s.guest)
    with pytest.raises(NestedPageFault) as e:
        attach_guest_memory(s.guest, s.host, np_enable=True, ncr3=s.tables.root, host_ctl=HOST_CTL, tlb=ModelTLB(),
                            asid=ASID)
    assert (e.value.info1, e.value.info2) == (NPF_RW | NPF_US | NPF_GUEST_PAGE_TABLE, PAE_PDPT)


def test_guest_mov_cr3_in_pae_mode_reads_pdptes_through_nested_tables() -> None:
    """A guest MOV CR3 (PAE) executed in hardware loads the PDPTEs at guest-physical CR3 (the nested walk)."""
    guest = _pae_cpu_guest()
    cpu = SpecCPU(guest.guest)
    assert cpu.step() is None  # mov cr3, eax (EAX = the new PDPT at gPA 0x6000)
    assert guest.guest.cr3 == 0x6000 and guest.guest.pdptes == [TABLE_GPA[2] | P, 0, 0, 0]
    # Unmap the new PDPT's page in the nested tables: the next MOV CR3 exits with NPF (bit 33) and is rolled back.
    guest.guest.rip = CODE
    assert guest.tables is not None
    guest.tables.set_entry(0x6000, 1, 0)
    assert cpu.step() is None and guest.guest.cr3 == 0x6000  # the nested TLB still maps it: no flush yet
    guest.guest.rip = CODE
    assert guest.tlb is not None
    guest.tlb.tlb_control(3, ASID)  # what the VMM must do after editing nested tables (APM 15.16.1)
    ev = cpu.step()
    assert ev is not None and ev.kind == "vmexit" and ev.exitcode == ExitCode.NPF and guest.guest.rip == CODE
    assert ev.exitinfo1 == NPF_RW | NPF_US | NPF_GUEST_PAGE_TABLE and ev.exitinfo2 == 0x6000


def _pae_cpu_guest() -> GuestSetup:
    st = flat_machine("prot32", bytes.fromhex("0f22d8f4"))  # mov cr3, eax; hlt
    phys = st.mem.phys  # flat_machine backs 0 .. 0x8000 with RAM
    # Identity-map the low 2 MiB with a PAE PD at TABLE_GPA[2] (2 MiB page), PDPTs at 0x7000 (cr3) and 0x6000.
    phys.write(TABLE_GPA[2], 8, P | RW | US | PS)
    phys.write(0x7000, 8, TABLE_GPA[2] | P)
    phys.write(0x6000, 8, TABLE_GPA[2] | P)
    s = make_setup(phys, cr0=st.cr0 | CR0_PG, cr3=0x7000, cr4=CR4_PAE, efer=0)
    for m in (s.bare, s.guest):
        m.seg, m.gdtr, m.rip = st.seg, st.gdtr, CODE
        m.gpr[0] = 0x6000
    return s


# ---------------------------------------------------------------------------
# The CPU path: an NPF is a #VMEXIT, the instruction leaves no trace
# ---------------------------------------------------------------------------

def long64_guest(code: bytes, *, prepare: Any = None, nested: bool = True) -> GuestSetup:
    """flat_machine('long64') as a guest under nested paging (its RAM at GUEST_BASE + gPA), or on host memory.

    ``prepare(phys)`` edits the guest's memory first."""
    st = flat_machine("long64", code, data_pages=4, idt=True)
    if prepare is not None:
        prepare(st.mem.phys)
    s = make_setup(st.mem.phys, cr0=st.cr0, cr3=st.cr3, cr4=st.cr4, efer=st.efer, nested=nested)
    for m in (s.bare, s.guest):
        m.seg, m.gdtr, m.idtr, m.tr, m.rip = list(st.seg), st.gdtr, st.idtr, st.tr, st.rip
        m.gpr[4] = st.gpr[4]
    return s


def test_npf_rolls_back_the_instruction() -> None:
    """push rax with the stack page nested-read-only: NPF (P, RW, US, bit 32), RSP and memory unchanged."""
    s = long64_guest(bytes.fromhex("50f4"))  # push rax; hlt
    assert s.tables is not None
    s.tables.set_entry(0x7000, 1, GUEST_BASE + 0x7000 | P | US)
    s.guest.gpr[0] = 0x1122
    before = s.host.read_bytes(GUEST_BASE + 0x7000, PAGE)
    ev = SpecCPU(s.guest, deliver_exceptions=True).step()
    assert ev is not None and ev.kind == "vmexit" and ev.exitcode == ExitCode.NPF
    assert ev.exitinfo1 == NPF_P | NPF_RW | NPF_US | NPF_FINAL_TRANSLATION and ev.exitinfo2 == 0x7FF8
    assert s.guest.gpr[4] == 0x8000 and s.guest.rip == CODE and s.host.read_bytes(GUEST_BASE + 0x7000, PAGE) == before


def test_program_equivalence_long64() -> None:
    """A guest program that remaps a page with INVLPG and reloads CR3 runs like on the bare machine."""
    # mov ebx, 0x11000; xor ecx, ecx; fill PT[0..511] at 0x11000 with rcx << 12 | 7 (identity, 4 KiB pages);
    # mov [0x72000], 0x11007 (PD[0] -> the new table); mov rax, cr3; mov cr3, rax;
    # mov dword [0x10000], 0xdeadbeef; mov [0x11080], 0x12007 (page 0x10000 -> frame 0x12000);
    # invlpg [0x10000]; mov rbx, [0x10000]; mov dword [0x10004], 0x55; hlt
    code = bytes.fromhex(
        "bb0010010031c94889c848c1e00c4883c807488904cbffc181f90002000075e7b80710010048890425002007000f20d80f22d8"
        "c7042500000100efbeaddeb80720010048890425801001000f013c2500000100488b1c2500000100c704250400010055000000f4")
    s = long64_guest(code)
    results = []
    for m in (s.bare, s.guest):
        ev = SpecCPU(m, deliver_exceptions=True).run(6000)
        results.append((ev.kind, m.rip, [CONCRETE.concrete(r) for r in m.gpr]))
    assert results[0] == results[1] and results[0][0] == "halted"
    assert s.bare_memory() == s.guest_memory()
    assert s.bare.mem.phys.read(0x10000, 4) == 0xDEADBEEF and s.bare.mem.phys.read(0x12004, 4) == 0x55
    assert s.bare.mem.phys.read(0x11080, 8) & (A | DIRTY) == A | DIRTY  # the guest's own A/D bits


def test_attach_detach() -> None:
    st = flat_machine("long64")
    host = st.mem.phys
    recorded: list[tuple] = []
    st.tlb_events = recorded
    tlb = ModelTLB()
    mmu = attach_guest_memory(st, host, np_enable=False, ncr3=0, host_ctl=HOST_CTL, tlb=tlb, asid=5)
    assert st.mem is mmu and isinstance(mmu, GuestMMU) and mmu.tlb is tlb and tlb.asid == 5
    assert isinstance(st.tlb_events, HardwareTLBEvents) and st.tlb_events.forward is recorded
    st.tlb_events.append(("cr3", st.cr3))
    assert recorded == [("cr3", st.cr3)]
    detach_guest_memory(st)
    assert type(st.mem) is MMU and st.mem.phys is host and st.mem.tlb is None and tlb.asid == 0
    assert st.tlb_events is recorded
    # Without a TLB (a processor that walks every time) no event sink is installed.
    st.tlb_events = None
    attach_guest_memory(st, host, np_enable=False, ncr3=0, host_ctl=HOST_CTL, tlb=None, asid=1)
    assert st.tlb_events is None and st.mem.read(CODE, 1) == 0


def test_pae_host_nested_walk_reads_nested_pdptes_each_walk() -> None:
    """A legacy PAE host: the nested walk is PAE paging, its PDPTEs read from nCR3 (not cached at VMRUN)."""
    host = PhysicalMemory()
    for a in (0x1000, 0x2000, 0x3000, 0x8000, 0x9000):
        host.map_page(a)
    host.write(0x1000, 8, 0x2000 | P)  # PDPTE 0 -> PD
    host.write(0x2000, 8, 0x3000 | P | RW | US)  # PDE 0 -> PT
    host.write(0x3000 + 8 * 5, 8, 0x8000 | P | RW | US)  # gPA 0x5000 -> 0x8000
    host.write(0x8000, 4, 0xAAAA)
    host.write(0x9000, 4, 0xBBBB)
    ctl = PagingControl(cr0=CR0_PG | CR0_PE, cr4=CR4_PAE, efer=0)
    nm = NestedMemory(host, 0x1000, ctl)
    assert nm.mode is PAE and nm.read(0x5000, 4) == 0xAAAA
    host.write(0x3000 + 8 * 5, 8, 0x9000 | P | RW | US)
    assert nm.read(0x5000, 4) == 0xBBBB  # no TLB: every access walks
    host.write(0x1000, 8, 0)  # nested PDPTE not present
    with pytest.raises(NestedPageFault) as e:
        nm.read(0x5000, 4)
    assert e.value.info1 == NPF_US | NPF_FINAL_TRANSLATION
