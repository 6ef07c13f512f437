"""Comparing outcomes: which architectural fields two backends disagree on after running one case.

:func:`compare` takes two :class:`~difftest.backend.Outcome` of one :class:`~difftest.case.Case`
and returns the :class:`Difference` list -- empty when they agree.  Compared:

* the stop event: kind, vector, error code (only when both backends report one), RIP, and
  CR2 for #PF (SDM Vol. 3A 6.15, "Interrupt 14");
* the 16 GPRs, RFLAGS bit by bit -- minus the status flags the reference's final snapshot
  lists in ``undefined_flags`` (the spec tracks them: an instruction that leaves a flag
  undefined sets it there, a later write defines it again, SDM Vol. 1 Appendix A) --,
  the six segment selectors, CR0/CR3/CR4 and EFER;
* every physical page of the *case's* snapshot, byte by byte (a backend's final snapshot
  may hold other pages: only the case's are compared; one a backend does not report is
  not observed by it).  Bytes inside the case's paging
  structures are reported per entry (``pte[0x71008]``), and a difference only in the
  accessed or dirty bit is called out as such (``pte[0x71008].A`` / ``.D``, SDM Vol. 3A
  4.8); other bytes as runs (``mem[0x10008..0x1000b]``).

What each backend can observe is respected (ORACLES.md):

* ``unsupported`` (the backend cannot run the case) and ``unimplemented`` (a spec model
  gap) outcomes are never divergences: :func:`compare` returns no differences (the
  triage reports them separately, :func:`difftest.triage.gap_signature`).
* Exceptions delivered to :func:`spec.machine.install_idt`'s HLT stubs (KVM always, the
  spec with ``deliver_exceptions=True``) are decoded from the handler's stack frame
  (:func:`difftest.backends.kvm.stub_exception`).  Two delivering backends are compared
  on their whole final state, the frame memory included.  A delivering backend against
  one that stops at the first exception (Unicorn, the spec without delivery) is compared
  at the exception: the delivering side's RIP, CS, RFLAGS (RF excepted, SDM Vol. 3A
  17.3.1.1), RSP and SS are read back from the frame (SDM Vol. 3A 6.12.1, 6.14.2), the
  frame's bytes are not compared, nor accessed/dirty/descriptor-accessed bits that only
  the delivery set.
* The case's terminating HLT is the harness's, not part of the code under test: halting
  there (RIP after it) and ``#GP(0)`` at it at CPL > 0 (HLT is privileged, SDM Vol. 2A
  HLT) are the same event, ``end`` (Unicorn does not fault on HLT at CPL 3).
* A ``budget`` stop marks a comparable point only when both backends count instructions
  exactly (:data:`INSTRUCTION_EXACT`); KVM's budget is a time bound, so there only the
  stop kind is compared.
* A KVM ``shutdown`` (a fault it could not deliver; vector unknown) matches an exception
  that a non-delivering backend stopped at: compared are RIP, CR2 and the state (RF
  excepted: KVM reports it set).
* Error codes are compared only when both outcomes carry one (Unicorn cannot observe
  them); pass ``capabilities`` to also flag a backend that should have reported one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

from pydantic import BaseModel, ConfigDict, Field

from difftest.backend import Capabilities, Outcome, describe
from difftest.backends.kvm import stub_exception
from difftest.case import HLT, Case
from spec import flags as F
from spec.domain import CONCRETE
from spec.faults import HAS_ERROR_CODE
from spec.memory import PAGE, AccessKind
from spec.paging import ACCESSED, DIRTY, PS, Access, PagingControl, paging_mode, walk
from spec.snapshot import GPR_NAMES, SEG_FIELDS, Snapshot

INCOMPARABLE = frozenset({"unsupported", "unimplemented"})
"""Outcome kinds that are never divergences (the backend could not run the case / the spec has a model gap)."""

INSTRUCTION_EXACT = frozenset({"spec", "qemu-tcg"})
"""``Outcome.executed_by`` values whose budget is an exact instruction count (KVM's is a time bound)."""

VECTOR_GP, VECTOR_PF = 13, 14
PF_RSVD = 8
RF_BIT = 1 << F.RF
M64 = (1 << 64) - 1

RFLAGS_FIELDS: tuple[tuple[str, int, int], ...] = (
    # (name, bit, width) -- SDM Vol. 1 Figure 3-8
    ("CF", F.CF, 1), ("PF", F.PF, 1), ("AF", F.AF, 1), ("ZF", F.ZF, 1), ("SF", F.SF, 1), ("TF", F.TF, 1),
    ("IF", F.IF, 1), ("DF", F.DF, 1), ("OF", F.OF, 1), ("IOPL", F.IOPL_SHIFT, 2), ("NT", F.NT, 1),
    ("RF", F.RF, 1), ("VM", F.VM, 1), ("AC", F.AC, 1), ("VIF", F.VIF, 1), ("VIP", F.VIP, 1), ("ID", F.ID, 1),
)
LEVEL_NAMES = {"4-level": {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
               "5-level": {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
               "PAE": {3: "PDPTE", 2: "PDE", 1: "PTE"}, "32-bit": {2: "PDE", 1: "PTE"}}

# Order of significance of field classes: the first differing class of a divergence is its headline.
CLASS_ORDER = ("stop.kind", "stop.vector", "stop.error_code", "stop.rip", "cr2", "gpr",
               *(f"flags.{n}" for n, _, _ in RFLAGS_FIELDS), "seg", "cr", "mem", "pte", "pte.D", "pte.A")
_CLASS_RANK = {c: i for i, c in enumerate(CLASS_ORDER)}


def class_rank(cls: str) -> int:
    """Position of a field class in :data:`CLASS_ORDER` (unknown classes last)."""
    return _CLASS_RANK.get(cls, len(CLASS_ORDER))


class Difference(BaseModel):
    """One field two (or more) backends disagree on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str = Field(description='what differs: "rax", "rflags.CF", "stop.vector", "mem[0x10008]", "pte[0x71008].A"')
    values: dict[str, str] = Field(description="backend name -> its value, rendered")
    cls: str = Field(description='field class for signatures: "gpr", "flags.CF", "mem", "pte.A", "stop.kind", ...')
    note: str = Field(default="", description="for humans: what the field is (e.g. which paging entry)")


# -- reading guest memory of a snapshot (no side effects) ----------------------------------------------

class _Pages:
    """Physical memory of a snapshot, read-only (the paging walker's ``PhysAccess``; writes are dropped)."""

    def __init__(self, snap: Snapshot) -> None:
        self.by_addr = {p.address: p for p in snap.pages}
        self.cache: dict[int, bytes] = {}

    def page(self, base: int) -> bytes | None:
        data = self.cache.get(base)
        if data is None:
            p = self.by_addr.get(base)
            if p is None:
                return None
            data = self.cache[base] = p.to_bytes()
        return data

    def read(self, addr: int, n: int) -> int:
        out = bytearray()
        while n:
            base, off = addr & ~(PAGE - 1), addr & (PAGE - 1)
            take = min(n, PAGE - off)
            data = self.page(base)
            out += data[off:off + take] if data is not None else b"\xff" * take  # open bus
            addr, n = addr + take, n - take
        return int.from_bytes(out, "little")

    def write(self, addr: int, n: int, value: int) -> None:
        """Dropped: reading a snapshot must not set accessed/dirty bits."""


def _translate(snap: Snapshot, pages: _Pages, linear: int) -> int | None:
    """Physical address of ``linear`` (a supervisor implicit read, SDM Vol. 3A 4.6), or ``None`` on a fault."""
    c = snap.control
    mode = paging_mode(c.cr0, c.cr4, snap.efer)
    if mode is None:
        return linear & (0xFFFF_FFFF if c.cr0 & 1 else 0x1F_FFFF)
    ctl = PagingControl(cr0=c.cr0, cr3=c.cr3, cr4=c.cr4, efer=snap.efer, pdptes=tuple(snap.pdptes))
    w = walk(CONCRETE, pages, mode, ctl, linear & M64, Access(AccessKind.READ, 0, implicit=True))
    return None if w.fault is not None else int(w.phys)


def _read_linear(snap: Snapshot, pages: _Pages, linear: int, n: int) -> int | None:
    value = 0
    for i in range(n):
        pa = _translate(snap, pages, linear + i)
        if pa is None:
            return None
        value |= pages.read(pa, 1) << (8 * i)
    return value


# -- paging structures of a case -----------------------------------------------------------------------

@dataclass(frozen=True)
class PagingTable:
    """One paging-structure table of a case (SDM Vol. 3A 4.3-4.5): where it is and what it maps."""

    address: int  # physical address of entry 0
    level: int  # 1 = PT, 2 = PD, 3 = PDPT, 4 = PML4 (SDM numbering of spec.paging)
    entry_bytes: int
    count: int  # entries
    linear_base: int  # linear address mapped by entry 0
    span: int  # linear bytes per entry
    level_name: str

    def describe(self, index: int, entry: int) -> str:
        lin = self.linear_base + index * self.span
        leaf = self.level == 1 or bool(entry & PS and self.span > PAGE)
        what = f"maps {_size(self.span)} page at linear {lin:#x}" if leaf else f"table for linear {lin:#x}"
        return f"{self.level_name} #{index} of table {self.address:#x} ({what})"

    def is_leaf(self, entry: int) -> bool:
        return self.level == 1 or bool(entry & PS and self.level in (2, 3) and self.span > PAGE)


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def paging_tables(snap: Snapshot) -> list[PagingTable]:
    """Every paging-structure table reachable from ``snap``'s CR3 through present entries."""
    c = snap.control
    mode = paging_mode(c.cr0, c.cr4, snap.efer)
    if mode is None:
        return []
    by_addr = {p.address: p.data for p in snap.pages}
    names = LEVEL_NAMES[mode.name]
    eb = mode.entry_bytes
    out: list[PagingTable] = []
    seen: set[tuple[int, int]] = set()
    pse = mode.name != "32-bit" or bool(c.cr4 & (1 << 4))

    def visit(addr: int, level: int, count: int, linear_base: int) -> None:
        data = by_addr.get(addr & ~(PAGE - 1))
        if (addr, level) in seen or data is None:
            return
        seen.add((addr, level))
        span = 1 << mode.index_shift(level)
        out.append(PagingTable(addr, level, eb, count, linear_base, span, names[level]))
        if level == 1:
            return
        first = (addr & (PAGE - 1)) // eb
        for k, e in _present_entries(data, eb):
            i = k - first
            if not 0 <= i < count:
                continue
            if level in mode.large_levels and pse and e & PS:
                continue
            lin = linear_base + i * span
            if mode.name == "4-level" and level == 4 and lin >> 47 & 1:
                lin |= M64 ^ ((1 << 48) - 1)  # canonical upper half
            nxt = e & (0xFFFF_F000 if eb == 4 else 0x000F_FFFF_FFFF_F000)
            visit(nxt, level - 1, PAGE // eb, lin)

    if mode.name == "PAE":
        visit(c.cr3 & 0xFFFF_FFE0, 3, 4, 0)  # the PDPT: four entries at CR3 (SDM 4.4.1)
    else:
        visit(c.cr3 & (0xFFFF_F000 if eb == 4 else 0x000F_FFFF_FFFF_F000), mode.levels, PAGE // eb, 0)
    return out


@lru_cache(maxsize=1024)
def _present_entries(data: str, eb: int) -> tuple[tuple[int, int], ...]:
    """``(index, entry)`` of the present (P=1) entries of a page holding ``eb``-byte entries (hex ``data``)."""
    raw = bytes.fromhex(data).ljust(PAGE, b"\0")
    words = memoryview(raw).cast("I" if eb == 4 else "Q")
    return tuple((i, e) for i, e in enumerate(words) if e & 1)


# -- what a backend stopped with -----------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """An exception frame as pushed by the delivery (SDM Vol. 3A Figures 6-4, 6-9; real mode: 20.1.4)."""

    rip: int
    cs: int
    rflags: int
    rsp: int | None  # pushed on a stack switch (always in 64-bit mode)
    ss: int | None
    start: int  # linear address of the frame's lowest byte (the error code, if any)
    length: int
    width: int  # bytes per pushed item: 2, 4 or 8


@dataclass(frozen=True)
class Event:
    """A normalized stop: what a backend stopped with, in terms comparable across backends."""

    kind: str  # end | halted | exception | shutdown | budget | unsupported | unimplemented
    rip: int
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    delivered: bool = False  # the final state is inside install_idt's handler stub
    frame: Frame | None = None


def terminator_rip(case: Case) -> int | None:
    """RIP of the case's terminating HLT (``None`` if the code does not end with one)."""
    if not case.code.endswith(HLT.hex()):
        return None
    return case.snapshot.regs.rip + len(case.code) // 2 - 1


def _frame(final: Snapshot, vector: int) -> Frame | None:
    """Decode the frame the delivery of ``vector`` left on the handler's stack (see :func:`stub_exception`)."""
    pages = _Pages(final)
    real = not final.control.cr0 & 1
    long_mode = bool(final.efer & (1 << 10))
    segs = final.segments
    if real:
        width, has_err = 2, False
    elif long_mode:
        width, has_err = 8, vector in HAS_ERROR_CODE
    else:
        lo = _read_linear(final, pages, final.idtr.base + 8 * vector, 8)
        if lo is None:
            return None
        width, has_err = (4 if (lo >> 40) & 0xF in (0xE, 0xF) else 2), vector in HAS_ERROR_CODE
    if long_mode:
        sp = final.regs.rsp
    elif real or not segs.ss.db:
        sp = final.regs.rsp & 0xFFFF
    else:
        sp = final.regs.rsp & 0xFFFF_FFFF
    start = segs.ss.base + sp
    pos = start + (width if has_err else 0)
    words = []
    for _ in range(3):
        w = _read_linear(final, pages, pos, width)
        if w is None:
            return None
        words.append(w)
        pos += width
    rip, cs, rflags = words
    rsp = ss = None
    # A stack switch pushed SS:RSP: always in 64-bit mode; in legacy protected mode on a privilege change.
    if long_mode or (not real and (cs & 3) != (segs.cs.selector & 3)):
        r, s = _read_linear(final, pages, pos, width), _read_linear(final, pages, pos + width, width)
        if r is None or s is None:
            return None
        rsp, ss = r, s & 0xFFFF
        pos += 2 * width
    return Frame(rip=rip, cs=cs & 0xFFFF, rflags=rflags, rsp=rsp, ss=ss, start=start, length=pos - start, width=width)


def observe(outcome: Outcome, case: Case, *, context: CaseContext | None = None) -> Event:
    """The normalized stop of ``outcome`` (see the module docstring: delivered exceptions, ``end``)."""
    stop, final = outcome.stop, outcome.final
    ev = Event(kind=stop.kind, rip=stop.rip, vector=stop.vector, error_code=stop.error_code, cr2=stop.cr2)
    if final is not None and final.halted and stop.kind in ("halted", "exception"):
        decoded = stub_exception(final)
        if decoded is not None and decoded.vector is not None:
            ev = Event(kind="exception", rip=decoded.rip, vector=decoded.vector, error_code=decoded.error_code,
                       cr2=decoded.cr2, delivered=True, frame=_frame(final, decoded.vector))
    ctx = context or CaseContext.of(case)
    term = ctx.terminator
    if term is not None:
        if ev.kind == "halted" and ev.rip == term + 1:
            ev = Event(kind="end", rip=term)
        elif (ev.kind == "exception" and ev.vector == VECTOR_GP and ev.rip == term and ev.error_code in (0, None)
              and ctx.cpl > 0):
            ev = Event(kind="end", rip=term, delivered=ev.delivered, frame=ev.frame)
    return ev


# -- the state at the comparison point -----------------------------------------------------------------

@dataclass
class _View:
    """A backend's architectural state at the point compared, plus what of it is not comparable."""

    snap: Snapshot
    gprs: dict[str, int]
    rflags: int
    selectors: dict[str, int]
    ignore_flags: int = 0
    frame_bytes: set[int] = field(default_factory=set)  # physical addresses the delivery wrote
    delivered_only_bits: bool = False  # A/D/descriptor-accessed bits set only by a delivery are not compared


def _plain_view(final: Snapshot) -> _View:
    r = final.regs.__dict__  # pydantic keeps field values in __dict__: the fast way to read them all
    segs = final.segments.__dict__
    return _View(snap=final, gprs={n: r[n] for n in GPR_NAMES}, rflags=r["rflags"],
                 selectors={n: segs[n].selector for n in SEG_FIELDS})


def _undelivered_view(final: Snapshot, frame: Frame) -> _View:
    """The state before the delivery of the exception whose frame is ``frame`` (SDM Vol. 3A 6.12.1)."""
    v = _plain_view(final)
    # a 16-bit frame holds FLAGS only: the upper half of EFLAGS is what it was (delivery leaves it)
    v.rflags = (frame.rflags if frame.width > 2 else (final.regs.rflags & ~0xFFFF) | frame.rflags) | 2
    v.ignore_flags = RF_BIT  # a fault's pushed RFLAGS may have RF set (SDM Vol. 3A 17.3.1.1)
    if frame.width == 2:
        v.ignore_flags |= 1 << F.AC  # not in a 16-bit frame; real-mode delivery clears it (SDM Vol. 3A 20.1.4)
    v.selectors["cs"] = frame.cs
    if frame.ss is not None:
        v.selectors["ss"] = frame.ss
    if frame.rsp is not None:
        v.gprs["rsp"] = frame.rsp
    else:  # no stack switch: the frame sits right below the interrupted stack pointer
        mask = 0xFFFF if (not final.control.cr0 & 1 or not final.segments.ss.db) else 0xFFFF_FFFF
        old = final.regs.rsp
        v.gprs["rsp"] = (old & ~mask) | ((old + frame.length) & mask)
    pages = _Pages(final)
    for i in range(frame.length):
        pa = _translate(final, pages, frame.start + i)
        if pa is not None:
            v.frame_bytes.add(pa)
    v.delivered_only_bits = True
    return v


def _hex(v: int | None) -> str:
    return "-" if v is None else hex(v)


# -- comparing two outcomes -------------------------------------------------------------------------------

@dataclass
class CaseContext:
    """What comparing outcomes of one case needs, computed once per case."""

    case: Case
    page_addresses: list[int]
    terminator: int | None  # RIP of the terminating HLT
    cpl: int  # the CPL the case starts at
    _tables: list[PagingTable] | None = None

    @classmethod
    def of(cls, case: Case) -> CaseContext:
        return cls(case, [p.address for p in case.snapshot.pages], terminator_rip(case), describe(case.snapshot)[2])

    @property
    def tables(self) -> list[PagingTable]:
        if self._tables is None:
            self._tables = paging_tables(self.case.snapshot)
        return self._tables

    def table_at(self, phys: int) -> tuple[PagingTable, int] | None:
        """The paging table and entry index whose entry holds byte ``phys``."""
        for t in self.tables:
            if t.address <= phys < t.address + t.count * t.entry_bytes:
                return t, (phys - t.address) // t.entry_bytes
        return None


def compare(reference: Outcome, other: Outcome, case: Case, *, undefined_flags: Iterable[str] | None = None,
            capabilities: Mapping[str, Capabilities] | None = None,
            context: CaseContext | None = None) -> list[Difference]:
    """The fields ``reference`` and ``other`` (two runs of ``case``) disagree on; empty when they agree.

    ``undefined_flags`` are masked (default: the reference's final ``undefined_flags`` -- pass the
    spec as reference).  ``capabilities`` (backend name -> :class:`Capabilities`) makes a missing
    error code a difference when both backends should report one.
    """
    if reference.stop.kind in INCOMPARABLE or other.stop.kind in INCOMPARABLE:
        return []
    ctx = context or CaseContext.of(case)
    a, b = reference.backend, other.backend
    if a == b:
        raise ValueError(f"two outcomes of the same backend {a!r}; give each backend a distinct name")
    ea, eb = observe(reference, case, context=ctx), observe(other, case, context=ctx)
    if undefined_flags is None:
        undefined_flags = reference.final.undefined_flags if reference.final is not None else ()
    out: list[Difference] = []

    def diff(fld: str, cls: str, va: str, vb: str, note: str = "") -> None:
        if va != vb:
            out.append(Difference(field=fld, values={a: va, b: vb}, cls=cls, note=note))

    # -- the stop event --------------------------------------------------------------------------------
    kinds = {ea.kind, eb.kind}
    shutdown_match = kinds == {"shutdown", "exception"} and not (ea.delivered or eb.delivered) and all(
        e.vector is None for e in (ea, eb) if e.kind == "shutdown")
    if not shutdown_match:
        diff("stop.kind", "stop.kind", ea.kind, eb.kind)
    exact = reference.executed_by in INSTRUCTION_EXACT and other.executed_by in INSTRUCTION_EXACT
    if "budget" in kinds and not exact:
        return out  # a time bound: no comparable point
    if shutdown_match:
        diff("stop.rip", "stop.rip", hex(ea.rip), hex(eb.rip))
        if ea.cr2 is not None and eb.cr2 is not None and VECTOR_PF in (ea.vector, eb.vector):
            diff("cr2", "cr2", hex(ea.cr2), hex(eb.cr2), "CR2: the faulting linear address")
    elif ea.kind != "end" or eb.kind != "end":
        diff("stop.vector", "stop.vector", _hex(ea.vector), _hex(eb.vector))
        if ea.kind == eb.kind == "exception":
            report_a = capabilities[a].reports_error_codes if capabilities and a in capabilities else None
            report_b = capabilities[b].reports_error_codes if capabilities and b in capabilities else None
            both = (ea.error_code is not None and eb.error_code is not None) or (
                report_a is True and report_b is True and ea.vector in HAS_ERROR_CODE)
            if both:
                diff("stop.error_code", "stop.error_code", _hex(ea.error_code), _hex(eb.error_code))
        diff("stop.rip", "stop.rip", hex(ea.rip), hex(eb.rip))
        if VECTOR_PF in (ea.vector, eb.vector):
            diff("cr2", "cr2", _hex(ea.cr2 if ea.vector == VECTOR_PF else None),
                 _hex(eb.cr2 if eb.vector == VECTOR_PF else None), "CR2: the faulting linear address")

    # -- the state ---------------------------------------------------------------------------------------
    if reference.final is None or other.final is None:
        return out
    va, vb = _views(ea, reference.final, eb, other.final)
    if "shutdown" in kinds:
        va.ignore_flags |= RF_BIT  # KVM reports RF set after a triple fault
        vb.ignore_flags |= RF_BIT
    if va.gprs != vb.gprs:
        for n in GPR_NAMES:
            if va.gprs[n] != vb.gprs[n]:
                diff(n, "gpr", hex(va.gprs[n]), hex(vb.gprs[n]))
    masked = va.ignore_flags | vb.ignore_flags
    for n in undefined_flags:
        masked |= 1 << F.BY_NAME[n]
    x = (va.rflags ^ vb.rflags) & ~masked
    if x:
        for n, bit, width in RFLAGS_FIELDS:
            m = ((1 << width) - 1) << bit
            if x & m:
                diff(f"rflags.{n}", f"flags.{n}", str((va.rflags & m) >> bit), str((vb.rflags & m) >> bit))
    if va.selectors != vb.selectors:
        for n in SEG_FIELDS:
            diff(n, "seg", hex(va.selectors[n]), hex(vb.selectors[n]), f"{n.upper()} selector")
    fa, fb = va.snap, vb.snap
    ca, cb = fa.control, fb.control
    for n, x, y in (("cr0", ca.cr0, cb.cr0), ("cr3", ca.cr3, cb.cr3), ("cr4", ca.cr4, cb.cr4),
                    ("efer", fa.efer, fb.efer)):
        if x != y:
            diff(n, "cr", hex(x), hex(y))
    out.extend(_compare_memory(ctx, a, va, b, vb))
    return out


def _views(ea: Event, fa: Snapshot, eb: Event, fb: Snapshot) -> tuple[_View, _View]:
    """Both states at the same point: final states, or -- when exactly one delivered -- just before delivery."""
    if ea.delivered == eb.delivered:
        return _plain_view(fa), _plain_view(fb)
    if ea.delivered and ea.frame is not None:
        return _undelivered_view(fa, ea.frame), _plain_view(fb)
    if eb.delivered and eb.frame is not None:
        return _plain_view(fa), _undelivered_view(fb, eb.frame)
    return _plain_view(fa), _plain_view(fb)


def _compare_memory(ctx: CaseContext, a: str, va: _View, b: str, vb: _View) -> list[Difference]:
    out: list[Difference] = []
    pa, pb = {p.address: p for p in va.snap.pages}, {p.address: p for p in vb.snap.pages}
    skip = va.frame_bytes | vb.frame_bytes
    delivered_a, delivered_b = va.delivered_only_bits, vb.delivered_only_bits
    # descriptor type bytes whose accessed bit only the delivering side may have set
    gdt = _descriptor_type_bytes(va.snap if delivered_a else vb.snap) if delivered_a or delivered_b else set()
    for addr in ctx.page_addresses:
        x, y = pa.get(addr), pb.get(addr)
        if x is not None and y is not None and x.data == y.data:
            continue
        if x is None or y is None:
            continue  # a backend that does not report a page of the case has not observed it
        bx, by = x.to_bytes(), y.to_bytes()
        entries: dict[tuple[int, int], tuple[PagingTable, int]] = {}
        run: list[int] = []
        for off in _differing_offsets(bx, by):
            if addr + off in skip:
                continue
            phys = addr + off
            hit = ctx.table_at(phys)
            if hit is not None:
                t, i = hit
                entries[(t.address, i)] = hit
                continue
            if phys in gdt and (bx[off] ^ by[off]) == 1 and (bx if delivered_a else by)[off] & 1:
                continue  # the descriptor's accessed bit, set by the delivery's segment loads
            if run and (run[-1] + 1 != phys or len(run) >= 16):
                out.append(_mem_difference(a, bx, b, by, addr, run))
                run = []
            run.append(phys)
        if run:
            out.append(_mem_difference(a, bx, b, by, addr, run))
        for t, i in entries.values():
            out.extend(_entry_differences(a, bx, delivered_a, b, by, delivered_b, addr, t, i))
    return out


def _differing_offsets(x: bytes, y: bytes) -> list[int]:
    """Offsets where two pages differ (64-byte blocks compared first)."""
    out = []
    for blk in range(0, PAGE, 64):
        if x[blk:blk + 64] != y[blk:blk + 64]:
            out.extend(off for off in range(blk, blk + 64) if x[off] != y[off])
    return out


def _descriptor_type_bytes(snap: Snapshot) -> set[int]:
    """Physical addresses of the GDT descriptors' type bytes (byte 5; bit 0 is 'accessed', SDM Vol. 3A 3.4.5.1)."""
    out: set[int] = set()
    pages = _Pages(snap)
    for k in range(8, snap.gdtr.limit + 1, 8):
        pa = _translate(snap, pages, snap.gdtr.base + k + 5)
        if pa is not None:
            out.add(pa)
    return out


def _mem_difference(a: str, bx: bytes, b: str, by: bytes, page: int, run: list[int]) -> Difference:
    lo, hi = run[0] - page, run[-1] - page + 1
    name = f"mem[{run[0]:#x}]" if len(run) == 1 else f"mem[{run[0]:#x}..{run[-1]:#x}]"
    return Difference(field=name, values={a: bx[lo:hi].hex(), b: by[lo:hi].hex()}, cls="mem",
                      note=f"{len(run)} byte(s) of physical memory")


def _entry_differences(a: str, bx: bytes, del_a: bool, b: str, by: bytes, del_b: bool, page: int, t: PagingTable,
                       i: int) -> list[Difference]:
    """One paging-structure entry: A and D bits called out separately (SDM Vol. 3A 4.8)."""
    off = t.address + i * t.entry_bytes - page
    ex = int.from_bytes(bx[off:off + t.entry_bytes], "little")
    ey = int.from_bytes(by[off:off + t.entry_bytes], "little")
    x = ex ^ ey
    if del_a or del_b:  # bits only a delivery (its stack/IDT/GDT/TSS accesses) set are not compared
        only_delivery = ex & ~ey if del_a else ey & ~ex
        other_clear = ey & ~ex if del_a else ex & ~ey
        if not other_clear and not only_delivery & ~(ACCESSED | DIRTY):
            return []
    base = f"pte[{t.address + i * t.entry_bytes:#x}]"
    note = t.describe(i, ex)
    out: list[Difference] = []
    if x & ACCESSED:
        out.append(Difference(field=f"{base}.A", values={a: str(ex >> 5 & 1), b: str(ey >> 5 & 1)}, cls="pte.A",
                              note=note + ": accessed bit"))
    if x & DIRTY and (t.is_leaf(ex) or t.is_leaf(ey)):
        out.append(Difference(field=f"{base}.D", values={a: str(ex >> 6 & 1), b: str(ey >> 6 & 1)}, cls="pte.D",
                              note=note + ": dirty bit"))
        x &= ~DIRTY
    rest = x & ~ACCESSED
    if rest:
        w = 2 * t.entry_bytes
        out.append(Difference(field=base, values={a: f"{ex:#0{w + 2}x}", b: f"{ey:#0{w + 2}x}"}, cls="pte",
                              note=note))
    return out


# -- comparing every backend with every other ----------------------------------------------------------------

class FieldRow(BaseModel):
    """One differing field across all backends of a run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    cls: str
    values: dict[str, str] = Field(description="backend -> value; a backend missing agreed with those it was "
                                               "compared to, or the field was masked for it")
    note: str = ""
    undefined: bool = Field(default=False, description="an RFLAGS status flag the spec leaves undefined here")
    dissenters: tuple[str, ...] = Field(default=(), description="backends off the majority value (all on a tie)")


class Comparison(BaseModel):
    """Every comparable pair of backends of one case run, and the differing fields side by side."""

    model_config = ConfigDict(extra="forbid")

    backends: tuple[str, ...] = Field(description="backends whose outcomes were compared")
    incomparable: dict[str, str] = Field(default_factory=dict, description="backend -> why it is not compared")
    executed_by: dict[str, str] = Field(default_factory=dict)
    undefined_flags: tuple[str, ...] = ()
    pairs: dict[str, list[Difference]] = Field(default_factory=dict, description='"a~b" -> differences')
    rows: list[FieldRow] = Field(default_factory=list)

    @property
    def diverges(self) -> bool:
        return bool(self.rows)

    @property
    def diverges_defined(self) -> bool:
        """Some field other than a flag the spec leaves undefined differs."""
        return any(not r.undefined for r in self.rows)

    def headline(self) -> FieldRow | None:
        """The most significant row: defined fields before undefined ones, then by :data:`CLASS_ORDER`."""
        return self.rows[0] if self.rows else None


REFERENCE = "spec"


def compare_all(outcomes: Sequence[Outcome], case: Case, *, reference: str = REFERENCE,
                capabilities: Mapping[str, Capabilities] | None = None) -> Comparison:
    """Compare every pair of comparable outcomes of ``case``.

    Pairs with the ``reference`` backend mask the flags its final snapshot calls undefined;
    other pairs (e.g. Unicorn vs KVM) are compared unmasked, so that their disagreements on
    undefined flags are seen -- and marked ``undefined`` in the rows.
    """
    names = [o.backend for o in outcomes]
    if len(set(names)) != len(names):
        raise ValueError(f"outcomes of one backend given twice: {', '.join(names)}")
    ctx = CaseContext.of(case)
    ok = [o for o in outcomes if o.stop.kind not in INCOMPARABLE]
    skipped = {o.backend: f"{o.stop.kind}: {o.stop.detail}".rstrip(": ") for o in outcomes
               if o.stop.kind in INCOMPARABLE}
    ref = next((o for o in ok if o.backend == reference), None)
    undefined = tuple(ref.final.undefined_flags) if ref is not None and ref.final is not None else ()
    ok.sort(key=lambda o: (o.backend != reference, o.backend))
    pairs: dict[str, list[Difference]] = {}
    for x, y in combinations(ok, 2):
        mask = undefined if x.backend == reference else ()
        d = compare(x, y, case, undefined_flags=mask, capabilities=capabilities, context=ctx)
        if d:
            pairs[f"{x.backend}~{y.backend}"] = d
    rows = tabulate([d for ds in pairs.values() for d in ds], undefined)
    return Comparison(backends=tuple(o.backend for o in ok), incomparable=skipped,
                      executed_by={o.backend: o.executed_by for o in outcomes}, undefined_flags=undefined,
                      pairs=pairs, rows=rows)


def tabulate(diffs: Iterable[Difference], undefined: Iterable[str] = ()) -> list[FieldRow]:
    """Merge pairwise differences into one row per field, with each row's dissenters.

    Dissenters are the backends whose value is not the majority value; when no value has
    more backends than every other (e.g. two backends), all backends with a value dissent.
    Rows are sorted: defined fields first, then by :data:`CLASS_ORDER`, then by field name.
    """
    und = {f"flags.{n}" for n in undefined}
    merged: dict[str, tuple[str, str, dict[str, str]]] = {}
    for d in diffs:
        cls, note, vals = merged.setdefault(d.field, (d.cls, d.note, {}))
        vals.update(d.values)
    rows = []
    for fld, (cls, note, vals) in merged.items():
        groups: dict[str, list[str]] = {}
        for backend, v in vals.items():
            groups.setdefault(v, []).append(backend)
        sizes = sorted((len(g) for g in groups.values()), reverse=True)
        if len(sizes) > 1 and sizes[0] > sizes[1]:
            major = next(v for v, g in groups.items() if len(g) == sizes[0])
            dissent = tuple(sorted(bk for v, g in groups.items() if v != major for bk in g))
        else:
            dissent = tuple(sorted(vals))
        rows.append(FieldRow(field=fld, cls=cls, values=dict(sorted(vals.items())), note=note, undefined=cls in und,
                             dissenters=dissent))
    rows.sort(key=lambda r: (r.undefined, class_rank(r.cls), _field_order(r.field)))
    return rows


def _field_order(name: str) -> tuple[int, str]:
    if name in GPR_NAMES:
        return (GPR_NAMES.index(name), "")
    return (len(GPR_NAMES), name)
