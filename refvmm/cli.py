"""The ``refvmm`` command line.

Commands
    run       run a guest (flat binary image or machine snapshot) on the spec CPU
    coverage  the opcode-map coverage table: instruction form x mode
    schema    export the JSON Schemas of the file formats

Bad input (a missing or malformed file, an unknown mode, a bad number) is
reported as one line on stderr with exit status 2; a guest that never halts is
stopped by the instruction budget (exit status 0, the stop event says why).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="refvmm: a reference x86 VMM with an executable specification.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class ModeName(StrEnum):
    real = "real"
    prot16 = "prot16"
    prot32 = "prot32"
    long64 = "long64"


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UserError(f"{what}: not a number: {text!r}") from None


def _load_guest(path: Path, mode: ModeName, load: int):
    from spec.machine import flat_machine
    from spec.snapshot import Snapshot

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a guest image or snapshot")
    if path.suffix == ".json":
        try:
            return Snapshot.model_validate_json(path.read_bytes()).to_state()
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: invalid snapshot: {loc}: {first['msg']}") from None
        except ValueError as e:
            raise UserError(f"{path}: invalid snapshot: {e}") from None
    image = path.read_bytes()
    if not image:
        raise UserError(f"{path}: empty guest image")
    st = flat_machine(mode.value)  # type: ignore[arg-type]
    end = load + len(image)
    if mode in (ModeName.real, ModeName.prot16) and end > 0x10000:
        raise UserError(f"{path}: a {mode.value} image must lie below 64 KiB (load {load:#x}, {len(image)} bytes)")
    if end > 0x100000000:
        raise UserError(f"{path}: image of {len(image)} bytes does not fit at {load:#x}")
    for page in range(load & ~0xFFF, end, 0x1000):
        if (page >> 12) not in st.mem.phys.pages:
            st.mem.phys.map_page(page)
    st.mem.phys.write_bytes(load, image)
    st.rip = load
    return st


def _state_lines(st, ev, steps: int) -> list[str]:
    from spec import flags as F
    from spec.snapshot import GPR_NAMES

    D = st.D
    lines = [f"stop: {ev.describe()} after {steps} instructions"]
    for k in range(0, 16, 4):
        lines.append("  ".join(f"{GPR_NAMES[i]:>3}={D.concrete(st.gpr[i]):#018x}" for i in range(k, k + 4)))
    fl = " ".join(F.NAMES[f] if st.get_flag(f) else F.NAMES[f].lower() for f in F.STATUS)
    undef = F.names({f for f in F.STATUS if st.undefined >> f & 1}) or "none"
    lines.append(f"rip={st.rip:#018x}  rflags={D.concrete(st.read_rflags()):#x} [{fl}]  undefined: {undef}")
    return lines


@app.command()
def run(
    guest: Annotated[Path, typer.Argument(help="flat binary image, or a machine snapshot (.json)")],
    mode: Annotated[ModeName, typer.Option(help="operating mode for a flat image")] = ModeName.long64,
    budget: Annotated[int, typer.Option(min=1, help="instruction budget (a guest that never halts stops here)")] = (
        1_000_000),
    load: Annotated[str, typer.Option(help="load address of a flat image")] = "0x1000",
    trace: Annotated[bool, typer.Option(help="print every instruction as it executes")] = False,
    dump: Annotated[list[str], typer.Option(help="ADDR:LEN of memory to hex-dump afterwards")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print the final snapshot as JSON")] = False,
    deliver: Annotated[bool | None, typer.Option(
        "--deliver/--no-deliver",
        help="deliver exceptions through the guest's IVT/IDT (default: yes for snapshots, no for flat images)")] = None,
) -> None:
    """Run a guest on the spec CPU and print its final state."""
    from spec.cpu import SpecCPU
    from spec.faults import Fault, Unimplemented
    from spec.snapshot import Snapshot

    st = _load_guest(guest, mode, _int(load, "--load"))
    dumps = []
    for d in dump:
        addr, _, n = d.partition(":")
        dumps.append((_int(addr, "--dump"), _int(n or "64", "--dump")))
    if deliver is None:
        deliver = guest.suffix == ".json"
    cpu = SpecCPU(st, deliver_exceptions=deliver)
    start = st.icount
    if trace:
        import iced_x86

        fmt = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
        ev = None
        for _ in range(budget):
            try:
                insn = cpu.fetch_decode()
            except (Fault, Unimplemented):
                insn = None  # nothing to print: the step below reports the fetch/decode outcome
            if insn is not None:
                text = fmt.format(next(iter(iced_x86.Decoder(st.code_bits, insn.raw, ip=st.rip))))
                out.print(f"{st.rip:#014x}  {insn.raw.hex():<30} {text}", markup=False)
            ev = cpu.step()
            if ev is not None:
                break
        if ev is None:
            from spec.cpu import StopEvent

            ev = StopEvent(kind="budget", rip=st.rip, detail=f"{budget} instructions executed")
    else:
        ev = cpu.run(budget)
    if as_json:
        snap = json.loads(Snapshot.from_state(st).to_json())
        out.print_json(data={"stop": ev.model_dump(), "snapshot": snap})
        return
    for line in _state_lines(st, ev, st.icount - start):
        out.print(line, markup=False)
    for addr, n in dumps:
        data = st.mem.phys.read_bytes(addr, n)
        for k in range(0, len(data), 16):
            out.print(f"{addr + k:#010x}  {data[k:k + 16].hex(' ')}", markup=False)


@app.command()
def coverage(
    mode: Annotated[list[ModeName], typer.Option(help="modes to probe (default: all)")] = [],  # noqa: B006
    missing: Annotated[bool, typer.Option(help="list the individual forms that are missing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the coverage table: instruction mnemonic x mode, measured by running the spec."""
    from spec.coverage import ISSUE2_REQUIRED, MISSING, probe_all, table
    from spec.machine import MODES

    modes = [m.value for m in mode] or list(MODES)
    probes = probe_all(modes)
    tab = table(probes)
    if as_json:
        out.print_json(data={"modes": modes, "table": tab,
                             "missing": [{"form": p.row.key, "mode": p.mode, "detail": p.detail}
                                         for p in probes if p.status == MISSING]})
        return
    style = {"ok": "green", "#UD": "cyan", "n/a": "dim", "missing": "red", "partial": "yellow"}
    t = Table(title="spec coverage: opcode-map forms by mode (measured)")
    t.add_column("mnemonic")
    for m in modes:
        t.add_column(m)
    for name in sorted(tab):
        t.add_row(name, *[f"[{style[s]}]{s}[/]" for s in (tab[name].get(m, 'n/a') for m in modes)])
    out.print(t)
    forms = len({p.row.key for p in probes})
    miss = [p for p in probes if p.status == MISSING]
    req_missing = sorted({n for n in ISSUE2_REQUIRED
                          if any(tab.get(n, {}).get(m) in ("missing", "partial") for m in modes)})
    out.print(f"{forms} forms x {len(modes)} modes; {len(miss)} form/mode pairs missing; "
              f"core general-purpose set: {'complete' if not req_missing else 'missing ' + ' '.join(req_missing)}")
    if missing:
        for p in miss:
            out.print(f"  missing  {p.mode:<7} {p.row.key}  ({p.detail})")


BENCH_LOOPS = {
    # mode -> ALU loop with a memory store and LOOP, run until the budget (encodings checked in tests)
    "long64": "b9ffffff7f31c0ba01000000bf00000100" "4801d04889c34831d348ffc2488907e2ef",
    "prot32": "b9ffffff7f31c0ba01000000bf00000100" "01d089c331d34289" "07e2f5",
    "real": "b9ffff31c0ba0100bf0020" "01d089c331d3428905e2f5" "ebe8",
}


@app.command()
def bench(
    instructions: Annotated[int, typer.Option(min=1000, help="instructions per mode")] = 200_000,
) -> None:
    """Measure the spec CPU's speed (guest instructions per second) on a small loop in each mode."""
    import time

    from spec.cpu import SpecCPU
    from spec.machine import flat_machine

    t = Table(title="spec CPU throughput (ALU + store + LOOP; paging on in long64)")
    t.add_column("mode")
    t.add_column("instructions", justify="right")
    t.add_column("seconds", justify="right")
    t.add_column("instr/s", justify="right")
    for mode, code in BENCH_LOOPS.items():
        st = flat_machine(mode, bytes.fromhex(code))  # type: ignore[arg-type]
        cpu = SpecCPU(st)
        start = time.perf_counter()
        ev = cpu.run(instructions)
        dt = time.perf_counter() - start
        if ev.kind != "budget":
            raise UserError(f"bench loop in {mode} stopped early: {ev.describe()}")
        t.add_row(mode, f"{st.icount:,}", f"{dt:.2f}", f"{st.icount / dt:,.0f}")
    out.print(t)


@app.command()
def schema(
    out_dir: Annotated[Path, typer.Option("--out", help="directory to write the *.schema.json files into")] = Path("."),
) -> None:
    """Export the JSON Schemas of refvmm's file formats."""
    from spec.snapshot import Snapshot

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in (("snapshot", Snapshot),):
        path = out_dir / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(mode="validation"), indent=1) + "\n")
        written.append(str(path))
    out.print("wrote " + ", ".join(written))


def main() -> None:
    """Console entry point: one-line errors for bad input, never a traceback."""
    try:
        app()
    except UserError as e:
        err.print(f"refvmm: error: {e}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("refvmm: interrupted")
        sys.exit(130)
    except OSError as e:
        err.print(f"refvmm: error: {e.filename or ''}: {e.strerror}")
        sys.exit(2)


if __name__ == "__main__":
    main()
