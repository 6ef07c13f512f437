"""The corpus: every case file under a directory, replayed on every available backend.

A *case file* is any ``*.json`` file below the corpus directory, except those
directly inside a directory that holds other documents (:data:`NOT_CASES`):
``schema/`` (the exported JSON Schemas), ``known/`` (the known-divergence
registry, :mod:`difftest.known`; its example cases in ``known/cases/`` are
cases), ``vm/`` (VM configurations) and ``guests/`` (guest images).
Files are taken in sorted path order.  A file that is not a valid case is an
error naming the file (:class:`~difftest.case.CaseError`), never skipped.

Replaying runs a case on every chosen backend, compares each with the spec
(the same checks as a campaign, :class:`difftest.campaign.Checker`) and
classifies it:

* ``pass``    -- every backend that could run it agrees with the spec;
* ``known``   -- it diverges, and every divergence signature is a known one;
* ``new``     -- it diverges with a signature that is not known;
* ``skipped`` -- no backend besides the spec could run it (each said
  ``unsupported``, with a reason).

Which backends vote: only independent implementations (the spec, Unicorn, KVM, user
backends) classify a divergence; the refvmm VMM backends run the spec itself in a
guest, so each is checked for equivalence with the spec alone (see
:class:`difftest.campaign.Checker`).  A known entry's example therefore classifies the
same with or without them, and a corpus replays the same on a machine without
``/dev/kvm`` (KVM's dissent is then simply absent).  A case that kills the worker
natively is a ``crash|...`` signature, matched against the registry like any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from difftest.case import Case, CaseError

if TYPE_CHECKING:
    from difftest.campaign import Crash

NOT_CASES = ("schema", "known", "vm", "guests")
"""Corpus subdirectories whose JSON files are not cases."""

Status = Literal["pass", "known", "new", "skipped"]


def case_files(root: str | Path) -> list[Path]:
    """Every case file below ``root`` (see the module docstring), sorted; ``root`` may be one file."""
    p = Path(root)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CaseError(f"{p}: no such corpus directory")
    return sorted(f for f in p.rglob("*.json") if f.is_file() and not _excluded(f.relative_to(p)))


def _excluded(rel: Path) -> bool:
    return len(rel.parts) > 1 and rel.parts[-2] in NOT_CASES


def load_cases(root: str | Path) -> Iterator[tuple[Path, Case]]:
    """``(path, case)`` for every case file below ``root``; a malformed file raises :class:`CaseError`."""
    for f in case_files(root):
        yield f, Case.load(f)


class ReplayResult(BaseModel):
    """How one corpus case replayed."""

    model_config = ConfigDict(extra="forbid")

    path: str
    name: str
    env: str
    status: Status
    signatures: list[str] = []
    verdicts: list[str] = []
    detail: str = ""
    stops: dict[str, str] = {}  # backend -> stop kind


def replay(cases: Sequence[tuple[Path, Case]] | Iterator[tuple[Path, Case]], backends: Sequence[str], *,
           known_dir: Path | None = None) -> Iterator[ReplayResult]:
    """Replay each case on ``backends`` (available ones; the spec must be among them).

    ``known_dir``: the known-divergence registry (default: the package's ``corpus/known``).
    Cases run in a worker process: a backend that kills it natively (a known Unicorn
    crash) makes the case a ``crash|...`` signature (:func:`difftest.campaign.diagnose_crash`)
    and a fresh worker takes the next case.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from difftest.campaign import diagnose_crash

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    names = list(backends)

    def pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_replay_worker, initargs=(names, known_dir))

    executor = pool()
    try:
        for path, case in cases:
            try:
                result = executor.submit(_replay_one, path, case).result()
            except BrokenProcessPool:
                executor.shutdown(wait=True)
                result = _crashed(path, case, diagnose_crash(case, names), known_dir)
                executor = pool()
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_REPLAY: dict[str, object] = {}


def _init_replay_worker(names: list[str], known_dir: Path | None) -> None:
    import faulthandler
    import signal

    from difftest.campaign import Checker, _die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.disable()  # a backend's native crash is diagnosed by the parent
    _die_with_parent(os.getppid())
    _REPLAY["checker"] = Checker(names, known_dir)


def _crashed(path: Path, case: Case, crash: Crash, known_dir: Path | None) -> ReplayResult:
    from difftest.known import is_known, load_known

    known = is_known(crash.key, load_known(known_dir), verdict=crash.verdict)
    return ReplayResult(path=str(path), name=case.name, env=case.env.label(), status="known" if known else "new",
                        signatures=[crash.key], verdicts=[crash.verdict], detail=crash.explanation,
                        stops={crash.backend: "crash"})


def _replay_one(path: Path, case: Case) -> ReplayResult:
    from difftest.campaign import REFERENCE, Checker

    checker = _REPLAY["checker"]
    assert isinstance(checker, Checker)
    res = checker.check(case)
    stops = {name: o.stop.kind for name, o in res.outcomes.items()}
    others = {n: o for n, o in res.outcomes.items() if n != REFERENCE}
    ran = [n for n, o in others.items() if o.stop.kind != "unsupported"]
    if res.errors:
        raise CaseError(f"{path}: the harness failed on this case: {res.errors[0]}")
    if res.divergences:
        new = [d for d in res.divergences if not d.known]
        status: Status = "new" if new else "known"
        detail = "; ".join(f"{d.explanation} at {d.instruction or '?'}" for d in (new or res.divergences))
    elif not ran:
        status = "skipped"
        detail = "; ".join(f"{n}: {o.stop.detail}" for n, o in others.items()) or "no other backend"
    else:
        status = "pass"
        detail = f"agrees on {', '.join(ran)}"
    return ReplayResult(path=str(path), name=case.name, env=case.env.label(), status=status,
                        signatures=[d.key for d in res.divergences],
                        verdicts=[d.verdict for d in res.divergences], detail=detail, stops=stops)
