"""The semantics table: mnemonic -> semantic function, with its flag contract as data.

Every instruction is registered with

* ``defines`` -- the status flags it writes with a defined value (at least
  on some path; e.g. shifts by a zero count write nothing),
* ``undefined`` -- the status flags it may leave architecturally undefined,
* ``ref`` -- the manual section it implements.

The dynamic truth (which flags *this* execution left undefined) is tracked
in the state (``MachineState.undefined``); this static contract is what tools
read to mask comparisons conservatively and to print the coverage table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spec import flags as F

if TYPE_CHECKING:
    from spec.decode.insn import Insn
    from spec.isa.context import Exec


@dataclass(frozen=True)
class Semantics:
    mnemonic: str
    fn: Callable[[Exec, Insn], None]
    defines: frozenset[int]
    undefined: frozenset[int]
    ref: str


SEMANTICS: dict[str, Semantics] = {}


def instruction(*mnemonics: str, defines: str = "", undefined: str = "", ref: str = "") -> Callable:
    """Register ``fn`` as the semantics of ``mnemonics`` (row mnemonics of the opcode map)."""
    d, u = F.parse(defines), F.parse(undefined)

    def deco(fn: Callable[[Exec, Insn], None]) -> Callable[[Exec, Insn], None]:
        for m in mnemonics:
            if m in SEMANTICS:
                raise ValueError(f"semantics for {m} registered twice")
            SEMANTICS[m] = Semantics(m, fn, d, u, ref)
        return fn

    return deco
