"""Where things are in each differential-testing environment (pure data, no machine state).

An :class:`~difftest.case.Environment` (mode, paging mode, page size, CPL)
fixes a memory layout; :func:`layout` returns it and :mod:`difftest.builders`
turns it into a machine.  Every address here is *linear*, and linear equals
physical: the page tables identity-map everything they map.

Low memory is the same in every environment (the :mod:`spec.machine`
conventions, so that :func:`difftest.backends.kvm.stub_exception` can decode
delivered exceptions):

==========  ==========================================================
0x0000      real-mode IVT; GDT at 0x800; TSS at 0xA00
0x1000      code (two pages, RIP starts at 0x1000)
0x3000      IDT
0x4000      handler stubs: ``HLT`` at 0x4000 + 16 * vector
0x5000      kernel stack page (RSP0/ESP0 = 0x6000)
0x6000      IST1 stack page (top 0x7000; #DF and NMI in long mode)
0x7000      stack page (RSP = 0x8000 at the start)
0x70000     the paging structures (root first)
==========  ==========================================================

Data and the unmapped page depend on the page size, so that corrupting the
leaf entry that maps a data page never also unmaps code, stacks or tables:

* no paging and 4 KiB pages: data at 0x8000 and 0x9000 (reachable with
  16-bit addresses), nothing at 0xC000 (no RAM there; with paging its PTE is
  not present);
* 2 MiB pages: the low 2 MiB are one page, data is the next one (0x200000),
  and the PDE of 0x400000 is not present;
* 1 GiB pages: the low 1 GiB is one page, data is the next one (0x40000000),
  and the PDPTE of 0x80000000 is not present.

Access rights (SDM Vol. 3A 4.6): every mapped page is writable; at CPL 3 the
code, stack and data pages are user pages, while descriptor tables, handler
stubs, kernel stacks and paging structures are supervisor pages (with 4 KiB
pages; a large page has one U/S bit for everything in it, so the low large page
is a user page at CPL 3).  Non-leaf entries allow everything (P, R/W, U/S), so
the leaf alone decides; PAE PDPTEs have only P (SDM Table 4-8).  Entries start
with A and D clear, so the accessed/dirty updates of the run are observable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from types import MappingProxyType

from difftest.case import Environment
from spec import machine as M
from spec.memory import PAGE
from spec.paging import PS, RW, US, P

GDT, TSS, IDT, HANDLERS = M.GDT, M.TSS, M.IDT, M.HANDLERS
CODE = M.CODE
CODE_END = 0x3000  # the code may use two pages
KERNEL_STACK_TOP = M.KERNEL_STACK
IST1_STACK_TOP = M.IST1_STACK
STACK_TOP = M.STACK_TOP
TABLES = M.PAGING_BASE
SYSTEM_PAGES = (0x0000, 0x3000, 0x4000, 0x5000, 0x6000)  # supervisor pages of low memory
CODE_PAGES = tuple(range(CODE, CODE_END, PAGE))
STACK_PAGE = STACK_TOP - PAGE
LOW_PAGES = tuple(range(0, STACK_TOP, PAGE))  # every page below the stack top is RAM

SMALL_DATA = (0x8000, 0x9000)
SMALL_UNMAPPED = 0xC000
LARGE_2M, LARGE_1G = 1 << 21, 1 << 30

TABLE_LEVELS = {"4-level": 4, "PAE": 3, "32-bit": 2}  # paging structures in memory, root first


def _env_key(env: Environment) -> tuple[str, str, int, int, bool]:
    return env.mode, env.paging, env.page_size, env.cpl, env.idt


def _environments() -> list[Environment]:
    envs = [Environment(mode="real"), Environment(mode="prot16"), Environment(mode="prot16", cpl=3)]
    combos = [("prot32", "none", PAGE), ("prot32", "32-bit", PAGE), ("prot32", "PAE", PAGE),
              ("prot32", "PAE", LARGE_2M), ("long64", "4-level", PAGE), ("long64", "4-level", LARGE_2M),
              ("long64", "4-level", LARGE_1G)]
    for mode, paging, size in combos:
        for cpl in (0, 3):
            envs.append(Environment(mode=mode, paging=paging, page_size=size, cpl=cpl))  # type: ignore[arg-type]
    return envs


ENVIRONMENTS: list[Environment] = _environments()
"""Every environment :func:`difftest.builders.build` supports (with ``idt=True``; ``idt=False`` works too)."""

_BY_LABEL = {e.label(): e for e in ENVIRONMENTS}


def environment(label: str) -> Environment:
    """The environment whose :meth:`Environment.label` is ``label`` (``ValueError`` naming the valid ones)."""
    env = _BY_LABEL.get(label)
    if env is None:
        raise ValueError(f"unknown environment {label!r} (environments: {', '.join(_BY_LABEL)})")
    return env

_SUPPORTED = {_env_key(e)[:4] for e in ENVIRONMENTS}


@dataclass(frozen=True)
class LeafTable:
    """One paging structure whose entries are leaves: entry ``i`` maps ``linear + (i << shift)``."""

    linear: int
    table: int  # physical address of the structure
    shift: int  # log2 of the size one entry maps
    entry_bytes: int
    count: int

    def covers(self, linear: int) -> bool:
        return self.linear <= linear < self.linear + (self.count << self.shift)

    def entry(self, linear: int) -> int:
        return self.table + self.entry_bytes * ((linear - self.linear) >> self.shift)


@dataclass(frozen=True)
class Layout:
    """Where code, data, stacks and paging structures are in one environment (linear = physical)."""

    label: str
    code: int
    code_end: int  # the code must end before this address
    data: tuple[int, ...]  # writable data pages (user pages at CPL 3)
    unmapped: int  # a page that is not present in the tables (no RAM there without paging)
    stack_top: int
    kernel_stack_top: int
    tables: tuple[int, ...] = ()  # the paging structures' pages, root first (empty without paging)
    entry_bytes: int = 0  # size of a paging-structure entry (4 or 8; 0 without paging)
    leaves: tuple[LeafTable, ...] = ()
    entries: Mapping[int, int] = field(default_factory=dict, compare=False)  # entry address -> initial value
    pages: tuple[int, ...] = ()  # every page of RAM the machine has (sorted)

    @property
    def paging(self) -> bool:
        return bool(self.tables)

    @property
    def data_end(self) -> int:
        return self.data[-1] + PAGE

    def leaf_entry(self, linear: int) -> int:
        """Physical address of the entry (PTE, or PDE/PDPTE with PS) that maps -- or would map -- ``linear``."""
        for leaf in self.leaves:
            if leaf.covers(linear):
                return leaf.entry(linear)
        if not self.tables:
            raise ValueError(f"{self.label}: no paging, so no entry maps {linear:#x}")
        raise ValueError(f"{self.label}: no leaf paging structure covers {linear:#x}")

    def entry_value(self, address: int) -> int:
        """The initial value of the paging-structure entry at physical ``address`` (0 if not present)."""
        return self.entries.get(address, 0)


def layout(env: Environment) -> Layout:
    """The layout of ``env`` (ValueError for an environment the builders do not support)."""
    key = _env_key(env)
    if key[:4] not in _SUPPORTED:
        raise ValueError(f"environment {env.label()} is not supported by the difftest builders")
    return _layout(*key[:4])


@cache
def _layout(mode: str, paging: str, page_size: int, cpl: int) -> Layout:
    label = Environment(mode=mode, paging=paging, page_size=page_size, cpl=cpl).label()  # type: ignore[arg-type]
    if paging == "none":
        pages = tuple(sorted({*LOW_PAGES, *SMALL_DATA}))
        return Layout(label=label, code=CODE, code_end=CODE_END, data=SMALL_DATA, unmapped=SMALL_UNMAPPED,
                      stack_top=STACK_TOP, kernel_stack_top=KERNEL_STACK_TOP, pages=pages)
    user = US if cpl == 3 else 0
    if page_size == PAGE:
        return _small_pages(label, paging, user)
    return _large_pages(label, paging, page_size, user)


def _small_pages(label: str, paging: str, user: int) -> Layout:
    """4 KiB pages: one page table maps low memory, data and the tables; the unmapped PTE stays 0."""
    levels = TABLE_LEVELS[paging]
    eb = 4 if paging == "32-bit" else 8
    tables = tuple(TABLES + PAGE * k for k in range(levels))
    entries: dict[int, int] = {}
    # Non-leaf entries: each points to the next structure, index 0 (everything lies below 2 MiB).
    for upper, lower in pairwise(tables):
        entries[upper] = lower | (P if paging == "PAE" and upper == tables[0] else P | RW | US)
    pt = tables[-1]
    rights = {a: P | RW for a in (*SYSTEM_PAGES, *tables)}
    rights.update({a: P | RW | user for a in (*CODE_PAGES, STACK_PAGE, *SMALL_DATA)})
    for a, r in rights.items():
        entries[pt + eb * (a >> 12)] = a | r
    span = 10 if eb == 4 else 9
    leaf = LeafTable(linear=0, table=pt, shift=12, entry_bytes=eb, count=1 << span)
    pages = tuple(sorted({*LOW_PAGES, *SMALL_DATA, *tables}))
    return Layout(label=label, code=CODE, code_end=CODE_END, data=SMALL_DATA, unmapped=SMALL_UNMAPPED,
                  stack_top=STACK_TOP, kernel_stack_top=KERNEL_STACK_TOP, tables=tables, entry_bytes=eb,
                  leaves=(leaf,), entries=MappingProxyType(entries), pages=pages)


def _large_pages(label: str, paging: str, size: int, user: int) -> Layout:
    """2 MiB / 1 GiB pages: large page 0 = low memory, 1 = data, 2 = not present (the unmapped page)."""
    if size == LARGE_1G:
        tables = (TABLES, TABLES + PAGE)  # PML4, PDPT (PDPTE with PS maps 1 GiB, SDM Table 4-16)
        shift = 30
    elif paging == "PAE":
        tables = (TABLES, TABLES + PAGE)  # PDPT, PD (PDE with PS maps 2 MiB, SDM Table 4-9)
        shift = 21
    else:
        tables = (TABLES, TABLES + PAGE, TABLES + 2 * PAGE)  # PML4, PDPT, PD (SDM Table 4-18)
        shift = 21
    entries: dict[int, int] = {}
    for upper, lower in pairwise(tables):
        entries[upper] = lower | (P if paging == "PAE" and upper == tables[0] else P | RW | US)
    leaf_table = tables[-1]
    entries[leaf_table] = 0 | P | RW | PS | user
    entries[leaf_table + 8] = (1 << shift) | P | RW | PS | user
    data = (1 << shift, (1 << shift) + PAGE)
    leaf = LeafTable(linear=0, table=leaf_table, shift=shift, entry_bytes=8, count=512)
    pages = tuple(sorted({*LOW_PAGES, *data, *tables}))
    return Layout(label=label, code=CODE, code_end=CODE_END, data=data, unmapped=2 << shift,
                  stack_top=STACK_TOP, kernel_stack_top=KERNEL_STACK_TOP, tables=tables, entry_bytes=8,
                  leaves=(leaf,), entries=MappingProxyType(entries), pages=pages)
