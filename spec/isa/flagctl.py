"""Flag control (SDM Vol. 1 7.3.13.1): CLC, STC, CMC, CLD, STD.

CF is a status flag (a domain value, kept by the lazy flag state); DF is a
system bit of RFLAGS and always concrete (``state.rflags_sys``).  CLI/STI and
the other system flags belong to the system-architecture layer.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import Insn
from spec.isa.context import Exec
from spec.isa.registry import instruction


@instruction("CLC", defines="CF", ref="SDM Vol. 2A CLC")
def clc(x: Exec, i: Insn) -> None:
    x.set_flag(F.CF, x.D.false())


@instruction("STC", defines="CF", ref="SDM Vol. 2B STC")
def stc(x: Exec, i: Insn) -> None:
    x.set_flag(F.CF, x.D.true())


@instruction("CMC", defines="CF", ref="SDM Vol. 2A CMC")
def cmc(x: Exec, i: Insn) -> None:
    x.set_flag(F.CF, x.D.bnot(x.flag(F.CF)))


@instruction("CLD", ref="SDM Vol. 2A CLD")
def cld(x: Exec, i: Insn) -> None:
    x.set_flag(F.DF, False)


@instruction("STD", ref="SDM Vol. 2B STD")
def std(x: Exec, i: Insn) -> None:
    x.set_flag(F.DF, True)
