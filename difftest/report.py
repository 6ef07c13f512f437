"""Divergence reports: run a case on several backends, find the first diverging instruction, render it.

:func:`first_divergence` bisects on the prefix length: the prefix of ``k``
instructions is :meth:`Case.with_instructions` ``(insns[:k])`` (the code plus the
terminating HLT).  With ``lo`` a prefix that agrees (the bare HLT, if it does) and
``hi`` one that diverges (the whole case), halving keeps that invariant, so the
result ``i`` always has ``insns[:i+1]`` diverging and ``insns[:i]`` agreeing -- even
when a later instruction would hide a divergence again (e.g. overwrite a wrong flag).

:func:`render` prints the case's disassembly with the diverging instruction marked,
every backend's stop, and a table with one row per differing field and every
backend's value side by side (rich; plain text when not writing to a terminal).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from difftest.backend import Backend, Outcome
from difftest.case import Case
from difftest.compare import Comparison, Difference, FieldRow, compare_all, tabulate


def run_backends(case: Case, backends: Sequence[Backend]) -> list[Outcome]:
    """Every backend's outcome of ``case`` (each gets the case's budget)."""
    return [b.run(case.snapshot, case.budget) for b in backends]


def diverges_on(backends: Sequence[Backend], *, defined: bool = False) -> Callable[[Case], bool]:
    """The predicate "some pair of ``backends`` disagrees on this case" (:func:`compare_all`).

    ``defined=True``: disagreements only in flags the spec leaves undefined do not count --
    so that an undefined flag set early in a case does not hide a later real divergence.
    """

    def diverges(case: Case) -> bool:
        comp = compare_all(run_backends(case, backends), case)
        return comp.diverges_defined if defined else comp.diverges

    return diverges


def instructions(case: Case) -> list[bytes]:
    """``case.instructions()``, also for a case with no instructions (only the terminating HLT)."""
    return case.instructions() if case.insn_offsets else []


def prefix(case: Case, k: int) -> Case:
    """``case`` with only its first ``k`` instructions (``k = 0``: the terminating HLT alone)."""
    insns = instructions(case)
    return case.with_instructions(insns[:k], name=case.name)


def first_divergence(case: Case, backends: Sequence[Backend] | None = None, *,
                     diverges: Callable[[Case], bool] | None = None, whole_diverges: bool = False,
                     defined: bool = False) -> int:
    """Index of the first diverging instruction of ``case`` (bisection on the prefix length).

    Returns ``i`` such that the prefix of ``i + 1`` instructions diverges and the prefix of
    ``i`` does not; ``-1`` when even the bare terminating HLT diverges (the environment
    itself).  Give ``backends`` (divergence = :func:`compare_all` finds a difference; with
    ``defined=True`` one outside the undefined flags) or a ``diverges`` predicate.  Raises
    ``ValueError`` when the whole case does not diverge (``whole_diverges=True``: the caller
    has seen it diverge; it is not run again).
    """
    if diverges is None:
        if backends is None:
            raise ValueError("first_divergence needs backends or a diverges predicate")
        diverges = diverges_on(backends, defined=defined)
    n = len(case.insn_offsets)
    if not whole_diverges and not diverges(case):
        raise ValueError(f"case {case.name} does not diverge: nothing to bisect")
    if diverges(prefix(case, 0)):
        return -1
    lo, hi = 0, n  # prefix lo agrees, prefix hi diverges
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if diverges(prefix(case, mid)):
            hi = mid
        else:
            lo = mid
    return hi - 1


# -- rendering ---------------------------------------------------------------------------------------------

def _rows(diffs: Comparison | Sequence[Difference] | Sequence[FieldRow]) -> list[FieldRow]:
    if isinstance(diffs, Comparison):
        return diffs.rows
    items = list(diffs)
    if items and isinstance(items[0], FieldRow):
        return items  # type: ignore[return-value]
    return tabulate(items)  # type: ignore[arg-type]


def render(case: Case, outcomes: Sequence[Outcome], diffs: Comparison | Sequence[Difference] | Sequence[FieldRow],
           *, index: int | None = None, width: int = 120, color: bool = False) -> str:
    """A human-readable divergence report (see the module docstring); ``index`` marks the diverging instruction."""
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None,
                  highlight=False)
    con.print(f"case {case.name}  [{case.env.label()}]  budget {case.budget}", markup=False)
    if case.explanation:
        con.print(case.explanation, markup=False)
    n = len(case.insn_offsets)
    at = None if index is None else (index if index >= 0 else n)  # -1: the terminating HLT
    for k, line in enumerate(case.disassembly):
        mark = "=>" if at == k else "  "
        con.print(f"{mark} {line}", markup=False)
    if index is not None:
        what = "the terminating HLT alone (the environment)" if index < 0 else f"instruction {index}"
        con.print(f"first divergence: {what}", markup=False)
    for o in outcomes:
        s = o.stop
        extra = "".join(f" {k}={v}" for k, v in (("vector", s.vector), ("error_code", _h(s.error_code)),
                                                   ("cr2", _h(s.cr2))) if v is not None)
        detail = f"  ({s.detail})" if s.detail else ""
        con.print(f"{o.backend:>10} [{o.executed_by}]: {s.kind} rip={s.rip:#x}{extra}{detail}", markup=False)
    rows = _rows(diffs)
    if not rows:
        con.print("no differences", markup=False)
        return buf.getvalue()
    backends = [o.backend for o in outcomes if any(o.backend in r.values for r in rows)]
    table = Table(title="differing fields", show_lines=False)
    table.add_column("field")
    for b in backends:
        table.add_column(b)
    table.add_column("note")
    for r in rows:
        tag = " (undefined)" if r.undefined else ""
        cells = []
        for b in backends:
            v = r.values.get(b, "=")
            cells.append(f"{v} *" if b in r.dissenters and len(r.dissenters) < len(r.values) else v)
        table.add_row(r.field + tag, *cells, r.note)
    con.print(table)
    con.print('"=": agrees with the backends it was compared to (or masked); "*": off the majority', markup=False)
    return buf.getvalue()


def _h(v: int | None) -> str | None:
    return None if v is None else hex(v)
