"""The bit-vector domain interface the semantics are written against.

Every value the semantics compute (register contents, memory bytes, flags) is a
*domain value*: a Python ``int`` in the concrete domain, a Z3 term in the
symbolic domain, a source-code expression in a staging domain.  Semantics never
apply Python operators to such values; they call the domain.

Conventions
-----------
* Bit-vectors are unsigned and carry their width explicitly: every operation
  takes the width ``w`` (in bits) as its first argument, so a domain whose
  values do not know their width (plain ints, source strings) can mask.
* Booleans are a separate sort (``bool`` / ``z3.BoolRef``); ``ite`` selects
  between two values of either sort.
* Shift counts are full ``w``-bit values; shifting by ``>= w`` gives 0
  (``shl``/``lshr``) or the sign fill (``ashr``), as in SMT-LIB.
* ``decide(cond)`` turns a domain boolean into a Python ``bool`` for control
  flow the semantics cannot express as a selection (faults, loop counts).  A
  concrete domain just returns it; the symbolic domain forks paths (see
  :mod:`spec.domain.symbolic`).

Derived operations (parity, population count, bit scans) have generic
definitions here in terms of the primitives; a domain may override them with
a faster equivalent.  Tests check every override against the generic form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

Value = Any
"""A domain bit-vector value (opaque to the semantics)."""

Bool = Any
"""A domain boolean (opaque to the semantics)."""


def mask(w: int) -> int:
    """All-ones of width ``w`` as a Python int."""
    return (1 << w) - 1


class Domain(ABC):
    """Abstract bit-vector domain.  Subclasses implement the primitives."""

    name: str = "abstract"

    # -- constants ---------------------------------------------------------
    @abstractmethod
    def const(self, w: int, v: int) -> Value: ...

    @abstractmethod
    def true(self) -> Bool: ...

    @abstractmethod
    def false(self) -> Bool: ...

    def boolean(self, b: bool) -> Bool:
        return self.true() if b else self.false()

    # -- arithmetic and logic (w-bit in, w-bit out) -------------------------
    @abstractmethod
    def add(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def sub(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def mul(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def udiv(self, w: int, a: Value, b: Value) -> Value:
        """Unsigned quotient; ``b`` must be non-zero (callers fault first)."""
        ...

    @abstractmethod
    def urem(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def sdiv(self, w: int, a: Value, b: Value) -> Value:
        """Signed quotient truncated toward zero (x86 IDIV rounding)."""
        ...

    @abstractmethod
    def srem(self, w: int, a: Value, b: Value) -> Value:
        """Signed remainder with the sign of the dividend (x86 IDIV)."""
        ...

    @abstractmethod
    def and_(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def or_(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def xor(self, w: int, a: Value, b: Value) -> Value: ...

    @abstractmethod
    def not_(self, w: int, a: Value) -> Value: ...

    @abstractmethod
    def neg(self, w: int, a: Value) -> Value: ...

    @abstractmethod
    def shl(self, w: int, a: Value, n: Value) -> Value: ...

    @abstractmethod
    def lshr(self, w: int, a: Value, n: Value) -> Value: ...

    @abstractmethod
    def ashr(self, w: int, a: Value, n: Value) -> Value: ...

    # -- comparisons (w-bit in, boolean out) --------------------------------
    @abstractmethod
    def eq(self, w: int, a: Value, b: Value) -> Bool: ...

    @abstractmethod
    def ult(self, w: int, a: Value, b: Value) -> Bool: ...

    @abstractmethod
    def ule(self, w: int, a: Value, b: Value) -> Bool: ...

    @abstractmethod
    def slt(self, w: int, a: Value, b: Value) -> Bool: ...

    @abstractmethod
    def sle(self, w: int, a: Value, b: Value) -> Bool: ...

    def ne(self, w: int, a: Value, b: Value) -> Bool:
        return self.bnot(self.eq(w, a, b))

    # -- booleans ------------------------------------------------------------
    @abstractmethod
    def band(self, a: Bool, b: Bool) -> Bool: ...

    @abstractmethod
    def bor(self, a: Bool, b: Bool) -> Bool: ...

    @abstractmethod
    def bxor(self, a: Bool, b: Bool) -> Bool: ...

    @abstractmethod
    def bnot(self, a: Bool) -> Bool: ...

    # -- selection and width changes -----------------------------------------
    @abstractmethod
    def ite(self, c: Bool, a: Value, b: Value) -> Value:
        """``a`` if ``c`` else ``b``; both bit-vectors of one width, or both booleans."""
        ...

    @abstractmethod
    def extract(self, v: Value, hi: int, lo: int) -> Value:
        """Bits ``hi..lo`` (inclusive) of ``v``; width ``hi - lo + 1``."""
        ...

    @abstractmethod
    def zext(self, v: Value, frm: int, to: int) -> Value: ...

    @abstractmethod
    def sext(self, v: Value, frm: int, to: int) -> Value: ...

    @abstractmethod
    def concat(self, hi: Value, lo: Value, lo_w: int) -> Value:
        """``hi:lo`` where ``lo`` is ``lo_w`` bits wide."""
        ...

    @abstractmethod
    def bit(self, w: int, v: Value, i: int) -> Bool:
        """Bit ``i`` (a Python int) of ``v`` as a boolean."""
        ...

    def from_bool(self, c: Bool, w: int) -> Value:
        """1 or 0 as a ``w``-bit value."""
        return self.ite(c, self.const(w, 1), self.const(w, 0))

    # -- leaving the domain --------------------------------------------------
    @abstractmethod
    def decide(self, c: Bool) -> bool:
        """Resolve a boolean for control flow (concrete: itself; symbolic: fork)."""
        ...

    @abstractmethod
    def concrete(self, v: Value) -> int:
        """The Python int a value denotes; raises :class:`SymbolicValueError` if it has none."""
        ...

    @abstractmethod
    def is_concrete(self, v: Value) -> bool: ...

    # -- derived operations (generic definitions; domains may override) --------
    def msb(self, w: int, v: Value) -> Bool:
        return self.bit(w, v, w - 1)

    def is_zero(self, w: int, v: Value) -> Bool:
        return self.eq(w, v, self.const(w, 0))

    def parity8(self, v: Value, w: int) -> Bool:
        """PF: true iff the low byte of ``v`` has an even number of set bits (SDM Vol. 1 3.4.3.1)."""
        acc = self.bit(w, v, 0)
        for i in range(1, 8):
            acc = self.bxor(acc, self.bit(w, v, i))
        return self.bnot(acc)

    def popcount(self, w: int, v: Value) -> Value:
        acc = self.const(w, 0)
        for i in range(w):
            acc = self.add(w, acc, self.zext(self.extract(v, i, i), 1, w))
        return acc

    def ctz(self, w: int, v: Value) -> Value:
        """Count of trailing zero bits; ``w`` for a zero input."""
        acc = self.const(w, w)
        for i in reversed(range(w)):
            acc = self.ite(self.bit(w, v, i), self.const(w, i), acc)
        return acc

    def clz(self, w: int, v: Value) -> Value:
        """Count of leading zero bits; ``w`` for a zero input."""
        acc = self.const(w, w)
        for i in range(w):
            acc = self.ite(self.bit(w, v, i), self.const(w, w - 1 - i), acc)
        return acc


class SymbolicValueError(Exception):
    """A symbolic value reached a place that needs a concrete one (a model limit, not a fault)."""
