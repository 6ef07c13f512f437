"""Symbolic twins: the bit-operation and data-movement semantics proved over ALL inputs.

Each test runs the very semantic function the concrete tests exercise, on
Z3 registers/flags/memory (spec.symexec.run_symbolic), explores every path
(spec.domain.symbolic.explore) and proves, under each path's condition, the
textbook definition written here independently of the implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import z3

from spec import flags as F
from spec.domain.symbolic import Path, explore, prove
from spec.symexec import SymbolicRun, run_symbolic

PREFIX = {16: "66 ", 32: "", 64: "48 "}


def paths(code: str, mode: str = "long64") -> list[Path[SymbolicRun]]:
    found = explore(lambda D: run_symbolic(D, mode, bytes.fromhex(code)))
    for p in found:
        assert p.result.fault is None, p.result.fault
    return found


def holds(ps: list[Path[SymbolicRun]], claim: Callable[[SymbolicRun], Any]) -> None:
    """Prove ``claim(run)`` on every path under the path condition (a counterexample fails)."""
    for p in ps:
        cex = prove(z3.Implies(p.condition, claim(p.result)), timeout_ms=20_000)
        assert cex is None, f"counterexample: {cex}"


def low(v: Any, w: int) -> Any:
    return v if w == 64 else z3.Extract(w - 1, 0, v)


def written(run: SymbolicRun, name: str, w: int, value: Any) -> Any:
    """The 64-bit register ``name`` holds ``value`` as written at width ``w`` (32 zero-extends)."""
    old = run.inputs[name]
    if w == 64:
        expect = value
    elif w == 32:
        expect = z3.ZeroExt(32, value)
    else:
        expect = z3.Concat(z3.Extract(63, w, old), value)
    return run.reg(name) == expect


# -- bit scans and counts --------------------------------------------------------------------

@pytest.mark.parametrize("w", [16, 32, 64])
def test_bsf_is_index_of_lowest_set_bit(w: int) -> None:
    """SDM Vol. 2A BSF: nonzero source -> DEST = index of the lowest 1, ZF = 0; zero source ->
    ZF = 1 and DEST unchanged (whole 64-bit register)."""
    ps = paths(PREFIX[w] + "0f bc c3")
    assert len(ps) == 2

    def claim(r: SymbolicRun) -> Any:
        src = low(r.inputs["rbx"], w)
        res = r.reg("rax", w)
        one = z3.BitVecVal(1, w)
        nonzero = z3.And(z3.ULT(res, w), z3.LShR(src, res) & one == one,
                         src & ((one << res) - one) == 0, written(r, "rax", w, res))
        return z3.And(r.flag(F.ZF) == (src == 0),
                      z3.If(src == 0, r.reg("rax") == r.inputs["rax"], nonzero))
    holds(ps, claim)


@pytest.mark.parametrize("w", [16, 32, 64])
def test_bsr_is_index_of_highest_set_bit(w: int) -> None:
    """SDM Vol. 2A BSR: SRC >> DEST == 1 (bit DEST is the highest 1); zero source as BSF."""
    ps = paths(PREFIX[w] + "0f bd c3")

    def claim(r: SymbolicRun) -> Any:
        src = low(r.inputs["rbx"], w)
        res = r.reg("rax", w)
        return z3.And(r.flag(F.ZF) == (src == 0),
                      z3.If(src == 0, r.reg("rax") == r.inputs["rax"],
                            z3.And(z3.LShR(src, res) == 1, written(r, "rax", w, res))))
    holds(ps, claim)


@pytest.mark.parametrize("w", [16, 32, 64])
def test_tzcnt_lzcnt_definitions(w: int) -> None:
    """SDM Vol. 2B TZCNT / Vol. 2A LZCNT: the count of trailing/leading zeros (w for 0);
    CF = (source == 0), ZF = (result == 0)."""
    one = z3.BitVecVal(1, w)
    for opc, trailing in (("bc", True), ("bd", False)):
        code = ("66 f3 " if w == 16 else "f3 ") + ("48 " if w == 64 else "") + f"0f {opc} c3"
        ps = paths(code)
        assert len(ps) == 1

        def claim(r: SymbolicRun, trailing: bool = trailing) -> Any:
            src = low(r.inputs["rbx"], w)
            n = r.reg("rax", w)
            if trailing:  # the n low bits are 0 and bit n is 1 (or n == w)
                shape = z3.And(src & ((one << n) - one) == 0, z3.Or(n == w, z3.LShR(src, n) & one == one))
            else:  # src < 2^(w-n) and bit w-1-n is 1 (or n == w)
                shape = z3.Or(z3.And(n == w, src == 0), z3.And(z3.ULT(n, w), z3.LShR(src, w - 1 - n) == 1))
            return z3.And(z3.ULE(n, w), shape, z3.Implies(n == w, src == 0), written(r, "rax", w, n),
                          r.flag(F.CF) == (src == 0), r.flag(F.ZF) == (n == 0))
        holds(ps, claim)


@pytest.mark.parametrize("w", [16, 32, 64])
def test_popcnt_is_sum_of_bits(w: int) -> None:
    """SDM Vol. 2B POPCNT: DEST = number of 1 bits; ZF = (source == 0); CF OF SF AF PF = 0.
    (POPCNT has no 8-bit form; operand sizes 16/32/64.)"""
    ps = paths(("66 f3 " if w == 16 else "f3 ") + ("48 " if w == 64 else "") + "0f b8 c3")

    def claim(r: SymbolicRun) -> Any:
        src = low(r.inputs["rbx"], w)
        total = z3.Sum([z3.If(z3.Extract(k, k, src) == 1, z3.BitVecVal(1, w), z3.BitVecVal(0, w))
                        for k in range(w)])
        zero_flags = [z3.Not(r.flag(f)) for f in (F.CF, F.OF, F.SF, F.AF, F.PF)]
        return z3.And(written(r, "rax", w, total), r.flag(F.ZF) == (src == 0), *zero_flags)
    holds(ps, claim)


# -- bit tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [16, 32, 64])
def test_bt_family_register_operand(w: int) -> None:
    """SDM Vol. 2A BT/BTS/BTR/BTC, register bit base: CF = bit (offset mod w); BTS/BTR/BTC set,
    clear, complement exactly that bit; ZF is unaffected."""
    for opc, update in (("a3", None), ("ab", lambda v, m: v | m), ("b3", lambda v, m: v & ~m),
                        ("bb", lambda v, m: v ^ m)):
        ps = paths(PREFIX[w] + f"0f {opc} c8")  # BTx eAX, eCX

        def claim(r: SymbolicRun, update: Any = update) -> Any:
            v, off = low(r.inputs["rax"], w), low(r.inputs["rcx"], w)
            m = z3.BitVecVal(1, w) << (off & (w - 1))
            result = r.reg("rax") == r.inputs["rax"] if update is None else written(r, "rax", w, update(v, m))
            return z3.And(r.flag(F.CF) == (v & m != 0), r.flag(F.ZF) == r.inputs["ZF"], result)
        holds(ps, claim)


@pytest.mark.parametrize("w", [16, 32, 64])
def test_bt_memory_register_offset_is_a_bit_string(w: int) -> None:
    """SDM Vol. 2A BT with a memory bit base and a register bit offset (Vol. 1 3.1.1.9): for every
    signed offset, CF is bit (off mod 8) of the byte at RDI + (off SAR 3); BTS sets exactly that bit
    of memory and leaves every other byte as it was."""
    for opc in ("a3", "ab"):
        ps = paths(PREFIX[w] + f"0f {opc} 0f")  # BTx [rDI], eCX

        def claim(r: SymbolicRun, bts: bool = opc == "ab") -> Any:
            mem0 = r.inputs["mem"]
            off = z3.SignExt(64 - w, low(r.inputs["rcx"], w)) if w < 64 else r.inputs["rcx"]
            addr = r.inputs["rdi"] + (off >> 3)
            bit = z3.Extract(7, 0, off & 7)
            byte = z3.Select(mem0, addr)
            parts = [r.flag(F.CF) == (z3.LShR(byte, bit) & 1 == 1)]
            if bts:
                q = z3.BitVec("q", 64)
                mem1 = r.state.mem.phys.array
                parts.append(z3.Select(mem1, addr) == byte | (z3.BitVecVal(1, 8) << bit))
                parts.append(z3.Implies(q != addr, z3.Select(mem1, q) == z3.Select(mem0, q)))
            return z3.And(*parts)
        holds(ps, claim)


# -- CMPXCHG -------------------------------------------------------------------------------------

def sub_flags(w: int, a: Any, b: Any) -> dict[int, Any]:
    """CMP a, b as in SDM Vol. 1 3.4.3.1 / Appendix A, from wide arithmetic (independent of spec.flags)."""
    r = a - b
    wide = z3.ZeroExt(1, a) - z3.ZeroExt(1, b)
    sa, sb = z3.SignExt(1, a), z3.SignExt(1, b)
    sr = sa - sb
    return {F.CF: z3.Extract(w, w, wide) == 1, F.ZF: a == b, F.SF: z3.Extract(w - 1, w - 1, r) == 1,
            F.OF: z3.Extract(w, w, sr) != z3.Extract(w - 1, w - 1, sr),
            F.AF: z3.Extract(4, 4, a ^ b ^ r) == 1,
            F.PF: z3.Sum([z3.ZeroExt(3, z3.Extract(k, k, r)) for k in range(8)]) & 1 == 0}


@pytest.mark.parametrize("w", [8, 16, 32, 64])
def test_cmpxchg_register(w: int) -> None:
    """SDM Vol. 2A CMPXCHG: flags of CMP accumulator, DEST (so ZF iff equal); equal: DEST = SRC and
    RAX untouched; not equal: accumulator = DEST and the register DEST untouched."""
    code = {8: "0f b0 d9", 16: "66 0f b1 d9", 32: "0f b1 d9", 64: "48 0f b1 d9"}[w]  # CMPXCHG cX, bX
    ps = paths(code)
    assert len(ps) == 2

    def claim(r: SymbolicRun) -> Any:
        acc, dst, src = (low(r.inputs[n], w) for n in ("rax", "rcx", "rbx"))
        flags = [r.flag(f) == v for f, v in sub_flags(w, acc, dst).items()]
        ok = z3.And(written(r, "rcx", w, src), r.reg("rax") == r.inputs["rax"])
        fail = z3.And(written(r, "rax", w, dst), r.reg("rcx") == r.inputs["rcx"])
        return z3.And(*flags, z3.If(acc == dst, ok, fail))
    holds(ps, claim)


# -- SETcc, CMOVcc ------------------------------------------------------------------------------------

def textbook(cc: int, r: SymbolicRun) -> Any:
    """SDM Vol. 1 Appendix B, Table B-1, written out per condition over the input flags."""
    cf, pf, zf, sf, of = (r.inputs[n] for n in ("CF", "PF", "ZF", "SF", "OF"))
    return [of, z3.Not(of), cf, z3.Not(cf), zf, z3.Not(zf), z3.Or(cf, zf), z3.And(z3.Not(cf), z3.Not(zf)),
            sf, z3.Not(sf), pf, z3.Not(pf), sf != of, sf == of, z3.Or(zf, sf != of),
            z3.And(z3.Not(zf), sf == of)][cc]


@pytest.mark.parametrize("cc", range(16))
def test_setcc_and_cmovcc_conditions(cc: int) -> None:
    """SETcc r/m8 = 1 iff the condition; CMOVcc moves iff the condition, a 32-bit CMOVcc writes
    (zero-extends) the destination either way (SDM Vol. 2A CMOVcc, Vol. 2B SETcc); flags unchanged."""
    def unchanged_flags(r: SymbolicRun) -> Any:
        return z3.And(*[r.flag(f) == r.inputs[F.NAMES[f]] for f in F.STATUS])

    holds(paths(f"0f {0x90 + cc:02x} c0"),
          lambda r: z3.And(written(r, "rax", 8, z3.If(textbook(cc, r), z3.BitVecVal(1, 8), z3.BitVecVal(0, 8))),
                           unchanged_flags(r)))
    for w in (16, 32, 64):
        def claim(r: SymbolicRun, w: int = w) -> Any:
            a, b = low(r.inputs["rax"], w), low(r.inputs["rbx"], w)
            return z3.And(written(r, "rax", w, z3.If(textbook(cc, r), b, a)), unchanged_flags(r))
        holds(paths(PREFIX[w] + f"0f {0x40 + cc:02x} c3"), claim)
