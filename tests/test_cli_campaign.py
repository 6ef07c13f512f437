"""`refvmm campaign`, `refvmm corpus replay` and the case schema from the command line (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FAKE = "negbug=test_difftest_campaign:NegBackend"  # the campaign tests' fake divergent backend


def refvmm(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "refvmm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=full)


def one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


# -- bad input ----------------------------------------------------------------------------------------------

def test_unknown_backend(tmp_path: Path) -> None:
    one_line_error(refvmm("campaign", "--db", str(tmp_path / "c.db"), "--cases", "5", "--backends", "spec,qemu"),
                   "unknown backend 'qemu'")
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--cases", "5", "--modes", "long32"], "unknown mode 'long32'"),
    (["--cases", "5", "--length", "0"], "--length"),
    ([], "give a case budget"),
])
def test_bad_settings_are_one_line_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    one_line_error(refvmm("campaign", "--db", str(tmp_path / "c.db"), *args), needle)


def test_bad_flag_and_bad_number(tmp_path: Path) -> None:
    for args, needle in ([["--frobnicate"], "No such option"], [["--workers", "0"], "--workers"]):
        r = refvmm("campaign", "--db", str(tmp_path / "c.db"), *args)
        assert r.returncode != 0 and needle in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("content", [b"garbage, not a database" * 40, b""])
def test_corrupt_or_foreign_database(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "c.db"
    if content:
        db.write_bytes(content)
        one_line_error(refvmm("campaign", "--db", str(db), "--cases", "5"), "not a usable campaign database")
        assert db.read_bytes() == content  # nothing saved is lost
    else:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE mine (x)")
        conn.execute("INSERT INTO mine VALUES (42)")
        conn.commit()
        conn.close()
        before = db.read_bytes()
        one_line_error(refvmm("campaign", "--db", str(db), "--cases", "5"), "not a refvmm campaign database")
        assert db.read_bytes() == before


def test_unreadable_database_path(tmp_path: Path) -> None:
    one_line_error(refvmm("campaign", "--db", str(tmp_path), "--cases", "5"), "is a directory")


# -- corpus replay -----------------------------------------------------------------------------------------------

def make_corpus(tmp_path: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from test_difftest_campaign import ALU, ENV, NEG_RAX, stream_case

    from difftest.layout import environment

    corpus = tmp_path / "corpus"
    (corpus / "findings").mkdir(parents=True)
    (corpus / "known").mkdir()
    base = stream_case(1, 0, envs=[environment(ENV)], length=2, campaign=None)
    base.with_instructions([ALU[0], ALU[3]], name="agree").save(corpus / "findings" / "agree.json")
    base.with_instructions([NEG_RAX], name="neg").save(corpus / "neg.json")
    return corpus


def test_corpus_replay_table_and_exit_status(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    empty = tmp_path / "empty-known"
    empty.mkdir()
    env = {"REFVMM_BACKENDS": FAKE}
    r = refvmm("corpus", "replay", str(corpus), "--backends", "spec,negbug", "--known", str(empty), env=env)
    assert r.returncode == 1, r.stderr  # a new divergence
    assert "new" in r.stdout and "pass" in r.stdout and "2 cases: 1 pass, 0 known, 1 new, 0 skipped" in r.stdout
    (corpus / "neg.json").unlink()
    r = refvmm("corpus", "replay", str(corpus), "--backends", "spec,negbug,unicorn", "--known", str(empty),
               "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [x["status"] for x in doc["results"]] == ["pass"] and doc["backends"] == ["spec", "negbug", "unicorn"]


def test_corpus_replay_malformed_case_names_the_file(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    (corpus / "findings" / "broken.json").write_text('{"version": 1, "name": "broken", "env": {"mode": "long64"}}')
    one_line_error(refvmm("corpus", "replay", str(corpus), "--backends", "spec,unicorn"), "broken.json")
    (corpus / "findings" / "broken.json").write_text("{not json")
    one_line_error(refvmm("corpus", "replay", str(corpus), "--backends", "spec,unicorn"), "broken.json")
    one_line_error(refvmm("corpus", "replay", str(corpus), "--backends", "spec,bochs"), "unknown backend 'bochs'")


# -- the case schema -------------------------------------------------------------------------------------------

def test_schema_export_includes_the_case_format(tmp_path: Path) -> None:
    r = refvmm("schema", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    schema = json.loads((tmp_path / "case.schema.json").read_text())
    assert schema["title"] == "Case" and {"snapshot", "env", "code"} <= set(schema["properties"])


def test_committed_case_schema_is_current() -> None:
    """corpus/schema/case.schema.json must match the model (regenerate with `refvmm schema --out corpus/schema`)."""
    from difftest.case import Case

    committed = json.loads((ROOT / "corpus" / "schema" / "case.schema.json").read_text())
    assert committed == Case.model_json_schema(mode="validation")


# -- campaigns end to end (the real generator) -----------------------------------------------------------------

def done_count(db: Path) -> int:
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


CAMPAIGN = ["--backends", "spec,unicorn", "--modes", "long64", "--length", "12", "--seed", "7", "--batch", "10"]


def test_campaign_runs_reports_and_lists_coverage(tmp_path: Path) -> None:
    db, cov = tmp_path / "c.db", tmp_path / "cov.tsv"
    r = refvmm("campaign", "--db", str(db), "--cases", "40", *CAMPAIGN, "--corpus", str(tmp_path / "corpus"),
               "--coverage-out", str(cov), "--no-minimize")
    assert r.returncode == 0, r.stderr
    for needle in ("stops per backend", "divergences by signature", "coverage: opcode-table rows x modes",
                   "40 cases in"):
        assert needle in r.stdout, r.stdout
    lines = cov.read_text().splitlines()
    exercised = [ln for ln in lines if ln.startswith("exercised\t")]
    missing = [ln for ln in lines if ln.startswith("missing\t")]
    assert exercised and missing and all(ln.split("\t")[1] == "long64" for ln in exercised + missing)
    # The same command again finds everything done; a different seed is refused in one line.
    r = refvmm("campaign", "--db", str(db), "--cases", "40", *CAMPAIGN, "--json", "--no-minimize")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cases"] == 40 and doc["session_cases"] == 0
    one_line_error(refvmm("campaign", "--db", str(db), "--cases", "50", "--seed", "8"), "seed is 7 there, 8 here")
    # Settings left out are the database's: this resumes the same campaign.
    r = refvmm("campaign", "--db", str(db), "--cases", "50", "--no-minimize", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cases"] == 50


def summary(db: Path) -> dict:
    """Everything the database records, as the summary reports it (read in this process)."""
    from difftest.campaign import CampaignConfig, summarize
    from difftest.store import Store

    config = CampaignConfig.model_validate(Store.peek_config(db))
    with Store.open(db, config.model_dump()) as store:
        return summarize(store, config).model_dump()


def test_sigkill_mid_campaign_then_restart_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    total = "80"
    args = ["--cases", total, *CAMPAIGN, "--workers", "2", "--no-minimize", "--corpus", str(tmp_path / "corpus")]
    db = tmp_path / "killed.db"
    full = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}"}
    p = subprocess.Popen([sys.executable, "-m", "refvmm.cli", "campaign", "--db", str(db), *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full, start_new_session=True)
    deadline = time.monotonic() + 120
    while done_count(db) < 10 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the campaign finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert 0 < done_count(db) < int(total)
    r = refvmm("campaign", "--db", str(db), *args)
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh.db"
    r = refvmm("campaign", "--db", str(fresh), *args)
    assert r.returncode == 0, r.stderr
    a, b = summary(db), summary(fresh)
    assert a["cases"] == b["cases"] == int(total)
    assert a == b


def test_time_budget_stops_and_saves(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    r = refvmm("campaign", "--db", str(db), "--time", "1.5", *CAMPAIGN, "--no-minimize", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cases"] == doc["session_cases"] == done_count(db) > 0


NO_KVM = """
import sys
from difftest import registry
registry._AVAILABILITY["kvm"] = (False, "simulated: no /dev/kvm")  # as probed on a machine without KVM
from refvmm.cli import main
sys.argv = ["refvmm", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("kvm", ["as-here", "absent"])
def test_committed_corpus_replays_without_new_divergences(kvm: str) -> None:
    """Every available backend (the refvmm VMMs included) on the committed corpus: nothing new, exit 0."""
    args = ["corpus", "replay", "corpus", "--json"]
    if kvm == "as-here":
        r = refvmm(*args)
    else:
        full = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}"}
        r = subprocess.run([sys.executable, "-c", NO_KVM, *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=300, env=full)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr)
    doc = json.loads(r.stdout)
    assert "kvm" not in doc["backends"] if kvm == "absent" else True
    status = {Path(x["path"]).name: x["status"] for x in doc["results"]}
    assert "new" not in status.values(), status
    assert status["rmw-read-fault-reports-write.json"] == "pass"  # the spec-bug regression (error code 7)
