"""Symbolic twins of tests/test_isa_decimal.py: Z3 proofs over every AL/AH/CF/AF (and the rest of RAX).

Each proof runs the spec's own semantic function in the symbolic domain (spec.symexec) and
checks the resulting terms against a second, independently written formulation:

* DAA/DAS/AAA/AAS: the SDM Vol. 2A "Operation" pseudo-code transcribed as Z3 formulas (widened
  arithmetic for the carry/borrow out of AL + 6 / AL - 6, the literal two-step AAS), and the
  decimal meaning: ADC + DAA / SBB + DAS on packed BCD bytes give the BCD sum / difference and
  the decimal carry / borrow; ADD + AAA / SUB + AAS on unpacked (or ASCII) digits give the digit
  and the carry into AH.
* AAM/AAD with symbolic AX and a fixed base: AH_new * base + AL_new = AL_old with AL_new < base,
  resp. AL_new = (AH * base + AL) mod 256 and AH_new = 0.

Every proof also pins the undefined-flag set the state tracks and the value the spec documents
for each undefined flag.  All widths are 8/16 bits, so the solver answers in milliseconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import z3

from spec import flags as F
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Fault, Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE
from spec.symexec import SymbolicRun, run_symbolic, symbolic_state

MODES = ("real", "prot16", "prot32")
SEQ_MODES = ("real", "prot32")  # the two-instruction proofs (slower): one 16-bit and one 32-bit mode
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)


def _bv(v: int, w: int) -> z3.BitVecRef:
    return z3.BitVecVal(v, w)


def _parity(v: z3.BitVecRef) -> z3.BoolRef:
    """PF: even number of ones in the low byte, as a sum of bits (not an XOR chain as in the spec)."""
    ones = sum(z3.ZeroExt(3, z3.Extract(k, k, v)) for k in range(8))
    return z3.Extract(0, 0, ones) == 0


def _szp(r: SymbolicRun, al: z3.BitVecRef) -> list[z3.BoolRef]:
    return [r.flag(F.SF) == z3.UGE(al, 0x80), r.flag(F.ZF) == (al == 0), r.flag(F.PF) == _parity(al)]


def _mask(*fl: int) -> int:
    return sum(1 << f for f in fl)


def _check(paths: list[Any], claim_of) -> None:
    """The claim built from each path's result holds under that path's condition."""
    for p in paths:
        claim = claim_of(p.result)
        model = prove(z3.Implies(p.condition, claim), timeout_ms=20_000)
        assert model is None, f"counterexample: {model}"


# -- second formulations of the SDM pseudo-code ----------------------------------------------------
def sdm_daa(al: z3.BitVecRef, cf: z3.BoolRef, af: z3.BoolRef) -> tuple[Any, Any, Any]:
    lo = z3.Or(z3.UGT(al & 0x0F, 9), af)
    t = z3.ZeroExt(8, al) + 6  # 16-bit: bit 8 is the carry out of AL + 6
    al1 = z3.If(lo, z3.Extract(7, 0, t), al)
    cf1 = z3.If(lo, z3.Or(cf, z3.Extract(8, 8, t) == 1), False)  # dead: overwritten below  # noqa: F841
    hi = z3.Or(z3.UGT(al, 0x99), cf)
    return z3.If(hi, al1 + 0x60, al1), z3.If(hi, True, False), lo


def sdm_das(al: z3.BitVecRef, cf: z3.BoolRef, af: z3.BoolRef) -> tuple[Any, Any, Any]:
    lo = z3.Or(z3.UGT(al & 0x0F, 9), af)
    t = z3.SignExt(8, z3.ZeroExt(1, al)) - 6  # wide signed: negative iff AL - 6 borrows
    al1 = z3.If(lo, z3.Extract(7, 0, t), al)
    cf1 = z3.If(lo, z3.Or(cf, t < 0), False)
    hi = z3.Or(z3.UGT(al, 0x99), cf)
    return z3.If(hi, al1 - 0x60, al1), z3.If(hi, True, cf1), lo


def sdm_aaa(ax: z3.BitVecRef, af: z3.BoolRef) -> tuple[Any, Any]:
    adj = z3.Or(z3.UGT(z3.Extract(3, 0, ax), 9), af)
    ax1 = z3.If(adj, ax + 0x106, ax)
    return z3.Concat(z3.Extract(15, 8, ax1), _bv(0, 4), z3.Extract(3, 0, ax1)), adj


def sdm_aas(ax: z3.BitVecRef, af: z3.BoolRef) -> tuple[Any, Any]:
    adj = z3.Or(z3.UGT(z3.Extract(3, 0, ax), 9), af)
    ax6 = ax - 6
    ah = z3.Extract(15, 8, ax6) - 1  # literally: AX := AX - 6; AH := AH - 1
    ax1 = z3.If(adj, z3.Concat(ah, z3.Extract(7, 0, ax6)), ax)
    return z3.Concat(z3.Extract(15, 8, ax1), _bv(0, 4), z3.Extract(3, 0, ax1)), adj


# -- DAA / DAS / AAA / AAS against the pseudo-code --------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("code", "sdm"), [("27", sdm_daa), ("2f", sdm_das)])
def test_daa_das_match_sdm(mode: str, code: str, sdm) -> None:
    paths = explore(lambda D: run_symbolic(D, mode, bytes.fromhex(code)))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        assert r.fault is None and r.next_rip == CODE + 1
        rax = r.inputs["rax"]
        al, cf, af = sdm(z3.Extract(7, 0, rax), r.inputs["CF"], r.inputs["AF"])
        assert r.state.undefined == _mask(F.OF)
        return z3.And(r.reg("rax") == z3.Concat(z3.Extract(63, 8, rax), al),
                      r.flag(F.CF) == cf, r.flag(F.AF) == af, *_szp(r, al),
                      r.flag(F.OF) == z3.BoolVal(False))  # undefined; the spec documents 0
    _check(paths, claim)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("code", "sdm"), [("37", sdm_aaa), ("3f", sdm_aas)])
def test_aaa_aas_match_sdm(mode: str, code: str, sdm) -> None:
    paths = explore(lambda D: run_symbolic(D, mode, bytes.fromhex(code)))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        assert r.fault is None
        rax = r.inputs["rax"]
        ax, adj = sdm(z3.Extract(15, 0, rax), r.inputs["AF"])
        al = z3.Extract(7, 0, ax)
        assert r.state.undefined == _mask(F.OF, F.SF, F.ZF, F.PF)
        return z3.And(r.reg("rax") == z3.Concat(z3.Extract(63, 16, rax), ax),
                      r.flag(F.CF) == adj, r.flag(F.AF) == adj,
                      *_szp(r, al), r.flag(F.OF) == z3.BoolVal(False))  # undefined: documented values
    _check(paths, claim)


# -- the decimal meaning (two-instruction sequences) ------------------------------------------------
def run_sequence(D: SymbolicDomain, mode: str, codes: list[str]) -> SymbolicRun:
    """Run several instructions in order on one symbolic state (each through its semantic function)."""
    st, inputs = symbolic_state(D, mode)  # type: ignore[arg-type]
    x = Exec(st)
    rip = CODE
    fault = None
    for code in codes:
        insn = decode(bytes.fromhex(code), BITS[mode])
        x.i = insn
        x.next_rip = rip + insn.length
        try:
            SEMANTICS[insn.row.mnemonic].fn(x, insn)
        except Fault as f:
            fault = f
            break
        rip = x.next_rip
    return SymbolicRun(st, inputs, fault, rip)


def _digits_ok(v: z3.BitVecRef) -> z3.BoolRef:
    return z3.And(z3.ULE(v & 0x0F, 9), z3.ULE(z3.LShR(v, 4), 9))


def _dec(v: z3.BitVecRef) -> z3.BitVecRef:
    """Packed BCD byte -> its value, as a 16-bit number."""
    return z3.ZeroExt(8, z3.LShR(v, 4)) * 10 + z3.ZeroExt(8, v & 0x0F)


def _bcd_value_is(v: z3.BitVecRef, n: z3.BitVecRef) -> z3.BoolRef:
    return z3.And(_digits_ok(v), _dec(v) == n)


@pytest.mark.parametrize("mode", SEQ_MODES)
def test_adc_daa_is_bcd_addition(mode: str) -> None:
    """For packed-BCD AL, BL and any CF: ADC AL,BL; DAA leaves the BCD of (a + b + c) mod 100, CF = carry."""
    paths = explore(lambda D: run_sequence(D, mode, ["12c3", "27"]))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        a, b = z3.Extract(7, 0, r.inputs["rax"]), z3.Extract(7, 0, r.inputs["rbx"])
        total = _dec(a) + _dec(b) + z3.If(r.inputs["CF"], _bv(1, 16), _bv(0, 16))
        return z3.Implies(z3.And(_digits_ok(a), _digits_ok(b)),
                          z3.And(_bcd_value_is(r.reg("rax", 8), z3.URem(total, 100)),
                                 r.flag(F.CF) == z3.UGE(total, 100)))
    _check(paths, claim)


@pytest.mark.parametrize("mode", SEQ_MODES)
def test_sbb_das_is_bcd_subtraction(mode: str) -> None:
    """For packed-BCD AL, BL and any CF: SBB AL,BL; DAS leaves the BCD of (a - b - c) mod 100, CF = borrow."""
    paths = explore(lambda D: run_sequence(D, mode, ["1ac3", "2f"]))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        a, b = z3.Extract(7, 0, r.inputs["rax"]), z3.Extract(7, 0, r.inputs["rbx"])
        c = z3.If(r.inputs["CF"], _bv(1, 16), _bv(0, 16))
        borrow = z3.ULT(_dec(a), _dec(b) + c)
        diff = z3.If(borrow, _dec(a) + 100 - _dec(b) - c, _dec(a) - _dec(b) - c)
        return z3.Implies(z3.And(_digits_ok(a), _digits_ok(b)),
                          z3.And(_bcd_value_is(r.reg("rax", 8), diff), r.flag(F.CF) == borrow))
    _check(paths, claim)


@pytest.mark.parametrize("mode", SEQ_MODES)
def test_add_aaa_is_unpacked_addition(mode: str) -> None:
    """Unpacked or ASCII digits (high nibble 0 or 3): ADD AL,BL; AAA -> AL = digit sum mod 10, carry into AH and CF.

    The high-nibble restriction matters: AAA adds 106H to all of AX, so a sum above F9H would
    carry into AH twice (the SDM's AX form; see test_isa_decimal.test_aaa_carry_from_al_reaches_ah).
    """
    paths = explore(lambda D: run_sequence(D, mode, ["00d8", "37"]))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        rax = r.inputs["rax"]
        a, b, ah = z3.Extract(7, 0, rax), z3.Extract(7, 0, r.inputs["rbx"]), z3.Extract(15, 8, rax)
        la, lb = a & 0x0F, b & 0x0F
        pre = z3.And(z3.ULE(la, 9), z3.ULE(lb, 9),
                     z3.Or(z3.LShR(a, 4) == 0, z3.LShR(a, 4) == 3), z3.Or(z3.LShR(b, 4) == 0, z3.LShR(b, 4) == 3))
        s = la + lb
        carry = z3.UGE(s, 10)
        want_ax = z3.Concat(ah + z3.If(carry, _bv(1, 8), _bv(0, 8)), z3.URem(s, 10))
        return z3.Implies(pre, z3.And(r.reg("rax", 16) == want_ax, r.flag(F.CF) == carry, r.flag(F.AF) == carry,
                                      z3.Extract(63, 16, r.reg("rax")) == z3.Extract(63, 16, rax)))
    _check(paths, claim)


@pytest.mark.parametrize("mode", SEQ_MODES)
def test_sub_aas_is_unpacked_subtraction(mode: str) -> None:
    """Digits in the low nibbles (any high nibbles): SUB AL,BL; AAS -> AL = (a - b) mod 10, borrow from AH and CF."""
    paths = explore(lambda D: run_sequence(D, mode, ["28d8", "3f"]))

    def claim(r: SymbolicRun) -> z3.BoolRef:
        rax = r.inputs["rax"]
        a, b, ah = z3.Extract(7, 0, rax), z3.Extract(7, 0, r.inputs["rbx"]), z3.Extract(15, 8, rax)
        la, lb = a & 0x0F, b & 0x0F
        borrow = z3.ULT(la, lb)
        want_ax = z3.Concat(ah - z3.If(borrow, _bv(1, 8), _bv(0, 8)), z3.If(borrow, la + 10 - lb, la - lb))
        return z3.Implies(z3.And(z3.ULE(la, 9), z3.ULE(lb, 9)),
                          z3.And(r.reg("rax", 16) == want_ax, r.flag(F.CF) == borrow, r.flag(F.AF) == borrow))
    _check(paths, claim)


# -- AAM / AAD --------------------------------------------------------------------------------------
BASES = (10, 16, 7, 0xFF, 1, 2, 0x80)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base", BASES)
def test_aam_divides(mode: str, base: int) -> None:
    """AAM imm8: AH_new * base + AL_new == AL_old, AL_new < base; SF/ZF/PF from AL; OF/AF/CF 0 (undefined)."""
    paths = explore(lambda D: run_symbolic(D, mode, bytes([0xD4, base])))
    assert len(paths) == 1

    def claim(r: SymbolicRun) -> z3.BoolRef:
        assert r.fault is None
        rax = r.inputs["rax"]
        ah, al = z3.Extract(15, 8, r.reg("rax", 16)), r.reg("rax", 8)
        wide = z3.ZeroExt(8, ah) * base + z3.ZeroExt(8, al)
        assert r.state.undefined == _mask(F.OF, F.AF, F.CF)
        return z3.And(wide == z3.ZeroExt(8, z3.Extract(7, 0, rax)), z3.ULT(al, base),
                      z3.Extract(63, 16, r.reg("rax")) == z3.Extract(63, 16, rax), *_szp(r, al),
                      *[r.flag(f) == z3.BoolVal(False) for f in (F.OF, F.AF, F.CF)])
    _check(paths, claim)


@pytest.mark.parametrize("mode", MODES)
def test_aam_zero_faults(mode: str) -> None:
    """AAM 0: #DE on every input (SDM AAM "Protected Mode Exceptions")."""
    paths = explore(lambda D: run_symbolic(D, mode, bytes([0xD4, 0])))
    assert len(paths) == 1
    assert paths[0].result.fault is not None and paths[0].result.fault.vector == Vector.DE


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base", (0, *BASES))
def test_aad_multiplies(mode: str, base: int) -> None:
    """AAD imm8: AL_new = (AH * base + AL) mod 256, AH_new = 0; flags of the 8-bit ADD (OF/AF/CF undefined)."""
    paths = explore(lambda D: run_symbolic(D, mode, bytes([0xD5, base])))
    assert len(paths) == 1

    def claim(r: SymbolicRun) -> z3.BoolRef:
        assert r.fault is None
        rax = r.inputs["rax"]
        al_old, ah_old = z3.Extract(7, 0, rax), z3.Extract(15, 8, rax)
        wide = z3.ZeroExt(8, ah_old) * base + z3.ZeroExt(8, al_old)  # 16-bit: no overflow
        al = z3.Extract(7, 0, wide)
        p = z3.Extract(7, 0, z3.ZeroExt(8, ah_old) * base)
        sum9 = z3.ZeroExt(1, al_old) + z3.ZeroExt(1, p)
        nib = z3.ZeroExt(4, al_old & 0x0F) + z3.ZeroExt(4, p & 0x0F)
        sa, sp, sr = z3.Extract(7, 7, al_old), z3.Extract(7, 7, p), z3.Extract(7, 7, al)
        assert r.state.undefined == _mask(F.OF, F.AF, F.CF)
        return z3.And(r.reg("rax", 16) == z3.ZeroExt(8, al),
                      z3.Extract(63, 16, r.reg("rax")) == z3.Extract(63, 16, rax), *_szp(r, al),
                      r.flag(F.CF) == (z3.Extract(8, 8, sum9) == 1),
                      r.flag(F.AF) == z3.UGT(nib, 0x0F),
                      r.flag(F.OF) == z3.And(sa == sp, sr != sa))
    _check(paths, claim)


@pytest.mark.parametrize("code", ["27", "2f", "37", "3f", "d40a", "d50a"])
def test_other_flags_and_registers_untouched(code: str) -> None:
    """No instruction here touches a register other than RAX or a status flag beyond those listed."""
    (p,) = explore(lambda D: run_symbolic(D, "prot32", bytes.fromhex(code)))
    r = p.result
    names = ("rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
    assert prove(z3.And(*[r.reg(n) == r.inputs[n] for n in names])) is None
    sem = SEMANTICS[decode(bytes.fromhex(code), 32).row.mnemonic]
    assert sem.defines | sem.undefined <= F.ALL_STATUS
