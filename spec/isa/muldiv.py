"""Multiply and divide: MUL, IMUL, DIV, IDIV (SDM Vol. 1 7.3.2; Vol. 2A/2B MUL, IMUL, DIV, IDIV).

Implicit operands by operand size ``w`` (SDM Vol. 2 MUL/DIV tables):

=====  ===================  ===============  ==========
w      multiplicand / dvd   product          quo : rem
=====  ===================  ===============  ==========
8      AL / AX              AX               AL : AH
16     AX / DX:AX           DX:AX            AX : DX
32     EAX / EDX:EAX        EDX:EAX          EAX : EDX
64     RAX / RDX:RAX        RDX:RAX          RAX : RDX
=====  ===================  ===============  ==========

32-bit results written to EAX/EDX zero-extend to 64 bits (SDM Vol. 1 3.4.1.1).

Flags.  MUL/IMUL define CF = OF = "the upper half is significant" and leave
SF, ZF, AF and PF undefined; the spec leaves those four *unchanged*, as AMD
hardware does (/work/shared/ORACLES.md).  DIV/IDIV leave all six status flags
undefined; the spec leaves them unchanged.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import Insn
from spec.domain.base import Value
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction

_CF, _PF, _AF, _ZF, _SF, _OF = F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF
_RAX, _RDX = 0, 2


def _write_wide(x: Exec, w: int, lo: Value, hi: Value) -> None:
    """Write a double-width result: AH:AL for 8 bits, else rDX:rAX."""
    if w == 8:
        x.s.write_gpr(_RAX, 16, x.D.concat(hi, lo, 8))
    else:
        x.s.write_gpr(_RAX, w, lo)
        x.s.write_gpr(_RDX, w, hi)


def _mul_flags(x: Exec, c: Value) -> None:
    x.set_flag(_CF, c)
    x.set_flag(_OF, c)
    x.undefine(_SF, _ZF, _AF, _PF)  # left unchanged (AMD)


@instruction("MUL", defines="CF OF", undefined="PF AF ZF SF", ref="SDM Vol. 2B MUL; APM Vol. 3 MUL")
def mul(x: Exec, i: Insn) -> None:
    """Unsigned rDX:rAX = rAX * src (AX = AL * src); CF = OF = (upper half != 0)."""
    (src,) = i.operands
    w = src.size
    w2 = 2 * w
    D = x.D
    a = x.s.read_gpr(_RAX, w)
    b = x.read(src)
    p = D.mul(w2, D.zext(a, w, w2), D.zext(b, w, w2))
    hi = D.extract(p, w2 - 1, w)
    _write_wide(x, w, D.extract(p, w - 1, 0), hi)
    _mul_flags(x, D.bnot(D.is_zero(w, hi)))


@instruction("IMUL", defines="CF OF", undefined="PF AF ZF SF", ref="SDM Vol. 2A IMUL; APM Vol. 3 IMUL")
def imul(x: Exec, i: Insn) -> None:
    """Signed multiply, three forms (SDM Vol. 2A IMUL "Description").

    * one operand (F6/F7 /5): rDX:rAX = rAX * src (AX = AL * src);
    * two operands (0F AF): DEST = truncate(DEST * src);
    * three operands (69, 6B): DEST = truncate(src * imm) (imm sign-extended).

    CF = OF = 1 iff the full 2w-bit signed product differs from the sign
    extension of its low w bits, i.e. the product does not fit the (low) result.
    """
    ops = i.operands
    D = x.D
    if len(ops) == 1:
        src = ops[0]
        a = x.s.read_gpr(_RAX, src.size)
        b = x.read(src)
    elif len(ops) == 2:
        src = ops[0]
        a, b = x.read(ops[0]), x.read(ops[1])
    else:
        src = ops[1]
        a, b = x.read(ops[1]), x.read(ops[2])
    w = src.size
    w2 = 2 * w
    p = D.mul(w2, D.sext(a, w, w2), D.sext(b, w, w2))
    lo = D.extract(p, w - 1, 0)
    if len(ops) == 1:
        _write_wide(x, w, lo, D.extract(p, w2 - 1, w))
    else:
        x.write(ops[0], lo)
    _mul_flags(x, D.ne(w2, D.sext(lo, w, w2), p))


def _dividend(x: Exec, w: int) -> tuple[Value, Value]:
    """(high, low) halves of the implicit dividend: AH, AL or rDX, rAX."""
    if w == 8:
        ax = x.s.read_gpr(_RAX, 16)
        return x.D.extract(ax, 15, 8), x.D.extract(ax, 7, 0)
    return x.s.read_gpr(_RDX, w), x.s.read_gpr(_RAX, w)


_DIV_UNDEF = (_CF, _PF, _AF, _ZF, _SF, _OF)


@instruction("DIV", undefined="CF PF AF ZF SF OF", ref="SDM Vol. 2A DIV; APM Vol. 3 DIV")
def div(x: Exec, i: Insn) -> None:
    """Unsigned divide of the 2w-bit dividend by src: quotient to AL/rAX, remainder to AH/rDX.

    #DE if src = 0 or the quotient does not fit w bits.  The quotient is
    >= 2^w exactly when the dividend's high half is >= the divisor, which is
    the test made here (the symbolic twins prove it equal to the manual's
    "temp > FFH" form).  All status flags undefined (left unchanged).
    """
    (src,) = i.operands
    w = src.size
    w2 = 2 * w
    D = x.D
    d = x.read(src)
    hi, lo = _dividend(x, w)
    if x.decide(D.is_zero(w, d)):
        raise x.fault(Vector.DE)
    if x.decide(D.ule(w, d, hi)):
        raise x.fault(Vector.DE)
    n = D.concat(hi, lo, w)
    dd = D.zext(d, w, w2)
    q = D.extract(D.udiv(w2, n, dd), w - 1, 0)
    r = D.extract(D.urem(w2, n, dd), w - 1, 0)
    _write_wide(x, w, q, r)
    x.undefine(*_DIV_UNDEF)


@instruction("IDIV", undefined="CF PF AF ZF SF OF", ref="SDM Vol. 2A IDIV; APM Vol. 3 IDIV")
def idiv(x: Exec, i: Insn) -> None:
    """Signed divide, quotient truncated toward zero, remainder with the dividend's sign.

    #DE if src = 0 or the quotient is outside [-2^(w-1), 2^(w-1) - 1] (e.g.
    -2^(2w-1) / -1, or -2^(w-1)*2 / -1).  All status flags undefined (left unchanged).
    """
    (src,) = i.operands
    w = src.size
    w2 = 2 * w
    D = x.D
    d = x.read(src)
    hi, lo = _dividend(x, w)
    if x.decide(D.is_zero(w, d)):
        raise x.fault(Vector.DE)
    n = D.concat(hi, lo, w)
    dd = D.sext(d, w, w2)
    q2 = D.sdiv(w2, n, dd)
    q = D.extract(q2, w - 1, 0)
    if x.decide(D.ne(w2, D.sext(q, w, w2), q2)):
        raise x.fault(Vector.DE)
    r = D.extract(D.srem(w2, n, dd), w - 1, 0)
    _write_wide(x, w, q, r)
    x.undefine(*_DIV_UNDEF)
