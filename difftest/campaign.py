"""Differential-testing campaigns: a deterministic stream of generated cases, run on every chosen
backend in worker processes, compared against the spec, triaged, and recorded in a resumable database.

The case stream is a pure function of the :class:`CampaignConfig`: case *i* is
``generate_case(seed, i, envs=..., length=...)``.  Indices are cut into
batches; each worker process keeps its own backends (one Unicorn engine, one
KVM VM, ...) and runs whole batches.  For every case it runs all available
backends, compares each against the spec (:func:`difftest.compare.compare`),
and for a divergent case finds the first diverging instruction
(:func:`difftest.report.first_divergence`), the signature
(:func:`difftest.triage.signature`), the verdict of the vote
(:func:`difftest.triage.vote`) and whether the signature is a known divergence
(:mod:`difftest.known`).  The coordinating process commits each batch's result
atomically (:class:`difftest.store.Store`), so a campaign killed at any moment
resumes where it stopped, without losing a finding or counting a case twice.

A signature's representative is its lowest-index case.  New signatures (not
known, not already in the findings directory) are minimized
(:func:`difftest.minimize.minimize`, keeping the signature) once every index
below the representative is finished -- so the representative, and with it
the minimized case, does not depend on worker count or timing -- and written
to ``<findings>/<signature>.json``.

A backend that kills its process natively (Unicorn 2.1.4 dies of SIGFPE on a 32-bit
``IDIV`` of 0x80000000_00000000 by -1 in 64-bit mode) cannot be caught in Python, so
batches run in worker processes (even with one worker).  When a worker dies, every batch it took down
is re-run in fresh single-use child processes, halving a range whose child dies until
the crashing cases stand alone (:func:`isolate_batch`).  Each crashing case becomes a
finding ``crash|<backend>|<form of the crashing instruction>|<mode>`` (the backend is
found by running each backend alone in a child, the instruction by bisecting the
instruction prefix); its "minimized" case is the prefix ending at that instruction.
The rest commit normally and a fresh pool carries on.  Isolation gives exactly the
results a batch would have given, so seeds, worker counts and restarts still yield
the same database.

Coverage is counted per (opcode-table row, mode) pair the generator exercised
(:func:`difftest.generate.rows_covered`), against every row valid in each mode
of the campaign.
"""

from __future__ import annotations

import faulthandler
import hashlib
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difftest import registry
from difftest.backend import Backend, Outcome, Stop
from difftest.case import Case, Environment, Provenance
from difftest.store import BatchResult, Divergence, Store, pending_batches

REFERENCE = registry.REFERENCE
DEFAULT_BACKENDS = ("spec", "unicorn")
DEFAULT_BATCH = 25
MAX_REASON = 100
MAX_FIELDS = 24  # differing field names kept per finding


class CampaignError(ValueError):
    """A campaign that cannot start (bad settings): one line."""


# -- configuration -----------------------------------------------------------------------------------

class CampaignConfig(BaseModel):
    """What defines a campaign's case stream and results (stored in its database)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(ge=0)
    backends: list[str] = Field(min_length=1, description="backend names; the spec is the reference")
    envs: list[str] = Field(min_length=1, description="environment labels (Environment.label())")
    length: int = Field(ge=1, le=1000, description="generated instructions per case")

    @property
    def name(self) -> str:
        """A short stable name (provenance of generated and minimized cases)."""
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:8]
        return f"seed{self.seed}-{digest}"

    def environments(self) -> list[Environment]:
        from difftest.layout import environment

        return [environment(label) for label in self.envs]

    def modes(self) -> list[str]:
        out: list[str] = []
        for env in self.environments():
            if env.mode not in out:
                out.append(env.mode)
        return out


def _all_environments() -> list[Environment]:
    from difftest.layout import ENVIRONMENTS

    return list(ENVIRONMENTS)


def select_environments(modes: Sequence[str] = (), envs: Sequence[str] = (), *,
                        paging_only: bool = False) -> list[str]:
    """Environment labels chosen by mode names and/or exact labels (default: every environment).

    ``modes`` and ``envs`` entries may be comma-separated.  An unknown name is
    a :class:`CampaignError` listing the valid ones.
    """
    every = _all_environments()
    labels = [e.label() for e in every]
    mode_names = sorted({e.mode for e in every}, key=[e.mode for e in every].index)
    chosen: list[str] = []
    for item in _split(modes):
        if item not in mode_names:
            raise CampaignError(f"unknown mode {item!r} (modes: {', '.join(mode_names)})")
        chosen += [e.label() for e in every if e.mode == item]
    for item in _split(envs):
        if item not in labels:
            raise CampaignError(f"unknown environment {item!r} (environments: {', '.join(labels)})")
        chosen.append(item)
    if not chosen:
        chosen = labels
    if paging_only:
        chosen = [lb for lb in chosen if "/" in lb.removesuffix("/cpl0").removesuffix("/cpl3")]
    out = [lb for lb in labels if lb in chosen]  # canonical order, no repeats
    if not out:
        raise CampaignError("no environment selected")
    return out


def _split(items: Sequence[str]) -> list[str]:
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def make_config(*, seed: int, backends: str | Sequence[str] = DEFAULT_BACKENDS, modes: Sequence[str] = (),
                envs: Sequence[str] = (), length: int = 20) -> CampaignConfig:
    """A validated configuration from command-line style settings (:class:`CampaignError` if bad)."""
    try:
        names = registry.parse(backends if isinstance(backends, str) else ",".join(backends))
    except registry.RegistryError as e:
        raise CampaignError(str(e)) from None
    if REFERENCE not in names:
        raise CampaignError(f"the backends must include {REFERENCE!r}: every backend is compared against the spec")
    names = [REFERENCE, *(n for n in names if n != REFERENCE)]
    if len(names) < 2:
        raise CampaignError("a campaign needs at least one backend besides the spec")
    if seed < 0:
        raise CampaignError(f"--seed must be >= 0, not {seed}")
    if not 1 <= length <= 1000:
        raise CampaignError(f"--length must be between 1 and 1000, not {length}")
    return CampaignConfig(seed=seed, backends=names, envs=select_environments(modes, envs), length=length)


# -- per-case work (inside a worker) -----------------------------------------------------------------

@dataclass
class CaseDivergence:
    """One divergence of one case, analysed."""

    key: str
    verdict: str
    known: bool
    insn_index: int | None
    instruction: str
    fields: list[str]
    backends: list[str]
    explanation: str
    render: Callable[[], str] | None = None  # the human-readable report (made only when asked for: it is slow)


@dataclass
class CaseCheck:
    """What running one case on every backend showed."""

    outcomes: dict[str, Outcome]
    divergences: list[CaseDivergence] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # backend/analysis crashes (harness bugs), as counter names


def normalize_reason(text: str) -> str:
    """An unsupported reason without its numbers, so that equal reasons count together."""
    text = re.sub(r"0x[0-9a-fA-F]+", "ADDR", text)
    text = re.sub(r"\b\d{3,}\b", "N", text)  # large decimal numbers; "32-bit", "CPL 3" stay
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


def spec_derived(outcome: Outcome) -> bool:
    """Whether ``outcome`` came from the spec itself run another way (the refvmm VMM backends).

    Such a backend is not an independent implementation: agreeing with the spec proves
    nothing about the hardware and disagreeing is a bug of the VMM.  It is therefore
    checked for equivalence with the reference alone and never votes (see :class:`Checker`).
    """
    return outcome.executed_by == "spec"


def _crash(backend: str, e: BaseException) -> Outcome:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return Outcome(backend=backend, stop=Stop(kind="unsupported", detail=f"crash: {type(e).__name__}: {e}{at}"),
                   final=None, executed_by="crash")


class Checker:
    """Runs cases on a fixed set of backends and analyses divergences (one per worker process).

    Analysis is :func:`difftest.triage.investigate` (compare every pair, bisect to the
    first diverging instruction, sign and vote on the diverging prefix) and
    :func:`difftest.known.is_known`.  The vote is among *independent* implementations
    only: the spec, Unicorn (QEMU), KVM (hardware and its emulator), user backends.
    Spec-derived backends (:func:`spec_derived`: the refvmm VMMs, which run the spec in
    the guest) are each compared with the spec alone, an equivalence check whose
    divergences are VMM bugs (verdict ``unknown``); otherwise their copies of the spec's
    answer would outvote KVM and Unicorn, and known hardware/QEMU divergences would
    split without a majority whenever they are present.
    """

    def __init__(self, names: Sequence[str], known_dir: Path | None = None) -> None:
        from difftest.known import load_known

        self.names = list(names)
        self.known = load_known(known_dir) if known_dir is not None else None
        self.backends: dict[str, Backend] = {}
        for name in self.names:
            if registry.availability(name)[0]:
                self.backends[name] = registry.create(name)

    def run_all(self, case: Case) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        for name, backend in self.backends.items():
            try:
                out[name] = backend.run(case.snapshot, case.budget)
            except Exception as e:  # a harness/backend bug: recorded as a crash, the campaign goes on
                out[name] = _crash(name, e)
        return out

    def check(self, case: Case) -> CaseCheck:
        outcomes = self.run_all(case)
        result = CaseCheck(outcomes)
        for name, o in outcomes.items():
            if o.executed_by == "crash":
                result.errors.append(f"crash/{name}/{normalize_reason(o.stop.detail.removeprefix('crash: '))}")
        independent = {n: o for n, o in outcomes.items() if n == REFERENCE or not spec_derived(o)}
        groups = [independent]  # one vote among independent implementations ...
        groups += [{REFERENCE: outcomes[REFERENCE], n: o} for n, o in outcomes.items()  # ... and one equivalence
                   if n not in independent and REFERENCE in outcomes]  # check per spec-derived backend
        for group in groups:
            if len(group) < 2:
                continue
            try:
                d = self._analyse(case, group, derived=len(group) == 2 and not set(group) <= set(independent))
            except Exception as e:  # a bug in comparison/triage: recorded, the campaign goes on
                result.errors.append(f"crash/analysis/{normalize_reason(f'{type(e).__name__}: {e}')}")
            else:
                if d is not None:
                    result.divergences.append(d)
        return result

    def _analyse(self, case: Case, outcomes: dict[str, Outcome], *, derived: bool = False) -> CaseDivergence | None:
        from difftest.known import is_known
        from difftest.triage import Verdict, investigate

        found = investigate(case, [self.backends[n] for n in outcomes], outcomes=list(outcomes.values()),
                            classify=not derived)
        if found is None:
            return None
        if derived:  # the spec run by a VMM must equal the spec itself: a difference is the VMM's bug
            other = next(n for n in outcomes if n != REFERENCE)
            found = found.model_copy(update={"verdict": Verdict(
                verdict="unknown", reason=f"{other} (the spec inside a VMM) differs from the spec: a VMM bug",
                dissenters=(other,), field=found.signature.field)})
        sig, index = found.signature, found.index
        known = is_known(sig, self.known, verdict=found.verdict.verdict)
        instruction = instruction_text(case, index)
        rows = found.comparison.rows
        fields = [r.field for r in rows]
        backends = sorted({b for r in rows for b in r.dissenters})

        def report() -> str:
            from difftest.report import render

            return render(case, found.outcomes, found.comparison, index=index)

        return CaseDivergence(key=sig.key, verdict=found.verdict.verdict, known=known, insn_index=index,
                              instruction=instruction, fields=fields, backends=backends,
                              explanation=found.verdict.reason, render=None if known else report)

    def signature_keys(self, case: Case) -> set[str]:
        """The divergence signatures of ``case`` (empty when the backends agree)."""
        return {d.key for d in self.check(case).divergences}


Generator = Callable[..., Case]
"""``generate_case(seed, index, *, envs, length, campaign) -> Case`` (:func:`difftest.generate.generate_case`)."""
RowsCovered = Callable[[Case], set[tuple[str, str]]]
"""``rows_covered(case) -> {(row key, mode)}`` (:func:`difftest.generate.rows_covered`)."""


def instruction_text(case: Case, index: int) -> str:
    """The disassembly line of instruction ``index`` of ``case`` (``-1``: the terminating HLT)."""
    insns = case.instructions() if case.insn_offsets else []
    if 0 <= index < len(insns):
        offset, raw, suffix = case.insn_offsets[index], insns[index], ""
    else:
        offset, raw, suffix = len(case.code_bytes) - 1, case.code_bytes[-1:], " (the terminating HLT)"
    address = case.snapshot.regs.rip + offset
    line = next((ln for ln in case.disassembly if ln.startswith(f"{address:#x}:")), None)
    return (line or f"{address:#x}: {raw.hex()}") + suffix


def run_batch(checker: Checker, config: CampaignConfig, start: int, end: int, generator: Generator,
              rows_covered: RowsCovered) -> BatchResult:
    """Generate and check cases ``start..end-1``: everything the store needs to record them."""
    envs = config.environments()
    out = BatchResult(start, end)
    cases: dict[str, Case] = {}  # the representative of each new signature
    t0 = time.perf_counter()
    for i in range(start, end):
        try:
            case = generator(config.seed, i, envs=envs, length=config.length, campaign=config.name)
        except Exception as e:  # a generator bug: counted, the index is still done (it is deterministic)
            out.count(f"crash/generator/{normalize_reason(f'{type(e).__name__}: {e}')}")
            out.count("cases")
            continue
        out.count("cases")
        for pair in rows_covered(case):
            out.coverage[pair] = out.coverage.get(pair, 0) + 1
        res = checker.check(case)
        for name, o in res.outcomes.items():
            out.count(f"stop/{name}/{o.stop.kind}")
            if o.stop.kind == "unsupported":
                out.count(f"unsupported/{name}/{normalize_reason(o.stop.detail)}")
        for e in res.errors:
            out.count(e)
        if res.divergences:
            out.count("cases/divergent")
            out.count("cases/divergent/" + ("new" if any(not d.known for d in res.divergences) else "known"))
        for d in res.divergences:
            out.count(f"verdict/{d.verdict}")
            out.add_divergence(Divergence(key=d.key, known=d.known, verdict=d.verdict, index=i,
                                          insn_index=d.insn_index, instruction=d.instruction, fields=d.fields,
                                          backends=d.backends, explanation=d.explanation))
            rep = out.divergences[d.key]
            if not d.known and rep.index == i:
                cases[d.key] = case
    for key, d in out.divergences.items():
        if not d.known:
            d.case_json = cases[key].model_dump_json()
        d.fields = d.fields[:MAX_FIELDS]
    out.count("time/us", int((time.perf_counter() - t0) * 1e6))
    return out


def minimize_finding(checker: Checker, key: str, case_json: str, config: CampaignConfig, index: int,
                     max_tests: int = 400) -> tuple[str, str]:
    """The minimized case of finding ``key`` (its signature kept) as case-file JSON, and its divergence report."""
    from difftest.minimize import minimize

    case = Case.model_validate_json(case_json)
    tags = {"finding"}
    try:
        small = minimize(case, lambda c: key in checker.signature_keys(c), max_tests=max_tests)
    except Exception as e:  # a minimizer bug must not cost the finding: keep the case as found
        small = case
        tags.add("unminimized")
        note = f"minimization failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        small = small.model_copy(update={"explanation": f"{case.explanation} {note}".strip()})
    report = ""
    for d in checker.check(small).divergences:
        if d.key == key:
            report = d.render() if d.render is not None else ""
            tags.add(d.verdict)
            where = f"; first diverging instruction: {d.instruction}" if d.instruction else ""
            small = small.model_copy(update={"explanation": f"{d.verdict}: {d.explanation}{where}. "
                                                            f"{small.explanation}".strip()})
    name = safe_name(key)
    small = small.model_copy(update={
        "name": name,
        "tags": sorted({*small.tags, *tags}),
        "provenance": Provenance(generator="minimized", seed=config.seed, campaign=config.name, index=index,
                                 parent=case.name),
    })
    return Case.model_validate_json(small.model_dump_json()).to_json(), report


def safe_name(key: str) -> str:
    """A file and case name for signature ``key`` (``[A-Za-z0-9_.+-]``, bounded length, stable)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", key).strip("_.") or "finding"
    if len(name) > 120 or name != key:
        name = f"{name[:100]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return name


# -- worker processes -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(names: list[str], parent: int, known_dir: Path | None) -> None:
    """Pool initializer: die with the coordinator, leave Ctrl-C to it, build this process's backends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.disable()  # a backend's native crash is isolated and recorded by the coordinator
    _die_with_parent(parent)
    _WORKER["checker"] = Checker(names, known_dir)


def _die_with_parent(parent: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): a SIGKILLed coordinator leaves no orphan workers."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the coordinator died before the request took effect
        os._exit(1)


def _task_batch(config: CampaignConfig, start: int, end: int, generator: Generator,
                rows_covered: RowsCovered) -> BatchResult:
    return run_batch(_WORKER["checker"], config, start, end, generator, rows_covered)


def _task_minimize(config: CampaignConfig, key: str, case_json: str, index: int,
                   max_tests: int) -> tuple[str, str]:
    return minimize_finding(_WORKER["checker"], key, case_json, config, index, max_tests)


class _InlineExecutor:
    """Runs tasks in this process (``RunOptions.inline``: no pickling, no IPC, but no crash isolation either)."""

    def __init__(self, names: list[str], known_dir: Path | None) -> None:
        _WORKER["checker"] = Checker(names, known_dir)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        _WORKER.pop("checker", None)


def _executor(workers: int, names: list[str], known_dir: Path | None, *,
              inline: bool = False) -> _InlineExecutor | ProcessPoolExecutor:
    if inline:
        return _InlineExecutor(names, known_dir)
    # fork: workers inherit the registry (backends registered at run time) and start fast.  The pool
    # starts its processes at the first submit, before the caller's progress display starts a thread.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=(names, os.getpid(), known_dir))


# -- crash isolation ------------------------------------------------------------------------------

CRASH_PREFIX = "crash|"


@dataclass
class ChildResult:
    """How a function run in a single-use child process ended."""

    status: Literal["ok", "error", "died"]
    value: Any = None
    why: str = ""  # "error": the exception; "died": how the process ended


def run_in_child(fn: Callable[[], Any]) -> ChildResult:
    """Run ``fn`` in a fresh forked child and return its result, its exception text, or how it died.

    The child inherits everything (registered backends, the generator), so nothing but
    the result is pickled.  It dies with this process (no orphans after a SIGKILL).
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, send, os.getpid()), daemon=True)
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError:  # the child died before it could answer
        status, value = "died", None
    finally:
        recv.close()
    proc.join()
    if status == "died":
        code = proc.exitcode if proc.exitcode is not None else 0
        why = f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}"
        return ChildResult("died", None, why)
    return ChildResult(status, value if status == "ok" else None, value if status == "error" else "")


def _child_main(fn: Callable[[], Any], send: Any, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.disable()  # a native crash here is expected and diagnosed by the parent, not a traceback
    _die_with_parent(parent)
    try:
        result: tuple[str, Any] = ("ok", fn())
    except Exception as e:
        result = ("error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    send.send(result)
    send.close()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class Isolation:
    """What a campaign needs to re-run cases in child processes."""

    config: CampaignConfig
    names: list[str]
    known_dir: Path | None
    generator: Generator
    rows_covered: RowsCovered

    def batch(self, start: int, end: int) -> BatchResult:
        return run_batch(Checker(self.names, self.known_dir), self.config, start, end, self.generator,
                         self.rows_covered)


def isolate_batch(iso: Isolation, start: int, end: int) -> list[BatchResult]:
    """Results for cases ``start..end-1`` whose worker died: ranges in increasing order, covering them all.

    The range runs in a fresh child; if that dies it is halved until single cases die,
    and each of those becomes a crash finding (:func:`crash_result`).  A Python exception
    escaping a batch is a harness bug: :class:`CampaignError`.
    """
    res = run_in_child(lambda: iso.batch(start, end))
    if res.status == "ok":
        return [res.value]
    if res.status == "error":
        raise CampaignError(f"cases {start}..{end - 1} failed: {res.why} (finished batches are saved; "
                            "rerun to resume)")
    if end - start == 1:
        return [crash_result(iso, start, res.why)]
    mid = (start + end) // 2
    return isolate_batch(iso, start, mid) + isolate_batch(iso, mid, end)


def _backend_dies(name: str, case: Case) -> ChildResult:
    return run_in_child(lambda: registry.create(name).run(case.snapshot, case.budget).stop.kind)


@dataclass
class Crash:
    """A case that kills the process running it, diagnosed."""

    key: str  # crash|<backend>|<form of the crashing instruction>|<mode>
    verdict: str
    backend: str  # the culprit ("unknown" when no backend dies alone: the crash is in the analysis)
    why: str  # how the process died
    insn_index: int | None
    instruction: str
    prefix: Case  # the case cut after the crashing instruction

    @property
    def explanation(self) -> str:
        at = f" at instruction {self.insn_index}: {self.instruction}" if self.instruction else ""
        return f"{self.backend} killed its process ({self.why}){at}"


def diagnose_crash(case: Case, names: Sequence[str], why: str = "") -> Crash:
    """Which backend kills its process on ``case`` and at which instruction.

    Each backend runs the case alone in a child: the first one that dies is the
    culprit; bisecting the instruction prefix on it finds the instruction.
    """
    from difftest.triage import form_at

    culprit, died = "unknown", why
    for name in names:
        if registry.availability(name)[0]:
            alone = _backend_dies(name, case)
            if alone.status == "died":
                culprit, died = name, alone.why
                break
    insns = case.instructions() if case.insn_offsets else []
    insn_index: int | None = None
    form, prefix = "unknown", case
    if culprit != "unknown" and insns:
        good, bad = 0, len(insns)  # the bare HLT is assumed to survive; the whole case does not
        while bad - good > 1:
            mid = (good + bad) // 2
            if _backend_dies(culprit, case.with_instructions(insns[:mid])).status == "died":
                bad = mid
            else:
                good = mid
        insn_index = bad - 1
        form = form_at(case, insn_index)
        prefix = case.with_instructions(insns[:bad])
    verdict = f"{culprit}-bug" if culprit in ("spec", "unicorn") else "unknown"
    return Crash(key=f"{CRASH_PREFIX}{culprit}|{form}|{case.env.label()}", verdict=verdict, backend=culprit,
                 why=died, insn_index=insn_index,
                 instruction=instruction_text(case, insn_index) if insn_index is not None else "", prefix=prefix)


def crash_result(iso: Isolation, index: int, why: str) -> BatchResult:
    """The record of case ``index``, which kills the process checking it (:func:`diagnose_crash`)."""
    from difftest.known import is_known, load_known

    config = iso.config
    out = BatchResult(index, index + 1)
    out.count("cases")
    try:
        case = iso.generator(config.seed, index, envs=config.environments(), length=config.length,
                             campaign=config.name)
    except Exception as e:  # the generator is pure Python: its bug is counted like in run_batch
        out.count(f"crash/generator/{normalize_reason(f'{type(e).__name__}: {e}')}")
        return out
    for pair in iso.rows_covered(case):
        out.coverage[pair] = out.coverage.get(pair, 0) + 1
    crash = diagnose_crash(case, iso.names, why)
    known = is_known(crash.key, load_known(iso.known_dir), verdict=crash.verdict)
    out.count(f"crash/{crash.backend}/native crash ({crash.why})")
    out.count("cases/divergent")
    out.count("cases/divergent/" + ("known" if known else "new"))
    out.count(f"verdict/{crash.verdict}")
    case_json = None
    if not known:
        small = crash.prefix.model_copy(update={
            "name": safe_name(crash.key), "tags": sorted({*case.tags, "finding", "crash", crash.verdict}),
            "explanation": f"{crash.verdict}: {crash.explanation}. {case.explanation}".strip(),
            "provenance": Provenance(generator="crash-isolation", seed=config.seed, campaign=config.name,
                                     index=index, parent=case.name)})
        case_json = Case.model_validate_json(small.model_dump_json()).to_json()
    out.add_divergence(Divergence(key=crash.key, known=known, verdict=crash.verdict, index=index,
                                  insn_index=crash.insn_index, instruction=crash.instruction, fields=["crash"],
                                  backends=[crash.backend], explanation=crash.explanation, case_json=case_json))
    return out


# -- the coordinator ------------------------------------------------------------------------------

@dataclass
class Progress:
    """Live numbers for the progress display."""

    done: int = 0  # cases finished in the database
    target: int | None = None
    session: int = 0  # cases finished by this run
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    new: int = 0  # distinct new signatures
    known: int = 0  # distinct known signatures
    divergent_cases: int = 0
    unsupported: int = 0
    crashes: int = 0
    covered: int = 0
    universe: int = 0
    minimized: int = 0
    minimizing: int = 0

    @property
    def rate(self) -> float:
        dt = time.monotonic() - self.started
        return self.session / dt if dt > 0 else 0.0

    @property
    def coverage(self) -> float:
        return 100.0 * self.covered / self.universe if self.universe else 0.0


@dataclass
class RunOptions:
    cases: int | None = None  # finish indices 0..cases-1 (None: no case limit)
    seconds: float | None = None  # stop starting batches after this long (None: no time limit)
    workers: int = 1
    batch: int = DEFAULT_BATCH
    findings_dir: Path | None = Path("corpus/findings")  # None: do not write finding files
    known_dir: Path | None = None  # known divergences (None: the package's corpus/known)
    minimize: bool = True
    minimize_tests: int = 400  # predicate calls a minimization may make
    inline: bool = False  # one worker in this very process: faster to profile, but a native crash kills the run


def coverage_universe(modes: Sequence[str]) -> set[tuple[str, str]]:
    """Every (opcode-table row key, mode) pair valid in the given modes."""
    from spec.decode.encode import rows_for
    from spec.machine import BITS

    return {(row.key, mode) for mode in modes for row in rows_for(BITS[mode])}


def run_campaign(store: Store, config: CampaignConfig, options: RunOptions, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 generator: Generator | None = None, rows_covered: RowsCovered | None = None) -> Progress:
    """Run (or resume) the campaign recorded in ``store`` until ``options``' budget; returns the final progress.

    ``generator`` and ``rows_covered`` default to :mod:`difftest.generate`'s (with
    several workers they must be picklable: module-level functions).
    """
    if generator is None or rows_covered is None:
        from difftest import generate

        generator = generator or generate.generate_case
        rows_covered = rows_covered or generate.rows_covered
    if options.cases is None and options.seconds is None:
        raise CampaignError("give a case budget (--cases) or a time budget (--time)")
    names = [n for n in config.backends if registry.availability(n)[0]]
    if REFERENCE not in names:
        why = registry.availability(REFERENCE)[1]
        raise CampaignError(f"the reference backend {REFERENCE!r} is unavailable: {why}")
    if len(names) < 2:
        reasons = "; ".join(f"{n}: {registry.availability(n)[1]}" for n in config.backends if n not in names)
        raise CampaignError(f"no backend besides the spec is available ({reasons})")
    from difftest.known import KnownError, load_known

    try:
        load_known(options.known_dir)
    except KnownError as e:
        raise CampaignError(str(e)) from None
    universe = coverage_universe(config.modes())
    covered = {pair for pair in store.coverage() if pair in universe}
    prog = Progress(done=store.done_count(), target=options.cases, universe=len(universe), covered=len(covered))
    if options.seconds is not None:
        prog.deadline = prog.started + options.seconds
    _refresh_findings(prog, store)
    batches: Iterator[tuple[int, int]] = pending_batches(store.done_ranges(), options.cases, max(1, options.batch))
    executor = _executor(options.workers, names, options.known_dir, inline=options.inline)
    iso = Isolation(config, names, options.known_dir, generator, rows_covered)
    inflight: dict[Future[Any], tuple[str, Any]] = {}
    minimizing: set[str] = set()
    stopping = False

    def record(batch: BatchResult) -> None:
        store.commit_batch(batch)
        n = batch.end - batch.start
        prog.done += n
        prog.session += n
        prog.divergent_cases += batch.counters.get("cases/divergent", 0)
        prog.unsupported += sum(v for k, v in batch.counters.items() if k.endswith("/unsupported"))
        prog.crashes += sum(v for k, v in batch.counters.items() if k.startswith("crash/"))
        covered.update(p for p in batch.coverage if p in universe)
        prog.covered = len(covered)
        if batch.divergences:
            _refresh_findings(prog, store)

    def minimize_isolated(key: str) -> None:
        """Minimize ``key`` in a child; if the minimizer's candidates kill it too, keep the case as found."""
        found = store.finding(key)
        assert found is not None and found.case_json is not None
        case_json = found.case_json
        res = run_in_child(lambda: minimize_finding(Checker(names, options.known_dir), key, case_json, config,
                                                    found.first_index, options.minimize_tests))
        if res.status == "error":
            raise CampaignError(f"minimizing {key} failed: {res.why} (rerun to resume)")
        if res.status == "ok":
            minimized_json, report = res.value
        else:
            case = Case.model_validate_json(case_json)
            note = f"unminimized: a minimization candidate killed the process ({res.why})"
            minimized_json = case.model_copy(update={
                "name": safe_name(key), "tags": sorted({*case.tags, "finding", "unminimized"}),
                "explanation": f"{case.explanation} {note}".strip()}).to_json()
            report = found.explanation
        path = _write_finding(options, key, minimized_json)
        store.set_minimized(key, minimized_json, None if path is None else str(path), report)
        minimizing.discard(key)
        prog.minimized += 1
    broken: list[tuple[str, Any]] = []  # tasks lost with a worker that died

    def submit(kind: str, what: Any, fn: Callable[..., Any], *args: Any) -> None:
        try:
            inflight[executor.submit(fn, *args)] = (kind, what)
        except BrokenProcessPool:  # a worker died since the last look: the task goes to isolation
            broken.append((kind, what))

    try:
        while True:
            broken.clear()
            if prog.deadline is not None and time.monotonic() >= prog.deadline:
                stopping = True
            while not stopping and sum(1 for k, _ in inflight.values() if k == "batch") < 2 * max(1, options.workers):
                nxt = next(batches, None)
                if nxt is None:
                    stopping = True
                    break
                submit("batch", nxt, _task_batch, config, nxt[0], nxt[1], generator, rows_covered)
                if broken:
                    break
            if options.minimize:
                # The representative is final once every lower index is done (or nothing more will run).
                watermark = None if (stopping and not _batches_running(inflight)) else store.watermark()
                for key, first_index in store.pending_minimizations():
                    if key in minimizing or (watermark is not None and first_index >= watermark):
                        continue
                    existing = _existing_file(options, key)
                    if existing is not None:  # in the corpus already (an earlier campaign): not new there
                        store.set_minimized(key, existing.read_text(), str(existing))
                        continue
                    found = store.finding(key)
                    assert found is not None and found.case_json is not None
                    if key.startswith(CRASH_PREFIX):  # already cut at the crashing instruction; rerunning it kills
                        path = _write_finding(options, key, found.case_json)
                        store.set_minimized(key, found.case_json, None if path is None else str(path),
                                            found.explanation)
                        prog.minimized += 1
                        continue
                    submit("minimize", key, _task_minimize, config, key, found.case_json, first_index,
                           options.minimize_tests)
                    minimizing.add(key)
            if not inflight and not broken:
                break
            finished, _ = wait(list(inflight), timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, what = inflight.pop(fut)
                if kind == "batch":
                    try:
                        batch: BatchResult = fut.result()
                    except BrokenProcessPool:
                        broken.append((kind, what))
                        continue
                    except Exception as e:  # a harness bug escaped: stop, nothing is lost
                        raise CampaignError(f"cases {what[0]}..{what[1] - 1} failed: {type(e).__name__}: "
                                            f"{' '.join(str(e).split())[:200]} (finished batches are saved; "
                                            "rerun to resume)") from None
                    record(batch)
                else:
                    try:
                        minimized_json, report = fut.result()
                    except BrokenProcessPool:
                        broken.append((kind, what))
                        continue
                    except Exception as e:  # a minimizer bug escaped: the finding stays pending for the next run
                        raise CampaignError(f"minimizing {what} failed: {type(e).__name__}: "
                                            f"{' '.join(str(e).split())[:200]} (rerun to resume)") from None
                    path = _write_finding(options, what, minimized_json)
                    store.set_minimized(what, minimized_json, None if path is None else str(path), report)
                    minimizing.discard(what)
                    prog.minimized += 1
                prog.minimizing = len(minimizing)
            if broken:
                # A worker died (a backend crashed natively): the pool is gone with every task in it.
                broken += inflight.values()
                inflight.clear()
                executor.shutdown(wait=True, cancel_futures=True)
                for start, end in sorted(what for kind, what in broken if kind == "batch"):
                    for part in isolate_batch(iso, start, end):
                        record(part)
                for key in sorted(what for kind, what in broken if kind == "minimize"):
                    minimize_isolated(key)
                executor = _executor(options.workers, names, options.known_dir, inline=options.inline)
            if on_progress is not None:
                on_progress(prog)
    finally:
        for fut in inflight:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
    if on_progress is not None:
        on_progress(prog)
    return prog


def _batches_running(inflight: dict[Future[Any], tuple[str, Any]]) -> bool:
    return any(kind == "batch" for kind, _ in inflight.values())


def _refresh_findings(prog: Progress, store: Store) -> None:
    prog.new, prog.known, prog.minimized = store.signature_counts()


def _finding_path(options: RunOptions, key: str) -> Path:
    assert options.findings_dir is not None
    return options.findings_dir / f"{safe_name(key)}.json"


def _existing_file(options: RunOptions, key: str) -> Path | None:
    """The finding file of ``key`` if it exists already (an earlier campaign, or this one before a kill)."""
    if options.findings_dir is None:
        return None
    path = _finding_path(options, key)
    return path if path.is_file() else None


def _write_finding(options: RunOptions, key: str, case_json: str) -> Path | None:
    if options.findings_dir is None:
        return None
    options.findings_dir.mkdir(parents=True, exist_ok=True)
    path = _finding_path(options, key)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(case_json.rstrip("\n") + "\n")
    tmp.replace(path)
    return path


# -- the summary ----------------------------------------------------------------------------------

class BackendState(BaseModel):
    name: str
    available: bool
    reason: str = ""


class FindingRow(BaseModel):
    key: str
    status: Literal["new", "known"]
    verdict: str
    count: int
    first_index: int
    instruction: str = ""
    explanation: str = ""
    file: str | None = None
    minimized: bool = False


class ModeCoverage(BaseModel):
    mode: str
    exercised: int
    total: int


class CampaignSummary(BaseModel):
    """Everything the database says about a campaign, for the end-of-run report."""

    model_config = ConfigDict(extra="forbid")

    config: CampaignConfig
    name: str
    cases: int = Field(description="cases finished (all runs on this database)")
    session_cases: int = 0
    session_seconds: float = 0.0
    backends: list[BackendState]
    stops: dict[str, dict[str, int]] = Field(description="backend -> stop kind -> cases")
    unsupported: list[tuple[str, str, int]] = Field(description="(backend, reason, cases), most frequent first")
    crashes: list[tuple[str, int]] = Field(default_factory=list, description="harness failures (bugs), by kind")
    divergent_cases: int = 0
    verdicts: dict[str, int] = Field(default_factory=dict, description="verdict -> divergent cases")
    findings: list[FindingRow]
    coverage: list[ModeCoverage]
    exercised: list[tuple[str, str, int]] = Field(description="(mode, row, cases) exercised")
    not_exercised: list[tuple[str, str]] = Field(description="(mode, row) never generated")

    @property
    def new(self) -> list[FindingRow]:
        return [f for f in self.findings if f.status == "new"]

    @property
    def known(self) -> list[FindingRow]:
        return [f for f in self.findings if f.status == "known"]


def summarize(store: Store, config: CampaignConfig, progress: Progress | None = None) -> CampaignSummary:
    counters = store.counters()
    stops: dict[str, dict[str, int]] = {}
    unsupported: list[tuple[str, str, int]] = []
    crashes: list[tuple[str, int]] = []
    verdicts: dict[str, int] = {}
    for name, n in counters.items():
        parts = name.split("/", 2)
        if parts[0] == "stop" and len(parts) == 3:
            stops.setdefault(parts[1], {})[parts[2]] = n
        elif parts[0] == "unsupported" and len(parts) == 3:
            unsupported.append((parts[1], parts[2], n))
        elif parts[0] == "crash":
            crashes.append((name.removeprefix("crash/"), n))
        elif parts[0] == "verdict" and len(parts) == 2:
            verdicts[parts[1]] = n
    unsupported.sort(key=lambda t: (-t[2], t[0], t[1]))
    findings = [FindingRow(key=f.key, status="known" if f.known else "new", verdict=f.verdict, count=f.count,
                           first_index=f.first_index, instruction=f.instruction, explanation=f.explanation,
                           file=f.file, minimized=f.minimized_json is not None) for f in store.findings()]
    modes = config.modes()
    universe = coverage_universe(modes)
    seen = store.coverage()
    by_mode = []
    for m in modes:
        total = sum(1 for _, mm in universe if mm == m)
        hit = sum(1 for (r, mm) in seen if mm == m and (r, mm) in universe)
        by_mode.append(ModeCoverage(mode=m, exercised=hit, total=total))
    exercised = sorted((m, r, n) for (r, m), n in seen.items())
    missing = sorted((m, r) for (r, m) in universe if (r, m) not in seen)
    backends = [BackendState(name=n, available=registry.availability(n)[0], reason=registry.availability(n)[1])
                for n in config.backends]
    return CampaignSummary(config=config, name=config.name, cases=store.done_count(),
                           session_cases=progress.session if progress else 0,
                           session_seconds=(time.monotonic() - progress.started) if progress else 0.0,
                           backends=backends, stops=stops, unsupported=unsupported, crashes=sorted(crashes),
                           divergent_cases=counters.get("cases/divergent", 0), verdicts=verdicts, findings=findings,
                           coverage=by_mode, exercised=exercised, not_exercised=missing)


# -- throughput benchmark ---------------------------------------------------------------------------------

class ThroughputRow(BaseModel):
    backends: list[str]
    workers: int
    cases: int
    seconds: float = Field(description="wall-clock time")
    cpu_seconds: float = Field(description="CPU time of the coordinator and its workers (robust on a shared machine)")
    divergent_cases: int
    unsupported: int

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_rate(self) -> float:
        """Cases per CPU-second: the throughput of one fully busy worker."""
        return self.cases / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


def measure_throughput(backends: Sequence[str], workers: int, cases: int, *, seed: int = 1, length: int = 20,
                       modes: Sequence[str] = ("long64",), directory: Path) -> ThroughputRow:
    """End-to-end campaign throughput (generation, every backend, comparison, triage, the database).

    A fresh database in ``directory``; minimization and finding files are off (they are
    per new signature, not per case).  Worker start-up is included.
    """
    config = make_config(seed=seed, backends=list(backends), modes=modes, length=length)
    db = directory / f"bench-{'-'.join(config.backends)}-{workers}.db"
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    import resource

    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # workers count once reaped

    with Store.open(db, config.model_dump()) as store:
        cpu0 = cpu()
        prog = run_campaign(store, config, RunOptions(cases=cases, workers=workers, findings_dir=None,
                                                      minimize=False))
        seconds = time.monotonic() - prog.started
        cpu_seconds = cpu() - cpu0
    return ThroughputRow(backends=config.backends, workers=workers, cases=prog.session, seconds=seconds,
                         cpu_seconds=cpu_seconds, divergent_cases=prog.divergent_cases,
                         unsupported=prog.unsupported)
