"""The symbolic domain: bit-vectors are Z3 terms.

Running the semantics here computes, for symbolic inputs, the exact terms the
architecture prescribes; proofs are then Z3 validity checks over those terms.

Control flow on a symbolic condition (``decide``) is handled by path
exploration: :func:`explore` re-runs a function once per feasible path,
forcing the decisions of each run from a script, and returns every path's
condition together with the function's result.  A property holds for *all*
inputs iff it holds on every path under that path's condition.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import z3

from spec.domain.base import Domain, SymbolicValueError

T = TypeVar("T")

_fresh = itertools.count()


class SymbolicDomain(Domain):
    """Z3 bit-vector domain.  ``decide`` follows ``script`` and records new forks."""

    name = "symbolic"

    def __init__(self, script: list[bool] | None = None) -> None:
        self.script: list[bool] = list(script or [])
        self.decisions: list[tuple[Any, bool]] = []
        self.solver = z3.Solver()

    # -- fresh inputs ---------------------------------------------------------
    def var(self, w: int, name: str | None = None) -> z3.BitVecRef:
        return z3.BitVec(name or f"v{next(_fresh)}", w)

    def bool_var(self, name: str | None = None) -> z3.BoolRef:
        return z3.Bool(name or f"b{next(_fresh)}")

    # -- primitives ---------------------------------------------------------------
    def const(self, w: int, v: int) -> z3.BitVecRef:
        return z3.BitVecVal(v & ((1 << w) - 1), w)

    def true(self) -> z3.BoolRef:
        return z3.BoolVal(True)

    def false(self) -> z3.BoolRef:
        return z3.BoolVal(False)

    def add(self, w: int, a: Any, b: Any) -> Any:
        return a + b

    def sub(self, w: int, a: Any, b: Any) -> Any:
        return a - b

    def mul(self, w: int, a: Any, b: Any) -> Any:
        return a * b

    def udiv(self, w: int, a: Any, b: Any) -> Any:
        return z3.UDiv(a, b)

    def urem(self, w: int, a: Any, b: Any) -> Any:
        return z3.URem(a, b)

    def sdiv(self, w: int, a: Any, b: Any) -> Any:
        return a / b  # Z3 bvsdiv truncates toward zero, as IDIV does

    def srem(self, w: int, a: Any, b: Any) -> Any:
        return z3.SRem(a, b)  # sign follows the dividend, as IDIV's remainder

    def and_(self, w: int, a: Any, b: Any) -> Any:
        return a & b

    def or_(self, w: int, a: Any, b: Any) -> Any:
        return a | b

    def xor(self, w: int, a: Any, b: Any) -> Any:
        return a ^ b

    def not_(self, w: int, a: Any) -> Any:
        return ~a

    def neg(self, w: int, a: Any) -> Any:
        return -a

    def shl(self, w: int, a: Any, n: Any) -> Any:
        return a << n

    def lshr(self, w: int, a: Any, n: Any) -> Any:
        return z3.LShR(a, n)

    def ashr(self, w: int, a: Any, n: Any) -> Any:
        return a >> n

    def eq(self, w: int, a: Any, b: Any) -> Any:
        return a == b

    def ult(self, w: int, a: Any, b: Any) -> Any:
        return z3.ULT(a, b)

    def ule(self, w: int, a: Any, b: Any) -> Any:
        return z3.ULE(a, b)

    def slt(self, w: int, a: Any, b: Any) -> Any:
        return a < b

    def sle(self, w: int, a: Any, b: Any) -> Any:
        return a <= b

    def band(self, a: Any, b: Any) -> Any:
        return z3.And(a, b)

    def bor(self, a: Any, b: Any) -> Any:
        return z3.Or(a, b)

    def bxor(self, a: Any, b: Any) -> Any:
        return z3.Xor(a, b)

    def bnot(self, a: Any) -> Any:
        return z3.Not(a)

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        return z3.If(c, a, b)

    def extract(self, v: Any, hi: int, lo: int) -> Any:
        return z3.Extract(hi, lo, v)

    def zext(self, v: Any, frm: int, to: int) -> Any:
        return v if to == frm else z3.ZeroExt(to - frm, v)

    def sext(self, v: Any, frm: int, to: int) -> Any:
        return v if to == frm else z3.SignExt(to - frm, v)

    def concat(self, hi: Any, lo: Any, lo_w: int) -> Any:
        return z3.Concat(hi, lo)

    def bit(self, w: int, v: Any, i: int) -> Any:
        return z3.Extract(i, i, v) == 1

    # -- leaving the domain -------------------------------------------------------
    def decide(self, c: Any) -> bool:
        c = z3.simplify(c) if not isinstance(c, bool) else z3.BoolVal(c)
        if z3.is_true(c):
            return True
        if z3.is_false(c):
            return False
        k = len(self.decisions)
        if k < len(self.script):
            choice = self.script[k]
        else:
            # A new fork: take the true side if it is feasible under the path so far.
            self.solver.push()
            self.solver.add(c)
            choice = self.solver.check() != z3.unsat
            self.solver.pop()
        self.decisions.append((c, choice))
        self.solver.add(c if choice else z3.Not(c))
        return choice

    def path_condition(self) -> Any:
        return z3.And([c if taken else z3.Not(c) for c, taken in self.decisions])

    def concrete(self, v: Any) -> int:
        if isinstance(v, int):
            return v
        s = z3.simplify(v)
        if z3.is_bv_value(s):
            return s.as_long()
        raise SymbolicValueError(f"value is symbolic where a concrete one is needed: {s}")

    def is_concrete(self, v: Any) -> bool:
        return isinstance(v, int) or z3.is_bv_value(z3.simplify(v))


@dataclass
class Path(Generic[T]):
    """One feasible path: its condition and what the explored function returned on it."""

    condition: Any
    result: T


def explore(fn: Callable[[SymbolicDomain], T], limit: int = 4096) -> list[Path[T]]:
    """Run ``fn`` on every feasible path of its symbolic decisions (depth-first)."""
    paths: list[Path[T]] = []
    pending: list[list[bool]] = [[]]
    while pending:
        if len(paths) >= limit:
            raise RuntimeError(f"path explosion: more than {limit} paths")
        script = pending.pop()
        dom = SymbolicDomain(script)
        result = fn(dom)
        paths.append(Path(dom.path_condition(), result))
        # Every decision made beyond the script is a fork whose other side is still open.
        for k in range(len(script), len(dom.decisions)):
            prefix = [taken for _, taken in dom.decisions[:k]]
            cond, taken = dom.decisions[k]
            s = z3.Solver()
            for c, t in dom.decisions[:k]:
                s.add(c if t else z3.Not(c))
            s.add(z3.Not(cond) if taken else cond)
            if s.check() != z3.unsat:
                pending.append([*prefix, not taken])
    return paths


def prove(claim: Any, timeout_ms: int = 60_000) -> z3.ModelRef | None:
    """``None`` if ``claim`` is valid, else a counterexample model."""
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(z3.Not(claim))
    r = s.check()
    if r == z3.unsat:
        return None
    if r == z3.unknown:
        raise RuntimeError(f"solver gave up: {s.reason_unknown()}")
    return s.model()
