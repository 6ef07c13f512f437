"""The bit-vector domains: concrete fast paths vs the generic definitions vs Z3, and path exploration.

* Every fast override of :class:`spec.domain.concrete.ConcreteDomain` (parity8, popcount,
  ctz, clz, msb, is_zero) agrees with the generic definition in
  :class:`spec.domain.base.Domain` (called on the concrete domain) and with the symbolic
  domain (Z3 terms over constants, folded by ``z3.simplify``), at every width 1..64 where
  the operation makes sense (parity8 reads 8 bits, so widths 8..64).
* Every primitive (including sext, ashr, sdiv, srem and shifts by counts >= the width) agrees
  between the two domains and with a plain-int reference written here.
* ``explore`` enumerates exactly the feasible paths of small functions, with disjoint path
  conditions that cover every input; ``prove`` returns None for valid claims and a genuine
  counterexample model otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.domain.base import Domain, SymbolicValueError
from spec.domain.concrete import CONCRETE
from spec.domain.symbolic import SymbolicDomain, explore, prove

C = CONCRETE
Z = SymbolicDomain()


def zval(t: Any) -> int | bool:
    """The constant a Z3 term over constants folds to (an int for bit-vectors, a bool for booleans)."""
    s = z3.simplify(t)
    if z3.is_bv_value(s):
        return s.as_long()
    if z3.is_true(s):
        return True
    if z3.is_false(s):
        return False
    raise AssertionError(f"did not fold to a constant: {s}")


def zc(w: int, v: int) -> Any:
    return Z.const(w, v)


def signed(w: int, v: int) -> int:
    return v - (1 << w) if v >> (w - 1) & 1 else v


def m(w: int) -> int:
    return (1 << w) - 1


@st.composite
def width_value(draw: st.DrawFn, lo: int = 1) -> tuple[int, int]:
    w = draw(st.integers(lo, 64))
    edges = [0, 1, m(w), m(w) >> 1, (m(w) >> 1) + 1, 1 << (w // 2)]
    v = draw(st.one_of(st.sampled_from([e & m(w) for e in edges]), st.integers(0, m(w))))
    return w, v


# ----------------------------------------------------------------------------------------------
# Derived operations: fast concrete == generic == Z3 == reference
# ----------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(wv=width_value())
def test_derived_operations_agree(wv: tuple[int, int]) -> None:
    w, v = wv
    bits = [(v >> i) & 1 for i in range(w)]
    ref = {
        "popcount": sum(bits),
        "ctz": next((i for i in range(w) if bits[i]), w),
        "clz": next((w - 1 - i for i in reversed(range(w)) if bits[i]), w),
        "msb": bool(bits[w - 1]),
        "is_zero": v == 0,
    }
    for name, want in ref.items():
        args = (w, v)
        fast = getattr(C, name)(*args)
        generic = getattr(Domain, name)(C, *args)
        sym = zval(getattr(Z, name)(w, zc(w, v)))
        assert fast == generic == sym == want, (name, w, hex(v), fast, generic, sym, want)
        assert type(fast) is type(want), (name, type(fast))  # ints stay ints, booleans stay bools


@settings(max_examples=80)
@given(wv=width_value(lo=8))
def test_parity8_agrees(wv: tuple[int, int]) -> None:
    """PF is the even parity of the low byte only (SDM Vol. 1 3.4.3.1), at every width."""
    w, v = wv
    want = bin(v & 0xFF).count("1") % 2 == 0
    assert C.parity8(v, w) is want
    assert Domain.parity8(C, v, w) == want
    assert zval(Z.parity8(zc(w, v), w)) == want


# ----------------------------------------------------------------------------------------------
# Primitives: concrete == Z3 == reference
# ----------------------------------------------------------------------------------------------

@st.composite
def operands(draw: st.DrawFn) -> tuple[int, int, int]:
    w = draw(st.integers(1, 64))
    val = st.one_of(st.sampled_from([0, 1, m(w), m(w) >> 1, (m(w) >> 1) + 1]), st.integers(0, m(w)))
    a = draw(val) & m(w)
    b = draw(val) & m(w)
    return w, a, b


@settings(max_examples=100)
@given(wab=operands())
def test_binary_primitives_agree(wab: tuple[int, int, int]) -> None:
    w, a, b = wab
    sa, sb = signed(w, a), signed(w, b)
    ref: dict[str, int | bool] = {
        "add": (a + b) & m(w), "sub": (a - b) & m(w), "mul": (a * b) & m(w),
        "and_": a & b, "or_": a | b, "xor": a ^ b,
        "eq": a == b, "ne": a != b, "ult": a < b, "ule": a <= b, "slt": sa < sb, "sle": sa <= sb,
    }
    if b:
        q = abs(sa) // abs(sb) * (-1 if (sa < 0) != (sb < 0) else 1)  # truncation toward zero
        ref.update(udiv=a // b, urem=a % b, sdiv=q & m(w), srem=(sa - q * sb) & m(w))
    for name, want in ref.items():
        got_c = getattr(C, name)(w, a, b)
        got_z = zval(getattr(Z, name)(w, zc(w, a), zc(w, b)))
        assert got_c == got_z == want, (name, w, hex(a), hex(b), got_c, got_z, want)
    assert C.not_(w, a) == zval(Z.not_(w, zc(w, a))) == a ^ m(w)
    assert C.neg(w, a) == zval(Z.neg(w, zc(w, a))) == -a & m(w)


def test_signed_division_edges() -> None:
    """x86 IDIV rounding (SDM Vol. 2A IDIV): truncate toward zero; remainder has the dividend's sign."""
    for w in (8, 16, 32, 64):
        for a, b, q, r in ((-7, 2, -3, -1), (7, -2, -3, 1), (-7, -2, 3, -1), (-(1 << (w - 1)), -1, -(1 << (w - 1)), 0)):
            args = (w, a & m(w), b & m(w))
            assert C.sdiv(*args) == zval(Z.sdiv(w, zc(w, a), zc(w, b))) == q & m(w)
            assert C.srem(*args) == zval(Z.srem(w, zc(w, a), zc(w, b))) == r & m(w)


@st.composite
def shifts(draw: st.DrawFn) -> tuple[int, int, int]:
    w = draw(st.integers(1, 64))
    a = draw(st.integers(0, m(w)))
    # Counts around and beyond the width are the interesting ones (SMT-LIB semantics).
    n = draw(st.one_of(st.integers(0, min(w + 2, m(w))), st.sampled_from([w - 1, m(w)]), st.integers(0, m(w))))
    return w, a, n & m(w)


@settings(max_examples=100)
@given(wan=shifts())
def test_shifts_agree(wan: tuple[int, int, int]) -> None:
    w, a, n = wan
    want = {
        "shl": (a << n) & m(w) if n < w else 0,
        "lshr": a >> n if n < w else 0,
        "ashr": (signed(w, a) >> min(n, w)) & m(w),
    }
    for name, v in want.items():
        got_c = getattr(C, name)(w, a, n)
        got_z = zval(getattr(Z, name)(w, zc(w, a), zc(w, n)))
        assert got_c == got_z == v, (name, w, hex(a), n, got_c, got_z, v)


@pytest.mark.parametrize("w", [1, 2, 7, 8, 31, 32, 63, 64])
def test_shift_counts_at_and_beyond_width(w: int) -> None:
    """Shifting by >= w gives 0 (shl, lshr) or the sign fill (ashr), as in SMT-LIB."""
    for n in sorted(n for n in {w, w + 1, m(w)} if n <= m(w)):
        for a in (m(w), 1 << (w - 1), 1):
            assert C.shl(w, a, n) == zval(Z.shl(w, zc(w, a), zc(w, n))) == 0
            assert C.lshr(w, a, n) == zval(Z.lshr(w, zc(w, a), zc(w, n))) == 0
            fill = m(w) if a >> (w - 1) else 0
            assert C.ashr(w, a, n) == zval(Z.ashr(w, zc(w, a), zc(w, n))) == fill


@settings(max_examples=80)
@given(wv=width_value(), data=st.data())
def test_width_changes_agree(wv: tuple[int, int], data: st.DataObject) -> None:
    w, v = wv
    to = data.draw(st.integers(w, 128))
    assert C.sext(v, w, to) == zval(Z.sext(zc(w, v), w, to)) == signed(w, v) & m(to)
    assert C.zext(v, w, to) == zval(Z.zext(zc(w, v), w, to)) == v
    hi = data.draw(st.integers(0, w - 1))
    lo = data.draw(st.integers(0, hi))
    assert C.extract(v, hi, lo) == zval(Z.extract(zc(w, v), hi, lo)) == (v >> lo) & m(hi - lo + 1)
    for i in {0, w - 1, data.draw(st.integers(0, w - 1))}:
        assert C.bit(w, v, i) == zval(Z.bit(w, zc(w, v), i)) == bool(v >> i & 1)
    u = data.draw(st.integers(0, 255))
    assert C.concat(u, v, w) == zval(Z.concat(zc(8, u), zc(w, v), w)) == u << w | v
    for c in (True, False):
        assert C.from_bool(c, w) == zval(Z.from_bool(Z.boolean(c), w)) == int(c)
        assert C.ite(c, v, 0) == zval(Z.ite(Z.boolean(c), zc(w, v), zc(w, 0))) == (v if c else 0)
    assert C.const(w, v | (1 << w)) == zval(Z.const(w, v | (1 << w))) == v  # constants are masked


@pytest.mark.parametrize(("p", "q"), [(False, False), (False, True), (True, False), (True, True)])
def test_booleans_agree(p: bool, q: bool) -> None:
    P, Q = Z.boolean(p), Z.boolean(q)
    assert C.band(p, q) == zval(Z.band(P, Q)) == (p and q)
    assert C.bor(p, q) == zval(Z.bor(P, Q)) == (p or q)
    assert C.bxor(p, q) == zval(Z.bxor(P, Q)) == (p != q)
    assert C.bnot(p) == zval(Z.bnot(P)) == (not p)
    assert C.true() is True and C.false() is False


def test_leaving_the_domain() -> None:
    assert C.concrete(5) == 5 and C.is_concrete(5) and C.decide(True) is True
    assert Z.concrete(z3.BitVecVal(3, 8) + 4) == 7 and Z.is_concrete(z3.BitVecVal(3, 8) + 4)
    x = z3.BitVec("x", 8)
    assert not Z.is_concrete(x + 1)
    with pytest.raises(SymbolicValueError):
        Z.concrete(x + 1)


# ----------------------------------------------------------------------------------------------
# explore(): exactly the feasible paths
# ----------------------------------------------------------------------------------------------

def classify(D: Domain, x: Any) -> str:
    """Decides on x < 5, then x == 3: three feasible paths (x == 3 is impossible once x >= 5)."""
    small = D.decide(D.ult(8, x, D.const(8, 5)))
    three = D.decide(D.eq(8, x, D.const(8, 3)))
    if small:
        return "three" if three else "small"
    assert not three
    return "big"


def _partition_checks(paths: list, x: Any) -> None:
    """Path conditions are pairwise disjoint and together cover every input."""
    conds = [p.condition for p in paths]
    assert prove(z3.Or(conds)) is None
    for i in range(len(conds)):
        for j in range(i + 1, len(conds)):
            assert prove(z3.Not(z3.And(conds[i], conds[j]))) is None


def test_explore_enumerates_feasible_paths() -> None:
    x = z3.BitVec("x", 8)
    paths = explore(lambda D: classify(D, x))
    assert sorted(p.result for p in paths) == ["big", "small", "three"]
    _partition_checks(paths, x)
    by = {p.result: p.condition for p in paths}
    assert prove(by["three"] == (x == 3)) is None
    assert prove(by["small"] == z3.And(z3.ULT(x, 5), x != 3)) is None
    assert prove(by["big"] == z3.UGE(x, 5)) is None


def test_explore_paths_match_concrete_runs() -> None:
    """For every input, exactly one path condition holds, and its result is the concrete run's."""
    x = z3.BitVec("x", 8)
    paths = explore(lambda D: classify(D, x))
    for xv in range(256):
        holding = [p for p in paths
                   if z3.is_true(z3.simplify(z3.substitute(p.condition, (x, z3.BitVecVal(xv, 8)))))]
        assert len(holding) == 1, xv
        assert holding[0].result == classify(C, xv), xv


def test_explore_skips_infeasible_and_concrete_decisions() -> None:
    x = z3.BitVec("x", 8)

    def fn(D: SymbolicDomain) -> tuple[bool, bool, bool]:
        a = D.decide(D.ult(8, x, D.const(8, 5)))
        b = D.decide(D.ult(8, D.const(8, 10), x))  # x > 10: infeasible after x < 5
        k = D.decide(D.eq(8, D.const(8, 1), D.const(8, 1)))  # concrete: no fork
        return a, b, k

    paths = explore(fn)
    assert sorted(p.result for p in paths) == [(False, False, True), (False, True, True), (True, False, True)]
    _partition_checks(paths, x)


def test_explore_no_decisions_and_loops() -> None:
    x = z3.BitVec("x", 8)
    (p,) = explore(lambda D: D.add(8, x, D.const(8, 1)))
    assert prove(p.condition) is None and prove(p.result == x + 1) is None

    def count(D: SymbolicDomain) -> int:
        n = 0
        while n < 4 and D.decide(D.ult(8, D.const(8, n), x)):  # x > n
            n += 1
        return n

    paths = explore(count)
    assert sorted(p.result for p in paths) == [0, 1, 2, 3, 4]
    _partition_checks(paths, x)
    with pytest.raises(RuntimeError, match="path explosion"):
        explore(count, limit=3)


# ----------------------------------------------------------------------------------------------
# prove(): None for valid claims, a real counterexample otherwise
# ----------------------------------------------------------------------------------------------

def test_prove_valid_and_invalid() -> None:
    a, b = z3.BitVecs("a b", 16)
    assert prove(a + b == b + a) is None
    assert prove(z3.Implies(z3.ULT(a, b), z3.ULE(a, b))) is None
    assert prove((a ^ a) == 0) is None
    claim = z3.ULT(a, a + 1)  # false at a = 0xFFFF
    model = prove(claim)
    assert model is not None
    assert model.eval(a, model_completion=True).as_long() == 0xFFFF
    assert z3.is_false(model.eval(claim, model_completion=True))
    bad = a * 3 != 9
    model = prove(bad)
    assert model is not None and z3.is_false(model.eval(bad, model_completion=True))
