"""Hypothesis strategies for differential-testing cases (importable by users).

The strategies drive the campaign generator (:mod:`difftest.generate`) with
hypothesis draws instead of a seeded random stream: every choice the
generator makes -- environment, instruction row, prefixes, REX, ModRM/SIB,
displacement, immediates, initial register values, data, paging corruption --
is one ``st.integers`` draw through :class:`spec.decode.strategies.DrawPicker`,
and the generator always lists the simple answer first (no prefix, no REX,
value 0, the first environment, ...).  So a failing example shrinks towards
fewer and simpler instructions in a simpler environment.

* :func:`environments` -- the builders' environments (real mode first);
* :func:`instructions` -- one instruction valid in an environment, with the
  set-up instructions it needs in front (``MOV reg, imm`` for its address
  registers or operand values, pushes of a return address, ...);
* :func:`cases` -- whole :class:`~difftest.case.Case` objects.

Example::

    from hypothesis import given
    from difftest.strategies import cases

    @given(cases(length=(1, 8)))
    def test_spec_never_crashes(case):
        SpecBackend().run(case.snapshot, case.budget)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from difftest.case import Case, Environment, Provenance
from difftest.generate import Generator, generate_for
from difftest.layout import ENVIRONMENTS
from spec.decode.strategies import DrawPicker

STRATEGY = "difftest.strategies"


def environments(envs: Sequence[Environment] | None = None) -> st.SearchStrategy[Environment]:
    """One of ``envs`` (default: every environment the builders support); shrinks towards the first."""
    pool = list(envs) if envs else list(ENVIRONMENTS)
    if not pool:
        raise ValueError("no environment to choose from")
    return st.sampled_from(pool)


def instructions(env: Environment, *, nondeterministic: bool = False) -> st.SearchStrategy[list[bytes]]:
    """One instruction of the campaign's row pool for ``env`` (a row valid in its mode), preceded by the
    set-up instructions the generator gives it; jumps and returns land right after the unit."""

    @st.composite
    def one(draw: Callable[[st.SearchStrategy[Any]], Any]) -> list[bytes]:
        gen = Generator(env, DrawPicker(draw), nondeterministic=nondeterministic)
        gen.run(1, corruption="none")
        return gen.layout_code()

    return one()


def cases(envs: Sequence[Environment] | None = None, length: int | tuple[int, int] = (1, 20), *,
          corruption: str | None = None, nondeterministic: bool = False) -> st.SearchStrategy[Case]:
    """Whole cases: an environment of ``envs``, then ``length`` generated instructions (a number, or a
    ``(min, max)`` range that shrinks towards ``min``).  ``corruption`` as in
    :func:`difftest.generate.generate_for` ("initial", "guest", "none"; default: sometimes)."""
    lo, hi = (length, length) if isinstance(length, int) else length
    if not 1 <= lo <= hi:
        raise ValueError(f"length range {lo}..{hi} is empty or below 1")
    env_strategy = environments(envs)

    @st.composite
    def one(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Case:
        env = draw(env_strategy)
        n = draw(st.integers(lo, hi))
        return generate_for(env, DrawPicker(draw), length=n, name="hypothesis",
                            provenance=Provenance(generator=STRATEGY), corruption=corruption,
                            nondeterministic=nondeterministic)

    return one()


__all__ = ["cases", "environments", "instructions"]
