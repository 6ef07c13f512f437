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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from difftest.case import Case, CaseError

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
    """
    from difftest.campaign import REFERENCE, Checker

    checker = Checker(backends, known_dir)
    for path, case in cases:
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
        yield ReplayResult(path=str(path), name=case.name, env=case.env.label(), status=status,
                           signatures=[d.key for d in res.divergences],
                           verdicts=[d.verdict for d in res.divergences], detail=detail, stops=stops)
