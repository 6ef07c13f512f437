"""The refvmm command line: the README's main job, coverage, schema export, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "corpus" / "guests"


def refvmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "refvmm.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_run_fibonacci_guest_prints_final_state() -> None:
    r = refvmm("run", str(GUESTS / "fibonacci-long64.bin"), "--dump", "0x10000:16")
    assert r.returncode == 0, r.stderr
    assert "stop: halted" in r.stdout
    assert f"rax={fib(20):#018x}" in r.stdout
    assert "0x00010000  00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00" in r.stdout


def test_run_json_output_is_a_valid_snapshot() -> None:
    from spec.snapshot import Snapshot

    r = refvmm("run", str(GUESTS / "fibonacci-long64.bin"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stop"]["kind"] == "halted"
    snap = Snapshot.model_validate(doc["snapshot"])
    st = snap.to_state()
    values = [st.mem.phys.read(0x10000 + 8 * k, 8) for k in range(20)]
    assert values == [fib(k) for k in range(20)]


def test_run_real_mode_guest() -> None:
    r = refvmm("run", str(GUESTS / "sum-real.bin"), "--mode", "real", "--dump", "0x2000:32")
    assert r.returncode == 0, r.stderr
    assert f"rax={5050:#018x}" in r.stdout  # 1 + 2 + ... + 100
    # the sum was stored at 0x2000 and copied to 0x2010 by REP MOVSB
    assert "0x00002000  ba 13" in r.stdout and "0x00002010  ba 13" in r.stdout


def test_run_snapshot_roundtrip_through_cli(tmp_path: Path) -> None:
    r = refvmm("run", str(GUESTS / "sum-real.bin"), "--mode", "real", "--budget", "3", "--json")
    doc = json.loads(r.stdout)
    assert doc["stop"]["kind"] == "budget"
    snap_file = tmp_path / "mid.json"
    snap_file.write_text(json.dumps(doc["snapshot"]))
    r2 = refvmm("run", str(snap_file))
    assert r2.returncode == 0, r2.stderr
    assert f"rax={5050:#018x}" in r2.stdout


def test_guest_that_never_halts_stops_at_the_budget(tmp_path: Path) -> None:
    loop = tmp_path / "loop.bin"
    loop.write_bytes(bytes.fromhex("ebfe"))  # jmp $
    r = refvmm("run", str(loop), "--budget", "500")
    assert r.returncode == 0
    assert "stop: budget" in r.stdout and "after 500 instructions" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "no/such/guest.bin"], "no such file"),
        (["run", "corpus/guests/sum-real.bin", "--mode", "bogus"], "--mode"),
        (["run", "corpus/guests/sum-real.bin", "--load", "zz"], "not a number"),
        (["run", "corpus"], "is a directory"),
        (["frobnicate"], "No such command"),
        (["run", "corpus/guests/sum-real.bin", "--no-such-flag"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str) -> None:
    r = refvmm(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert needle in r.stderr + r.stdout


def test_malformed_snapshot_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"regs": {"rflags": "0x0"}}')
    r = refvmm("run", str(bad))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "regs.rflags" in lines[0], r.stderr
    bad.write_text("{not json")
    r = refvmm("run", str(bad))
    assert r.returncode == 2 and "invalid snapshot" in r.stderr and "Traceback" not in r.stderr


def test_schema_export(tmp_path: Path) -> None:
    r = refvmm("schema", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    schema = json.loads((tmp_path / "snapshot.schema.json").read_text())
    assert schema["title"] == "Snapshot" and "regs" in schema["properties"]


def test_coverage_core_set_complete() -> None:
    r = refvmm("coverage", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    from spec.coverage import ISSUE2_REQUIRED

    for name in ISSUE2_REQUIRED:
        row = doc["table"][name]
        for mode, status in row.items():
            assert status in ("ok", "#UD", "n/a"), f"{name} in {mode}: {status}"


def test_committed_schema_is_current() -> None:
    """corpus/schema/*.schema.json must match the models (regenerate with `refvmm schema --out corpus/schema`)."""
    from spec.snapshot import Snapshot

    committed = json.loads((ROOT / "corpus" / "schema" / "snapshot.schema.json").read_text())
    assert committed == Snapshot.model_json_schema(mode="validation")


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_snapshot_guest_gets_exceptions_through_its_own_idt(tmp_path: Path, mode: str) -> None:
    """A snapshot runs with delivery on: UD2 lands in the guest's #UD handler stub, which halts."""
    from spec.machine import HANDLER_STRIDE, HANDLERS, flat_machine
    from spec.snapshot import Snapshot

    snap = tmp_path / "ud.json"
    snap.write_text(Snapshot.from_state(flat_machine(mode, bytes.fromhex("0f0b"), idt=True)).to_json())  # type: ignore[arg-type]
    r = refvmm("run", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stop"]["kind"] == "halted"
    assert doc["stop"]["rip"] == HANDLERS + HANDLER_STRIDE * 6 + 1  # past the HLT of vector 6's stub
    r = refvmm("run", str(snap), "--no-deliver")
    assert "stop: fault #UD at rip=0x1000" in r.stdout


def test_bench_runs_every_mode_loop() -> None:
    """`refvmm bench` runs its loops to the budget in each mode (speed itself is not asserted)."""
    r = refvmm("bench", "--instructions", "3000")
    assert r.returncode == 0, r.stderr
    for mode in ("long64", "prot32", "real"):
        assert mode in r.stdout
