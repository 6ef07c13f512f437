"""Properties of the page walker proved with Z3 over ALL page-table contents.

Every proof runs the real :func:`spec.paging.walk` in the symbolic domain on a
symbolic physical memory and a symbolic linear address, explores every
feasible path (:func:`spec.domain.symbolic.explore`) and proves the claim on
each path under its path condition (:func:`spec.domain.symbolic.prove`).
Control registers and the access are concrete (the walker branches on them in
Python), so each property enumerates a list of concrete configurations.

Every property has a twin test that runs the same check on a deliberately
broken walker -- a small monkeypatch of one helper of ``spec.paging``, or a
one-line source mutation of ``walk``/``_denied`` -- and asserts that Z3
refutes it with a concrete counterexample, printed as the paging-structure
entries the walk read: ``level``, physical address (or "PDPTE register") and
value (run ``pytest -s`` to see them).

Memory models: :class:`EntryMemory` is a :class:`spec.memory.SymbolicMemory`
whose array holds whole entries (8 or 4 bytes) instead of bytes.  It is exact
for accesses of one entry size at entry-aligned addresses -- and property
``g4`` proves that every access the walk makes is exactly that (aligned, in
the table the previous level names); ``test_byte_memory_gives_the_same_paths``
runs the byte-level SymbolicMemory itself for comparison (about ten times
slower).  The two-walk equivalences (e) and (f) use :class:`SnapshotMemory`,
whose reads see the initial contents (the walk's only stores set A/D, which no
later step reads -- property (c)) and whose overrides describe the second
page-table layout.

Configurations (the walker branches on them in Python): ``CONFIGS`` -- 4-level
paging with WP, NXE, SMEP, SMAP on and seven accesses (CPL 0/3 read, write,
fetch; implicit supervisor write), with WP+SMAP+AC=1+PKE (PKRU: key 1 WD, key 2
AD) and three accesses, with everything off; 32-bit paging (PSE, WP, SMEP,
SMAP), PAE and 5-level paging with a few accesses.  MAXPHYADDR is 40.

Properties: (a) success implies every entry granted the access; (b) turning
on WP / SMEP / SMAP (and NXE, qualified: see below) never turns a fault into a
success; (c) the walk only sets A/D flags, D only on writes and only in the
leaf; (d) the #PF P flag is set iff the failing entry is present; (e) a 2 MiB
page translates like the page table of 512 equivalent 4 KiB PTEs; (f) PAE and
4-level paging agree where their formats coincide; (g1) the physical address
is the leaf's frame plus the linear page offset; (g2) RSVD faults exactly
when a present entry sets a reserved bit (SDM reserved-bit lists, written
here), and then P=1; (g3) the error code's W/R, U/S, I/D, PK flags describe
the access; (g4) every entry address is the SDM's formula (table base from
the previous level, index from the linear address, entry-aligned).

Finding: (b) does NOT hold for EFER.NXE as an unqualified statement -- with
NXE=0 an XD bit is reserved (RSVD fault), with NXE=1 the same read succeeds.
The test proves the qualified form (no fault other than a RSVD fault becomes a
success) and shows Z3's counterexample to the unqualified one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import z3

from spec import paging
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.memory import AccessKind, SymbolicMemory
from spec.paging import BITS32, LEVEL4, LEVEL5, PAE, Access, PagingControl, PagingMode, Walk

M = 40  # MAXPHYADDR used by the proofs
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
PG, LME = 1 << 31, 1 << 8
WP, PSE, PAE_BIT, LA57, SMEP, SMAP, PKE, NXE = 1 << 16, 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21, 1 << 22, 1 << 11
CR3 = 0x1000
PKRU = (1 << 3) | (1 << 4)  # key 1: write-disable; key 2: access-disable


class EntryMemory(SymbolicMemory):
    """Symbolic physical memory as an array of whole paging-structure entries (``eb`` bytes each)."""

    def __init__(self, name: str = "mem", eb: int = 8, array: Any = None) -> None:
        self._z3 = z3
        self.eb, self.sh = eb, (3 if eb == 8 else 2)
        self.array = array if array is not None else z3.Array(name, z3.BitVecSort(64 - self.sh),
                                                               z3.BitVecSort(8 * eb))
        self.writes: list[tuple[Any, Any]] = []  # (slot, value) of every store, in order

    def index(self, addr: Any) -> Any:
        return z3.Extract(63, self.sh, self._addr(addr))

    def read(self, addr: Any, n: int) -> Any:
        assert n == self.eb
        return z3.Select(self.array, self.index(addr))

    def write(self, addr: Any, n: int, value: Any) -> None:
        assert n == self.eb
        self.writes.append((self.index(addr), value))
        self.array = z3.Store(self.array, self.index(addr), value)

    def copy(self) -> EntryMemory:
        return EntryMemory(eb=self.eb, array=self.array)


class SnapshotMemory(EntryMemory):
    """Entry memory whose reads see the initial contents (stores are recorded, not read back), with
    per-read overrides: ``overrides[k](addr)`` answers the k-th read.

    Used by the two-walk equivalences (e) and (f): the walk's only stores set A/D flags (property (c)), which
    no later step of the walk reads (A and D are neither address, rights, reserved nor PS bits), so reading
    the initial contents gives the same outcome; the overrides describe the second page-table layout for
    the entries where it differs (which excludes aliasing between those entries and the rest).
    """

    def __init__(self, array: Any, overrides: dict[int, Callable[[Any], Any]] | None = None) -> None:
        super().__init__(eb=8, array=array)
        self.initial = array
        self.overrides = overrides or {}
        self.reads = 0

    def read(self, addr: Any, n: int) -> Any:
        k = self.reads
        self.reads += 1
        if k in self.overrides:
            return self.overrides[k](addr)
        return z3.Select(self.initial, self.index(addr))


def control(mode: PagingMode, *, wp: bool = False, nxe: bool = False, smep: bool = False, smap: bool = False,
            ac: bool = False, pke: bool = False, pkru: int = 0) -> PagingControl:
    cr4 = {BITS32: PSE, PAE: PAE_BIT, LEVEL4: PAE_BIT, LEVEL5: PAE_BIT | LA57}[mode]
    cr4 |= (SMEP if smep else 0) | (SMAP if smap else 0) | (PKE if pke else 0)
    efer = (NXE if nxe else 0) | (LME if mode in (LEVEL4, LEVEL5) else 0)
    ctl = PagingControl(cr0=PG | (WP if wp else 0), cr3=CR3, cr4=cr4, efer=efer, maxphyaddr=M, pkru=pkru, ac=ac)
    assert paging.paging_mode(ctl.cr0, ctl.cr4, ctl.efer) is mode
    return ctl


def linear_for(mode: PagingMode) -> Any:
    if mode in (BITS32, PAE):
        return z3.ZeroExt(32, z3.BitVec("lin32", 32))
    return z3.BitVec("lin", 64)


PDPTE_REGS = tuple(z3.BitVec(f"pdpte{k}", 64) for k in range(4))


@dataclass
class Run:
    """One feasible path of a walk: its condition, the walk, memory before/after, the inputs."""

    cond: Any
    w: Walk
    before: Any
    after: Any
    writes: list[tuple[Any, Any]]
    lin: Any
    mode: PagingMode
    ctl: PagingControl
    acc: Access


_CACHE: dict[tuple[Any, ...], list[Run]] = {}


def runs(mode: PagingMode, ctl: PagingControl, acc: Access, variant: str = "real",
         memory: Callable[[], EntryMemory] | None = None) -> list[Run]:
    """Every path of ``paging.walk`` (as currently bound: a test may have patched it) for one configuration."""
    key = (variant, mode, ctl, acc, memory)
    if key in _CACHE:
        return _CACHE[key]
    if mode is PAE:
        ctl = replace(ctl, pdptes=PDPTE_REGS)

    def fn(D: SymbolicDomain) -> Run:
        mem = memory() if memory else EntryMemory("mem", mode.entry_bytes)
        lin = linear_for(mode)
        before = mem.array
        w = paging.walk(D, mem, mode, ctl, lin, acc)
        return Run(None, w, before, mem.array, getattr(mem, 'writes', []), lin, mode, ctl, acc)

    out = []
    for p in explore(fn):
        p.result.cond = p.condition
        out.append(p.result)
    if variant == "real":
        _CACHE[key] = out
    return out


def ev(model: z3.ModelRef, term: Any) -> int:
    return model.eval(term, model_completion=True).as_long()


def describe(model: z3.ModelRef, run: Run) -> str:
    """A counterexample as the entries the walk read: level, physical address, value."""
    w = run.w
    lines = [f"  {run.mode.name} {run.acc} linear={ev(model, run.lin):#x}"]
    for level, addr, value in w.entries:
        where = "PDPTE register" if addr is None else f"{ev(model, addr):#x}"
        lines.append(f"    level {level} entry @ {where} = {ev(model, value):#018x}")
    lines.append("    -> " + (f"#PF error code {w.fault:#x}" if w.fault is not None
                             else f"physical {ev(model, w.phys):#x} ({1 << w.page_shift:#x}-byte page)"))
    return "\n".join(lines)


def refute(claims: Iterator[tuple[Any, list[Run]]]) -> str | None:
    """The first counterexample to any ``(claim, runs)``, described; None if every claim is valid."""
    for claim, involved in claims:
        model = prove(claim, timeout_ms=30_000)
        if model is not None:
            hit = [r for r in involved if z3.is_true(model.eval(r.cond, model_completion=True))]
            return "counterexample:\n" + "\n".join(describe(model, r) for r in hit)
    return None


def refuted(check: Callable[[str], str | None], variant: str) -> str:
    cex = check(variant)
    assert cex is not None, f"the broken walker '{variant}' was not refuted"
    print(f"\n[{variant}] {cex}")
    return cex


def bit(v: Any, i: int) -> Any:
    return z3.Extract(i, i, v) == 1


def in_memory(run: Run, level: int) -> bool:
    return not (run.mode.top_from_registers and level == run.mode.levels)


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

ALL_ON = {"wp": True, "nxe": True, "smep": True, "smap": True}
CONFIGS: list[tuple[PagingMode, PagingControl, Access]] = (
    [(LEVEL4, control(LEVEL4, **ALL_ON), a) for a in (Access(W, 3, implicit=True), Access(W, 0), Access(R, 0),
                                                      Access(W, 3), Access(X, 0), Access(R, 3), Access(X, 3))]
    + [(LEVEL4, control(LEVEL4, wp=True, smap=True, ac=True, pke=True, pkru=PKRU), a)
       for a in (Access(R, 0), Access(W, 3), Access(R, 3, implicit=True))]
    + [(LEVEL4, control(LEVEL4), Access(W, 0))]  # WP, NXE, SMEP, SMAP off
    + [(BITS32, control(BITS32, wp=True, smep=True, smap=True), a) for a in (Access(W, 0), Access(X, 0))]
    + [(PAE, control(PAE, **ALL_ON), a) for a in (Access(W, 3), Access(X, 0))]
    + [(LEVEL5, control(LEVEL5, **ALL_ON), Access(W, 3))]
)


def all_runs(variant: str) -> Iterator[Run]:
    for mode, ctl, acc in CONFIGS:
        yield from runs(mode, ctl, acc, variant)


# ---------------------------------------------------------------------------
# Broken walkers
# ---------------------------------------------------------------------------

def mutate(fn: Callable[..., Any], old: str, new: str) -> Callable[..., Any]:
    """``fn`` with one source line changed (a mutant of the real code, compiled in its module's namespace)."""
    src = inspect.getsource(fn)
    assert src.count(old) == 1, old
    namespace = dict(vars(paging))
    exec(compile("from __future__ import annotations\n" + src.replace(old, new), "<mutant>", "exec"), namespace)
    return namespace[fn.__name__]


_real = {name: getattr(paging, name) for name in
         ("walk", "_denied", "_set_bits", "_error_code", "_page_base", "_table_address", "reserved_mask")}


def _rw_leaf_only(D, mode, ctl, acc, leaf, user, writable, xd):  # type: ignore[no-untyped-def]
    return _real["_denied"](D, mode, ctl, acc, leaf, user, D.bit(64, leaf, 1), xd)


def _no_smap(D, mode, ctl, acc, leaf, user, writable, xd):  # type: ignore[no-untyped-def]
    return _real["_denied"](D, mode, replace(ctl, cr4=ctl.cr4 & ~SMAP), acc, leaf, user, writable, xd)


def _dirty_always(D, mem, addr, eb, entry, bits):  # type: ignore[no-untyped-def]
    return _real["_set_bits"](D, mem, addr, eb, entry, bits | paging.DIRTY)


def _always_present(D, ctl, acc, present):  # type: ignore[no-untyped-def]
    return _real["_error_code"](D, ctl, acc, True)


def _us_from_cpl(D, ctl, acc, present):  # type: ignore[no-untyped-def]
    return _real["_error_code"](D, ctl, acc, present) | (paging.PF_U if acc.cpl == 3 else 0)


def _pat_in_address(D, mode, entry, level, maxphy):  # type: ignore[no-untyped-def]
    if mode.entry_bytes == 8:
        return D.and_(64, entry, D.const(64, paging._mask(maxphy - 1, 12)))
    return _real["_page_base"](D, mode, entry, level, maxphy)


def _table_bit11(D, mode, entry, maxphy):  # type: ignore[no-untyped-def]
    return D.and_(64, entry, D.const(64, paging._mask(maxphy - 1, 11)))


def _no_reserved(mode, level, large, ctl):  # type: ignore[no-untyped-def]
    return 0


VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {
    "rw-leaf-only": lambda: {"_denied": _rw_leaf_only},
    "forget-smap": lambda: {"_denied": _no_smap},
    "dirty-on-reads": lambda: {"_set_bits": _dirty_always},
    "pf-always-present": lambda: {"_error_code": _always_present},
    "us-from-cpl": lambda: {"_error_code": _us_from_cpl},
    "pat-bit-in-address": lambda: {"_page_base": _pat_in_address},
    "table-address-bit11": lambda: {"_table_address": _table_bit11},
    "skip-reserved-check": lambda: {"reserved_mask": _no_reserved},
    # SMEP written as a replacement of the XD check instead of an addition to it.
    "smep-replaces-xd": lambda: {"_denied": mutate(_real["_denied"], "deny = D.bor(deny, user)  # SMEP",
                                                   "deny = user  # SMEP")},
    # PAE PDPTE registers treated as carrying R/W and U/S (they carry none: SDM Table 4-8).
    "pdpte-rights": lambda: {"walk": mutate(_real["walk"], "if not (mode.top_from_registers and level == mode.levels):",
                                            "if True:")},
    # The page offset of a large page taken as 12 bits.
    "offset-12-bits": lambda: {"walk": mutate(_real["walk"], "D.const(64, (1 << ps) - 1)", "D.const(64, 0xFFF)")},
}


@contextmanager
def broken(variant: str) -> Iterator[None]:
    patches = VARIANTS[variant]()
    saved = {name: getattr(paging, name) for name in patches}
    for name, fn in patches.items():
        setattr(paging, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(paging, name, fn)


def checked(check: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Run ``check`` with the named walker variant patched in."""
    def run(variant: str) -> str | None:
        if variant == "real":
            return check(variant)
        with broken(variant):
            return check(variant)
    return run


# ---------------------------------------------------------------------------
# (a) A successful translation: every entry granted the access (SDM 4.6.1, 4.6.2)
# ---------------------------------------------------------------------------

def granted(run: Run) -> Any:
    ctl, acc = run.ctl, run.acc
    entries = [v for _, _, v in run.w.entries]
    rights = [v for lv, _, v in run.w.entries if in_memory(run, lv)]  # PAE PDPTEs carry no rights
    user = acc.cpl == 3 and not acc.implicit
    wp, nxe = bool(ctl.cr0 & WP), bool(ctl.efer & NXE)
    user_address = z3.And([bit(v, 2) for v in rights])
    c = [bit(v, 0) for v in entries]  # P = 1 at every level
    if user:
        c += [bit(v, 2) for v in rights]
    if acc.kind == W and (user or wp):
        c += [bit(v, 1) for v in rights]
    if acc.kind == X and nxe and run.mode is not BITS32:
        c += [z3.Not(bit(v, 63)) for v in rights]
    if not user and acc.kind == X and ctl.cr4 & SMEP:
        c.append(z3.Not(user_address))
    if not user and acc.kind != X and ctl.cr4 & SMAP and (acc.implicit or not ctl.ac):
        c.append(z3.Not(user_address))
    if ctl.cr4 & PKE and acc.kind != X and run.mode in (LEVEL4, LEVEL5):
        key = z3.ZeroExt(28, z3.Extract(62, 59, entries[-1]))
        pkru = z3.BitVecVal(ctl.pkru, 32)
        ad = z3.Extract(0, 0, z3.LShR(pkru, 2 * key)) == 1
        wd = z3.Extract(0, 0, z3.LShR(pkru, 2 * key + 1)) == 1
        deny = z3.Or(ad, wd) if acc.kind == W and (user or wp) else ad
        c.append(z3.Implies(user_address, z3.Not(deny)))
    return z3.And(c)


@checked
def check_a(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, granted(r)), [r]) for r in all_runs(variant) if r.w.ok)


def test_a_success_implies_every_entry_granted() -> None:
    assert check_a("real") is None


@pytest.mark.parametrize("variant", ["rw-leaf-only", "forget-smap"])
def test_a_refutes_broken(variant: str) -> None:
    refuted(check_a, variant)


# ---------------------------------------------------------------------------
# (b) Turning a protection on never turns a fault into a success
# ---------------------------------------------------------------------------

MONOTONE = [  # (control bit, mode, access, the other control bits) -- "on" configurations are in CONFIGS
    ("wp", LEVEL4, Access(W, 0), ALL_ON),
    ("wp", LEVEL4, Access(W, 3, implicit=True), ALL_ON),
    ("smep", LEVEL4, Access(X, 0), ALL_ON),
    ("smap", LEVEL4, Access(R, 0), ALL_ON),
    ("smap", LEVEL4, Access(W, 3, implicit=True), ALL_ON),
    ("nxe", LEVEL4, Access(X, 3), ALL_ON),
    ("wp", BITS32, Access(W, 0), {"smep": True, "smap": True}),
    ("smep", PAE, Access(X, 0), ALL_ON),
]


def monotone_claims(variant: str, cases: list[tuple[str, PagingMode, Access, dict[str, bool]]],
                    allow_rsvd: bool) -> Iterator[tuple[Any, list[Run]]]:
    for name, mode, acc, kw in cases:
        off = runs(mode, control(mode, **{**kw, name: False}), acc, variant)
        on = runs(mode, control(mode, **{**kw, name: True}), acc, variant)
        for a in off:
            if a.w.ok or (allow_rsvd and a.w.fault is not None and a.w.fault & paging.PF_RSVD):
                continue
            for b in on:
                if b.w.ok:  # same memory, same linear address: the two paths must exclude each other
                    yield z3.Not(z3.And(a.cond, b.cond)), [a, b]


@checked
def check_b(variant: str) -> str | None:
    return refute(monotone_claims(variant, MONOTONE, allow_rsvd=True))


def test_b_protections_are_monotone() -> None:
    assert check_b("real") is None


def test_b_nxe_unqualified_is_false() -> None:
    """With NXE=0 an XD bit is reserved (RSVD fault); with NXE=1 the same read succeeds (SDM 4.5.4, 4.6.1)."""
    cex = refute(monotone_claims("real", [("nxe", LEVEL4, Access(R, 0), ALL_ON)], allow_rsvd=False))
    assert cex is not None
    print("\n[NXE turns an RSVD fault into a success] " + cex)


def test_b_refutes_broken() -> None:
    refuted(check_b, "smep-replaces-xd")


# ---------------------------------------------------------------------------
# (c) The walk only sets A/D flags; D only on a write, only in the leaf (SDM 4.8)
# ---------------------------------------------------------------------------

A_BIT, D_BIT = 0x20, 0x40


def only_ad_changed(run: Run) -> Any:
    """Memory after the walk is memory before with a sequence of entry stores (checked structurally); each
    store keeps every bit of the slot's value at that moment, and adds only A -- or A and D in the leaf of a
    successful write -- for the entries the walk used at that slot."""
    w, eb = run.w, run.mode.entry_bytes
    sh = 3 if eb == 8 else 2
    used = w.entries if w.ok else w.entries[:-1]  # a failing entry is not used
    claims = []
    array = run.before
    for slot, value in run.writes:
        allowed = z3.BitVecVal(0, 8 * eb)
        for k, (_, addr, _) in enumerate(used):
            if addr is None:
                continue
            bits = A_BIT | (D_BIT if (w.ok and k == len(used) - 1 and run.acc.kind == W) else 0)
            allowed = z3.If(z3.Extract(63, sh, addr) == slot, allowed | bits, allowed)
        old = z3.Select(array, slot)
        claims += [value & ~allowed == old & ~allowed, old & ~value == 0]
        array = z3.Store(array, slot, value)
    assert z3.eq(z3.simplify(array), z3.simplify(run.after)), "memory changed other than by the recorded stores"
    return z3.And(claims)


@checked
def check_c(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, only_ad_changed(r)), [r]) for r in all_runs(variant))


def test_c_only_accessed_and_dirty_are_set() -> None:
    assert check_c("real") is None


def test_c_refutes_broken() -> None:
    refuted(check_c, "dirty-on-reads")


# ---------------------------------------------------------------------------
# (d) #PF P flag is set iff the failing entry was present (SDM 4.7)
# ---------------------------------------------------------------------------

@checked
def check_d(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, bit(r.w.entries[-1][2], 0) == bool(r.w.fault & 1)), [r])
                  for r in all_runs(variant) if r.w.fault is not None)


def test_d_p_flag_iff_entry_present() -> None:
    assert check_d("real") is None


def test_d_refutes_broken() -> None:
    refuted(check_d, "pf-always-present")


# ---------------------------------------------------------------------------
# (e) A 2 MiB page translates like a page table of 512 equivalent 4 KiB PTEs
# ---------------------------------------------------------------------------

def paired(walk_a: Callable[[SymbolicDomain], Run], walk_b: Callable[[SymbolicDomain], Run],
           pre: Callable[[Run, Run], Any]) -> Iterator[tuple[Any, list[Run]]]:
    """Explore two walks over related memories; for every pair of paths, claim the same outcome (fault code,
    or physical address) where both path conditions and the precondition hold."""
    def paths(fn: Callable[[SymbolicDomain], Run]) -> list[Run]:
        out = []
        for p in explore(fn):
            p.result.cond = p.condition
            out.append(p.result)
        return out

    runs_b = paths(walk_b)
    for a in paths(walk_a):
        agree = []
        for b in runs_b:
            if a.w.ok and b.w.ok:
                same: Any = a.w.phys == b.w.phys
            else:
                same = z3.BoolVal(a.w.fault == b.w.fault)
            agree.append(z3.Implies(z3.And(pre(a, b), b.cond), same))
        # One claim per path of the first walk, covering every path of the second.
        yield z3.Implies(a.cond, z3.And(agree)), [a, *runs_b]


def large_vs_small(variant: str, ctl: PagingControl, acc: Access) -> Iterator[tuple[Any, list[Run]]]:
    """Upper levels: any memory contents.  Layout 1: the PDE the walk reaches maps a 2 MiB page (PS=1, bits
    20:13 clear -- a well-formed large mapping).  Layout 2: that PDE slot instead holds ``table | P|RW|US|A``
    for a symbolic page-table address, and the table's 512 PTEs map the 512 4 KiB pieces of the same frame
    with the same flags (PTE i = frame + i*4K; PAT moves from bit 12 to bit 7; G, PK, XD, ignored bits kept).
    The PTE read is the one for linear bits 20:12 ((g4) proves the walk reads exactly that slot)."""
    base = z3.Array("mem", z3.BitVecSort(61), z3.BitVecSort(64))
    lin = linear_for(LEVEL4)
    table = z3.BitVec("table", 64)
    table_ok = z3.And(table & 0xFFF == 0, z3.ULT(table, 1 << M))
    large: list[Any] = []

    def pde(addr: Any) -> Any:
        large[:] = [z3.Select(base, z3.Extract(63, 3, addr))]  # what layout 1 holds in this slot
        return table | 0x27

    def pte(addr: Any) -> Any:
        big = large[0]
        i = z3.ZeroExt(55, z3.Extract(20, 12, lin))  # which of the 512 PTEs
        pat = z3.ZeroExt(63, z3.Extract(12, 12, big))
        return (big & ~z3.BitVecVal((1 << 21) - 1, 64)) | (big & 0xF7F) | (i << 12) | (pat << 7)

    def layout(overrides: dict[int, Callable[[Any], Any]]) -> Callable[[SymbolicDomain], Run]:
        def fn(D: SymbolicDomain) -> Run:
            D.solver.add(table_ok)
            m = SnapshotMemory(base, overrides)
            w = paging.walk(D, m, LEVEL4, ctl, lin, acc)
            return Run(None, w, base, m.array, m.writes, lin, LEVEL4, ctl, acc)
        return fn

    def pre(a: Run, b: Run) -> Any:
        c = [table_ok]
        if len(a.w.entries) >= 3:  # layout 1 reached a PDE: a well-formed 2 MiB mapping (if present)
            v = a.w.entries[2][2]
            c.append(z3.Implies(bit(v, 0), z3.And(bit(v, 7), z3.Extract(20, 13, v) == 0)))
        return z3.And(c)

    return paired(layout({}), layout({2: pde, 3: pte}), pre)


LARGE_CASES = [
    (control(LEVEL4, **ALL_ON), Access(W, 3)),
    (control(LEVEL4, nxe=True, smep=True), Access(X, 0)),
    (control(LEVEL4, wp=True, smap=True, pke=True, pkru=PKRU), Access(W, 0)),
]


@checked
def check_e(variant: str) -> str | None:
    for ctl, acc in LARGE_CASES:
        cex = refute(large_vs_small(variant, ctl, acc))
        if cex:
            return cex
    return None


def test_e_large_page_equals_512_small_pages() -> None:
    assert check_e("real") is None


def test_e_refutes_broken() -> None:
    refuted(check_e, "pat-bit-in-address")


# ---------------------------------------------------------------------------
# (f) PAE and 4-level paging agree where their formats coincide
# ---------------------------------------------------------------------------

def pdpte_register_reserved(v: Any) -> Any:
    """SDM Table 4-8: bits 2:1, 8:5 and 63:M of a PDPTE register are reserved."""
    return v & (0x6 | 0x1E0 | paging._mask(63, M)) != 0


def pae_vs_4level(variant: str, ctl4: PagingControl, acc: Access) -> Iterator[tuple[Any, list[Run]]]:
    """A 32-bit linear address.  PAE: the PDPTE registers (free of their reserved bits, as MOV CR3 ensures).
    4-level: CR3 -> PML4E[0] = pdpt|P|RW|US -> a PDPT whose four entries equal the registers with R/W = U/S
    = 1 (PDPTEs carry no rights in PAE paging); the PDPTE read is the one for linear bits 31:30 ((g4) proves
    the walk reads exactly that slot).  Page directories and tables: any common memory contents, with bits
    62:52 of the PDEs/PTEs read clear (reserved in PAE, ignored in 4-level paging)."""
    base = z3.Array("mem", z3.BitVecSort(61), z3.BitVecSort(64))
    pdpt = z3.BitVec("pdpt", 64)
    pdpt_ok = z3.And(pdpt & 0xFFF == 0, z3.ULT(pdpt, 1 << M))
    regs_ok = z3.And([z3.Not(pdpte_register_reserved(r)) for r in PDPTE_REGS])
    ctl_pae = replace(ctl4, efer=ctl4.efer & ~LME, pdptes=PDPTE_REGS)
    lin = linear_for(PAE)

    def pdpte(addr: Any) -> Any:
        e = PDPTE_REGS[0]
        for k in (1, 2, 3):
            e = z3.If(z3.Extract(31, 30, lin) == k, PDPTE_REGS[k], e)
        return e | 0x6

    def layout(mode: PagingMode, ctl: PagingControl,
               overrides: dict[int, Callable[[Any], Any]]) -> Callable[[SymbolicDomain], Run]:
        def fn(D: SymbolicDomain) -> Run:
            D.solver.add(pdpt_ok, regs_ok)
            m = SnapshotMemory(base, overrides)
            w = paging.walk(D, m, mode, ctl, lin, acc)
            return Run(None, w, base, m.array, m.writes, lin, mode, ctl, acc)
        return fn

    def pre(a: Run, b: Run) -> Any:
        same_format = [z3.Extract(62, 52, v) == 0 for lv, _, v in b.w.entries if lv <= 2]
        return z3.And(pdpt_ok, regs_ok, *same_format)

    return paired(layout(PAE, ctl_pae, {}), layout(LEVEL4, ctl4, {0: lambda addr: pdpt | 0x7, 1: pdpte}), pre)


PAE_CASES = [
    (control(LEVEL4, **ALL_ON), Access(W, 3)),
    (control(LEVEL4, nxe=True, smep=True), Access(X, 0)),
    (control(LEVEL4, wp=True), Access(R, 3, implicit=True)),
    (control(LEVEL4), Access(X, 3)),
]


@checked
def check_f(variant: str) -> str | None:
    for ctl, acc in PAE_CASES:
        cex = refute(pae_vs_4level(variant, ctl, acc))
        if cex:
            return cex
    return None


def test_f_pae_agrees_with_4level() -> None:
    assert check_f("real") is None


def test_f_refutes_broken() -> None:
    refuted(check_f, "pdpte-rights")


# ---------------------------------------------------------------------------
# (g1) The physical address is the leaf's frame plus the linear page offset (SDM 4.3-4.5)
# ---------------------------------------------------------------------------

def frame_plus_offset(run: Run) -> Any:
    w, leaf = run.w, run.w.entries[-1][2]
    s = w.page_shift
    if run.mode is BITS32 and s == 22:  # 4 MiB: PA[39:32] = PDE[20:13], PA[31:22] = PDE[31:22]
        frame = z3.Concat(z3.BitVecVal(0, 24), z3.Extract(20, 13, leaf), z3.Extract(31, 22, leaf))
    elif run.mode is BITS32:
        frame = z3.Concat(z3.BitVecVal(0, 32), z3.Extract(31, 12, leaf))
    else:
        frame = z3.Concat(z3.BitVecVal(0, 64 - M), z3.Extract(M - 1, s, leaf))
    expected = z3.Concat(z3.Extract(63 - s, 0, frame), z3.Extract(s - 1, 0, run.lin))
    size = {1: 12, 2: 22 if run.mode is BITS32 else 21, 3: 30}[w.level]
    return z3.And(w.phys == expected, z3.BoolVal(s == size))


@checked
def check_g1(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, frame_plus_offset(r)), [r]) for r in all_runs(variant) if r.w.ok)


def test_g1_physical_address_is_frame_plus_offset() -> None:
    assert check_g1("real") is None


@pytest.mark.parametrize("variant", ["offset-12-bits", "pat-bit-in-address"])
def test_g1_refutes_broken(variant: str) -> None:
    refuted(check_g1, variant)


# ---------------------------------------------------------------------------
# (g2) RSVD exactly when a present entry sets a reserved bit; then P=1 (SDM 4.3-4.5 reserved-bit lists)
# ---------------------------------------------------------------------------

def sdm_reserved(run: Run, level: int, v: Any) -> Any:
    """Whether a present entry at ``level`` sets a reserved bit (written from the SDM's lists)."""
    mode, nxe = run.mode, bool(run.ctl.efer & NXE)
    ps = bit(v, 7)

    def any_set(hi: int, lo: int) -> Any:
        return z3.Extract(hi, lo, v) != 0

    if mode is BITS32:  # 4-MByte PDE (CR4.PSE=1): bits 21:(M'-19), M' = min(M, 40) -- Table 4-4
        return z3.And(ps, any_set(21, min(M, 40) - 19)) if level == 2 else z3.BoolVal(False)
    if mode is PAE and level == 3:  # PDPTE register: 2:1, 8:5, 63:M -- Table 4-8
        return z3.Or(any_set(2, 1), any_set(8, 5), any_set(63, M))
    terms = [any_set(62 if mode is PAE else 51, M)]
    if not nxe:
        terms.append(bit(v, 63))
    if level >= 4:
        terms.append(ps)  # PML4E / PML5E: PS reserved
    if level == 3:
        terms.append(z3.And(ps, any_set(29, 13)))  # 1-GByte page
    if level == 2:
        terms.append(z3.And(ps, any_set(20, 13)))  # 2-MByte page
    return z3.Or(terms)


def rsvd_exact(run: Run) -> Any:
    w = run.w
    passed = w.entries if w.ok else w.entries[:-1]
    c = [z3.Not(sdm_reserved(run, lv, v)) for lv, _, v in passed]
    if w.fault is not None:
        lv, _, v = w.entries[-1]
        rsvd = bool(w.fault & paging.PF_RSVD)
        c.append(sdm_reserved(run, lv, v) == z3.BoolVal(rsvd) if bool(w.fault & 1) else z3.BoolVal(not rsvd))
        if rsvd:
            c.append(z3.BoolVal(bool(w.fault & 1)))
    return z3.And(c)


@checked
def check_g2(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, rsvd_exact(r)), [r]) for r in all_runs(variant))


def test_g2_rsvd_exactly_for_reserved_bits() -> None:
    assert check_g2("real") is None


def test_g2_refutes_broken() -> None:
    refuted(check_g2, "skip-reserved-check")


# ---------------------------------------------------------------------------
# (g3) The error code's W/R, U/S, I/D and PK flags describe the access (SDM 4.7)
# ---------------------------------------------------------------------------

def access_bits_right(run: Run) -> Any:
    code, acc, ctl = run.w.fault, run.acc, run.ctl
    assert code is not None
    user = acc.cpl == 3 and not acc.implicit
    fetch_id = acc.kind == X and bool(ctl.cr4 & SMEP or (ctl.cr4 & PAE_BIT and ctl.efer & NXE))
    ok = (bool(code & 2) == (acc.kind == W) and bool(code & 4) == user and bool(code & 16) == fetch_id
          and code & ~0x3F == 0)
    if code & 32:  # PK: a data access to a user-mode address with CR4.PKE in IA-32e paging
        rights = [v for lv, _, v in run.w.entries if in_memory(run, lv)]
        ok = ok and acc.kind != X and bool(ctl.cr4 & PKE) and run.mode in (LEVEL4, LEVEL5)
        return z3.And(z3.BoolVal(ok), *[bit(v, 2) for v in rights])
    return z3.BoolVal(ok)


@checked
def check_g3(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, access_bits_right(r)), [r]) for r in all_runs(variant)
                  if r.w.fault is not None)


def test_g3_error_code_describes_access() -> None:
    assert check_g3("real") is None


def test_g3_refutes_broken() -> None:
    refuted(check_g3, "us-from-cpl")


# ---------------------------------------------------------------------------
# (g4) Every entry address is the SDM's: table base from the level above, index from the linear address
# ---------------------------------------------------------------------------

def addresses_right(run: Run) -> Any:
    mode, lin = run.mode, run.lin
    c = []
    prev: Any = None
    for lv, addr, v in run.w.entries:
        if addr is not None:
            shift = mode.index_shift(lv)
            bits = mode.index_bits[lv - 1]
            if prev is None:  # the top table: CR3 bits 31:12 (32-bit) or M-1:12
                base = z3.BitVecVal(CR3 & (0xFFFF_F000 if mode is BITS32 else paging._mask(M - 1, 12)), 64)
            elif mode is BITS32:
                base = z3.ZeroExt(44, z3.Extract(31, 12, prev)) << 12
            else:
                base = z3.ZeroExt(76 - M, z3.Extract(M - 1, 12, prev)) << 12
            eb_shift = 2 if mode.entry_bytes == 4 else 3
            index = z3.ZeroExt(64 - bits, z3.Extract(shift + bits - 1, shift, lin))
            c.append(addr == base + (index << eb_shift))
        prev = v
    return z3.And(c)


@checked
def check_g4(variant: str) -> str | None:
    return refute((z3.Implies(r.cond, addresses_right(r)), [r]) for r in all_runs(variant))


def test_g4_entry_addresses_follow_the_sdm() -> None:
    assert check_g4("real") is None


def test_g4_refutes_broken() -> None:
    refuted(check_g4, "table-address-bit11")


def test_byte_memory_gives_the_same_paths() -> None:
    """The entry-granular memory is a faithful stand-in: on byte-level SymbolicMemory the 32-bit walk has the
    same outcomes (fault codes and page sizes) and (g4) holds there too."""
    def byte_memory() -> EntryMemory:
        return SymbolicMemory("bytes")  # type: ignore[return-value]

    mode, ctl, acc = BITS32, control(BITS32, wp=True, smep=True, smap=True), Access(W, 3)
    byte_runs = runs(mode, ctl, acc, memory=byte_memory)
    word_runs = runs(mode, ctl, acc)
    assert sorted((r.w.fault or -1, r.w.page_shift) for r in byte_runs) == \
        sorted((r.w.fault or -1, r.w.page_shift) for r in word_runs)
    for r in byte_runs:
        assert prove(z3.Implies(r.cond, addresses_right(r))) is None
