"""The ``refvmm`` command line.

Commands
    run            run a guest (flat image, snapshot, case) on the spec CPU, or a VM (configuration file,
                   or --paging shadow|nested) on the SVM model, printing its exit statistics
    campaign       a differential-testing campaign (spec vs Unicorn/KVM/...), resumable
    corpus replay  replay every corpus case on every available backend: pass/known/new
    coverage       the opcode-map coverage table: instruction form x mode
    bench          spec CPU speed; with --campaign, campaign throughput
    schema         export the JSON Schemas of the file formats

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


class PagingName(StrEnum):
    shadow = "shadow"
    nested = "nested"
    bare = "bare"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid snapshot: not JSON: {e}") from None


def _guest_kind(path: Path) -> str:
    """What a guest file is: "vm" (a VM configuration), "case", "snapshot" or "flat" (a binary image)."""
    from refvmm.config import looks_like_vm_config

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a guest image, snapshot, case or VM configuration")
    if path.suffix == ".toml":
        return "vm"
    if path.suffix == ".json":
        doc = _read_json(path)
        if looks_like_vm_config(doc):
            return "vm"
        return "case" if isinstance(doc, dict) and "snapshot" in doc else "snapshot"
    return "flat"


def _load_guest(path: Path, mode: ModeName, load: int):
    from spec.machine import flat_machine
    from spec.snapshot import Snapshot

    kind = _guest_kind(path)
    if kind in ("snapshot", "case"):
        try:
            doc = _read_json(path)
            if kind == "case":
                doc = doc["snapshot"]  # type: ignore[index]
            return Snapshot.model_validate(doc).to_state()
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


def _register_lines(st) -> list[str]:
    from spec import flags as F
    from spec.snapshot import GPR_NAMES

    D = st.D
    lines = []
    for k in range(0, 16, 4):
        lines.append("  ".join(f"{GPR_NAMES[i]:>3}={D.concrete(st.gpr[i]):#018x}" for i in range(k, k + 4)))
    fl = " ".join(F.NAMES[f] if st.get_flag(f) else F.NAMES[f].lower() for f in F.STATUS)
    undef = F.names({f for f in F.STATUS if st.undefined >> f & 1}) or "none"
    lines.append(f"rip={st.rip:#018x}  rflags={D.concrete(st.read_rflags()):#x} [{fl}]  undefined: {undef}")
    return lines


def _state_lines(st, ev, steps: int) -> list[str]:
    return [f"stop: {ev.describe()} after {steps} instructions", *_register_lines(st)]


def _vm_config(guest: Path, kind: str, paging: PagingName | None, mode: ModeName, load: int, budget: int | None):
    """The VM configuration for ``refvmm run``: the file itself, or one made for a bare guest file."""
    from refvmm.config import ConfigError, EntryConfig, FlatImage, MemoryConfig, SnapshotImage, VMConfig, load_config

    try:
        if kind == "vm":
            cfg = load_config(guest)
        else:
            if kind == "flat":  # a flat image gets the default RAM and devices (a console on COM1 and port E9h)
                cfg = VMConfig(name=guest.stem, image=FlatImage(kind="flat", path=str(guest), load=load),
                               entry=EntryConfig(mode=mode.value))  # type: ignore[arg-type]
            else:  # a snapshot or case is a test vector: exactly its pages are RAM, and no devices, as on bare
                cfg = VMConfig(name=guest.stem, image=SnapshotImage(kind=kind, path=str(guest)),  # type: ignore[arg-type]
                               memory=MemoryConfig(size=0), devices=[])
    except ConfigError as e:
        raise UserError(str(e)) from None
    update: dict[str, object] = {}
    if paging is not None and paging is not PagingName.bare:
        update["paging"] = paging.value
    if budget is not None:
        update["budget"] = budget
    return cfg.model_copy(update=update) if update else cfg


def _print_output(output: dict[str, bytes]) -> None:
    for source, data in output.items():
        out.print(f"output ({source}):", markup=False)
        text = data.decode("latin-1").replace("\r\n", "\n")
        for line in text.rstrip("\n").split("\n"):
            out.print(f"  {line}", markup=False)


def _run_vm(cfg, paging: PagingName | None, dumps: list[tuple[int, int]], as_json: bool) -> None:
    """``refvmm run`` of a VM: the guest under shadow or nested paging (or, with --paging bare, the same
    guest and devices on the bare spec CPU), then its state, its device output and the exit statistics."""
    from refvmm.config import ConfigError
    from refvmm.stats import stats_table
    from refvmm.vm import VM, BareMachine
    from spec.snapshot import Snapshot

    try:
        if paging is PagingName.bare:
            bare = BareMachine(cfg)
            start = bare.state.icount
            ev = bare.run(cfg.budget)
            st, output, memory_read = bare.state, bare.output.by_source(), bare.state.mem.phys.read_bytes
            devices = bare.devices
            if as_json:
                out.print_json(data={"stop": ev.model_dump(), "output": {k: v.decode("latin-1")
                                                                        for k, v in output.items()},
                                     "snapshot": json.loads(Snapshot.from_state(st).to_json())})
                return
            out.print(f"stop: {ev.describe()} after {st.icount - start} instructions (bare spec CPU)", markup=False)
            for line in _register_lines(st):
                out.print(line, markup=False)
        else:
            vm = VM(cfg)
            result = vm.run()
            st, output, memory_read = vm.guest_state(), vm.output.by_source(), vm.memory.read_bytes
            devices = vm.devices
            if as_json:
                out.print_json(data={"stop": result.model_dump(mode="json"),
                                     "snapshot": json.loads(vm.guest_snapshot().to_json())})
                if result.reason in ("error", "unhandled-exit"):
                    raise typer.Exit(1)
                return
            code = "" if result.exit_code is None else f" (exit code {result.exit_code})"
            out.print(f"stop: {result.describe()}{code} after {result.stats.guest_instructions} guest instructions "
                      f"({result.stats.paging} paging)", markup=False)
            for line in _register_lines(st):
                out.print(line, markup=False)
    except ConfigError as e:
        raise UserError(str(e)) from None
    for addr, n in dumps:
        data = memory_read(addr, n)
        for k in range(0, len(data), 16):
            out.print(f"{addr + k:#010x}  {data[k:k + 16].hex(' ')}", markup=False)
    _print_output(output)
    for name, dev in devices.items():
        if dev.summary():
            out.print(f"device {name} ({dev.kind}): {dev.summary()}", markup=False)
    if paging is not PagingName.bare:
        out.print(stats_table(result.stats, f"exit statistics of {cfg.name}"))
        if result.reason in ("error", "unhandled-exit"):
            raise typer.Exit(1)


@app.command()
def run(
    guest: Annotated[Path, typer.Argument(
        help="flat binary image, machine snapshot or corpus case (.json), or VM configuration (.json/.toml)")],
    mode: Annotated[ModeName, typer.Option(help="operating mode for a flat image")] = ModeName.long64,
    budget: Annotated[int | None, typer.Option(
        min=1, help="instruction budget (a guest that never halts stops here) (default: 1000000, or the VM's)")] = (
        None),
    load: Annotated[str, typer.Option(help="load address of a flat image")] = "0x1000",
    paging: Annotated[PagingName | None, typer.Option(
        help="run as a VM guest under shadow or nested paging; bare: on the spec CPU without a VMM "
             "(default: bare, or the VM configuration's)")] = None,
    trace: Annotated[bool, typer.Option(help="print every instruction as it executes (bare only)")] = False,
    dump: Annotated[list[str], typer.Option(help="ADDR:LEN of memory to hex-dump afterwards")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print the final snapshot as JSON")] = False,
    deliver: Annotated[bool | None, typer.Option(
        "--deliver/--no-deliver",
        help="deliver exceptions through the guest's IVT/IDT (default: yes for snapshots, no for flat images; "
             "a VM guest always gets them)")] = None,
) -> None:
    """Run a guest on the spec CPU, or as a VM under shadow/nested paging, and print its final state.

    A VM run (a VM configuration, or --paging shadow|nested) also prints what the guest wrote to its
    devices and the exit statistics (exits by reason, exits per 1000 guest instructions).
    """
    from spec.cpu import SpecCPU
    from spec.faults import Fault, Unimplemented
    from spec.snapshot import Snapshot

    kind = _guest_kind(guest)
    dumps = []
    for d in dump:
        addr, _, n = d.partition(":")
        dumps.append((_int(addr, "--dump"), _int(n or "64", "--dump")))
    load_addr = _int(load, "--load")
    if kind == "vm" or paging in (PagingName.shadow, PagingName.nested):
        if trace:
            raise UserError("--trace is only available on the bare spec CPU (--paging bare)")
        if deliver is False:
            raise UserError("--no-deliver: a VM guest always gets its exceptions through its own IDT")
        cfg = _vm_config(guest, kind, paging, mode, load_addr, budget)
        _run_vm(cfg, paging, dumps, as_json)
        return
    budget = 1_000_000 if budget is None else budget
    st = _load_guest(guest, mode, load_addr)
    if deliver is None:
        deliver = kind != "flat"
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
    campaign: Annotated[bool, typer.Option("--campaign", help="measure campaign throughput instead")] = False,
    cases: Annotated[int, typer.Option(min=10, help="--campaign: cases per configuration")] = 1000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="--campaign: the most worker processes tried")] = 2,
) -> None:
    """Measure the spec CPU's speed (guest instructions per second) on a small loop in each mode.

    With --campaign: end-to-end campaign throughput (cases/s) for 20-instruction 64-bit cases
    with paging, spec + Unicorn and spec + KVM, with 1 to --workers worker processes.
    """
    import time

    if campaign:
        _bench_campaign(cases, workers)
        return

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


def _bench_campaign(cases: int, max_workers: int) -> None:
    import tempfile

    from difftest import campaign as C
    from difftest import registry

    t = Table(title=f"campaign throughput: {cases:,} cases of 20 instructions, long64 with paging (4K/2M/1G, "
                    "CPL 0/3), no minimization")
    for col in ("backends", "workers", "cases", "s", "cases/s", "/worker", "CPU s", "cases/CPU-s", "diverged",
                "unsupp."):
        t.add_column(col, justify="left" if col == "backends" else "right", overflow="fold")
    with tempfile.TemporaryDirectory(prefix="refvmm-bench-") as tmp:
        for partner in ("unicorn", "kvm"):
            ok, why = registry.availability(partner)
            if not ok:
                out.print(f"{partner}: unavailable ({why}); not measured", markup=False)
                continue
            for w in range(1, max_workers + 1):
                try:
                    row = C.measure_throughput(["spec", partner], w, cases, directory=Path(tmp))
                except C.CampaignError as e:
                    raise UserError(str(e)) from None
                t.add_row("+".join(row.backends), str(w), f"{row.cases:,}", f"{row.seconds:.2f}", f"{row.rate:,.0f}",
                          f"{row.rate / w:,.0f}", f"{row.cpu_seconds:.2f}", f"{row.cpu_rate:,.0f}",
                          f"{row.divergent_cases:,}", f"{row.unsupported:,}")
    out.print(t)
    out.print("cases/CPU-s: cases per CPU-second of the coordinator and workers -- what one fully busy worker does "
              "(wall-clock rates drop when other processes share the cores)", markup=False)


@app.command()
def campaign(
    db: Annotated[Path, typer.Option(help="campaign database (SQLite); an existing one is resumed")],
    seed: Annotated[int | None, typer.Option(help="seed of the case stream (default: 0, or the database's)")] = None,
    cases: Annotated[int | None, typer.Option(min=1, help="finish cases 0..N-1 (counting earlier runs)")] = None,
    seconds: Annotated[float | None, typer.Option("--time", min=0.001,
                                                  help="stop starting new cases after this many seconds")] = None,
    backends: Annotated[str | None, typer.Option(
        help="comma-separated backends, spec first (default: spec,unicorn, or the database's)")] = None,
    workers: Annotated[int, typer.Option(min=1, max=256, help="worker processes")] = 1,
    length: Annotated[int | None, typer.Option(help="instructions per case (default: 20, or the database's)")] = None,
    modes: Annotated[list[str], typer.Option("--modes", help="modes: real prot16 prot32 long64 (default: all)")] = [],  # noqa: B006
    envs: Annotated[list[str], typer.Option("--envs", help="environment labels, e.g. long64/4-level/4K/cpl3")] = [],  # noqa: B006
    corpus_dir: Annotated[Path, typer.Option("--corpus", help="corpus directory (findings go to DIR/findings)")] = (
        Path("corpus")),
    findings: Annotated[Path | None, typer.Option(
        help="where new minimized findings go (default: CORPUS/findings)")] = None,
    known: Annotated[Path | None, typer.Option(
        help="known-divergence registry (default: CORPUS/known, else the package's)")] = None,
    minimize: Annotated[bool, typer.Option("--minimize/--no-minimize", help="minimize and write new findings")] = True,
    coverage_out: Annotated[Path | None, typer.Option(help="write the row x mode coverage listing here")] = None,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="cases per committed batch")] = 25,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run (or resume) a differential-testing campaign: generated cases on every backend, compared with the spec."""
    from difftest import campaign as C
    from difftest import registry
    from difftest.known import KnownError, load_known
    from difftest.store import Store, StoreError

    try:
        registry.load_environment()
        stored = Store.peek_config(db)
        if stored is not None:  # settings not given are the database's: `refvmm campaign --db X --cases N` resumes
            seed = stored.get("seed", seed) if seed is None else seed
            length = stored.get("length", length) if length is None else length
            backends = ",".join(stored.get("backends", [])) if backends is None else backends
            if not modes and not envs:
                envs = list(stored.get("envs", []))
        config = C.make_config(seed=0 if seed is None else seed, backends=backends or "spec,unicorn", modes=modes,
                               envs=envs, length=20 if length is None else length)
        if cases is None and seconds is None:
            raise UserError("give a case budget (--cases N) or a time budget (--time SECONDS)")
        if coverage_out is not None and coverage_out.is_dir():
            raise UserError(f"--coverage-out {coverage_out}: is a directory")
        known_dir = _known_dir(known, corpus_dir)
        load_known(known_dir)
        store = Store.open(db, config.model_dump())
    except (C.CampaignError, StoreError, registry.RegistryError, KnownError) as e:
        raise UserError(str(e)) from None
    options = C.RunOptions(cases=cases, seconds=seconds, workers=workers, batch=batch, minimize=minimize,
                           findings_dir=findings if findings is not None else corpus_dir / "findings",
                           known_dir=known_dir)
    try:
        prog = _run_with_progress(store, config, options)
        summary = C.summarize(store, config, prog)
    except (C.CampaignError, StoreError) as e:
        raise UserError(str(e)) from None
    finally:
        store.close()
    if coverage_out is not None:
        _write_coverage(coverage_out, summary)
    if as_json:
        out.print_json(summary.model_dump_json(exclude={"exercised", "not_exercised"}))
    else:
        _print_summary(db, summary, coverage_out)


def _run_with_progress(store, config, options):  # type: ignore[no-untyped-def]
    from rich.live import Live
    from rich.text import Text

    from difftest import campaign as C

    def render(p: C.Progress) -> Text:
        target = f"/{p.target:,}" if p.target is not None else ""
        left = ""
        if p.deadline is not None:
            import time

            left = f"  {max(0.0, p.deadline - time.monotonic()):.0f} s left"
        return Text.from_markup(
            f"[bold]cases[/] {p.done:,}{target}  [bold]{p.rate:,.0f}[/] cases/s  "
            f"divergences: [red]{p.new} new[/], {p.known} known ({p.divergent_cases:,} cases)  "
            f"unsupported {p.unsupported:,}  coverage {p.coverage:.1f}%"
            + (f"  minimizing {p.minimizing}" if p.minimizing else "")
            + (f"  [red]crashes {p.crashes}[/]" if p.crashes else "") + left)

    # The display's refresh thread starts at the first progress report, after the worker processes were
    # forked (run_campaign submits work first): a fork never copies a process with that thread running.
    live = Live(console=err, refresh_per_second=4, transient=True)

    def show(p: C.Progress) -> None:
        live.update(render(p))
        if not live.is_started:
            live.start()

    try:
        return C.run_campaign(store, config, options, on_progress=show)
    finally:
        live.stop()


def _write_coverage(path: Path, summary) -> None:  # type: ignore[no-untyped-def]
    lines = ["# status\tmode\tcases\topcode-table row"]
    lines += [f"exercised\t{m}\t{n}\t{r}" for m, r, n in summary.exercised]
    lines += [f"missing\t{m}\t0\t{r}" for m, r in summary.not_exercised]
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError as e:
        raise UserError(f"--coverage-out {path}: {e.strerror or e}") from None


def _print_summary(db: Path, s, coverage_out: Path | None) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    rate = s.session_cases / s.session_seconds if s.session_seconds > 0 else 0.0
    out.print(f"campaign {s.name}: {s.cases:,} cases in {db} (this run: {s.session_cases:,} cases, "
              f"{s.session_seconds:.1f} s, {rate:,.0f} cases/s); seed {s.config.seed}, {s.config.length} "
              f"instructions, {len(s.config.envs)} environments", markup=False)
    for b in s.backends:
        if not b.available:
            out.print(f"backend {b.name} unavailable: {b.reason}", markup=False)
    t = Table(title="stops per backend")
    names = [b.name for b in s.backends if b.name in s.stops]
    kinds = sorted({k for d in s.stops.values() for k in d})
    t.add_column("stop")
    for n in names:
        t.add_column(n, justify="right")
    for k in kinds:
        t.add_row(k, *[f"{s.stops[n].get(k, 0):,}" for n in names])
    out.print(t)
    if s.unsupported:
        t = Table(title="unsupported, by reason")
        t.add_column("backend")
        t.add_column("reason", overflow="fold")
        t.add_column("cases", justify="right")
        for b, reason, n in s.unsupported[:15]:
            t.add_row(b, escape(reason), f"{n:,}")
        if len(s.unsupported) > 15:
            t.add_row("...", f"{len(s.unsupported) - 15} more reasons", "")
        out.print(t)
    if s.crashes:
        t = Table(title="[red]harness failures (bugs in a backend, the generator or the comparison)[/]")
        t.add_column("where")
        t.add_column("cases", justify="right")
        for what, n in s.crashes:
            t.add_row(escape(what), f"{n:,}")
        out.print(t)
    t = Table(title=f"divergences by signature ({s.divergent_cases:,} divergent cases)")
    for col in ("status", "verdict", "cases", "first", "signature", "first diverging instruction"):
        t.add_column(col, justify="right" if col in ("cases", "first") else "left",
                     overflow="fold" if col in ("signature", "first diverging instruction") else "ellipsis")
    for f in sorted(s.findings, key=lambda f: (f.status != "new", -f.count, f.key)):
        status = "[red]new[/]" if f.status == "new" else "known"
        t.add_row(status, f.verdict, f"{f.count:,}", str(f.first_index), escape(f.key), escape(f.instruction))
    out.print(t)
    files = sorted({str(Path(f.file).parent) for f in s.findings if f.file})
    pending = sum(1 for f in s.new if not f.minimized)
    if files or pending:
        out.print(f"minimized findings: {sum(1 for f in s.findings if f.file)} case files in {', '.join(files) or '-'}"
                  + (f"; {pending} not minimized yet (run again with --minimize)" if pending else ""), markup=False)
    if s.verdicts:
        out.print("verdicts (cases): " + ", ".join(f"{v} {n:,}" for v, n in sorted(s.verdicts.items())), markup=False)
    t = Table(title="coverage: opcode-table rows x modes exercised")
    for col in ("mode", "exercised", "not exercised", "rows", "%"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for c in s.coverage:
        t.add_row(c.mode, str(c.exercised), str(c.total - c.exercised), str(c.total),
                  f"{100 * c.exercised / c.total:.1f}" if c.total else "-")
    out.print(t)
    total = sum(c.total for c in s.coverage)
    hit = sum(c.exercised for c in s.coverage)
    where = f"listing in {coverage_out}" if coverage_out else "--coverage-out FILE lists them"
    out.print(f"{hit} of {total} row x mode pairs exercised, {total - hit} not ({where}); "
              f"{len(s.new)} new and {len(s.known)} known divergence signatures", markup=False)


def _known_dir(known: Path | None, corpus_dir: Path) -> Path | None:
    """The known-divergence registry: --known, else CORPUS/known when it exists, else the package's."""
    if known is not None:
        return known
    return corpus_dir / "known" if (corpus_dir / "known").is_dir() else None


corpus_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The case corpus.")
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("replay")
def corpus_replay(
    directory: Annotated[Path, typer.Argument(help="corpus directory or one case file")] = Path("corpus"),
    backends: Annotated[str | None, typer.Option(help="comma-separated backends (default: every available one)")] = (
        None),
    known: Annotated[Path | None, typer.Option(
        help="known-divergence registry (default: DIR/known, else the package's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Replay every corpus case on every available backend: pass, known or new divergence (exit 1 on new)."""
    from rich.markup import escape

    from difftest import registry
    from difftest.case import CaseError
    from difftest.corpus import load_cases, replay
    from difftest.known import KnownError, load_known

    try:
        registry.load_environment()
        names = registry.parse(backends) if backends else registry.names()
        names = [registry.REFERENCE, *(n for n in names if n != registry.REFERENCE)]
        known_dir = _known_dir(known, directory if directory.is_dir() else directory.parent)
        load_known(known_dir)
        loaded = list(load_cases(directory))  # every file is checked before anything runs
        usable = [n for n in names if registry.availability(n)[0]]
        if registry.REFERENCE not in usable:
            raise UserError(f"the spec backend is unavailable: {registry.availability(registry.REFERENCE)[1]}")
        results = list(replay(loaded, usable, known_dir=known_dir))
    except (registry.RegistryError, CaseError, KnownError) as e:
        raise UserError(str(e)) from None
    if as_json:
        out.print_json(data={"backends": usable, "results": [r.model_dump() for r in results]})
    else:
        for n in names:
            if n not in usable:
                out.print(f"backend {n} unavailable: {registry.availability(n)[1]}", markup=False)
        t = Table(title=f"corpus replay: {directory} on {', '.join(usable)}")
        for col in ("case", "environment", "result", "detail"):
            t.add_column(col, overflow="fold")
        style = {"pass": "green", "known": "yellow", "new": "red", "skipped": "dim"}
        for r in results:
            t.add_row(escape(r.path), r.env, f"[{style[r.status]}]{r.status}[/]", escape(r.detail))
        out.print(t)
        counts = {k: sum(1 for r in results if r.status == k) for k in ("pass", "known", "new", "skipped")}
        out.print(f"{len(results)} cases: " + ", ".join(f"{n} {k}" for k, n in counts.items()), markup=False)
    if any(r.status == "new" for r in results):
        raise typer.Exit(1)


@app.command()
def schema(
    out_dir: Annotated[Path, typer.Option("--out", help="directory to write the *.schema.json files into")] = Path("."),
) -> None:
    """Export the JSON Schemas of refvmm's file formats."""
    from difftest.case import Case
    from refvmm.config import VMConfig
    from spec.snapshot import Snapshot

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in (("snapshot", Snapshot), ("case", Case), ("vm", VMConfig)):
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
