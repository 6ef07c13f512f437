"""The concrete domain: bit-vectors are non-negative Python ints below ``2**w``.

This is the reference interpreter's domain.  Every result is masked to its
width, so a value is always the unsigned reading of its bits.
"""

from __future__ import annotations

from spec.domain.base import Domain, mask

_PARITY = tuple(bin(i).count("1") % 2 == 0 for i in range(256))


def _signed(w: int, v: int) -> int:
    return v - (1 << w) if v >> (w - 1) else v


class ConcreteDomain(Domain):
    name = "concrete"

    def const(self, w: int, v: int) -> int:
        return v & ((1 << w) - 1)

    def true(self) -> bool:
        return True

    def false(self) -> bool:
        return False

    def boolean(self, b: bool) -> bool:
        return b

    def add(self, w: int, a: int, b: int) -> int:
        return (a + b) & ((1 << w) - 1)

    def sub(self, w: int, a: int, b: int) -> int:
        return (a - b) & ((1 << w) - 1)

    def mul(self, w: int, a: int, b: int) -> int:
        return (a * b) & ((1 << w) - 1)

    def udiv(self, w: int, a: int, b: int) -> int:
        return a // b

    def urem(self, w: int, a: int, b: int) -> int:
        return a % b

    def sdiv(self, w: int, a: int, b: int) -> int:
        sa, sb = _signed(w, a), _signed(w, b)
        q = abs(sa) // abs(sb)
        if (sa < 0) != (sb < 0):
            q = -q
        return q & mask(w)

    def srem(self, w: int, a: int, b: int) -> int:
        sa, sb = _signed(w, a), _signed(w, b)
        r = abs(sa) % abs(sb)
        if sa < 0:
            r = -r
        return r & mask(w)

    def and_(self, w: int, a: int, b: int) -> int:
        return a & b

    def or_(self, w: int, a: int, b: int) -> int:
        return a | b

    def xor(self, w: int, a: int, b: int) -> int:
        return a ^ b

    def not_(self, w: int, a: int) -> int:
        return a ^ ((1 << w) - 1)

    def neg(self, w: int, a: int) -> int:
        return -a & ((1 << w) - 1)

    def shl(self, w: int, a: int, n: int) -> int:
        return (a << n) & ((1 << w) - 1) if n < w else 0

    def lshr(self, w: int, a: int, n: int) -> int:
        return a >> n if n < w else 0

    def ashr(self, w: int, a: int, n: int) -> int:
        return (_signed(w, a) >> min(n, w)) & ((1 << w) - 1)

    def eq(self, w: int, a: int, b: int) -> bool:
        return a == b

    def ne(self, w: int, a: int, b: int) -> bool:
        return a != b

    def ult(self, w: int, a: int, b: int) -> bool:
        return a < b

    def ule(self, w: int, a: int, b: int) -> bool:
        return a <= b

    def slt(self, w: int, a: int, b: int) -> bool:
        return _signed(w, a) < _signed(w, b)

    def sle(self, w: int, a: int, b: int) -> bool:
        return _signed(w, a) <= _signed(w, b)

    def band(self, a: bool, b: bool) -> bool:
        return a and b

    def bor(self, a: bool, b: bool) -> bool:
        return a or b

    def bxor(self, a: bool, b: bool) -> bool:
        return a != b

    def bnot(self, a: bool) -> bool:
        return not a

    def ite(self, c: bool, a: int, b: int) -> int:
        return a if c else b

    def extract(self, v: int, hi: int, lo: int) -> int:
        return (v >> lo) & ((1 << (hi - lo + 1)) - 1)

    def zext(self, v: int, frm: int, to: int) -> int:
        return v

    def sext(self, v: int, frm: int, to: int) -> int:
        if v >> (frm - 1):
            return v | (((1 << to) - 1) ^ ((1 << frm) - 1))
        return v

    def concat(self, hi: int, lo: int, lo_w: int) -> int:
        return (hi << lo_w) | lo

    def bit(self, w: int, v: int, i: int) -> bool:
        return (v >> i) & 1 == 1

    def from_bool(self, c: bool, w: int) -> int:
        return 1 if c else 0

    def decide(self, c: bool) -> bool:
        return c

    def concrete(self, v: int) -> int:
        return v

    def is_concrete(self, v: int) -> bool:
        return True

    # -- fast overrides of the derived operations ---------------------------
    def msb(self, w: int, v: int) -> bool:
        return v >> (w - 1) == 1

    def is_zero(self, w: int, v: int) -> bool:
        return v == 0

    def parity8(self, v: int, w: int) -> bool:
        return _PARITY[v & 0xFF]

    def popcount(self, w: int, v: int) -> int:
        return v.bit_count()

    def ctz(self, w: int, v: int) -> int:
        return (v & -v).bit_length() - 1 if v else w

    def clz(self, w: int, v: int) -> int:
        return w - v.bit_length()


CONCRETE = ConcreteDomain()
"""The shared concrete domain instance (the domain is stateless)."""
