"""Whole guests on the VMM: the boot guest (real -> protected -> long mode, serial output, MMIO) under both
paging strategies, equal to the bare spec; and ``refvmm run`` of VMs with their exit statistics."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from refvmm.config import load_config
from refvmm.vm import VM, BareMachine
from spec.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent
BOOT = ROOT / "corpus" / "vm" / "boot-serial.json"
BOOT_TOML = ROOT / "corpus" / "vm" / "boot-serial-shadow.toml"
BOOT_OUTPUT = ("refvmm boot: real mode\r\nrefvmm boot: protected mode\r\nrefvmm boot: long mode\r\n"
               "refvmm boot: MMIO ok, halting\r\n")


def refvmm(*args: str) -> subprocess.CompletedProcess[str]:
    """``refvmm ARGS`` in this process (its console entry point, exit status and output; fast)."""
    from refvmm import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["refvmm", *args]), contextlib.chdir(ROOT):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_the_installed_entry_point_runs_a_vm() -> None:
    r = subprocess.run([sys.executable, "-m", "refvmm.cli", "run", str(BOOT)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "refvmm boot: MMIO ok, halting" in r.stdout and "exit statistics" in r.stdout


@pytest.fixture(scope="module")
def bare() -> BareMachine:
    b = BareMachine(load_config(BOOT))
    ev = b.run(200_000)
    assert ev.kind == "halted", ev.describe()
    return b


@pytest.mark.parametrize("paging", ["shadow", "nested"])
def test_boot_guest_equals_the_bare_machine(bare: BareMachine, paging: str) -> None:
    cfg = load_config(BOOT).model_copy(update={"paging": paging})
    vm = VM(cfg)
    r = vm.run()
    assert r.reason == "halted" and r.output == {"com1": BOOT_OUTPUT}
    assert vm.output.by_source() == bare.output.by_source()
    want = Snapshot.from_state(bare.state).model_dump()
    got = vm.guest_snapshot().model_dump()
    # The spec marks AF undefined after the last flag-setting instruction; the VMCB keeps plain bits.
    undefined = bare.state.undefined
    for d in (want, got):
        d.pop("undefined_flags")
        d["regs"]["rflags"] &= ~undefined
    assert got == want
    # What the guest left: the TSC (instructions retired before RDTSC; RDTSC and HLT follow), MMIO results.
    regs = got["regs"]
    assert regs["rax"] == bare.state.icount - 2 and regs["r8"] == int.from_bytes(b"RVMM", "little")
    assert (regs["r9"], regs["r10"], regs["r12"]) == (0x1234, 1, 0x600D)
    assert r.stats.guest_instructions == bare.state.icount
    assert r.stats.exits["IOIO"] > 100 and r.stats.exits["HLT"] == 1
    assert 0 < r.stats.exits_per_1000 < 100  # most instructions run without the VMM
    if paging == "nested":
        assert not any(name.startswith(("CR", "EXCP")) for name in r.stats.exits)  # no CR or #PF intercepts
    else:
        assert r.stats.exits["CR0_WRITE"] >= 2 and r.stats.exits["EXCP14"] > 0


@pytest.mark.parametrize(("target", "paging"), [(BOOT, "nested"), (BOOT_TOML, "shadow")])
def test_cli_runs_vm_configs_with_exit_statistics(target: Path, paging: str) -> None:
    r = refvmm("run", str(target))
    assert r.returncode == 0, r.stderr
    assert "stop: halted at rip=0x114e" in r.stdout and f"({paging} paging)" in r.stdout
    assert "output (com1):" in r.stdout and "refvmm boot: long mode" in r.stdout
    assert "exit statistics" in r.stdout and "IOIO" in r.stdout and "per 1000 guest instr." in r.stdout


@pytest.mark.parametrize("paging", ["shadow", "nested"])
def test_cli_paging_option_runs_flat_images_and_cases(tmp_path: Path, paging: str) -> None:
    r = refvmm("run", "corpus/guests/fibonacci-long64.bin", "--paging", paging, "--dump", "0x10000:16")
    assert r.returncode == 0, r.stderr
    assert "stop: halted" in r.stdout and "rax=0x0000000000001a6d" in r.stdout  # fib(20) % ... as on bare
    assert "0x00010000  00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00" in r.stdout
    assert f"exit statistics of fibonacci-long64 ({paging} paging)" in r.stdout
    bare = refvmm("run", "corpus/guests/fibonacci-long64.bin")
    assert "rax=0x0000000000001a6d" in bare.stdout
    # A corpus case / snapshot as the guest (its pages become guest RAM); --json gives the record.
    from spec.machine import flat_machine

    snap = tmp_path / "case.json"
    snap.write_text(json.dumps({"name": "t", "snapshot": json.loads(
        Snapshot.from_state(flat_machine("prot32", bytes.fromhex("b82a000000f4"))).to_json())}))
    r = refvmm("run", str(snap), "--paging", paging, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stop"]["reason"] == "halted" and doc["stop"]["stats"]["guest_instructions"] == 2
    assert int(doc["snapshot"]["regs"]["rax"], 16) == 42


def test_cli_bare_paging_runs_the_config_without_a_vmm() -> None:
    r = refvmm("run", str(BOOT), "--paging", "bare")
    assert r.returncode == 0, r.stderr
    assert "(bare spec CPU)" in r.stdout and "refvmm boot: MMIO ok, halting" in r.stdout
    assert "exit statistics" not in r.stdout


@pytest.mark.parametrize(("doc", "needle"), [
    ({"paging": "sideways", "image": {"kind": "flat", "path": "x.bin"}}, "paging: Input should be"),
    ({"memory": {"size": "3K"}, "image": {"kind": "flat", "path": "x.bin"}}, "memory.size:"),
    ({"image": {"kind": "flat", "path": "missing.bin"}}, "image.path:"),
    ({"devices": [{"kind": "uart16550"}], "mmio": [{"gpa": "0x200000", "device": "uart16550"}],
      "image": {"kind": "flat", "path": "x.bin"}}, "has no MMIO registers"),
])
def test_cli_bad_vm_config_is_one_line_exit_2(tmp_path: Path, doc: dict, needle: str) -> None:
    (tmp_path / "x.bin").write_bytes(b"\xf4")
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(doc))
    r = refvmm("run", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_cli_vm_options_that_make_no_sense() -> None:
    r = refvmm("run", str(BOOT), "--trace")
    assert r.returncode == 2 and "--trace" in r.stderr
    r = refvmm("run", "corpus/guests/sum-real.bin", "--paging", "warp")
    assert r.returncode != 0 and "--paging" in r.stderr + r.stdout and "Traceback" not in r.stderr
