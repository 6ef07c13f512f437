"""Minimization: shrink a diverging case while its divergence stays the same.

:func:`minimize` takes a case and a predicate ``still_diverges(case) -> bool`` -- in a
campaign "run these backends, and is the signature still the original one"
(:func:`same_signature`) -- and simplifies in passes, keeping every change the
predicate accepts:

1. instructions: delta debugging (Zeller & Hildebrandt's ddmin: try chunks, then
   complements of chunks, at doubling granularity), ending 1-minimal -- no single
   instruction can be dropped;
2. immediates and relative branch displacements (the trailing immediate bytes of
   the instruction, from the opcode-table row): 0, then 1;
3. initial GPR values (RSP excepted: the environment's stack): 0, 1, then the value
   truncated to 8/16/32 bits;
4. RFLAGS: the status flags and DF cleared together, then one at a time;
5. memory that is neither code nor a system structure (paging structures, GDT, IDT,
   TSS, handler stubs): zeroed a page at a time, then in halves down to 8 bytes.

Passes repeat while they change something (simpler values can make more instructions
removable).  Everything is deterministic for a deterministic predicate; results of the
predicate are memoized.  ``max_tests`` bounds the predicate calls (then the best case
so far is returned, tagged ``minimization-budget-exhausted``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from difftest.backend import Backend
from difftest.case import Case, Provenance
from difftest.compare import paging_tables
from difftest.report import instructions
from difftest.triage import investigate
from spec import flags as F
from spec.decode.decoder import decode
from spec.decode.encode import imm_fields
from spec.decode.insn import IMM, REL
from spec.faults import Fault, Unimplemented
from spec.machine import HANDLER_STRIDE, HANDLERS
from spec.memory import PAGE
from spec.snapshot import GPR_NAMES, PageModel

SIMPLE_FLAGS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.DF, F.OF)
MIN_CHUNK = 8


INCOMPLETE_TAG = "minimization-budget-exhausted"


class _Budget(Exception):
    """The predicate budget ran out."""


class _Minimizer:
    def __init__(self, case: Case, still_diverges: Callable[[Case], bool], max_tests: int) -> None:
        self.base = case
        self.test_fn = still_diverges
        self.max_tests = max_tests
        self.calls = 0
        self.memo: dict[tuple, bool] = {}
        self.insns: list[bytes] = instructions(case)
        self.regs: dict[str, int] = {n: getattr(case.snapshot.regs, n) for n in GPR_NAMES}
        self.rflags = case.snapshot.regs.rflags
        self.pages: dict[int, bytes] = {}  # data pages changed so far (address -> 4 KiB)
        self.protected = _protected_bytes(case)

    # -- building and testing candidates ------------------------------------------------------------------
    def build(self, insns: list[bytes], regs: dict[str, int], rflags: int, pages: dict[int, bytes]) -> Case:
        c = self.base.with_instructions(insns)
        snap = c.snapshot
        for n, v in regs.items():
            setattr(snap.regs, n, v)
        snap.regs.rflags = rflags
        if pages:
            by = {p.address: p for p in snap.pages}
            for a, raw in pages.items():
                by[a] = PageModel(address=a, data=raw.rstrip(b"\0").hex())
            snap.pages = sorted(by.values(), key=lambda p: p.address)
        return c

    def test(self, insns: list[bytes] | None = None, regs: dict[str, int] | None = None, rflags: int | None = None,
             pages: dict[int, bytes] | None = None) -> bool:
        insns = self.insns if insns is None else insns
        regs = self.regs if regs is None else regs
        rflags = self.rflags if rflags is None else rflags
        pages = self.pages if pages is None else pages
        key = (tuple(insns), tuple(sorted(regs.items())), rflags, tuple(sorted(pages.items())))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if self.calls >= self.max_tests:
            raise _Budget
        self.calls += 1
        ok = bool(self.test_fn(self.build(insns, regs, rflags, pages)))
        self.memo[key] = ok
        return ok

    # -- passes ---------------------------------------------------------------------------------------
    def instructions(self) -> bool:
        """ddmin over the instruction list; True if it shrank."""
        items = list(self.insns)
        before = len(items)
        if items and self.test(insns=[]):
            self.insns = []
            return True
        n = 2
        while len(items) >= 2:
            size = len(items)
            chunks = [items[size * k // n: size * (k + 1) // n] for k in range(n)]
            reduced = False
            for c in chunks:
                if c and len(c) < size and self.test(insns=c):
                    items, n, reduced = c, 2, True
                    break
            if not reduced:
                for k in range(len(chunks)):
                    comp = [x for j, c in enumerate(chunks) if j != k for x in c]
                    if len(comp) < size and self.test(insns=comp):
                        items, n, reduced = comp, max(n - 1, 2), True
                        break
            if not reduced:
                if n >= size:
                    break
                n = min(size, 2 * n)
            self.insns = items
        self.insns = items
        return len(items) < before

    def immediates(self) -> bool:
        changed = False
        bits = self.base.env.bits
        for k in range(len(self.insns)):
            raw = self.insns[k]
            width = _immediate_width(raw, bits, self.base.env.mode == "real")
            if not width:
                continue
            for value in (0, 1):
                cand = raw[:-width] + value.to_bytes(width, "little")
                if cand == raw:
                    break
                trial = [*self.insns[:k], cand, *self.insns[k + 1:]]
                if self.test(insns=trial):
                    self.insns = trial
                    changed = True
                    break
        return changed

    def registers(self) -> bool:
        changed = False
        for n in GPR_NAMES:
            if n == "rsp":
                continue
            v = self.regs[n]
            for cand in _simpler_values(v):
                trial = {**self.regs, n: cand}
                if self.test(regs=trial):
                    self.regs = trial
                    changed = True
                    break
        return changed

    def flags(self) -> bool:
        mask = sum(1 << f for f in SIMPLE_FLAGS)
        if not self.rflags & mask:
            return False
        if self.test(rflags=self.rflags & ~mask):
            self.rflags &= ~mask
            return True
        changed = False
        for f in SIMPLE_FLAGS:
            if self.rflags >> f & 1 and self.test(rflags=self.rflags & ~(1 << f)):
                self.rflags &= ~(1 << f)
                changed = True
        return changed

    def memory(self) -> bool:
        changed = False
        current = {p.address: p.to_bytes() for p in self.base.snapshot.pages}
        code_lo = self.base.code_physical & ~(PAGE - 1)
        code_hi = self.base.code_physical + len(self.base.code_bytes)
        for addr in sorted(current):
            if code_lo <= addr < code_hi:
                continue  # pages holding code are rebuilt by with_instructions; overriding them would undo that
            raw = bytearray(self.pages.get(addr, current[addr]))
            spans = [(lo, hi) for lo, hi in _free_spans(addr, self.protected) if any(raw[lo:hi])]
            for lo, hi in spans:
                changed |= self._zero(addr, raw, lo, hi)
        return changed

    def _zero(self, addr: int, raw: bytearray, lo: int, hi: int) -> bool:
        """Zero ``raw[lo:hi]`` of page ``addr`` if the divergence survives, else recurse into halves."""
        if not any(raw[lo:hi]):
            return False
        trial = bytearray(raw)
        trial[lo:hi] = bytes(hi - lo)
        if self.test(pages={**self.pages, addr: bytes(trial)}):
            raw[lo:hi] = bytes(hi - lo)
            self.pages = {**self.pages, addr: bytes(raw)}
            return True
        if hi - lo <= MIN_CHUNK:
            return False
        mid = (lo + hi) // 2
        a = self._zero(addr, raw, lo, mid)
        b = self._zero(addr, raw, mid, hi)
        return a or b

    def run(self) -> Case:
        exhausted = False
        try:
            for _ in range(4):
                changed = self.instructions()
                changed |= self.immediates()
                changed |= self.registers()
                changed |= self.flags()
                changed |= self.memory()
                if not changed:
                    break
        except _Budget:
            exhausted = True  # keep the best case so far: every accepted step kept the divergence
        best = self.build(self.insns, self.regs, self.rflags, self.pages)
        if exhausted:  # say so in the case file: a reader should not take it for a fixpoint
            best.tags.append(INCOMPLETE_TAG)
        return best


def minimize(case: Case, still_diverges: Callable[[Case], bool], *, max_tests: int = 3000,
             name: str | None = None) -> Case:
    """The smallest case found that ``still_diverges`` (see the module docstring).

    The result is named ``name`` (default ``<case>-min``) with provenance ``minimized``
    and ``parent`` = the case's name; ``still_diverges(case)`` should hold to begin with
    (otherwise the case is returned with only its name and provenance changed).
    """
    result = _Minimizer(case, still_diverges, max_tests).run() if still_diverges(case) else case
    prov = Provenance(generator="minimized", seed=case.provenance.seed, campaign=case.provenance.campaign,
                      index=case.provenance.index, parent=case.name)
    return result.model_copy(update={"name": name or f"{case.name}-min", "provenance": prov})


def same_signature(backends: Sequence[Backend], key: str) -> Callable[[Case], bool]:
    """The predicate "running ``backends`` on the case gives a divergence with signature ``key``"."""

    def check(case: Case) -> bool:
        finding = investigate(case, backends, classify=False)
        return finding is not None and finding.signature.key == key

    return check


# -- helpers ------------------------------------------------------------------------------------------------

def _simpler_values(v: int) -> list[int]:
    out: list[int] = []
    for c in (0, 1, v & 0xFF, v & 0xFFFF, v & 0xFFFF_FFFF):
        if c < v and c not in out:
            out.append(c)
    return out


def _immediate_width(raw: bytes, bits: int, real: bool) -> int:
    """Bytes of the trailing immediate/displacement fields of the instruction ``raw`` (0 if none)."""
    try:
        insn = decode(raw, bits, real=real)
    except (Fault, Unimplemented, IndexError):
        return 0
    if not any(op.kind in (IMM, REL) for op in insn.operands):
        return 0
    width = sum(imm_fields(insn.row, insn.opsize, insn.addrsize))
    return width if 0 < width < len(raw) else 0


def _protected_bytes(case: Case) -> list[tuple[int, int]]:
    """Physical ranges minimization leaves alone: code and system structures (identity-mapped builders)."""
    snap = case.snapshot
    spans = [(case.code_physical, case.code_physical + len(case.code_bytes))]
    spans += [(t.address, t.address + t.count * t.entry_bytes) for t in paging_tables(snap)]
    spans.append((snap.gdtr.base, snap.gdtr.base + snap.gdtr.limit + 1))
    spans.append((snap.idtr.base, snap.idtr.base + snap.idtr.limit + 1))
    tr = snap.segments.tr
    spans.append((tr.base, tr.base + tr.limit + 1))
    spans.append((HANDLERS, HANDLERS + 256 * HANDLER_STRIDE))
    return spans


def _free_spans(page: int, protected: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Offsets ``(lo, hi)`` within ``page`` not covered by a protected range."""
    cuts = sorted((max(lo, page) - page, min(hi, page + PAGE) - page) for lo, hi in protected
                  if lo < page + PAGE and hi > page)
    out, pos = [], 0
    for lo, hi in cuts:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < PAGE:
        out.append((pos, PAGE))
    return out
