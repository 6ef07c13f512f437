"""Triage (signatures, the vote), minimization and the known-divergence registry.

Injected divergences come from :class:`tests.test_difftest_compare.Perturbed` (the spec
CPU with a bug added after one instruction form retires), so every expectation --
which instruction, which field, who dissents, what verdict -- is known in advance.
The registry's example cases are replayed on the real backends (KVM-dependent ones
skip with the backend's reason where /dev/kvm is unusable).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftest import registry
from difftest.backend import Outcome, Stop
from difftest.case import Case
from difftest.compare import compare, compare_all
from difftest.known import KNOWN_DIR, KnownDivergence, KnownError, is_known, json_schema, load_known, match
from difftest.minimize import INCOMPLETE_TAG, minimize, same_signature
from difftest.report import instructions, run_backends
from difftest.triage import (
    Signature,
    assess,
    flags_read,
    gap_signature,
    instruction_form,
    investigate,
    signature,
    vote,
)
from spec import flags as F
from spec.machine import DATA
from spec.snapshot import GPR_NAMES, Snapshot
from tests.test_difftest_compare import (
    KVM,
    KVM_CAPS,
    SPEC,
    UNICORN,
    H,
    Perturbed,
    build_case,
    renamed,
)

CHAIN = [H(x) for x in ("4801d8", "4811c8", "4829d1", "48c1e003", "4811d8", "4831f6", "4801c1")]
REGS = {"rax": 0xFFFF_FFFF_FFFF_FFF0, "rbx": 0x7F, "rcx": 3, "rdx": 9, "rsi": 0x5A5A, "r9": 0x1234}
MODE = "long64/4-level/2M/cpl0"
CF, AF = 1 << F.CF, 1 << F.AF


def clean(name: str, executed_by: str) -> Perturbed:
    return Perturbed(name, executed_by, None)


# -- an injected divergence, end to end --------------------------------------------------------------------------

@pytest.mark.parametrize(("buggy", "verdict"), [("unicorn", "unicorn-bug"), ("spec", "spec-bug")])
def test_injected_cf_flip_is_bisected_signed_voted_and_minimized(buggy: str, verdict: str) -> None:
    roles = {"spec": "spec", "unicorn": "qemu-tcg", "kvm": "hardware"}
    backends = [Perturbed(n, e, CHAIN[0], flip=CF) if n == buggy else clean(n, e) for n, e in roles.items()]
    case = build_case("long64", CHAIN, regs=REGS, data={DATA + 0x40: b"\x5a" * 24}, name="cf")
    finding = investigate(case, backends)
    assert finding is not None
    assert finding.index == 0  # the ADD; its CF feeds the ADC, so the final RAX differs too
    assert finding.signature.key == f"01 ADD Ev,Gv os64|{MODE}|flags.CF|{buggy}"
    assert finding.verdict.verdict == verdict and finding.verdict.dissenters == (buggy,)
    small = minimize(case, same_signature(backends, finding.signature.key))
    assert small.instructions() == [CHAIN[0]]
    assert all(getattr(small.snapshot.regs, n) == 0 for n in GPR_NAMES if n != "rsp")  # values simplified
    data = next(p for p in small.snapshot.pages if p.address == DATA)
    assert data.data == ""  # the irrelevant data zeroed
    assert small.provenance.generator == "minimized" and small.provenance.parent == "cf" and small.name == "cf-min"
    again = investigate(small, backends)
    assert again is not None and again.signature == finding.signature and again.verdict.verdict == verdict
    assert minimize(case, same_signature(backends, finding.signature.key)).to_json() == small.to_json()


def test_injected_wrong_byte_is_a_memory_divergence() -> None:
    store = H("48890425") + DATA.to_bytes(4, "little")  # mov [DATA], rax
    insns = [CHAIN[0], store, CHAIN[2]]
    fake = Perturbed("unicorn", "qemu-tcg", store, poke=(DATA + 1, b"\xee"))
    backends = [SPEC, fake, clean("kvm", "kvm-emulator")]
    case = build_case("long64", insns, regs=REGS)
    finding = investigate(case, backends)
    assert finding is not None and finding.index == 1
    assert finding.signature.key == f"89 MOV Ev,Gv os64|{MODE}|mem|unicorn"
    row = finding.comparison.rows[0]
    assert row.field == f"mem[{DATA + 1:#x}]" and row.values["unicorn"] == "ee"
    assert finding.verdict.verdict == "unicorn-bug"
    small = minimize(case, same_signature(backends, finding.signature.key))
    assert small.instructions() == [store]


def test_minimize_without_a_divergence_only_renames() -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    out = minimize(case, lambda c: False, name="x")
    assert out.instructions() == case.instructions() and out.name == "x"
    assert out.snapshot == case.snapshot


def test_minimize_respects_the_test_budget() -> None:
    case = build_case("long64", CHAIN, regs=REGS)
    calls: list[int] = []

    def diverges(c: Case) -> bool:
        calls.append(1)
        return any(i.startswith(CHAIN[3][:3]) for i in instructions(c))  # "a SHL RAX, imm8 is left"

    out = minimize(case, diverges, max_tests=5)
    assert len(calls) <= 6 and CHAIN[3] in out.instructions()  # 1 initial check + at most 5 tests
    assert INCOMPLETE_TAG in out.tags  # a cut-short minimization says so in the case file
    full = minimize(case, diverges)
    assert full.instructions() == [CHAIN[3][:3] + b"\x00"]  # one instruction, its shift count simplified 3 -> 0
    assert INCOMPLETE_TAG not in full.tags


# -- the vote ------------------------------------------------------------------------------------------------------

def _vote(backends: list, case: Case) -> tuple[Signature | None, str | None]:
    finding = investigate(case, backends)
    return (finding.signature, finding.verdict.verdict) if finding else (None, None)


def test_undefined_flags_between_unicorn_and_kvm_are_an_undefined_gap() -> None:
    shl = H("48c1e003")
    case = build_case("long64", [shl], regs={"rax": 0x1234})
    sig, verdict = _vote([SPEC, Perturbed("unicorn", "qemu-tcg", shl, flip=AF), clean("kvm", "hardware")], case)
    assert verdict == "undefined-gap"
    assert sig is not None and sig.key == f"C1 /4 SHL Ev,Ib os64|{MODE}|flags.AF|kvm,unicorn"
    entry = match(sig, verdict=verdict)
    assert entry is not None and entry.name == "01-undefined-af-shift"
    # a *defined* flag flipped as well outranks the undefined one
    sig2, verdict2 = _vote([SPEC, Perturbed("unicorn", "qemu-tcg", shl, flip=AF | CF), clean("kvm", "hardware")],
                           case)
    assert verdict2 == "unicorn-bug" and sig2 is not None and sig2.field == "flags.CF" and not is_known(sig2)
    # ... and so does a defined field of a lower class (memory)
    sig3, verdict3 = _vote([SPEC, Perturbed("unicorn", "qemu-tcg", shl, flip=AF, poke=(DATA, b"\x01")),
                            clean("kvm", "hardware")], case)
    assert verdict3 == "unicorn-bug" and sig3 is not None and sig3.field == "mem"


@pytest.mark.parametrize(("executed_by", "verdict"), [("kvm-emulator", "kvm-quirk"), ("hardware", "unknown")])
def test_kvm_alone(executed_by: str, verdict: str) -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    backends = [SPEC, clean("unicorn", "qemu-tcg"), Perturbed("kvm", executed_by, CHAIN[1], flip=CF)]
    sig, v = _vote(backends, case)
    assert v == verdict and sig is not None and sig.backends == ("kvm",)


@pytest.mark.parametrize(("other", "verdict"), [("hardware", "spec-bug"), ("qemu-tcg", "unknown"),
                                                ("kvm-emulator", "unknown")])
def test_two_backends(other: str, verdict: str) -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    sig, v = _vote([SPEC, Perturbed("other", other, CHAIN[1], flip=CF)], case)
    assert v == verdict and sig is not None and sig.backends == ("other", "spec")


def test_no_majority_is_unknown() -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    backends = [SPEC, Perturbed("unicorn", "qemu-tcg", CHAIN[1], poke=(DATA, b"\x01")),
                Perturbed("kvm", "hardware", CHAIN[1], poke=(DATA, b"\x02"))]
    sig, v = _vote(backends, case)
    assert v == "unknown" and sig is not None and sig.backends == ("kvm", "spec", "unicorn")


def test_an_early_undefined_flag_does_not_hide_a_later_bug() -> None:
    """Unicorn's AF after MUL differs (undefined), then its ADD gets CF wrong: the ADD is the finding."""
    mul, add = H("48f7e3"), H("4801d8")
    case = build_case("long64", [mul, add], regs={"rax": 0x1234, "rbx": 0x5678})

    uni = Perturbed("unicorn", "qemu-tcg", add, flip=CF)
    undefined_first = Perturbed("unicorn", "qemu-tcg", mul, flip=AF)
    alone = build_case("long64", [mul], regs={"rax": 0x1234, "rbx": 0x5678})
    sig, verdict = _vote([SPEC, undefined_first, clean("kvm", "hardware")], alone)
    assert verdict == "undefined-gap" and sig is not None and sig.form.startswith("F7 /4 MUL")
    sig, verdict = _vote([SPEC, _chain(undefined_first, uni), clean("kvm", "hardware")], case)
    assert verdict == "unicorn-bug" and sig is not None
    assert sig.key == f"01 ADD Ev,Gv os64|{MODE}|flags.CF|unicorn"


def _chain(*bugs: Perturbed) -> Perturbed:
    """One fake backend with several injected bugs (each after its own trigger)."""
    name, executed_by = bugs[0].name, bugs[0].executed_by

    class Chained(Perturbed):
        def run(self, snap, budget):  # type: ignore[no-untyped-def]
            from spec.cpu import SpecCPU

            m = snap.to_state()
            cpu = SpecCPU(m)
            ev = None
            for _ in range(budget):
                head = bytes(m.mem.phys.read_bytes(m.rip, 15))
                ev = cpu.step()
                if ev is not None:
                    break
                for b in bugs:
                    if b.trigger and head.startswith(b.trigger) and b.flip:
                        undefined = m.undefined
                        m.write_rflags(m.D.concrete(m.read_rflags()) ^ b.flip)
                        m.undefined = undefined
            assert ev is not None and ev.kind == "halted"
            return Outcome(backend=name, stop=Stop(kind="halted", rip=ev.rip), final=Snapshot.from_state(m),
                           executed_by=executed_by)

    return Chained(name, executed_by, None)


def test_a_flag_reader_of_an_undefined_flag_is_an_undefined_gap() -> None:
    """LAHF after MUL copies PF/SF/ZF/AF -- undefined after MUL -- into AH (SDM Vol. 1 Appendix A)."""
    mul, lahf = H("48f7e3"), H("9f")
    case = build_case("long64", [mul, lahf], regs={"rax": 0x1234, "rbx": 0x5678})
    pf = 1 << F.PF
    sig, verdict = _vote([SPEC, Perturbed("unicorn", "qemu-tcg", mul, flip=pf), clean("kvm", "hardware")], case)
    assert verdict == "undefined-gap" and sig is not None
    assert sig.key == f"9F LAHF|{MODE}|gpr|unicorn"
    assert match(sig, verdict=verdict).name == "99-undefined-gap"  # type: ignore[union-attr]
    sig2, verdict2 = _vote([SPEC, Perturbed("unicorn", "qemu-tcg", mul, flip=CF), clean("kvm", "hardware")], case)
    assert verdict2 == "unicorn-bug"  # CF is defined after MUL: a real bug, first seen at the MUL
    assert sig2 is not None and sig2.form.startswith("F7 /4 MUL")


def test_error_code_seen_by_spec_and_hardware_only() -> None:
    """Unicorn cannot observe error codes: spec against hardware decides (the hardware is ground truth)."""
    case = build_case("long64", [H("488b03")], regs={"rbx": 1 << 63}, cpl=3)  # #GP(0)
    spec = SPEC.run(case.snapshot, case.budget)
    uni = renamed(spec, "unicorn", stop=spec.stop.model_copy(update={"error_code": None}), executed_by="qemu-tcg")
    kvm = renamed(spec, "kvm", stop=spec.stop.model_copy(update={"error_code": 8}), executed_by="hardware")
    v = vote([spec, uni, kvm], case)
    assert v is not None and v.verdict == "spec-bug" and v.field == "stop.error_code" and v.dissenters == ("kvm",
                                                                                                           "spec")
    emu = renamed(kvm, "kvm", executed_by="kvm-emulator")
    v2 = vote([spec, uni, emu], case)
    assert v2 is not None and v2.verdict == "unknown"


def test_flags_read() -> None:
    assert flags_read(H("11d8"), 32) == {"CF"}  # ADC
    assert flags_read(H("7e00"), 32) == {"ZF", "SF", "OF"}  # JLE
    assert flags_read(H("0f94c0"), 32) == {"ZF"}  # SETE
    assert flags_read(H("9f"), 32) == {"SF", "ZF", "AF", "PF", "CF"}  # LAHF
    assert flags_read(H("01d8"), 32) == frozenset()  # ADD writes flags, reads none


def test_vote_is_none_without_divergence() -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    outs = run_backends(case, [SPEC, clean("unicorn", "qemu-tcg")])
    assert vote(outs, case) is None
    assert investigate(case, [SPEC, clean("unicorn", "qemu-tcg")]) is None


@pytest.mark.parametrize(("poke", "value", "verdict"), [(0x7FF9, 0x02, "kvm-quirk"), (0x7FF8, 0x00, "unknown"),
                                                       (0x7FF9, 0x01, "unknown")])
def test_pushf_rule_needs_only_if_iopl_bits(poke: int, value: int, verdict: str) -> None:
    """Hardware at CPL 3 pushes the host's IF (bit 9: byte 1, bit 1 of the image); the same bit of byte 0
    (the always-one bit 1) or TF (bit 8) is not that quirk."""
    pushf = H("9c")
    case = build_case("long64", [pushf], cpl=3)
    kvm = Perturbed("kvm", "hardware", pushf, poke=(poke, bytes([value])))
    sig, v = _vote([SPEC, clean("unicorn", "qemu-tcg"), kvm], case)
    assert v == verdict and sig is not None
    assert sig.key == "9C PUSHF os64|long64/4-level/2M/cpl3|mem|kvm"
    assert (match(sig, verdict=v) is not None) == (verdict == "kvm-quirk")


def test_one_gib_page_rule() -> None:
    case = Case.load(KNOWN_DIR / "cases" / "04-kvm-no-pdpe1gb.json")
    spec = SPEC.run(case.snapshot, case.budget)
    shutdown = renamed(spec, "kvm", stop=Stop(kind="shutdown", rip=0x1000, detail="vector unknown"),
                       executed_by="kvm-emulator")
    v = vote([spec, renamed(spec, "unicorn", executed_by="qemu-tcg"), shutdown], case)
    assert v is not None and v.verdict == "kvm-quirk" and "PDPE1GB" in v.reason
    flat = build_case("long64", [H("90")])  # 2-MiB pages: the same shutdown is not explained by the rule
    spec2 = SPEC.run(flat.snapshot, flat.budget)
    v2 = vote([spec2, renamed(spec2, "unicorn", executed_by="qemu-tcg"),
               renamed(spec2, "kvm", stop=Stop(kind="shutdown", rip=0x1000), executed_by="kvm-emulator")], flat)
    assert v2 is not None and v2.verdict == "kvm-quirk" and "emulator" in v2.reason


def test_sse_rule() -> None:
    case = build_case("long64", [H("0f28c1")], cpl=3)  # movaps xmm0, xmm1 with CR4.OSFXSR = 0
    snap = case.snapshot
    spec = Outcome(backend="spec", stop=Stop(kind="unimplemented", rip=0x1000), final=None, executed_by="spec")
    uni = Outcome(backend="unicorn", stop=Stop(kind="exception", rip=0x1000, vector=6), final=snap,
                  executed_by="qemu-tcg")
    kvm = Outcome(backend="kvm", stop=Stop(kind="exception", rip=0x1003, vector=13, error_code=0), final=snap,
                  executed_by="hardware")
    v = vote([spec, uni, kvm], case)
    assert v is not None and v.verdict == "kvm-quirk" and "OSFXSR" in v.reason
    sig = signature(case, compare_all([spec, uni, kvm], case), 0)
    assert sig.key == "iced:MOVAPS xmm1, xmm2/m128|long64/4-level/2M/cpl3|stop.kind|kvm,unicorn"
    assert match(sig, verdict="kvm-quirk").name == "05-kvm-sse-osfxsr"  # type: ignore[union-attr]
    gap = gap_signature(case, spec)
    assert gap.key == "iced:MOVAPS xmm1, xmm2/m128|long64/4-level/2M/cpl3|unimplemented.model-gap|spec"


# -- signatures ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "bits", "form"), [
    ("4801d8", 64, "01 ADD Ev,Gv os64"), ("01d8", 32, "01 ADD Ev,Gv os32"), ("6601d8", 32, "01 ADD Ev,Gv os16"),
    ("f4", 64, "F4 HLT"), ("9c", 16, "9C PUSHF os16"), ("0f28c1", 64, "iced:MOVAPS xmm1, xmm2/m128"),
    ("06", 64, "bytes:06"),
])
def test_instruction_forms(raw: str, bits: int, form: str) -> None:
    assert instruction_form(H(raw), bits) == form


def test_signature_from_one_pairs_differences() -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    a = SPEC.run(case.snapshot, case.budget)
    b = Perturbed("other", "qemu-tcg", CHAIN[1], flip=CF).run(case.snapshot, case.budget)
    sig = signature(case, compare(a, b, case), 1)
    assert sig == Signature(form="11 ADC Ev,Gv os64", mode=MODE, field="flags.CF", backends=("other", "spec"))
    assert str(sig) == sig.key == f"11 ADC Ev,Gv os64|{MODE}|flags.CF|other,spec"
    assert signature(case, compare(a, b, case), -1).form == "F4 HLT"
    with pytest.raises(ValueError, match="no differences"):
        signature(case, [], 0)


@pytest.mark.parametrize(("kind", "detail", "field"), [
    ("unsupported", "KVM internal error: emulation failure (data 0x1)", "unsupported.internal-error"),
    ("unsupported", "KVM entry failed: hardware reason 0x7", "unsupported.entry-failed"),
    ("unsupported", "paging mode PAE not supported", "unsupported.refused"),
    ("unsupported", "read of physical memory not present (x); the spec models open bus", "unsupported.open-bus"),
    ("unimplemented", "opcode 0F 28 is not in the spec's opcode map", "unimplemented.model-gap"),
    ("unsupported", "something new", "unsupported.other"),
])
def test_gap_signatures(kind: str, detail: str, field: str) -> None:
    case = build_case("long64", CHAIN[:2], regs=REGS)
    for rip, form in ((0x1000, "01 ADD Ev,Gv os64"), (0x1003, "11 ADC Ev,Gv os64"), (0x1006, "F4 HLT"),
                      (0x1001, "?")):
        out = Outcome(backend="kvm", stop=Stop(kind=kind, rip=rip, detail=detail), executed_by="kvm-emulator")  # type: ignore[arg-type]
        assert gap_signature(case, out).key == f"{form}|{MODE}|{field}|kvm"
    with pytest.raises(ValueError, match="compared"):
        gap_signature(case, SPEC.run(case.snapshot, case.budget))


# -- the registry ---------------------------------------------------------------------------------------------------

ENTRIES = load_known()


def test_registry_contents() -> None:
    names = [e.name for e in ENTRIES]
    assert names[:2] == ["01-undefined-af-shift", "02-undefined-flags-mul"]  # the ORACLES.md classes first
    assert {"03-kvm-pushf-cpl3", "04-kvm-no-pdpe1gb", "05-kvm-sse-osfxsr", "06-kvm-emulator-internal-error"} <= set(
        names)
    for e in ENTRIES:
        case = Case.load(e.example_path())
        assert case.explanation and len(case.insn_offsets) >= 1
    schema = json.loads(json_schema())
    assert set(schema["required"]) >= {"name", "key_pattern", "verdict", "explanation", "example", "backends"}


def test_match_by_key_and_verdict() -> None:
    key = "D3 /7 SAR Ev,CL os32|prot32/cpl3|flags.AF|kvm,unicorn"
    assert match(key, verdict="undefined-gap").name == "01-undefined-af-shift"  # type: ignore[union-attr]
    assert match(key) is None  # the entry needs the vote to confirm the flag is undefined there
    assert match(key, verdict="unicorn-bug") is None
    mul = "F7 /5 IMUL Ev os16|real/cpl0|flags.ZF|kvm,unicorn"
    assert match(mul, verdict="undefined-gap").name == "02-undefined-flags-mul"  # type: ignore[union-attr]
    # any other undefined-gap falls to the catch-all; without that verdict nothing matches
    add = f"01 ADD Ev,Gv os64|{MODE}|flags.AF|kvm,unicorn"
    assert match(add, verdict="undefined-gap").name == "99-undefined-gap"  # type: ignore[union-attr]
    assert not is_known(add, verdict="unicorn-bug") and not is_known(add)
    # key-only entries match without a verdict (gaps; undefined results the vote cannot see)
    gap = f"F3 0F B8 POPCNT Gv,Ev os64|{MODE}|unsupported.internal-error|kvm"
    assert match(gap).name == "06-kvm-emulator-internal-error"  # type: ignore[union-attr]
    bsf = f"0F BC BSF Gv,Ev os32|{MODE}|gpr|unicorn"
    assert match(bsf, verdict="unicorn-bug").name == "10-unicorn-bsf-zero-source"  # type: ignore[union-attr]
    # without KVM a Unicorn bug is a spec/Unicorn tie: key-only entries accept it, others via undecided_pattern
    assert match(f"0F BC BSF Gv,Ev os32|{MODE}|gpr|spec,unicorn", verdict="unknown").name == (  # type: ignore[union-attr]
        "10-unicorn-bsf-zero-source")
    lahf = "9F LAHF|long64/4-level/4K/cpl3|gpr|"
    assert match(lahf + "unicorn", verdict="unicorn-bug").name == "16-unicorn-lahf-rex"  # type: ignore[union-attr]
    assert match(lahf + "spec,unicorn", verdict="unknown").name == "16-unicorn-lahf-rex"  # type: ignore[union-attr]
    assert match(lahf + "unicorn", verdict="unknown") is None  # the vote named Unicorn: it must say why
    gap = match(lahf + "kvm,unicorn", verdict="undefined-gap")
    assert gap is not None and gap.name == "99-undefined-gap"  # a LAHF of carried undefined flags stays a gap
    # crash signatures (difftest.campaign.diagnose_crash)
    idiv = "crash|unicorn|F7 /7 IDIV Ev os32|long64/4-level/4K/cpl0"
    assert match(idiv, verdict="unicorn-bug").name == "11-unicorn-idiv-overflow-crash"  # type: ignore[union-attr]
    assert match(idiv.replace("IDIV Ev os32", "IDIV Ev os64"), verdict="unicorn-bug") is None


def _write(d: Path, stem: str, **over: object) -> Path:
    (d / "cases").mkdir(exist_ok=True)
    (d / "cases" / "x.json").write_text("{}")
    entry = {"name": stem, "key_pattern": "a|b", "verdict": "unknown", "explanation": "an explanation",
             "example": "cases/x.json", "backends": ["spec"], **over}
    p = d / f"{stem}.json"
    p.write_text(json.dumps(entry))
    return p


@pytest.mark.parametrize(("over", "message"), [
    ({"key_pattern": "(unclosed"}, "key_pattern: Value error, invalid regular expression"),
    ({"verdict": "bug"}, "verdict: Input should be"),
    ({"example": "cases/missing.json"}, "example cases/missing.json does not exist"),
    ({"name": "other"}, "does not match the file name"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"backends": []}, "backends: List should have at least 1 item"),
])
def test_malformed_registry_files_are_one_line_errors(tmp_path: Path, over: dict, message: str) -> None:
    _write(tmp_path, "ok-entry")
    _write(tmp_path, "bad", **over)
    with pytest.raises(KnownError) as e:
        load_known(tmp_path)
    text = str(e.value)
    assert "\n" not in text and "bad.json" in text and message in text


def test_unreadable_registry(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KnownError, match=r"broken\.json: entry: Invalid JSON"):
        load_known(tmp_path)
    with pytest.raises(KnownError, match="no such registry directory"):
        load_known(tmp_path / "nope")
    good = load_known(Path(_write(tmp_path / "..", "fine").parent))
    assert any(isinstance(e, KnownDivergence) and e.name == "fine" for e in good)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_every_example_reproduces_its_signature(entry: KnownDivergence) -> None:
    if "kvm" in entry.backends and KVM is None:
        pytest.skip(f"KVM backend unavailable: {KVM_CAPS.reason}")
    case = Case.load(entry.example_path())
    if entry.key_pattern.startswith("crash"):  # a backend that kills its process: diagnosed in child processes
        from difftest.campaign import diagnose_crash

        crash = diagnose_crash(case, entry.backends)
        assert entry.matches(crash.key) and crash.verdict == entry.verdict, crash
        assert match(crash.key, verdict=crash.verdict) == entry
        return
    by_name = {"spec": SPEC, "unicorn": UNICORN, "kvm": KVM}
    backends = [by_name[b] if b in by_name else registry.create(b) for b in entry.backends]
    result = assess(case, backends)  # type: ignore[arg-type]
    if result.finding is not None:
        sig, verdict = result.finding.signature, result.finding.verdict.verdict
        assert entry.matches(sig), sig.key
        if entry.requires_verdict:
            assert verdict == entry.verdict, result.finding.verdict
        assert match(sig, verdict=verdict) == entry
    else:
        assert any(entry.matches(g) and match(g) == entry for g in result.gaps), [g.key for g in result.gaps]
