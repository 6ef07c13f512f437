"""Shifts and rotates: SAL/SHL, SHR, SAR, ROL, ROR, RCL, RCR, SHLD, SHRD (SDM Vol. 1 7.3.6, 7.3.7).

Rules common to the family (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR,
SHLD, SHRD; AMD APM Vol. 3 same entries):

* The count (an imm8, CL or the constant 1) is masked to 5 bits, 6 bits for
  a 64-bit operand.  RCL/RCR then rotate by the masked count modulo 9 (8-bit)
  or 17 (16-bit) -- a rotation through CF is a rotation of a ``w + 1``-bit
  ring; ROL/ROR rotate by the masked count modulo the operand size.
* A masked count of 0 changes no flag at all (and marks none undefined).
* OF is defined only for a masked count of 1; for larger counts it is
  undefined (the spec leaves the count-1 formula evaluated on the actual
  operands and result).  Shifts leave AF undefined for any nonzero count (the
  spec sets AF = 1, as AMD hardware does, /work/shared/ORACLES.md).  SHL/SHR
  leave CF undefined when the count is >= the operand size (possible for 8-
  and 16-bit operands only); the spec keeps the last bit shifted out, i.e. the
  pseudocode's value (0 for counts above the size).
* Rotates change only CF and OF.

Write-back with a zero count.  The destination is written even when the
masked count is 0: no manual makes an exception to the rule that a 32-bit
destination register is zero-extended to 64 bits in 64-bit mode (SDM Vol. 1
3.4.1.1; APM Vol. 1 3.1.2.3 "Zero-extension of 32-bit results"), and emulators
modelling hardware (Bochs) clear the upper half for a count of 0 too.  For a
memory destination the spec writes the unchanged value back, i.e. a count-0
shift is still a read-modify-write access (write permission is checked).
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.decode.insn import Insn
from spec.domain.base import Domain
from spec.isa.context import Exec
from spec.isa.registry import instruction

_CF, _PF, _AF, _ZF, _SF, _OF = F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF


# -- lazy flag definitions --------------------------------------------------------------------
# The record is (kind, w, a, n, r, c): ``a`` the original destination, ``n`` the masked count as a
# ``w``-bit value (nonzero), ``r`` the result; SF/ZF/PF come from ``r`` (FlagKind.flag).

class _ShiftKind(F.FlagKind):
    def af(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.true()  # architecturally undefined; AMD sets it (ORACLES.md)


class ShlKind(_ShiftKind):
    """SHL/SAL: CF = last bit shifted out of the top; OF (count 1) = MSB(result) XOR CF."""

    name = "shl"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.msb(w, D.shl(w, a, D.sub(w, b, D.const(w, 1))))

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bxor(D.msb(w, r), self.cf(D, w, a, b, r, c))


class ShrKind(_ShiftKind):
    """SHR: CF = last bit shifted out of the bottom; OF (count 1) = MSB of the original operand."""

    name = "shr"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bit(w, D.lshr(w, a, D.sub(w, b, D.const(w, 1))), 0)

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.msb(w, a)


class SarKind(_ShiftKind):
    """SAR: CF = last bit shifted out (the sign once the count reaches the size); OF (count 1) = 0."""

    name = "sar"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bit(w, D.ashr(w, a, D.sub(w, b, D.const(w, 1))), 0)


class ShldKind(_ShiftKind):
    """SHLD: ``a`` is DEST:SRC (2w bits), ``b`` the count (2w bits); OF = sign change of DEST."""

    name = "shld"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        w2 = 2 * w
        return D.msb(w2, D.shl(w2, a, D.sub(w2, b, D.const(w2, 1))))

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bxor(D.msb(w, r), D.bit(2 * w, a, 2 * w - 1))


class ShrdKind(_ShiftKind):
    """SHRD: ``a`` is SRC:DEST (2w bits), ``b`` the count (2w bits); OF = sign change of DEST."""

    name = "shrd"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        w2 = 2 * w
        return D.bit(w2, D.lshr(w2, a, D.sub(w2, b, D.const(w2, 1))), 0)

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bxor(D.msb(w, r), D.bit(2 * w, a, w - 1))


SHL, SHR, SAR, SHLD, SHRD = ShlKind(), ShrKind(), SarKind(), ShldKind(), ShrdKind()


def _masked_count(x: Exec, op: Any, w: int) -> Any:
    """The count operand ANDed with 1FH, or 3FH for a 64-bit operand (an 8-bit value)."""
    return x.D.and_(8, x.read(op), x.D.const(8, 0x3F if w == 64 else 0x1F))


# -- SAL/SHL, SHR, SAR ----------------------------------------------------------------------

def _shift(kind: F.FlagKind, op: str, cf_undef_at_size: bool) -> Any:
    def sem(x: Exec, i: Insn) -> None:
        dst, src = i.operands
        w = dst.size
        D = x.D
        a = x.read(dst)
        n8 = _masked_count(x, src, w)
        if x.decide(D.is_zero(8, n8)):
            x.write(dst, a)  # no flag changes; the write still zero-extends a 32-bit register
            return
        n = D.zext(n8, 8, w)
        r = getattr(D, op)(w, a, n)
        x.set_flags(kind, w, a, n, r)
        if x.decide(D.eq(8, n8, D.const(8, 1))):
            x.undefine(_AF)
        elif cf_undef_at_size and w < 32 and x.decide(D.ule(8, D.const(8, w), n8)):
            x.undefine(_AF, _OF, _CF)  # SHL/SHR: CF undefined for count >= operand size
        else:
            x.undefine(_AF, _OF)
        x.write(dst, r)
    return sem


instruction("SHL", "SAL", defines="CF PF ZF SF OF", undefined="CF AF OF",
            ref="SDM Vol. 2B SAL/SAR/SHL/SHR; APM Vol. 3 SAL, SHL")(_shift(SHL, "shl", True))
instruction("SHR", defines="CF PF ZF SF OF", undefined="CF AF OF",
            ref="SDM Vol. 2B SAL/SAR/SHL/SHR; APM Vol. 3 SHR")(_shift(SHR, "lshr", True))
instruction("SAR", defines="CF PF ZF SF OF", undefined="AF OF",
            ref="SDM Vol. 2B SAL/SAR/SHL/SHR; APM Vol. 3 SAR")(_shift(SAR, "ashr", False))


# -- ROL, ROR ---------------------------------------------------------------------------------

@instruction("ROL", defines="CF OF", undefined="OF", ref="SDM Vol. 2B RCL/RCR/ROL/ROR; APM Vol. 3 ROL")
def rol(x: Exec, i: Insn) -> None:
    """Rotate left by (masked count) mod size; CF = LSB(result), OF (count 1) = MSB(result) XOR CF."""
    dst, src = i.operands
    w = dst.size
    D = x.D
    a = x.read(dst)
    n8 = _masked_count(x, src, w)
    if x.decide(D.is_zero(8, n8)):
        x.write(dst, a)
        return
    k = D.zext(D.and_(8, n8, D.const(8, w - 1)), 8, w)
    r = D.or_(w, D.shl(w, a, k), D.lshr(w, a, D.sub(w, D.const(w, w), k)))
    cf = D.bit(w, r, 0)
    x.set_flag(_CF, cf)
    x.set_flag(_OF, D.bxor(D.msb(w, r), cf))
    if not x.decide(D.eq(8, n8, D.const(8, 1))):
        x.undefine(_OF)
    x.write(dst, r)


@instruction("ROR", defines="CF OF", undefined="OF", ref="SDM Vol. 2B RCL/RCR/ROL/ROR; APM Vol. 3 ROR")
def ror(x: Exec, i: Insn) -> None:
    """Rotate right by (masked count) mod size; CF = MSB(result), OF (count 1) = XOR of the top two bits."""
    dst, src = i.operands
    w = dst.size
    D = x.D
    a = x.read(dst)
    n8 = _masked_count(x, src, w)
    if x.decide(D.is_zero(8, n8)):
        x.write(dst, a)
        return
    k = D.zext(D.and_(8, n8, D.const(8, w - 1)), 8, w)
    r = D.or_(w, D.lshr(w, a, k), D.shl(w, a, D.sub(w, D.const(w, w), k)))
    cf = D.msb(w, r)
    x.set_flag(_CF, cf)
    x.set_flag(_OF, D.bxor(cf, D.bit(w, r, w - 2)))
    if not x.decide(D.eq(8, n8, D.const(8, 1))):
        x.undefine(_OF)
    x.write(dst, r)


# -- RCL, RCR (rotation of the (w+1)-bit ring CF:DEST) -------------------------------------------

def _rc_count(D: Domain, n8: Any, w: int) -> Any:
    """Rotation amount in the (w+1)-bit ring: masked count mod 9 / mod 17; unchanged for 32/64 bits."""
    if w == 8:
        return D.urem(8, n8, D.const(8, 9))
    if w == 16:
        return D.urem(8, n8, D.const(8, 17))
    return n8


@instruction("RCL", defines="CF OF", undefined="OF", ref="SDM Vol. 2B RCL/RCR/ROL/ROR; APM Vol. 3 RCL")
def rcl(x: Exec, i: Insn) -> None:
    """Rotate CF:DEST left; CF = the ring's top bit, OF (count 1) = MSB(result) XOR CF.

    A count that is a multiple of the ring size (e.g. 9 for 8 bits) leaves
    DEST and CF as they were, but is still a nonzero masked count (OF undefined).
    """
    dst, src = i.operands
    w = dst.size
    D = x.D
    a = x.read(dst)
    n8 = _masked_count(x, src, w)
    if x.decide(D.is_zero(8, n8)):
        x.write(dst, a)
        return
    w1 = w + 1
    ring = D.concat(D.from_bool(x.flag(_CF), 1), a, w)
    k = D.zext(_rc_count(D, n8, w), 8, w1)
    t = D.or_(w1, D.shl(w1, ring, k), D.lshr(w1, ring, D.sub(w1, D.const(w1, w1), k)))
    r = D.extract(t, w - 1, 0)
    cf = D.bit(w1, t, w)
    x.set_flag(_CF, cf)
    x.set_flag(_OF, D.bxor(D.msb(w, r), cf))
    if not x.decide(D.eq(8, n8, D.const(8, 1))):
        x.undefine(_OF)
    x.write(dst, r)


@instruction("RCR", defines="CF OF", undefined="OF", ref="SDM Vol. 2B RCL/RCR/ROL/ROR; APM Vol. 3 RCR")
def rcr(x: Exec, i: Insn) -> None:
    """Rotate CF:DEST right; CF = the ring's top bit, OF (count 1) = MSB(DEST) XOR old CF.

    The count-1 OF equals the XOR of the result's two top bits (the new MSB is the
    old CF, the next bit the old MSB); the spec evaluates it that way for every count.
    """
    dst, src = i.operands
    w = dst.size
    D = x.D
    a = x.read(dst)
    n8 = _masked_count(x, src, w)
    if x.decide(D.is_zero(8, n8)):
        x.write(dst, a)
        return
    w1 = w + 1
    ring = D.concat(D.from_bool(x.flag(_CF), 1), a, w)
    k = D.zext(_rc_count(D, n8, w), 8, w1)
    t = D.or_(w1, D.lshr(w1, ring, k), D.shl(w1, ring, D.sub(w1, D.const(w1, w1), k)))
    r = D.extract(t, w - 1, 0)
    x.set_flag(_CF, D.bit(w1, t, w))
    x.set_flag(_OF, D.bxor(D.msb(w, r), D.bit(w, r, w - 2)))
    if not x.decide(D.eq(8, n8, D.const(8, 1))):
        x.undefine(_OF)
    x.write(dst, r)


# -- SHLD, SHRD ---------------------------------------------------------------------------------

def _double(left: bool) -> Any:
    kind = SHLD if left else SHRD

    def sem(x: Exec, i: Insn) -> None:
        dst, src, cnt = i.operands
        w = dst.size
        w2 = 2 * w
        D = x.D
        a, b = x.read(dst), x.read(src)
        n8 = _masked_count(x, cnt, w)
        if x.decide(D.is_zero(8, n8)):
            x.write(dst, a)  # "no operation"; a 32-bit register is still zero-extended
            return
        n = D.zext(n8, 8, w2)
        if left:
            pair = D.concat(a, b, w)  # DEST:SRC; SRC's top bits shift in from the right
            r = D.extract(D.shl(w2, pair, n), w2 - 1, w)
        else:
            pair = D.concat(b, a, w)  # SRC:DEST; SRC's low bits shift in from the left
            r = D.extract(D.lshr(w2, pair, n), w - 1, 0)
        x.set_flags(kind, w, pair, n, r)
        if w == 16 and x.decide(D.ult(8, D.const(8, 16), n8)):
            x.undefine(_CF, _PF, _AF, _ZF, _SF, _OF)  # count > operand size: result and flags undefined
        elif x.decide(D.eq(8, n8, D.const(8, 1))):
            x.undefine(_AF)
        else:
            x.undefine(_AF, _OF)
        x.write(dst, r)
    return sem


_DOUBLE_DOC = """{name} DEST, SRC, count: shift DEST {dir} by the masked count, filling from SRC.

CF = last bit shifted out of DEST; OF (count 1) = 1 iff DEST's sign changed;
SF/ZF/PF from the result; AF undefined (the spec sets 1: measured on AMD for
SHLD, ORACLES.md; assumed the same for SHRD).  A masked count of 0
is a no-operation (no flag changes).  A masked count greater than the operand
size (16-bit operands only, counts 17..31) leaves the register result and all
six status flags undefined (SDM Vol. 2B {name} "Operation": "Bad parameters");
the spec then produces the {half} half of ({pair}) {op} count -- bits of SRC
followed by zeros -- and the flags from that result by the usual rules, all
marked undefined.  Hardware differs here (the destination value is vendor- and
model-specific), so this result is not a reference for such counts.
"""

_shld, _shrd = _double(True), _double(False)
_shld.__doc__ = _DOUBLE_DOC.format(name="SHLD", dir="left", half="upper", pair="DEST:SRC", op="<<")
_shrd.__doc__ = _DOUBLE_DOC.format(name="SHRD", dir="right", half="lower", pair="SRC:DEST", op=">>")
instruction("SHLD", defines="CF PF ZF SF OF", undefined="CF PF AF ZF SF OF",
            ref="SDM Vol. 2B SHLD; APM Vol. 3 SHLD")(_shld)
instruction("SHRD", defines="CF PF ZF SF OF", undefined="CF PF AF ZF SF OF",
            ref="SDM Vol. 2B SHRD; APM Vol. 3 SHRD")(_shrd)
