"""Campaigns: determinism, finding/deduplicating/minimizing divergences, resumability, bad settings,
corpus replay, and the snapshot/backend fast paths campaigns rely on.

The campaign logic is tested with a small local case stream (``stream_case``: register-only ALU code
in one 64-bit environment, built with :func:`difftest.builders.build`) so that the expected findings
are known exactly, and with a fake divergent backend registered through the registry's API.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftest import registry
from difftest.backend import Outcome, SpecBackend
from difftest.builders import build
from difftest.campaign import (
    CampaignError,
    Checker,
    RunOptions,
    make_config,
    normalize_reason,
    run_campaign,
    safe_name,
    summarize,
)
from difftest.case import Case, Environment, Provenance
from difftest.corpus import case_files, load_cases, replay
from difftest.layout import environment
from difftest.store import Store, StoreError
from spec.decode.decoder import decode
from spec.snapshot import PageModel, Snapshot

ROOT = Path(__file__).resolve().parent.parent
ENV = "long64/4-level/4K/cpl0"
# Register-only 64-bit ALU instructions with defined flags only (no HLT byte inside any of them).
ALU = [bytes.fromhex(h) for h in ("4801d8", "4829c8", "4821c8", "4809d8", "4831d8", "48ffc0", "48ffcb", "4801c9")]
NEG_RAX = bytes.fromhex("48f7d8")  # what the fake backend gets wrong


def stream_case(seed: int, index: int, *, envs: list[Environment], length: int, campaign: str | None) -> Case:
    """A deterministic local case stream (case i is a pure function of seed and i)."""
    rng = random.Random(f"{seed}:{index}")
    insns = [NEG_RAX if rng.random() < 0.06 else rng.choice(ALU) for _ in range(length)]
    regs = {n: rng.getrandbits(64) for n in ("rax", "rbx", "rcx")}
    return build(envs[index % len(envs)], insns, regs=regs, name=f"c{index}",
                 provenance=Provenance(generator="test-stream", seed=seed, campaign=campaign, index=index))


def stream_rows(case: Case) -> set[tuple[str, str]]:
    return {(decode(raw, case.env.bits).row.key, case.env.mode) for raw in case.instructions()}


class NegBackend:
    """The spec, except that NEG RAX (48 F7 D8) in the executed code leaves RAX's bit 0 flipped."""

    name = "negbug"

    def __init__(self) -> None:
        self.spec = SpecBackend()

    def capabilities(self):  # type: ignore[no-untyped-def]
        return self.spec.capabilities()

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        out = self.spec.run(snap, budget)
        page = next(p for p in snap.pages if p.address == snap.regs.rip & ~0xFFF).to_bytes()
        code = page[snap.regs.rip & 0xFFF:]
        body = code[:code.index(b"\xf4")]
        if NEG_RAX in body and out.final is not None:
            final = out.final.model_copy(update={"regs": out.final.regs.model_copy(
                update={"rax": out.final.regs.rax ^ 1})})
            out = out.model_copy(update={"backend": self.name, "final": final})
        return out.model_copy(update={"backend": self.name})


@pytest.fixture
def negbug() -> Iterator[str]:
    registry.register("negbug", NegBackend, replace=True)
    yield "negbug"
    registry.unregister("negbug")


def run(db: Path, *, backends: str = "spec,negbug", cases: int = 60, workers: int = 1, seed: int = 3,
        findings: Path | None = None, length: int = 8, minimize: bool = True, batch: int = 7) -> Store:
    config = make_config(seed=seed, backends=backends, envs=[ENV], length=length)
    store = Store.open(db, config.model_dump())
    known = db.parent / "no-known"  # an empty registry: the results do not depend on corpus/known
    known.mkdir(exist_ok=True)
    run_campaign(store, config, RunOptions(cases=cases, workers=workers, batch=batch, findings_dir=findings,
                                           minimize=minimize, minimize_tests=150, known_dir=known),
                 generator=stream_case, rows_covered=stream_rows)
    return store


def digest(store: Store) -> tuple:
    findings = [(f.key, f.known, f.verdict, f.first_index, f.count, f.insn_index, f.minimized_json)
                for f in store.findings()]
    counters = {k: v for k, v in store.counters().items() if not k.startswith("time/")}  # time is not deterministic
    return store.done_ranges(), counters, sorted(store.coverage().items()), findings


# -- finding, deduplicating, minimizing ---------------------------------------------------------------

def test_fake_divergence_is_found_deduped_minimized_and_written_once(tmp_path: Path, negbug: str) -> None:
    out = tmp_path / "findings"
    store = run(tmp_path / "c.db", findings=out)
    cases = [stream_case(3, i, envs=[environment(ENV)], length=8, campaign=None) for i in range(60)]
    expected = [i for i, c in enumerate(cases) if NEG_RAX in c.instructions()]
    assert expected, "the stream must contain NEG RAX"
    found = store.findings()
    assert len(found) == 1, [f.key for f in found]
    f = found[0]
    assert f.key.startswith("F7 /3 NEG Ev os64|long64/4-level/4K/cpl0|gpr|")
    assert f.count == len(expected) and f.first_index == expected[0] and not f.known
    assert "neg rax" in f.instruction
    files = sorted(out.iterdir())
    assert files == [out / f"{safe_name(f.key)}.json"] and f.file == str(files[0])
    small = Case.load(files[0])
    assert small.instructions() == [NEG_RAX]  # minimized to the one culprit
    assert small.provenance.generator == "minimized" and small.provenance.index == expected[0]
    assert "finding" in small.tags and small.explanation
    assert json.loads(f.minimized_json or "{}")["name"] == small.name
    assert Checker(["spec", "negbug"], tmp_path / "no-known").signature_keys(small) == {f.key}
    c = store.counters()
    assert c["cases"] == 60 and c["cases/divergent"] == len(expected)
    assert c["stop/spec/halted"] == 60 and c["stop/negbug/halted"] == 60
    store.close()


def test_agreeing_backends_find_nothing(tmp_path: Path) -> None:
    store = run(tmp_path / "c.db", backends="spec,unicorn", cases=30, findings=tmp_path / "f")
    assert store.findings() == [] and store.counters()["cases"] == 30
    assert not (tmp_path / "f").exists()
    s = summarize(store, make_config(seed=3, backends="spec,unicorn", envs=[ENV], length=8))
    assert s.stops["unicorn"] == {"halted": 30} and s.findings == []
    adds = sum(1 for i in range(30)  # coverage counts cases (rows_covered is a set per case)
               if {ALU[0], ALU[7]} & set(stream_case(3, i, envs=[environment(ENV)], length=8,
                                                     campaign=None).instructions()))
    assert ("long64", "01 ADD Ev,Gv", adds) in s.exercised
    assert ("long64", "F4 HLT") in s.not_exercised
    assert {c.mode for c in s.coverage} == {"long64"}
    store.close()


def test_known_signature_is_counted_but_not_minimized(tmp_path: Path, negbug: str) -> None:
    known = tmp_path / "known"
    (known / "cases").mkdir(parents=True)
    first = stream_case(3, 0, envs=[environment(ENV)], length=1, campaign=None)
    example = first.with_instructions([NEG_RAX], name="neg")
    example.save(known / "cases" / "neg.json")
    (known / "negbug.json").write_text(json.dumps({
        "name": "negbug", "key_pattern": r"F7 /3 NEG Ev os64\|.*", "verdict": "unknown",
        "explanation": "the fake backend of this test gets NEG RAX wrong", "example": "cases/neg.json",
        "backends": ["spec", "negbug"]}))
    config = make_config(seed=3, backends="spec,negbug", envs=[ENV], length=8)
    store = Store.open(tmp_path / "c.db", config.model_dump())
    run_campaign(store, config, RunOptions(cases=40, findings_dir=tmp_path / "f", known_dir=known),
                 generator=stream_case, rows_covered=stream_rows)
    (f,) = store.findings()
    assert f.known and f.case_json is None and f.minimized_json is None and f.count > 0
    assert not (tmp_path / "f").exists()
    store.close()


# -- determinism and resumability -------------------------------------------------------------------------

def test_same_seed_same_results_and_worker_count_does_not_matter(tmp_path: Path, negbug: str) -> None:
    a = digest(run(tmp_path / "a.db", workers=1, findings=tmp_path / "fa"))
    b = digest(run(tmp_path / "b.db", workers=1, findings=tmp_path / "fb"))
    c = digest(run(tmp_path / "c.db", workers=2, findings=tmp_path / "fc"))
    assert a == b == c
    d = digest(run(tmp_path / "d.db", workers=1, seed=4, findings=tmp_path / "fd"))
    assert d[1] != a[1] or d[3] != a[3]  # another seed is another stream
    assert sorted(p.name for p in (tmp_path / "fa").iterdir()) == sorted(p.name for p in (tmp_path / "fc").iterdir())


def test_resume_in_steps_equals_one_run(tmp_path: Path, negbug: str) -> None:
    whole = digest(run(tmp_path / "whole.db", cases=50, minimize=False))
    for n in (9, 23, 23, 50):  # a repeated target runs nothing
        s = run(tmp_path / "steps.db", cases=n, minimize=False)
        assert s.done_count() == n
        s.close()
    assert digest(Store.open(tmp_path / "steps.db", make_config(
        seed=3, backends="spec,negbug", envs=[ENV], length=8).model_dump())) == whole


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_difftest_campaign as T
    from difftest import registry
    registry.register("negbug", T.NegBackend)
    store = T.run(__import__("pathlib").Path(sys.argv[1]), cases=int(sys.argv[2]), workers=int(sys.argv[3]),
                  minimize=False, batch=5)
    print("finished", flush=True)
""")


def _done(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT COALESCE(SUM(end - start), 0) FROM done").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_and_restart_loses_nothing_and_repeats_nothing(tmp_path: Path, negbug: str, workers: int) -> None:
    total = 80
    script = KILLED.format(tests=str(ROOT / "tests"))
    db = tmp_path / "k.db"
    p = subprocess.Popen([sys.executable, "-c", script, str(db), str(total), str(workers)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while _done(db) < 10 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    os.killpg(p.pid, signal.SIGKILL)  # the coordinator and its workers, mid-campaign
    p.wait()
    killed_at = _done(db)
    assert 0 < killed_at < total
    r = subprocess.run([sys.executable, "-c", script, str(db), str(total), str(workers)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr
    resumed = Store.open(db, make_config(seed=3, backends="spec,negbug", envs=[ENV], length=8).model_dump())
    fresh = run(tmp_path / "fresh.db", cases=total, workers=workers, minimize=False)
    assert digest(resumed) == digest(fresh)
    assert resumed.counters()["cases"] == total


# -- bad settings ----------------------------------------------------------------------------------------------

def test_unknown_backend_and_bad_settings() -> None:
    with pytest.raises(CampaignError, match="unknown backend 'qemu'"):
        make_config(seed=0, backends="spec,qemu")
    with pytest.raises(CampaignError, match="must include 'spec'"):
        make_config(seed=0, backends="unicorn")
    with pytest.raises(CampaignError, match="at least one backend besides"):
        make_config(seed=0, backends="spec")
    with pytest.raises(CampaignError, match="unknown mode 'long32'"):
        make_config(seed=0, modes=["long32"])
    with pytest.raises(CampaignError, match="unknown environment"):
        make_config(seed=0, envs=["long64/9-level"])
    with pytest.raises(CampaignError, match="--length"):
        make_config(seed=0, length=0)
    cfg = make_config(seed=0, backends="unicorn,spec", modes=["long64"])
    assert cfg.backends == ["spec", "unicorn"] and all(e.startswith("long64/") for e in cfg.envs)


def test_config_mismatch_is_refused(tmp_path: Path, negbug: str) -> None:
    run(tmp_path / "c.db", cases=5, minimize=False).close()
    with pytest.raises(StoreError, match="length is 8 there, 9 here"):
        run(tmp_path / "c.db", cases=5, length=9)


def test_unavailable_partner_is_an_error(tmp_path: Path) -> None:
    class Gone(NegBackend):
        def capabilities(self):  # type: ignore[no-untyped-def]
            from difftest.backend import Capabilities

            return Capabilities(available=False, reason="switched off")

    registry.register("gone", Gone, replace=True)
    try:
        with pytest.raises(CampaignError, match="gone: switched off"):
            run(tmp_path / "c.db", backends="spec,gone", cases=3)
    finally:
        registry.unregister("gone")


def test_registry_environment_declarations() -> None:
    added = registry.load_environment("fake1=test_difftest_campaign:NegBackend")
    try:
        assert added == ["fake1"] and isinstance(registry.create("fake1"), NegBackend)
    finally:
        registry.unregister("fake1")
    for bad, needle in [("nofactory", "name=package.module:factory"), ("x=nomodule_zz:f", "cannot import"),
                        ("x=difftest.registry:nothing", "has no nothing"), ("x=difftest.registry", "package.module")]:
        with pytest.raises(registry.RegistryError, match=needle):
            registry.load_environment(bad)
    with pytest.raises(registry.RegistryError, match="bad backend name"):
        registry.register("a,b", NegBackend)


def test_builtin_backends_and_vmm_backends_are_registered() -> None:
    names = registry.names()
    assert names[:3] == ["spec", "unicorn", "kvm"]
    if (ROOT / "difftest" / "backends" / "refvmm.py").exists():
        assert {"refvmm-shadow", "refvmm-nested"} <= set(names)
    assert registry.availability("spec") == (True, "")


def test_reason_normalization_and_safe_names() -> None:
    assert normalize_reason("page 0x1234 lies above 0x10000 (1700 slots)") == "page ADDR lies above ADDR (N slots)"
    assert normalize_reason("paging mode 32-bit not supported") == "paging mode 32-bit not supported"
    assert safe_name("F7 /3 NEG Ev os64|long64/4-level/4K/cpl0|gpr|negbug,spec").startswith("F7_3_NEG_Ev_os64_long64")
    a, b = safe_name("x|y"), safe_name("x/y")
    assert a != b and all(ch.isalnum() or ch in "_.+-" for ch in a)


# -- corpus replay ----------------------------------------------------------------------------------------------

def test_corpus_replay_classifies_pass_known_new_and_rejects_malformed(tmp_path: Path, negbug: str) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "findings").mkdir(parents=True)
    (corpus / "schema").mkdir()
    (corpus / "schema" / "case.schema.json").write_text("{}")  # not a case: ignored
    base = stream_case(1, 0, envs=[environment(ENV)], length=2, campaign=None)
    base.with_instructions([ALU[0], ALU[1]], name="agree").save(corpus / "findings" / "agree.json")
    base.with_instructions([ALU[0], NEG_RAX], name="neg").save(corpus / "neg.json")
    assert [p.name for p in case_files(corpus)] == ["agree.json", "neg.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    results = {r.name: r for r in replay(load_cases(corpus), ["spec", "negbug"], known_dir=empty)}
    assert results["agree"].status == "pass" and results["neg"].status == "new"
    assert results["neg"].signatures[0].startswith("F7 /3 NEG Ev os64|")
    known = tmp_path / "known"
    (known / "cases").mkdir(parents=True)
    (known / "cases" / "neg.json").write_text((corpus / "neg.json").read_text())
    (known / "neg.json").write_text(json.dumps({
        "name": "neg", "key_pattern": r"F7 /3 NEG.*", "verdict": "unknown", "explanation": "the test's fake bug",
        "example": "cases/neg.json", "backends": ["spec", "negbug"]}))
    results = {r.name: r for r in replay(load_cases(corpus), ["spec", "negbug"], known_dir=known)}
    assert results["neg"].status == "known" and results["agree"].status == "pass"
    (corpus / "bad.json").write_text('{"version": 1, "name": "bad"}')
    from difftest.case import CaseError

    with pytest.raises(CaseError, match=r"bad\.json"):
        list(load_cases(corpus))


# -- fast paths are behaviour-preserving ----------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12))
def test_backend_fast_paths_equal_validated_models(seed: int, length: int) -> None:
    """Outcomes built without re-validation equal what validation builds from their own JSON."""
    case = stream_case(seed, 0, envs=[environment(ENV)], length=length, campaign=None)
    for backend in (SpecBackend(), registry.create("unicorn")):
        out = backend.run(case.snapshot, case.budget)
        assert out.final is not None
        again = Snapshot.model_validate_json(out.final.model_dump_json())
        assert again == out.final and again.model_dump_json() == out.final.model_dump_json()
    raw = bytes(random.Random(seed).getrandbits(8) for _ in range(64)) + bytes(100)
    assert PageModel.from_bytes(0x5000, raw) == PageModel(address=0x5000, data=raw.hex())
    assert PageModel.from_bytes(0x5000, raw).to_bytes() == raw.ljust(4096, b"\0")


def test_page_cache_follows_reassigned_data() -> None:
    p = PageModel(address=0, data="ab")
    assert p.to_bytes()[:2] == b"\xab\x00"
    p.data = "cd"
    assert p.to_bytes()[:2] == b"\xcd\x00"


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32))
def test_snapshot_deep_copy_is_equal_and_independent(seed: int) -> None:
    import copy

    snap = stream_case(seed, 1, envs=[environment(ENV)], length=3, campaign=None).snapshot
    for d in (snap.model_copy(deep=True), copy.deepcopy(snap)):
        assert d == snap and d.model_dump_json() == snap.model_dump_json()
        assert d.model_fields_set == snap.model_fields_set
        d.regs.rax ^= 1
        d.segments.ss.dpl ^= 3
        d.pages[0].data = "ff"
        d.msrs["0x10"] = 1
        d.dr[0] ^= 1
        d.undefined_flags.append("CF")
        assert snap.regs.rax != d.regs.rax and snap.segments.ss.dpl != d.segments.ss.dpl
        assert snap.pages[0].data != "ff" and "0x10" not in snap.msrs and snap.dr[0] != d.dr[0]
        assert "CF" not in snap.undefined_flags or snap.undefined_flags.count("CF") != d.undefined_flags.count("CF")


def test_inline_runs_equal_worker_runs(tmp_path: Path, negbug: str) -> None:
    """RunOptions.inline (no worker process, no crash isolation) records exactly what a worker does."""
    config = make_config(seed=3, backends="spec,negbug", envs=[ENV], length=8)
    known = tmp_path / "no-known"
    known.mkdir()
    inline = Store.open(tmp_path / "i.db", config.model_dump())
    run_campaign(inline, config, RunOptions(cases=30, batch=7, findings_dir=None, minimize=False, known_dir=known,
                                            inline=True), generator=stream_case, rows_covered=stream_rows)
    assert digest(inline) == digest(run(tmp_path / "w.db", cases=30, minimize=False))
