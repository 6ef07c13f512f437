"""Isolation of host memory under nested paging, proved with Z3 (a product invariant of refvmm).

Claim: for the nested tables :func:`refvmm.paging.nested.build_nested_tables`
builds from a VM's memory map, every guest-physical address (symbolic: all
2^48 of them) that the nested walk translates at all, for any access kind,
lands inside guest RAM -- exactly at ``gpa_to_hpa(gpa)`` of a RAM page.  Never a
VMM page (VMCB, IOPM, MSRPM, the nested tables themselves), never an MMIO hole.

Why this covers the whole two-dimensional walk: the guest reaches host memory
only through :class:`spec.svm.nested.NestedMemory`, whose every access (final
data accesses, guest page-table reads and A/D writes, PDPTE loads) goes to the
host address :meth:`~spec.svm.nested.NestedMemory.translate` returns -- the
nested walk of :func:`spec.paging.walk` proved here.  The dynamic test at the end
checks that structure: it records every host access a random guest makes and
finds only guest RAM and the nested table pages (the hardware walker's own reads).

How: the real walker runs in the symbolic domain (``spec.domain.symbolic``) on a
symbolic gPA; the tables are the concrete pages the builder wrote, every other
host page is an unconstrained Z3 array (guest-controlled or unknown contents --
sound for a broken builder that points an entry at a non-table page).  The walk's
stores only set A/D flags, which no later step of the same walk reads (property
(c) of tests/test_paging_proofs.py), so reads see the tables as built.  Every
feasible path is explored; on each successful one Z3 proves the claim under the
path condition.

Mutation check: four deliberately broken builders (a page past a region's end,
MMIO mapped, a 2 MiB page over a partial block, a VMM page mapped) are each
refuted with a concrete counterexample gPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

import refvmm.paging.nested as builder
from refvmm.guest_memory import GUEST_BASE, GuestMemory, PageAllocator
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.paging import LEVEL4, Access, walk
from spec.svm.nested import NestedMemory, NestedPageFault, nested_control
from spec.tlb import ModelTLB
from tests.test_nested_paging import HOST_CTL

KINDS = (AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH)
GPA_BITS = 48  # the 4-level nested walk's reach; NestedMemory refuses larger gPAs before walking


class NullDevice:
    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        return None


def memory_map(ram: list[tuple[int, int]], mmio: list[tuple[int, int]] | None = None
               ) -> tuple[GuestMemory, PageAllocator]:
    phys = PhysicalMemory()
    mem = GuestMemory(phys)
    for gpa, size in ram:
        mem.add_ram(gpa, size)
    for k, (gpa, size) in enumerate(mmio or []):
        mem.add_mmio(gpa, size, f"dev{k}", NullDevice())
    return mem, PageAllocator(phys)


class TableMemory:
    """Host memory for the symbolic walk: the concrete table pages, everything else unconstrained (8-byte reads)."""

    def __init__(self, phys: PhysicalMemory, table_pages: list[int]) -> None:
        self.unknown = z3.Array("host", z3.BitVecSort(61), z3.BitVecSort(64))
        self.tables = {page: [(k, e) for k in range(512) if (e := phys.read(page + 8 * k, 8))]
                       for page in table_pages}  # the non-zero entries of each table page

    def read(self, addr: Any, n: int) -> Any:
        assert n == 8
        out = z3.Select(self.unknown, z3.Extract(63, 3, addr))
        slot = z3.Extract(11, 3, addr)
        for page, entries in self.tables.items():
            value: Any = z3.BitVecVal(0, 64)
            for k, e in entries:
                value = z3.If(slot == k, z3.BitVecVal(e, 64), value)
            out = z3.If(z3.Extract(63, 12, addr) == page >> 12, value, out)
        return out

    def write(self, addr: Any, n: int, value: Any) -> None:
        return None  # A/D updates: not read again by the same walk (module docstring)


def counterexample(mem: GuestMemory, tables: builder.NestedTables) -> str | None:
    """A gPA whose nested translation escapes guest RAM (or misses its own host page), or None: proved."""
    host = TableMemory(mem.phys, tables.pages)
    ctl = nested_control(HOST_CTL, tables.root)
    gpa = z3.BitVec("gpa", 64)
    in_reach = z3.ULT(gpa, 1 << GPA_BITS)
    for kind in KINDS:
        def run(D: SymbolicDomain, kind: AccessKind = kind) -> Any:
            return walk(D, host, LEVEL4, ctl, gpa, Access(kind, 3))

        for path in explore(run):
            w = path.result
            if w.fault is not None:
                continue
            hpa = w.phys
            host_ram = z3.Or([z3.And(z3.ULE(r.hpa, hpa), z3.ULT(hpa, r.hpa + r.size)) for r in mem.regions])
            guest_ram = z3.Or([z3.And(z3.ULE(r.gpa, gpa), z3.ULT(gpa, r.end)) for r in mem.regions])
            claim = z3.Implies(z3.And(path.condition, in_reach),
                               z3.And(host_ram, guest_ram, hpa == gpa + GUEST_BASE))
            model = prove(claim, timeout_ms=60_000)
            if model is not None:
                g = model.eval(gpa, model_completion=True).as_long()
                h = model.eval(hpa, model_completion=True).as_long()
                return f"{kind.name}: gPA {g:#x} -> host {h:#x} (guest RAM: {mem.gpa_to_hpa(g) and hex(g)})"
    return None


MAPS: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {
    # 2 MiB of RAM (one large page) + one more 4 KiB page; a hole; MMIO near 4 GiB.
    "large+small": ([(0, 0x20_1000)], [(0xFEE0_0000, 0x1000)]),
    # Scattered small regions around an MMIO window, one region high up.
    "scattered": ([(0, 0x8000), (0xA000, 0x3000), (0x4000_0000, 0x2000)], [(0x8000, 0x2000)]),
    # A region starting mid-block: no 2 MiB page may be used for the partial blocks.
    "unaligned": ([(0x1F_F000, 0x20_2000)], []),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_nested_tables_isolate_host_memory(name: str) -> None:
    ram, mmio = MAPS[name]
    mem, alloc = memory_map(ram, mmio)
    tables = builder.build_nested_tables(mem, alloc)
    if name == "large+small":
        assert tables.large_mappings == 1 and tables.small_mappings == 1
    assert counterexample(mem, tables) is None


@st.composite
def random_maps(draw: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Up to three RAM regions (1..48 pages, or a whole 2 MiB block) and an MMIO region, non-overlapping."""
    ram: list[tuple[int, int]] = []
    used: set[int] = set()
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            start, count = draw(st.integers(0, 7)) * 512, 512
        else:
            start, count = draw(st.integers(0, 8191)), draw(st.integers(1, 48))
        pages = set(range(start, start + count))
        if not pages & used:
            used |= pages
            ram.append((start * PAGE, count * PAGE))
    start, count = draw(st.integers(0, 8191)), draw(st.integers(1, 4))
    mmio = [] if set(range(start, start + count)) & used else [(start * PAGE, count * PAGE)]
    return ram, mmio


@settings(max_examples=10)
@given(m=random_maps())
def test_nested_tables_isolate_host_memory_random_maps(m: tuple) -> None:
    mem, alloc = memory_map(*m)
    assert counterexample(mem, builder.build_nested_tables(mem, alloc)) is None


# ---------------------------------------------------------------------------
# Broken builders are refuted
# ---------------------------------------------------------------------------

@contextmanager
def broken(kind: str, mem: GuestMemory) -> Iterator[None]:
    """Patch the builder into one of four broken variants."""
    mp = pytest.MonkeyPatch()
    real_map = builder._TableWriter.map
    if kind == "page-past-region":
        pages = mem.ram_pages()
        mp.setattr(mem, "ram_pages", lambda: [*pages, pages[-1] + PAGE])
        mp.setattr(mem, "gpa_to_hpa", lambda gpa: GUEST_BASE + gpa)
    elif kind == "mmio-mapped":
        def map_mmio_too(self: Any, gpa: int, hpa: int, large: bool) -> None:
            real_map(self, gpa, hpa, large)
            for r in mem.mmio_regions:
                for off in range(0, r.size, PAGE):
                    real_map(self, r.gpa + off, GUEST_BASE + r.gpa + off, False)
        mp.setattr(builder._TableWriter, "map", map_mmio_too)
    elif kind == "partial-large-page":
        mp.setattr(builder, "_large_block", lambda memory, ram, block: block in ram)
    elif kind == "vmm-page-mapped":
        def map_root_too(self: Any, gpa: int, hpa: int, large: bool) -> None:
            real_map(self, gpa, hpa, large)
            real_map(self, 0x7000_0000, self.tables.root, False)  # the nested root, guest-visible
        mp.setattr(builder._TableWriter, "map", map_root_too)
    try:
        yield
    finally:
        mp.undo()


@pytest.mark.parametrize("kind", ["page-past-region", "mmio-mapped", "partial-large-page", "vmm-page-mapped"])
def test_broken_builder_is_refuted(kind: str) -> None:
    mem, alloc = memory_map([(0x1F_F000, 0x3000)], [(0x20_2000, 0x1000)])
    with broken(kind, mem):
        tables = builder.build_nested_tables(mem, alloc)
    cex = counterexample(mem, tables)
    assert cex is not None, f"broken builder {kind!r} not refuted"
    print(f"\n[{kind}] {cex}")


# ---------------------------------------------------------------------------
# Dynamic check of the structure: a guest touches only guest RAM (and the walker the tables)
# ---------------------------------------------------------------------------

class RecordingMemory(PhysicalMemory):
    def __init__(self) -> None:
        super().__init__()
        self.touched: set[int] = set()

    def read(self, addr: int, n: int) -> int:
        self.touched.add(addr >> 12)
        return super().read(addr, n)

    def write(self, addr: int, n: int, value: int) -> None:
        self.touched.add(addr >> 12)
        super().write(addr, n, value)


@settings(max_examples=30)
@given(accesses=st.lists(st.tuples(st.integers(0, (1 << 23) - 1), st.sampled_from(KINDS)), max_size=40))
def test_guest_accesses_touch_only_guest_ram_and_tables(accesses: list[tuple[int, AccessKind]]) -> None:
    phys = RecordingMemory()
    mem = GuestMemory(phys)
    mem.add_ram(0, 0x20_0000)
    mem.add_ram(0x30_0000, 0x3000)
    mem.add_mmio(0x40_0000, 0x1000, "dev", NullDevice())
    alloc = PageAllocator(phys)
    vmcb = alloc.alloc()
    tables = builder.build_nested_tables(mem, alloc)
    phys.touched.clear()
    nm = NestedMemory(phys, tables.root, HOST_CTL, ModelTLB(1), 1)
    for gpa, kind in accesses:
        try:
            if kind == AccessKind.WRITE:
                nm.write(gpa, 1, 0x5A)
            else:
                nm.check_final(gpa, kind)
                nm.read(gpa, 1)
            nm.tables.read(gpa & ~7, 8)
        except NestedPageFault as e:
            assert not mem.is_ram(e.gpa)
    allowed = {p >> 12 for p in tables.pages} | {h >> 12 for h in mem.host_pages()}
    assert phys.touched <= allowed and vmcb >> 12 not in phys.touched


def test_counterexample_search_is_not_vacuous() -> None:
    """The symbolic walk does reach successful translations (else every claim would hold trivially)."""
    mem, alloc = memory_map([(0, 0x1000)])
    tables = builder.build_nested_tables(mem, alloc)
    host = TableMemory(mem.phys, tables.pages)
    ctl = nested_control(HOST_CTL, tables.root)
    gpa = z3.BitVec("gpa", 64)
    ok = [p for p in explore(lambda D: walk(D, host, LEVEL4, ctl, gpa, Access(AccessKind.READ, 3)))
          if p.result.fault is None]
    assert ok
    s = z3.Solver()
    s.add(ok[0].condition)
    assert s.check() == z3.sat and s.model().eval(gpa, model_completion=True).as_long() < PAGE

