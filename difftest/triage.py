"""Triage: a signature for de-duplicating divergences, and a vote that classifies them.

A :class:`Signature` names a divergence by what matters for finding it again:

* ``form`` -- the instruction form of the first diverging instruction: its opcode-table
  row key (:attr:`spec.decode.opcodes.Row.key`), with the operand size for rows whose
  size varies (``"C1 /4 SHL Ev,Ib os64"``); forms outside the spec's table are named by
  iced-x86 (``"iced:MOVAPS xmm1, xmm2/m128"``) or by their bytes.  When even the bare
  terminating HLT diverges, the form is the HLT's;
* ``mode`` -- :meth:`Environment.label` (``"long64/4-level/4K/cpl3"``);
* ``field`` -- the class of the most significant differing field
  (:data:`difftest.compare.CLASS_ORDER`; defined fields before undefined ones):
  ``"stop.vector"``, ``"gpr"``, ``"flags.AF"``, ``"mem"``, ``"pte.A"``, ...;
* ``backends`` -- who is off the majority on that field (all of them on a tie).

``key`` joins them with ``|``: the stable string campaigns dedupe on and
:mod:`difftest.known` matches.

:func:`vote` classifies a divergence among the spec, Unicorn and KVM (roles come from
``Outcome.executed_by``: ``spec``, ``qemu-tcg``, ``hardware`` = KVM at CPL 3 on the real
CPU, ``kvm-emulator`` = KVM's instruction emulator at CPL 0):

``undefined-gap``
    only flags the spec's own tables leave undefined differ (the spec masks them; they
    show between Unicorn and KVM, e.g. AF after shifts, SF/ZF/AF/PF after MUL/IMUL) --
    or the first diverging instruction reads such a flag (ADC, Jcc, SETcc, CMOVcc, LAHF,
    PUSHF, ...) whose values already differed before it (:func:`carried_undefined`).
``kvm-quirk``
    a known property of this nested KVM (ORACLES.md) explains it: PUSHF showing the
    host's IF/IOPL at CPL 3; no PDPE1GB in KVM's CPUID, so a 1-GiB page is a
    reserved-bit #PF; SSE not #UD with CR4.OSFXSR=0 at CPL 3; 32-bit exception frames
    pushed through 16-bit gates; or KVM's emulator (CPL 0) alone disagreeing.
``spec-bug``
    the spec alone disagrees while the others agree -- or the spec against the hardware
    when no other backend observes the field (e.g. an error code: Unicorn has none).
``unicorn-bug``
    Unicorn alone disagrees while the others agree.
``unknown``
    anything else: a tie between two backends, the hardware alone against spec and
    Unicorn, three different answers.

:func:`investigate` is the pipeline for one case: run, compare, bisect (on differences
outside the undefined flags when there are any, so that an early undefined flag does not
hide a later real divergence), sign and vote on the diverging prefix.

Outcomes that are ``unsupported`` or ``unimplemented`` are never divergences; their
:func:`gap_signature` lets a campaign count and dedupe them (e.g. KVM emulator internal
errors) all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from difftest.backend import Backend, Outcome
from difftest.case import HLT, Case
from difftest.compare import (
    INCOMPARABLE,
    PF_RSVD,
    VECTOR_PF,
    Comparison,
    Difference,
    FieldRow,
    compare,
    compare_all,
    observe,
    paging_tables,
    tabulate,
)
from difftest.report import first_divergence, instructions, prefix, run_backends
from spec import flags as F
from spec.decode.decoder import decode
from spec.faults import Fault, Unimplemented
from spec.paging import PS

VerdictName = Literal["spec-bug", "unicorn-bug", "kvm-quirk", "undefined-gap", "unknown"]
VERDICTS: tuple[str, ...] = ("spec-bug", "unicorn-bug", "kvm-quirk", "undefined-gap", "unknown")

KVM_EXECUTORS = frozenset({"hardware", "kvm-emulator"})
ROLE_OF_EXECUTOR = {"spec": "spec", "qemu-tcg": "unicorn", "hardware": "kvm", "kvm-emulator": "kvm"}
CR4_OSFXSR = 1 << 9
PUSHED_FLAGS_QUIRK = (1 << F.IF) | (3 << F.IOPL_SHIFT)  # what nested KVM's PUSHF shows of the host
VECTOR_UD = 6
GATE16 = frozenset({0x6, 0x7})  # 16-bit interrupt and trap gates (SDM Vol. 3A Table 3-2)


class Signature(BaseModel):
    """What identifies a divergence for de-duplication (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    form: str
    mode: str
    field: str
    backends: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.form}|{self.mode}|{self.field}|{','.join(self.backends)}"

    def __str__(self) -> str:
        return self.key


class Verdict(BaseModel):
    """The classification of one divergence and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verdict: VerdictName
    reason: str
    dissenters: tuple[str, ...] = ()
    field: str = ""


class Finding(BaseModel):
    """A divergence investigated: where it starts, what it is, how it was classified."""

    model_config = ConfigDict(extra="forbid")

    signature: Signature
    verdict: Verdict
    index: int = Field(description="first diverging instruction; -1: the terminating HLT alone")
    comparison: Comparison = Field(description="the backends compared on the prefix ending at `index`")
    outcomes: list[Outcome] = Field(default_factory=list, description="the prefix's outcomes")


# -- instruction forms ----------------------------------------------------------------------------------------

def instruction_form(raw: bytes, bits: int, *, real: bool = False) -> str:
    """The form of the instruction in ``raw`` (see :class:`Signature`)."""
    try:
        insn = decode(raw, bits, real=real)
    except (Fault, Unimplemented, IndexError):
        return _iced_form(raw, bits)
    row = insn.row
    sized = bool(row.names) or any(op.endswith(("v", "z")) for op in row.operands)
    return f"{row.key} os{insn.opsize}" if sized else row.key


def _iced_form(raw: bytes, bits: int) -> str:
    from iced_x86 import Code, Decoder, OpCodeInfo

    ins = Decoder(bits, raw).decode()
    if ins.code == Code.INVALID:
        return f"bytes:{raw[:15].hex()}"
    return f"iced:{OpCodeInfo(ins.code).instruction_string}"


def form_at(case: Case, index: int) -> str:
    """Form of instruction ``index`` of ``case`` (``-1`` or past the end: the terminating HLT)."""
    insns = instructions(case)
    raw = insns[index] if 0 <= index < len(insns) else HLT
    return instruction_form(raw, case.env.bits, real=case.env.mode == "real")


# Status flags an instruction reads (SDM Vol. 1 Appendix A, Table A-2 "T" = tests): condition codes
# (SDM Vol. 1 Table B-1) and the instructions that consume flags as data.
CONDITION_FLAGS = ({"OF"}, {"OF"}, {"CF"}, {"CF"}, {"ZF"}, {"ZF"}, {"CF", "ZF"}, {"CF", "ZF"}, {"SF"}, {"SF"},
                   {"PF"}, {"PF"}, {"SF", "OF"}, {"SF", "OF"}, {"ZF", "SF", "OF"}, {"ZF", "SF", "OF"})
FLAGS_READ = {"ADC": {"CF"}, "SBB": {"CF"}, "RCL": {"CF"}, "RCR": {"CF"}, "CMC": {"CF"}, "SALC": {"CF"},
              "INTO": {"OF"}, "LOOPE": {"ZF"}, "LOOPNE": {"ZF"}, "AAA": {"AF"}, "AAS": {"AF"},
              "DAA": {"AF", "CF"}, "DAS": {"AF", "CF"}, "LAHF": {"SF", "ZF", "AF", "PF", "CF"},
              "PUSHF": {"CF", "PF", "AF", "ZF", "SF", "OF"}}


def flags_read(raw: bytes, bits: int, *, real: bool = False) -> frozenset[str]:
    """The status flags the instruction in ``raw`` reads (empty if it reads none or does not decode)."""
    try:
        insn = decode(raw, bits, real=real)
    except (Fault, Unimplemented, IndexError):
        return frozenset()
    row = insn.row
    if row.cc is not None:
        return frozenset(CONDITION_FLAGS[row.cc])
    return frozenset(FLAGS_READ.get(row.mnemonic, ()))


def carried_undefined(case: Case, backends: Sequence[Backend], index: int, *,
                      reference: str = "spec", runs: PrefixRuns | None = None) -> frozenset[str]:
    """Undefined status flags whose values differ between ``backends`` after the first ``index`` instructions.

    Runs the prefix of ``index`` instructions (it agrees, up to undefined flags, by definition of the
    first divergence) and compares every pair unmasked; only flags the reference (spec) lists as
    undefined there count.  ``runs``: prefixes already run (the bisection's), reused instead of run again.
    """
    if index <= 0:
        return frozenset()
    if runs is None:
        runs = PrefixRuns(case, backends)
    short, outs = runs.run(index)
    outs = [o for o in outs if o.stop.kind not in INCOMPARABLE]
    ref = next((o for o in outs if o.backend == reference and o.final is not None), None)
    if ref is None or ref.final is None:
        return frozenset()
    undefined = set(ref.final.undefined_flags)
    found: set[str] = set()
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            for d in compare(a, b, short, undefined_flags=()):
                if d.cls.startswith("flags.") and d.cls[6:] in undefined:
                    found.add(d.cls[6:])
    return frozenset(found)


# -- signatures ---------------------------------------------------------------------------------------------

def signature(case: Case, diffs: Comparison | Sequence[Difference] | Sequence[FieldRow], index: int) -> Signature:
    """The signature of ``case``'s divergence whose first diverging instruction is ``index``.

    ``diffs``: a :class:`Comparison` (preferably of the prefix ending at ``index``), or the
    differences of one pair (then both backends of the pair dissent).
    """
    rows = diffs.rows if isinstance(diffs, Comparison) else _as_rows(diffs)
    if not rows:
        raise ValueError(f"case {case.name}: no differences, so no signature")
    head = rows[0]
    return Signature(form=form_at(case, index), mode=case.env.label(), field=head.cls, backends=head.dissenters)


def _as_rows(diffs: Sequence[Difference] | Sequence[FieldRow]) -> list[FieldRow]:
    items = list(diffs)
    if items and isinstance(items[0], FieldRow):
        return items  # type: ignore[return-value]
    return tabulate(items)  # type: ignore[arg-type]


def gap_signature(case: Case, outcome: Outcome) -> Signature:
    """A signature for an outcome that is not compared (``unsupported`` / ``unimplemented``).

    ``field`` is ``<kind>.<reason class>``: ``unsupported.internal-error`` (KVM's emulator
    gave up), ``unsupported.entry-failed``, ``unsupported.refused`` (the backend cannot run
    this environment), ``unsupported.open-bus`` (Unicorn: physical memory not present),
    ``unimplemented.model-gap``, or ``<kind>.other``; ``form`` is the instruction at the
    stop's RIP (or ``?`` when the RIP is not an instruction start of the case).
    """
    if outcome.stop.kind not in INCOMPARABLE:
        raise ValueError(f"{outcome.backend}: a {outcome.stop.kind} outcome is compared, not a gap")
    off = outcome.stop.rip - case.snapshot.regs.rip
    if off in case.insn_offsets:
        form = form_at(case, case.insn_offsets.index(off))
    elif off == len(case.code_bytes) - 1:
        form = form_at(case, -1)
    else:
        form = "?"
    return Signature(form=form, mode=case.env.label(), field=f"{outcome.stop.kind}.{_gap_class(outcome)}",
                     backends=(outcome.backend,))


def _gap_class(outcome: Outcome) -> str:
    d = outcome.stop.detail
    if outcome.stop.kind == "unimplemented":
        return "model-gap"
    if d.startswith("KVM internal error"):
        return "internal-error"
    if d.startswith("KVM entry failed"):
        return "entry-failed"
    if "not present" in d:
        return "open-bus"
    if any(w in d for w in ("not supported", "unavailable", "lies above", "exceed", "shuts down", "refused")):
        return "refused"
    return "other"


# -- the vote -------------------------------------------------------------------------------------------------

def _role(executed_by: str) -> str:
    return ROLE_OF_EXECUTOR.get(executed_by, executed_by)


def vote(outcomes: Sequence[Outcome], case: Case, *, comparison: Comparison | None = None,
         index: int | None = None, carried: frozenset[str] = frozenset()) -> Verdict | None:
    """Classify the divergence of ``outcomes`` of ``case`` (``None``: nothing diverges).

    ``comparison`` saves recomputing :func:`compare_all`; ``index`` is the first diverging
    instruction (it sharpens the PUSHF rule -- without it any PUSHF in the case counts);
    ``carried`` the status flags left undefined by earlier instructions whose values already
    differed between backends before instruction ``index`` (:func:`carried_undefined`): if
    that instruction reads one of them (ADC, Jcc, PUSHF, LAHF, ...), the divergence is an
    undefined-gap too.
    """
    comp = comparison or compare_all(outcomes, case)
    if not comp.diverges:
        return None
    head = comp.rows[0]
    defined = [r for r in comp.rows if not r.undefined]
    if not defined:
        flags = sorted({r.cls for r in comp.rows})
        return Verdict(verdict="undefined-gap", dissenters=head.dissenters, field=head.cls,
                       reason=f"only flags the spec leaves undefined here differ ({', '.join(flags)})")
    insns = instructions(case)
    if carried and index is not None and 0 <= index < len(insns):
        read = flags_read(insns[index], case.env.bits, real=case.env.mode == "real") & carried
        if read:
            return Verdict(verdict="undefined-gap", dissenters=head.dissenters, field=head.cls,
                           reason=f"instruction {index} reads {', '.join(sorted(read))}, left undefined by an earlier "
                                  "instruction with values that already differed between backends")
    by_name = {o.backend: o for o in outcomes}
    quirk = _kvm_quirk(case, comp, defined, by_name, index)
    if quirk is not None:
        return Verdict(verdict="kvm-quirk", reason=quirk, dissenters=head.dissenters, field=head.cls)
    dissent = head.dissenters
    agree = [b for b in comp.backends if b not in dissent]
    roles = {b: _role(comp.executed_by.get(b, "")) for b in comp.backends}

    def verdict(v: VerdictName, reason: str) -> Verdict:
        return Verdict(verdict=v, reason=reason, dissenters=dissent, field=head.cls)

    if len(dissent) == 1 and len(agree) >= 2:
        d = dissent[0]
        who = f"{', '.join(agree)} agree"
        if roles[d] == "spec":
            return verdict("spec-bug", f"the spec alone differs in {head.field}; {who}")
        if roles[d] == "unicorn":
            return verdict("unicorn-bug", f"Unicorn alone differs in {head.field}; {who}")
        if comp.executed_by.get(d) == "kvm-emulator":
            return verdict("kvm-quirk", f"KVM's instruction emulator (CPL 0) alone differs in {head.field}; {who}")
        if comp.executed_by.get(d) == "hardware":
            return verdict("unknown", f"the hardware alone differs in {head.field} ({who}): a bug the spec and "
                                      "Unicorn share, or a KVM-environment quirk not yet known")
        return verdict("unknown", f"{d} alone differs in {head.field}; {who}")
    if len(dissent) == 2 and set(dissent) == set(head.values):  # two values, no third observation
        hw = [b for b in dissent if comp.executed_by.get(b) == "hardware"]
        spec = [b for b in dissent if roles[b] == "spec"]
        if hw and spec:
            return verdict("spec-bug", f"the spec differs from the hardware (ground truth) in {head.field}"
                                       + ("" if len(comp.backends) == 2 else "; no other backend observes it"))
        if len(comp.backends) == 2:
            return verdict("unknown", f"{' and '.join(dissent)} differ in {head.field}; no third backend breaks "
                                      "the tie")
    return verdict("unknown", f"no majority in {head.field}: {', '.join(f'{b}={v}' for b, v in head.values.items())}")


def _kvm_quirk(case: Case, comp: Comparison, defined: list[FieldRow], by_name: dict[str, Outcome],
               index: int | None) -> str | None:
    """The known KVM-environment quirk (ORACLES.md) explaining this divergence, if one does."""
    kvm = [b for b in comp.backends if comp.executed_by.get(b) in KVM_EXECUTORS and b in defined[0].dissenters]
    if not kvm:
        return None
    name = kvm[0]
    ev = observe(by_name[name], case)
    others = [observe(by_name[b], case) for b in comp.backends if b != name]
    hardware = comp.executed_by.get(name) == "hardware"
    if _maps_1g_page(case) and (ev.kind == "shutdown" or (ev.vector == VECTOR_PF and (ev.error_code or 0) & PF_RSVD)):
        return ("KVM's CPUID lacks PDPE1GB (CPUID 80000001H:EDX[26]), so PS=1 in a PDPTE is a reserved bit: "
                "#PF with RSVD (a shutdown when the handlers are in that page too), where the others map 1 GiB")
    if hardware and not case.snapshot.control.cr4 & CR4_OSFXSR:
        ud = {e.rip for e in others if e.kind == "exception" and e.vector == VECTOR_UD}
        if ud and not (ev.kind == "exception" and ev.vector == VECTOR_UD and ev.rip in ud):
            return ("nested KVM at CPL 3 runs SSE instructions although CR4.OSFXSR=0 (the host's CR4 applies), "
                    "where #UD is architectural (SDM Vol. 3A 2.5, CR4.OSFXSR)")
    if hardware and _pushf_only(case, defined, name, index):
        return ("nested KVM at CPL 3: PUSHF stores the host's IF=1 and IOPL=0 instead of the guest's "
                "(the only differing bits are IF/IOPL of a pushed flags image)")
    if ev.delivered and ev.vector is not None and _gate_is_16bit(case, ev.vector):
        return ("KVM pushes a 32-bit exception frame through a 16-bit gate (SDM Vol. 3A 6.12.1 requires "
                "16-bit pushes), so the frame decoded from its stack is garbage")
    return None


def _maps_1g_page(case: Case) -> bool:
    """Does the case's 4-level paging use a 1-GiB page (a present PDPTE with PS=1, SDM Table 4-16)?"""
    snap = case.snapshot
    pages = {p.address: p.to_bytes() for p in snap.pages}
    for t in paging_tables(snap):
        if t.level != 3 or t.entry_bytes != 8 or t.count != 512:
            continue
        data = pages.get(t.address & ~0xFFF)
        if data is None:
            continue
        for i in range(t.count):
            off = (t.address & 0xFFF) + 8 * i
            e = int.from_bytes(data[off:off + 8], "little")
            if e & 1 and e & PS:
                return True
    return False


def _gate_is_16bit(case: Case, vector: int) -> bool:
    snap = case.snapshot
    if not snap.control.cr0 & 1 or snap.efer & (1 << 10):
        return False
    addr = snap.idtr.base + 8 * vector
    for p in snap.pages:
        if p.address <= addr < p.address + 0x1000 - 7:
            off = addr - p.address
            gate = int.from_bytes(p.to_bytes()[off:off + 8], "little")
            return (gate >> 40) & 0xF in GATE16
    return False


def _pushf_only(case: Case, defined: list[FieldRow], kvm: str, index: int | None) -> bool:
    """PUSHF ran and every defined difference is KVM's, in IF/IOPL bits of a flags image (memory or a GPR)."""
    insns = instructions(case)
    chosen = [insns[index]] if index is not None and 0 <= index < len(insns) else insns
    bits = case.env.bits
    if not any(_is_pushf(raw, bits) for raw in chosen):
        return False
    for r in defined:
        if kvm not in r.dissenters or r.cls not in ("mem", "gpr"):
            return False
        others = [v for b, v in r.values.items() if b != kvm]
        if not others or kvm not in r.values:
            return False
        mine = r.values[kvm]
        for v in others:
            if r.cls == "gpr":
                if (int(mine, 16) ^ int(v, 16)) & ~PUSHED_FLAGS_QUIRK:
                    return False
            else:
                start = int(r.field[4:].split("..")[0].rstrip("]"), 16)
                for k, (x, y) in enumerate(zip(bytes.fromhex(mine), bytes.fromhex(v), strict=True)):
                    if x != y and ((start + k) & 1 != 1 or (x ^ y) & ~(PUSHED_FLAGS_QUIRK >> 8)):
                        return False
    return True


def _is_pushf(raw: bytes, bits: int) -> bool:
    try:
        return decode(raw, bits).row.opcode == (0x9C,)
    except (Fault, Unimplemented, IndexError):
        return False


# -- the whole pipeline for one case -----------------------------------------------------------------------------

class PrefixRuns:
    """The prefixes of one case run on ``backends``, each at most once (the backends are deterministic).

    The bisection runs prefixes; signing runs the first diverging one again and the vote the
    last agreeing one -- both were run by the bisection, so they are looked up here.
    """

    def __init__(self, case: Case, backends: Sequence[Backend]) -> None:
        self.case, self.backends = case, list(backends)
        self._runs: dict[int, tuple[Case, list[Outcome]]] = {}
        self._comparisons: dict[int, Comparison] = {}

    def _record(self, short: Case) -> int:
        k = len(short.insn_offsets)
        if k not in self._runs:
            self._runs[k] = (short, run_backends(short, self.backends))
        return k

    def run(self, k: int) -> tuple[Case, list[Outcome]]:
        """The prefix of ``k`` instructions and its outcomes."""
        if k not in self._runs:
            self._record(prefix(self.case, k))
        return self._runs[k]

    def comparison(self, k: int) -> Comparison:
        """:func:`compare_all` of the prefix of ``k`` instructions."""
        if k not in self._comparisons:
            short, outs = self.run(k)
            self._comparisons[k] = compare_all(outs, short)
        return self._comparisons[k]

    def diverges_predicate(self, defined: bool) -> Callable[[Case], bool]:
        """:func:`difftest.report.diverges_on` for prefixes of the case, remembering each run."""

        def diverges(short: Case) -> bool:
            k = self._record(short)
            comp = self.comparison(k)
            return comp.diverges_defined if defined else comp.diverges

        return diverges


def investigate(case: Case, backends: Sequence[Backend], *, outcomes: Sequence[Outcome] | None = None,
                classify: bool = True) -> Finding | None:
    """Run ``case`` on ``backends``; if they diverge, bisect, then sign (and vote on) the diverging prefix.

    The bisection looks for the first *defined* difference when the whole case has one
    (undefined flags often differ from an early MUL or shift on, and would otherwise hide
    everything after); the prefix's undefined flags that already differed are then passed to
    the vote (:func:`carried_undefined`).

    ``outcomes`` of the whole case, when the caller has them already; ``classify=False``
    skips the vote (the verdict is then ``unknown``: "not classified").  ``None`` when
    nothing diverges.
    """
    outs = list(outcomes) if outcomes is not None else run_backends(case, backends)
    whole = compare_all(outs, case)
    if not whole.diverges:
        return None
    # Bisect on defined differences when there are any: an undefined flag that differs from an early
    # instruction on must not hide a later real divergence.
    runs = PrefixRuns(case, backends)
    index = first_divergence(case, whole_diverges=True, diverges=runs.diverges_predicate(whole.diverges_defined))
    short, p_outs = runs.run(index + 1)
    comp = runs.comparison(index + 1)
    if not comp.diverges:  # a backend that is not deterministic (KVM's time bound): sign the whole case
        short, p_outs, comp = case, outs, whole
    sig = signature(short, comp, index)
    verdict = None
    if classify:
        carried = (carried_undefined(case, backends, index, runs=runs) if comp.rows and not comp.rows[0].undefined
                   else frozenset())
        verdict = vote(p_outs, short, comparison=comp, index=index, carried=carried)
    if verdict is None:
        verdict = Verdict(verdict="unknown", reason="not classified", dissenters=sig.backends, field=sig.field)
    return Finding(signature=sig, verdict=verdict, index=index, comparison=comp, outcomes=p_outs)


class Assessment(BaseModel):
    """Everything a case run says: its divergence (if any) and the outcomes that were not compared."""

    model_config = ConfigDict(extra="forbid")

    finding: Finding | None = None
    gaps: list[Signature] = Field(default_factory=list, description="gap_signature of each unsupported/"
                                                                     "unimplemented outcome")

    @property
    def signatures(self) -> list[Signature]:
        return ([self.finding.signature] if self.finding else []) + self.gaps


def assess(case: Case, backends: Sequence[Backend]) -> Assessment:
    """Run ``case`` on ``backends``: :func:`investigate` the divergence and sign every gap."""
    outs = run_backends(case, backends)
    gaps = [gap_signature(case, o) for o in outs if o.stop.kind in INCOMPARABLE]
    return Assessment(finding=investigate(case, backends, outcomes=outs), gaps=gaps)
