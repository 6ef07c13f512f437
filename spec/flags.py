"""RFLAGS: bit positions, and the status-flag definitions of the arithmetic families.

The six status flags (Intel SDM Vol. 1 3.4.3.1) are defined here once, over the
domain, as functions of an operation's width, operands and result.  The state
keeps a *lazy record* ``(kind, w, a, b, r, c)`` of the last flag-setting
operation and evaluates a flag only when it is read (see
:class:`spec.state.Flags`); the symbolic twins prove these definitions against
their textbook meaning.
"""

from __future__ import annotations

from typing import Any

from spec.domain.base import Domain

# RFLAGS bit positions (SDM Vol. 1 Figure 3-8).
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 0, 2, 4, 6, 7, 8, 9, 10, 11
IOPL_SHIFT = 12
NT, RF, VM, AC, VIF, VIP, ID = 14, 16, 17, 18, 19, 20, 21

STATUS = (CF, PF, AF, ZF, SF, OF)
"""The status flags, in the order the state stores them."""

STATUS_MASK = sum(1 << f for f in STATUS)
NAMES = {CF: "CF", PF: "PF", AF: "AF", ZF: "ZF", SF: "SF", OF: "OF"}
BY_NAME = {v: k for k, v in NAMES.items()}
ALL_STATUS = frozenset(STATUS)

RESERVED_ONE = 1 << 1
"""RFLAGS bit 1 always reads as 1."""


def names(flags: frozenset[int] | set[int]) -> str:
    """``{CF, OF}`` -> ``"CF OF"`` (in RFLAGS bit order)."""
    return " ".join(NAMES[f] for f in sorted(flags))


def parse(text: str) -> frozenset[int]:
    """``"CF OF"`` -> ``{CF, OF}``; the inverse of :func:`names`."""
    return frozenset(BY_NAME[t] for t in text.split())


class FlagKind:
    """How one operation family defines the six status flags.

    SF, ZF and PF depend only on the result for every family here; CF, AF and
    OF are family-specific.  ``c`` is the carry/borrow input (ADC/SBB).
    """

    name = "result"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.false()

    def af(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.false()

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.false()

    def flag(self, D: Domain, f: int, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        if f == ZF:
            return D.is_zero(w, r)
        if f == SF:
            return D.msb(w, r)
        if f == PF:
            return D.parity8(r, w)
        if f == CF:
            return self.cf(D, w, a, b, r, c)
        if f == OF:
            return self.of(D, w, a, b, r, c)
        return self.af(D, w, a, b, r, c)


def _af(D: Domain, w: int, a: Any, b: Any, r: Any) -> Any:
    """Carry/borrow out of bit 3: bit 4 of ``a ^ b ^ r`` (same for add and subtract)."""
    return D.bit(w, D.xor(w, D.xor(w, a, b), r), 4)


class AddKind(FlagKind):
    """ADD/ADC/INC/XADD: ``r = a + b + c`` (SDM Vol. 2A ADD, ADC)."""

    name = "add"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        # Unsigned carry out: the sum wrapped below a, or equals a with a carry-in and b = 2^w - 1.
        return D.bor(D.ult(w, r, a), D.band(c, D.eq(w, r, a)))

    def af(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return _af(D, w, a, b, r)

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        # Signed overflow: both operands' signs agree and differ from the result's.
        return D.msb(w, D.and_(w, D.xor(w, a, r), D.xor(w, b, r)))


class SubKind(FlagKind):
    """SUB/SBB/CMP/NEG/DEC/CMPXCHG/SCAS/CMPS: ``r = a - b - c`` (SDM Vol. 2B SUB, SBB)."""

    name = "sub"

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        # Borrow: a < b + c as unbounded integers.
        return D.bor(D.ult(w, a, b), D.band(c, D.eq(w, a, b)))

    def af(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return _af(D, w, a, b, r)

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        # Signed overflow: operands' signs differ and the result's sign differs from a's.
        return D.msb(w, D.and_(w, D.xor(w, a, b), D.xor(w, a, r)))


class LogicKind(FlagKind):
    """AND/OR/XOR/TEST: CF = OF = 0; AF undefined (the spec leaves it 0)."""

    name = "logic"


ADD = AddKind()
SUB = SubKind()
LOGIC = LogicKind()
RESULT = FlagKind()
"""SF/ZF/PF from the result; CF/AF/OF 0 unless the caller overrides them."""
