"""Hypothesis strategies for instruction encodings, built from typed parts (see :mod:`spec.decode.encode`).

``instructions(bits)`` draws a row of the opcode map valid in the mode and
random valid parts for it (prefixes, REX, ModRM/SIB/displacement,
immediates); the result is an :class:`~spec.decode.encode.Encoding` whose
``code`` decodes as that row.  Every choice is a hypothesis draw, so failures
shrink towards fewer prefixes, no REX and simple field values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from spec.decode.encode import Encoding, generate, rows_for
from spec.decode.opcodes import ROWS, Row


class DrawPicker:
    """A :class:`~spec.decode.encode.Picker` over hypothesis draws."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


def instructions(bits: int, rows: Sequence[Row] = ROWS, *, vendor: str = "amd",
                 valid: bool = True) -> st.SearchStrategy[Encoding]:
    """Encodings of the rows of ``rows`` that are valid in a ``bits``-bit mode (with ``valid=False``:
    also those that are #UD there but have bytes, e.g. ``i64`` rows in 64-bit mode)."""
    usable = rows_for(bits, rows, valid_only=valid)
    if not usable:
        raise ValueError(f"no row of the selection is usable in {bits}-bit mode")

    @st.composite
    def one(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Encoding:
        row = draw(st.sampled_from(usable))
        return generate(row, bits, DrawPicker(draw), vendor=vendor, valid=valid)

    return one()


__all__ = ["DrawPicker", "instructions"]
