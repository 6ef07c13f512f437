"""Campaigns and corpus replay survive a backend that kills its process natively.

A registered test backend is the spec, except that it sends itself SIGFPE when the
executed code contains NEG RAX (what Unicorn 2.1.4 does on IDIV of INT64_MIN by -1):
the campaign must isolate exactly the cases containing it, record each as a crash
finding at that instruction, commit every other case, and give the same database for
any worker count and across a SIGKILL of the coordinator.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from difftest import registry
from difftest.backend import Outcome, SpecBackend
from difftest.builders import build
from difftest.campaign import (
    CRASH_PREFIX,
    RunOptions,
    diagnose_crash,
    make_config,
    run_campaign,
    run_in_child,
)
from difftest.case import Case, Environment, Provenance
from difftest.corpus import replay
from difftest.known import KNOWN_DIR, load_known
from difftest.layout import environment
from difftest.store import Store
from spec.snapshot import Snapshot
from tests.test_cli_campaign import done_count
from tests.test_difftest_campaign import stream_rows

ROOT = Path(__file__).resolve().parent.parent
ENV = "long64/4-level/4K/cpl0"
ALU = [bytes.fromhex(h) for h in ("4801d8", "4829c8", "4821c8", "4809d8", "4831d8", "48ffc0", "48ffcb")]
NEG_RAX = bytes.fromhex("48f7d8")  # what kills the crashing backend
NEG_FORM = "F7 /3 NEG Ev os64"
IDIV_CASE = {"insns": [bytes.fromhex("f7f9")], "regs": {"rax": 0, "rdx": 0x80000000, "rcx": 0xFFFFFFFF}}


def stream_case(seed: int, index: int, *, envs: list[Environment], length: int, campaign: str | None) -> Case:
    rng = random.Random(f"crash:{seed}:{index}")
    insns = [NEG_RAX if rng.random() < 0.03 else rng.choice(ALU) for _ in range(length)]
    regs = {n: rng.getrandbits(64) for n in ("rax", "rbx", "rcx")}
    return build(envs[index % len(envs)], insns, regs=regs, name=f"c{index}",
                 provenance=Provenance(generator="crash-stream", seed=seed, campaign=campaign, index=index))


def idiv_stream(seed: int, index: int, *, envs: list[Environment], length: int, campaign: str | None) -> Case:
    """Harmless cases, except case 5: the 32-bit IDIV that kills Unicorn 2.1.4 with SIGFPE."""
    if index == 5:
        return build(environment(ENV), list(IDIV_CASE["insns"]), regs=dict(IDIV_CASE["regs"]), name="idiv")
    return stream_case(seed, index, envs=envs, length=length, campaign=campaign)


class CrashBackend:
    """The spec, except that NEG RAX in the code kills the process (SIGFPE, like a host division trap)."""

    name = "crashneg"

    def __init__(self) -> None:
        self.spec = SpecBackend()

    def capabilities(self):  # type: ignore[no-untyped-def]
        return self.spec.capabilities()

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        page = next(p for p in snap.pages if p.address == snap.regs.rip & ~0xFFF).to_bytes()
        code = page[snap.regs.rip & 0xFFF:]
        if NEG_RAX in code[:code.index(b"\xf4")]:
            os.kill(os.getpid(), signal.SIGFPE)
        return self.spec.run(snap, budget).model_copy(update={"backend": self.name})


@pytest.fixture
def crashneg() -> Iterator[str]:
    registry.register("crashneg", CrashBackend, replace=True)
    yield "crashneg"
    registry.unregister("crashneg")


def run(db: Path, *, cases: int = 40, workers: int = 1, findings: Path | None = None, batch: int = 8,
        known: Path | None = None, backends: str = "spec,crashneg", generator=stream_case) -> Store:  # type: ignore[no-untyped-def]
    config = make_config(seed=1, backends=backends, envs=[ENV], length=6)
    store = Store.open(db, config.model_dump())
    if known is None:
        known = db.parent / "no-known"
        known.mkdir(exist_ok=True)
    run_campaign(store, config, RunOptions(cases=cases, workers=workers, batch=batch, findings_dir=findings,
                                           known_dir=known, minimize_tests=50),
                 generator=generator, rows_covered=stream_rows)
    return store


def digest(store: Store) -> tuple:
    findings = [(f.key, f.known, f.verdict, f.first_index, f.count, f.insn_index, f.minimized_json)
                for f in store.findings()]
    counters = {k: v for k, v in store.counters().items() if not k.startswith("time/")}
    return store.done_ranges(), counters, sorted(store.coverage().items()), findings


def crashing_indices(cases: int) -> list[int]:
    envs = [environment(ENV)]
    return [i for i in range(cases) if NEG_RAX in stream_case(1, i, envs=envs, length=6, campaign=None).instructions()]


def test_run_in_child_reports_results_errors_and_deaths() -> None:
    assert run_in_child(lambda: 6 * 7).value == 42
    err = run_in_child(lambda: 1 // 0)
    assert err.status == "error" and "ZeroDivisionError" in err.why
    died = run_in_child(lambda: os.kill(os.getpid(), signal.SIGFPE))
    assert died.status == "died" and died.why == "killed by SIGFPE"
    assert run_in_child(lambda: os._exit(3)).why == "exit status 3"


@pytest.mark.parametrize("workers", [1, 2])
def test_crashing_cases_become_findings_and_the_campaign_goes_on(tmp_path: Path, crashneg: str,
                                                                 workers: int) -> None:
    crashing = crashing_indices(40)
    assert 2 <= len(crashing) <= 15  # the stream has some, not all
    store = run(tmp_path / "c.db", workers=workers, findings=tmp_path / "f")
    assert store.done_ranges() == [(0, 40)] and store.counters()["cases"] == 40
    key = f"{CRASH_PREFIX}crashneg|{NEG_FORM}|{ENV}"
    crash = [f for f in store.findings() if f.key.startswith(CRASH_PREFIX)]
    assert [f.key for f in crash] == [key]
    f = crash[0]
    assert f.count == len(crashing) and f.first_index == crashing[0] and not f.known and f.verdict == "unknown"
    assert f.fields == ["crash"] and f.backends == ["crashneg"] and "SIGFPE" in f.explanation
    assert store.counters()["crash/crashneg/native crash (killed by SIGFPE)"] == len(crashing)
    # the finding file is the case cut after the crashing instruction
    small = Case.load(Path(f.file or ""))
    first = stream_case(1, crashing[0], envs=[environment(ENV)], length=6, campaign=None).instructions()
    assert small.instructions() == first[:first.index(NEG_RAX) + 1] and "crash" in small.tags
    assert f.insn_index == first.index(NEG_RAX)
    # every other case ran normally: spec and crashneg agree on them
    assert store.counters()["stop/crashneg/halted"] == 40 - len(crashing)


def test_isolation_is_deterministic_across_worker_counts(tmp_path: Path, crashneg: str) -> None:
    a = digest(run(tmp_path / "a.db", workers=1, findings=tmp_path / "fa"))
    b = digest(run(tmp_path / "b.db", workers=2, findings=tmp_path / "fb", batch=5))
    assert a[1:] == b[1:] and a[0] == b[0]


def test_a_known_crash_is_reported_known(tmp_path: Path, crashneg: str) -> None:
    known = tmp_path / "known"
    (known / "cases").mkdir(parents=True)
    (known / "cases" / "x.json").write_text("{}")
    (known / "01-crashneg.json").write_text(
        '{"name": "01-crashneg", "key_pattern": "crash\\\\|crashneg\\\\|F7 /3 NEG Ev os64\\\\|.*", '
        '"verdict": "unknown", "requires_verdict": false, "explanation": "the test backend dies on NEG RAX", '
        '"example": "cases/x.json", "backends": ["spec", "crashneg"]}')
    store = run(tmp_path / "k.db", known=known, findings=tmp_path / "f")
    crash = [f for f in store.findings() if f.key.startswith(CRASH_PREFIX)]
    assert len(crash) == 1 and crash[0].known and crash[0].file is None
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_campaign_crash as T
    from difftest import registry
    registry.register("crashneg", T.CrashBackend)
    T.run(__import__("pathlib").Path(sys.argv[1]), cases=int(sys.argv[2]), workers=2, batch=4)
    print("finished", flush=True)
""")


def test_sigkill_during_a_crashing_campaign_loses_and_repeats_nothing(tmp_path: Path, crashneg: str) -> None:
    total = 36
    script = KILLED.format(tests=str(ROOT / "tests"))
    db = tmp_path / "k.db"
    p = subprocess.Popen([sys.executable, "-c", script, str(db), str(total)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while done_count(db) < 4 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert 0 < done_count(db) < total
    r = subprocess.run([sys.executable, "-c", script, str(db), str(total)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr
    config = make_config(seed=1, backends="spec,crashneg", envs=[ENV], length=6)
    resumed = Store.open(db, config.model_dump())
    fresh = run(tmp_path / "fresh.db", cases=total, workers=1, batch=4)
    assert digest(resumed) == digest(fresh)


# -- the real Unicorn crash --------------------------------------------------------------------------------------

def _unicorn_dies() -> bool:
    if not registry.availability("unicorn")[0]:
        return False
    case = build(environment(ENV), list(IDIV_CASE["insns"]), regs=dict(IDIV_CASE["regs"]))
    return run_in_child(lambda: registry.create("unicorn").run(case.snapshot, case.budget)).status == "died"


UNICORN_DIES = _unicorn_dies()
needs_crash = pytest.mark.skipif(not UNICORN_DIES, reason="this Unicorn survives IDIV INT64_MIN/-1")


@needs_crash
def test_real_unicorn_idiv_crash_is_diagnosed_and_known(tmp_path: Path) -> None:
    case = build(environment(ENV), list(IDIV_CASE["insns"]), regs=dict(IDIV_CASE["regs"]))
    crash = diagnose_crash(case, ["spec", "unicorn"])
    assert crash.key == f"crash|unicorn|F7 /7 IDIV Ev os32|{ENV}" and crash.verdict == "unicorn-bug"
    assert crash.why == "killed by SIGFPE" and crash.insn_index == 0
    # a campaign on spec+unicorn records it as the known Unicorn crash and finishes every case
    store = run(tmp_path / "u.db", cases=12, backends="spec,unicorn", generator=idiv_stream, known=KNOWN_DIR,
                findings=tmp_path / "f")
    assert store.done_ranges() == [(0, 12)]
    crash_rows = [f for f in store.findings() if f.key.startswith(CRASH_PREFIX)]
    assert [(f.key, f.known, f.first_index, f.count) for f in crash_rows] == [(crash.key, True, 5, 1)]


@needs_crash
def test_corpus_replay_survives_the_unicorn_crash(tmp_path: Path) -> None:
    entry = next(e for e in load_known() if e.key_pattern.startswith("crash"))
    case = Case.load(entry.example_path())
    results = list(replay([(entry.example_path(), case), (entry.example_path(), case)], ["spec", "unicorn"]))
    assert [r.status for r in results] == ["known", "known"]
    assert results[0].signatures == [f"crash|unicorn|F7 /7 IDIV Ev os32|{ENV}"]


class MinimizerCrashBackend(CrashBackend):
    """NEG RAX leaves RAX's bit 0 flipped (a divergence); RBX = 0 kills the process.

    The stream never starts with RBX = 0, so only the minimizer's simplified candidates die.
    """

    name = "mincrash"

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        if snap.regs.rbx == 0:
            os.kill(os.getpid(), signal.SIGFPE)
        out = self.spec.run(snap, budget).model_copy(update={"backend": self.name})
        page = next(p for p in snap.pages if p.address == snap.regs.rip & ~0xFFF).to_bytes()
        code = page[snap.regs.rip & 0xFFF:]
        if NEG_RAX in code[:code.index(b"\xf4")] and out.final is not None:
            regs = out.final.regs.model_copy(update={"rax": out.final.regs.rax ^ 1})
            out = out.model_copy(update={"final": out.final.model_copy(update={"regs": regs})})
        return out


@pytest.mark.parametrize("workers", [1, 2])
def test_a_minimization_that_kills_its_worker_keeps_the_finding_unminimized(tmp_path: Path, workers: int) -> None:
    registry.register("mincrash", MinimizerCrashBackend, replace=True)
    try:
        store = run(tmp_path / "m.db", cases=20, workers=workers, backends="spec,mincrash", findings=tmp_path / "f")
    finally:
        registry.unregister("mincrash")
    assert store.done_ranges() == [(0, 20)]
    found = [f for f in store.findings() if not f.known]
    assert found and all(f.minimized_json is not None and f.file for f in found)
    assert not any(f.key.startswith(CRASH_PREFIX) for f in found)  # the cases themselves do not crash
    small = Case.load(Path(found[0].file or ""))
    assert "unminimized" in small.tags and "killed the process" in small.explanation
