"""Binary and unary integer arithmetic and logic (SDM Vol. 1 7.3.2, 7.3.4; Vol. 2 ADD..XOR).

Every instruction has the same shape: operands -> operation -> flags ->
write-back.  LOCK needs no semantics of its own in a single-CPU model.
"""

from __future__ import annotations

from collections.abc import Callable

from spec import flags as F
from spec.decode.insn import Insn
from spec.isa.context import Exec
from spec.isa.registry import instruction


@instruction("ADD", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A ADD")
def add(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    a, b = x.read(dst), x.read(src)
    r = x.D.add(w, a, b)
    x.set_flags(F.ADD, w, a, b, r)
    x.write(dst, r)


@instruction("ADC", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A ADC")
def adc(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    D = x.D
    a, b = x.read(dst), x.read(src)
    c = x.flag(F.CF)
    r = D.add(w, D.add(w, a, b), D.from_bool(c, w))
    x.set_flags(F.ADD, w, a, b, r, c)
    x.write(dst, r)


@instruction("SUB", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B SUB")
def sub(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    a, b = x.read(dst), x.read(src)
    r = x.D.sub(w, a, b)
    x.set_flags(F.SUB, w, a, b, r)
    x.write(dst, r)


@instruction("SBB", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B SBB")
def sbb(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    D = x.D
    a, b = x.read(dst), x.read(src)
    c = x.flag(F.CF)
    r = D.sub(w, D.sub(w, a, b), D.from_bool(c, w))
    x.set_flags(F.SUB, w, a, b, r, c)
    x.write(dst, r)


@instruction("CMP", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A CMP")
def cmp(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    a, b = x.read(dst), x.read(src)
    x.set_flags(F.SUB, w, a, b, x.D.sub(w, a, b))


def _logic(op: str) -> Callable[[Exec, Insn], None]:
    """AND/OR/XOR ``dst, src``: the domain operation named ``op``, logic flags."""

    def sem(x: Exec, i: Insn) -> None:
        dst, src = i.operands
        w = dst.size
        a, b = x.read(dst), x.read(src)
        r = getattr(x.D, op)(w, a, b)
        # CF and OF are cleared; AF is undefined (the spec leaves it 0).
        x.set_flags(F.LOGIC, w, a, b, r)
        x.undefine(F.AF)
        x.write(dst, r)
    return sem


instruction("AND", defines="CF PF ZF SF OF", undefined="AF", ref="SDM Vol. 2A AND")(_logic("and_"))
instruction("OR", defines="CF PF ZF SF OF", undefined="AF", ref="SDM Vol. 2B OR")(_logic("or_"))
instruction("XOR", defines="CF PF ZF SF OF", undefined="AF", ref="SDM Vol. 2B XOR")(_logic("xor"))


@instruction("TEST", defines="CF PF ZF SF OF", undefined="AF", ref="SDM Vol. 2B TEST")
def test(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    a, b = x.read(dst), x.read(src)
    x.set_flags(F.LOGIC, w, a, b, x.D.and_(w, a, b))
    x.undefine(F.AF)


@instruction("INC", defines="PF AF ZF SF OF", ref="SDM Vol. 2A INC")
def inc(x: Exec, i: Insn) -> None:
    (dst,) = i.operands
    w = dst.size
    a = x.read(dst)
    b = x.D.const(w, 1)
    r = x.D.add(w, a, b)
    x.set_flags(F.ADD, w, a, b, r, keep=(F.CF,))  # CF is not affected
    x.write(dst, r)


@instruction("DEC", defines="PF AF ZF SF OF", ref="SDM Vol. 2A DEC")
def dec(x: Exec, i: Insn) -> None:
    (dst,) = i.operands
    w = dst.size
    a = x.read(dst)
    b = x.D.const(w, 1)
    r = x.D.sub(w, a, b)
    x.set_flags(F.SUB, w, a, b, r, keep=(F.CF,))  # CF is not affected
    x.write(dst, r)


@instruction("NEG", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B NEG")
def neg(x: Exec, i: Insn) -> None:
    # NEG is 0 - src: CF = (src != 0), the other flags as for SUB.
    (dst,) = i.operands
    w = dst.size
    b = x.read(dst)
    zero = x.D.const(w, 0)
    r = x.D.sub(w, zero, b)
    x.set_flags(F.SUB, w, zero, b, r)
    x.write(dst, r)


@instruction("NOT", ref="SDM Vol. 2B NOT")
def not_(x: Exec, i: Insn) -> None:
    (dst,) = i.operands
    x.write(dst, x.D.not_(dst.size, x.read(dst)))
