"""Symbolic twins of tests/test_isa_shift.py and tests/test_isa_muldiv.py.

Each instruction is decoded and run once through its *spec* semantic
function on a state whose registers and flags are fresh Z3 variables
(spec.symexec.run_symbolic); spec.domain.symbolic.explore covers every path
the semantics fork on (zero count, count 1, count >= size, #DE); and each
claim below -- written independently of the spec, from the manual -- is
proved valid under each path's condition, i.e. for ALL register and flag
values.

Widths: shifts and rotates are proved at 8/16/32/64 bits (64-bit mode; the
8/16/32-bit forms also through the real-mode and protected-mode encodings).
Multiplication is proved at 8/16/32 bits and division at 8/16 bits only: the
bit-blasted 64x64 multiplier and the wide dividers take Z3 far beyond this
suite's time budget (the concrete hypothesis tests cover those widths).

Division: the claims pin the quotient and remainder to the SMT-LIB integer
division of the full 2w-bit dividend (bvudiv/bvurem, bvsdiv/bvsrem, whose
definitions are floor/truncating integer division, i.e. n = q*d + r), plus
r < d (|r| < |d| and the sign rule for IDIV) and the exact #DE condition.
The multiplicative identity q*d + r == n itself is NOT proved by Z3 here:
relating a bit-blasted divider to a multiplier timed out (> 60 s) even at
8 bits, and a case split on the divisor took ~50 s; the hypothesis
properties in tests/test_isa_muldiv.py check that identity concretely at
every width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import capstone
import pytest
import z3

from spec import flags as F
from spec.domain.symbolic import explore, prove
from spec.faults import Vector
from spec.symexec import SymbolicRun, run_symbolic

WIDTHS = (8, 16, 32, 64)
PREFIX = {16: {8: "", 16: "", 32: "66"}, 32: {8: "", 16: "66", 32: ""}, 64: {8: "", 16: "66", 32: "", 64: "48"}}
MODE_BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}
DIGIT = {"ROL": 0, "ROR": 1, "RCL": 2, "RCR": 3, "SHL": 4, "SHR": 5, "SAL": 6, "SAR": 7}
REG = {8: "bl", 16: "bx", 32: "ebx", 64: "rbx"}
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
OTHER_MODES = ("real", "prot16", "prot32")
CROSS_MODE_OPS = ("SHL", "SAR", "ROR", "RCL")


def pfx(w: int, mode: str) -> bytes:
    """Operand-size prefix for ``w`` in ``mode`` (66, REX.W or none)."""
    return bytes.fromhex(PREFIX[MODE_BITS[mode]][w])


def shift_cl(op: str, w: int, mode: str = "long64") -> bytes:
    """``op rBX, CL`` (D2/D3 /digit)."""
    return pfx(w, mode) + bytes([0xD2 if w == 8 else 0xD3, 0xC0 | DIGIT[op] << 3 | 3])


def double_cl(left: bool, w: int, mode: str = "long64") -> bytes:
    """``SHLD/SHRD rBX, rDX, CL`` (0F A5 / 0F AD)."""
    return pfx(w, mode) + bytes([0x0F, 0xA5 if left else 0xAD, 0xD3])


def group3(op: str, w: int, mode: str = "long64") -> bytes:
    """``MUL/IMUL/DIV/IDIV rBX`` (F6/F7 /4../7)."""
    d = {"MUL": 4, "IMUL": 5, "DIV": 6, "IDIV": 7}[op]
    return pfx(w, mode) + bytes([0xF6 if w == 8 else 0xF7, 0xC0 | d << 3 | 3])


def test_encodings_match_capstone() -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    def text(code: bytes) -> str:
        (i,) = md.disasm(code, 0)
        assert i.size == len(code)
        return f"{i.mnemonic} {i.op_str}"

    for w in WIDTHS:
        for op in DIGIT:
            assert text(shift_cl(op, w)) == f"{op.lower()} {REG[w]}, cl"
        for op in ("MUL", "IMUL", "DIV", "IDIV"):
            assert text(group3(op, w)) == f"{op.lower()} {REG[w]}"
        if w > 8:
            src = {16: "dx", 32: "edx", 64: "rdx"}[w]
            assert text(double_cl(True, w)) == f"shld {REG[w]}, {src}, cl"
            assert text(double_cl(False, w)) == f"shrd {REG[w]}, {src}, cl"
    assert text(bytes.fromhex("0fafd3")) == "imul edx, ebx"
    assert text(bytes.fromhex("660fafd3")) == "imul dx, bx"
    for mode in OTHER_MODES:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16 if MODE_BITS[mode] == 16 else capstone.CS_MODE_32)
        for w in (8, 16, 32):
            for op in CROSS_MODE_OPS:
                assert text(shift_cl(op, w, mode)) == f"{op.lower()} {REG[w]}, cl"
            if w > 8:
                assert text(double_cl(True, w, mode)) == f"shld {REG[w]}, {'dx' if w == 16 else 'edx'}, cl"


# -- machinery --------------------------------------------------------------------------------------

def prove_paths(code: bytes, claim: Callable[[SymbolicRun], Any], min_paths: int = 1, mode: str = "long64") -> int:
    """Explore every path of ``code`` in ``mode`` and prove ``claim(run)`` under each path condition."""
    paths = explore(lambda D: run_symbolic(D, mode, code))
    assert len(paths) >= min_paths
    for p in paths:
        cex = prove(z3.Implies(p.condition, claim(p.result)), timeout_ms=30_000)
        assert cex is None, f"{code.hex()}: counterexample {cex}"
    return len(paths)


def low(v: Any, w: int) -> Any:
    return z3.Extract(w - 1, 0, v)


def bit(v: Any, i: Any, w: int = 0) -> Any:
    """Bit ``i`` (a Python int or a ``w``-bit term) of ``v``, as a Z3 boolean."""
    if isinstance(i, int):
        return z3.Extract(i, i, v) == 1
    return z3.Extract(0, 0, z3.LShR(v, i)) == 1


def msb(v: Any, w: int) -> Any:
    return z3.Extract(w - 1, w - 1, v) == 1


def even_parity(v: Any) -> Any:
    ones = z3.Sum([z3.ZeroExt(7, z3.Extract(i, i, v)) for i in range(8)])
    return z3.Extract(0, 0, ones) == 0


def undefined_exactly(run: SymbolicRun, conds: dict[int, Any]) -> Any:
    """Each status flag is marked undefined iff its condition in ``conds`` holds (absent: never).

    The undefined mask is a concrete int on each path; the conditions are terms over the inputs.
    """
    return z3.And([z3.BoolVal(bool(run.state.undefined >> f & 1)) == conds.get(f, z3.BoolVal(False))
                   for f in STATUS])


def unchanged(run: SymbolicRun, flags: tuple[int, ...]) -> Any:
    return z3.And([run.flag(f) == run.inputs[F.NAMES[f]] for f in flags])


def dest_reg(run: SymbolicRun, w: int, value: Any) -> Any:
    """rBX after a ``w``-bit write of ``value``: 32-bit writes zero-extend, 8/16-bit writes merge."""
    old = run.inputs["rbx"]
    if w == 64:
        want = value
    elif w == 32:
        want = z3.ZeroExt(32, value)
    else:
        want = z3.Concat(z3.Extract(63, w, old), value)
    return run.reg("rbx") == want


# -- shifts -----------------------------------------------------------------------------------------

def _count(run: SymbolicRun, w: int) -> Any:
    """The masked count as a ``w``-bit term: CL AND 1FH (3FH for 64 bits)."""
    n = z3.Extract(7, 0, run.inputs["rcx"]) & (0x3F if w == 64 else 0x1F)
    return n if w == 8 else z3.ZeroExt(w - 8, n)


def _zero_count_claim(run: SymbolicRun, w: int, n: Any) -> Any:
    """Masked count 0: destination value kept (zero-extended), no flag changed, none marked undefined."""
    a = low(run.inputs["rbx"], w)
    return z3.Implies(n == 0, z3.And(dest_reg(run, w, a), unchanged(run, STATUS), z3.BoolVal(run.state.undefined == 0)))


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("op", ["SHL", "SAL", "SHR", "SAR"])
def test_shift_definitions(op: str, w: int) -> None:
    prove_paths(shift_cl(op, w), shift_claim(op, w), min_paths=3)


def shift_claim(op: str, w: int) -> Callable[[SymbolicRun], Any]:
    """SHL/SAL == a << n, SHR == logical, SAR == arithmetic shift by the masked count n;
    CF == last bit shifted out (1 <= n <= w; SAR: the sign beyond); OF (n == 1) by the
    SDM table; SF/ZF/PF from the result; AF always undefined for n != 0; OF undefined
    iff n > 1; CF undefined iff SHL/SHR with n >= w.
    """

    def claim(run: SymbolicRun) -> Any:
        a = low(run.inputs["rbx"], w)
        n = _count(run, w)
        one = z3.BitVecVal(1, w)
        if op in ("SHL", "SAL"):
            r = a << n
            last = bit(a, z3.BitVecVal(w, w) - n, w)  # bit w-n of a
            of1 = z3.Xor(msb(r, w), run.flag(F.CF))
        elif op == "SHR":
            r = z3.LShR(a, n)
            last = bit(a, n - one, w)
            of1 = msb(a, w)
        else:
            r = a >> n
            last = z3.If(z3.ULE(n, w), bit(a, n - one, w), msb(a, w))
            of1 = z3.BoolVal(False)
        nz = n != 0
        in_range = z3.And(nz, z3.ULE(n, w)) if op != "SAR" else nz
        return z3.And(
            dest_reg(run, w, r),
            _zero_count_claim(run, w, n),
            z3.Implies(in_range, run.flag(F.CF) == last),
            z3.Implies(n == 1, run.flag(F.OF) == of1),
            z3.Implies(nz, z3.And(run.flag(F.SF) == msb(r, w), run.flag(F.ZF) == (r == 0),
                                  run.flag(F.PF) == even_parity(r))),
            undefined_exactly(run, {
                F.AF: nz,
                F.OF: z3.And(nz, n != 1),
                F.CF: z3.And(nz, z3.UGE(n, w)) if op != "SAR" else z3.BoolVal(False),
            }),
        )

    return claim


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("op", ["ROL", "ROR"])
def test_rol_ror_definitions(op: str, w: int) -> None:
    prove_paths(shift_cl(op, w), rol_ror_claim(op, w), min_paths=3)


def rol_ror_claim(op: str, w: int) -> Callable[[SymbolicRun], Any]:
    """ROL/ROR == rotation by (masked count mod w) (Z3's own rotate); CF = LSB/MSB of the result;
    OF (count 1) = MSB(r) XOR CF / XOR of the two top bits; only CF and OF change."""

    def claim(run: SymbolicRun) -> Any:
        a = low(run.inputs["rbx"], w)
        n = _count(run, w)
        k = z3.URem(n, w)
        r = z3.RotateLeft(a, k) if op == "ROL" else z3.RotateRight(a, k)
        cf = bit(r, 0) if op == "ROL" else msb(r, w)
        of1 = z3.Xor(msb(r, w), cf) if op == "ROL" else z3.Xor(msb(r, w), bit(r, w - 2))
        nz = n != 0
        return z3.And(
            dest_reg(run, w, r),
            _zero_count_claim(run, w, n),
            z3.Implies(nz, run.flag(F.CF) == cf),
            z3.Implies(n == 1, run.flag(F.OF) == of1),
            unchanged(run, (F.SF, F.ZF, F.AF, F.PF)),
            undefined_exactly(run, {F.OF: z3.And(nz, n != 1)}),
        )

    return claim


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("op", ["RCL", "RCR"])
def test_rcl_rcr_definitions(op: str, w: int) -> None:
    prove_paths(shift_cl(op, w), rc_claim(op, w), min_paths=3)


def rc_claim(op: str, w: int) -> Callable[[SymbolicRun], Any]:
    """RCL/RCR == rotation of the (w+1)-bit ring CF:DEST by (masked count) mod (w+1)
    -- the SDM's MOD 9 / MOD 17 for 8/16 bits; OF (count 1) = MSB(r) XOR CF (RCL) or
    MSB(DEST) XOR old CF (RCR); only CF and OF change."""

    def claim(run: SymbolicRun) -> Any:
        a = low(run.inputs["rbx"], w)
        cf0 = run.inputs["CF"]
        n = _count(run, w)
        ring = z3.Concat(z3.If(cf0, z3.BitVecVal(1, 1), z3.BitVecVal(0, 1)), a)
        k = z3.URem(z3.ZeroExt(1, n), w + 1)
        t = z3.RotateLeft(ring, k) if op == "RCL" else z3.RotateRight(ring, k)
        r = low(t, w)
        cf = bit(t, w)
        of1 = z3.Xor(msb(r, w), cf) if op == "RCL" else z3.Xor(msb(a, w), cf0)
        nz = n != 0
        return z3.And(
            dest_reg(run, w, r),
            _zero_count_claim(run, w, n),
            z3.Implies(nz, run.flag(F.CF) == cf),
            z3.Implies(n == 1, run.flag(F.OF) == of1),
            unchanged(run, (F.SF, F.ZF, F.AF, F.PF)),
            undefined_exactly(run, {F.OF: z3.And(nz, n != 1)}),
        )

    return claim


@pytest.mark.parametrize("w", (16, 32, 64))
@pytest.mark.parametrize("left", [True, False], ids=["SHLD", "SHRD"])
def test_shld_shrd_definitions(left: bool, w: int) -> None:
    prove_paths(double_cl(left, w), double_claim(left, w), min_paths=3)


def double_claim(left: bool, w: int) -> Callable[[SymbolicRun], Any]:
    """SHLD/SHRD for 1 <= n <= w: r = (DEST << n) | (SRC >> (w - n)) (resp. mirrored); CF = last bit of
    DEST shifted out; OF (n == 1) = sign change; SF/ZF/PF from r; AF undefined; n > w (16-bit only):
    all six flags undefined; n == 0: nothing changes."""

    def claim(run: SymbolicRun) -> Any:
        a, b = low(run.inputs["rbx"], w), low(run.inputs["rdx"], w)
        n = _count(run, w)
        wn = z3.BitVecVal(w, w) - n
        if left:
            r = (a << n) | z3.LShR(b, wn)
            last = bit(a, wn, w)
        else:
            r = z3.LShR(a, n) | (b << wn)
            last = bit(a, n - 1, w)
        ok = z3.And(n != 0, z3.ULE(n, w))
        return z3.And(
            _zero_count_claim(run, w, n),
            z3.Implies(ok, z3.And(dest_reg(run, w, r), run.flag(F.CF) == last, run.flag(F.SF) == msb(r, w),
                                  run.flag(F.ZF) == (r == 0), run.flag(F.PF) == even_parity(r))),
            z3.Implies(n == 1, run.flag(F.OF) == z3.Xor(msb(r, w), msb(a, w))),
            undefined_exactly(run, {
                F.AF: n != 0, F.OF: z3.And(n != 0, n != 1),
                F.CF: z3.UGT(n, w), F.SF: z3.UGT(n, w), F.ZF: z3.UGT(n, w), F.PF: z3.UGT(n, w),
            }),
        )

    return claim


@pytest.mark.parametrize("mode", OTHER_MODES)
def test_shift_definitions_in_other_modes(mode: str) -> None:
    """The same claims through the 16/32-bit encodings of real mode and 16/32-bit protected mode
    (where 66 selects the non-default operand size)."""
    for w in (8, 16, 32):
        for op in CROSS_MODE_OPS:
            claim = {"SHL": shift_claim, "SAR": shift_claim, "ROR": rol_ror_claim, "RCL": rc_claim}[op](op, w)
            prove_paths(shift_cl(op, w, mode), claim, min_paths=3, mode=mode)
        if w > 8:
            prove_paths(double_cl(True, w, mode), double_claim(True, w), min_paths=3, mode=mode)


# -- multiply ---------------------------------------------------------------------------------------

def _wide_result(run: SymbolicRun, w: int) -> tuple[Any, Any, Any]:
    """(high, low, claim that nothing else changed) of the implicit AH:AL / rDX:rAX destination."""
    rax, rdx = run.inputs["rax"], run.inputs["rdx"]
    if w == 8:
        ax = run.reg("rax", 16)
        keep = z3.And(z3.Extract(63, 16, run.reg("rax")) == z3.Extract(63, 16, rax), run.reg("rdx") == rdx)
        return z3.Extract(15, 8, ax), z3.Extract(7, 0, ax), keep
    hi, lo = run.reg("rdx", w), run.reg("rax", w)
    if w == 32:  # 32-bit writes zero-extend both registers
        keep = z3.And(z3.Extract(63, 32, run.reg("rax")) == 0, z3.Extract(63, 32, run.reg("rdx")) == 0)
    elif w == 16:
        keep = z3.And(z3.Extract(63, 16, run.reg("rax")) == z3.Extract(63, 16, rax),
                      z3.Extract(63, 16, run.reg("rdx")) == z3.Extract(63, 16, rdx))
    else:
        keep = z3.BoolVal(True)
    return hi, lo, keep


def _mul_flags(run: SymbolicRun, cf: Any) -> Any:
    return z3.And(run.flag(F.CF) == cf, run.flag(F.OF) == cf, unchanged(run, (F.SF, F.ZF, F.AF, F.PF)),
                  z3.BoolVal(run.state.undefined == (1 << F.SF | 1 << F.ZF | 1 << F.AF | 1 << F.PF)))


@pytest.mark.parametrize("w", (8, 16, 32))
def test_mul_definition(w: int) -> None:
    """MUL: AH:AL / rDX:rAX == zext(rAX) * zext(src); CF = OF iff the product exceeds 2^w - 1."""

    def claim(run: SymbolicRun) -> Any:
        a, b = low(run.inputs["rax"], w), low(run.inputs["rbx"], w)
        hi, lo, keep = _wide_result(run, w)
        p = z3.ZeroExt(w, a) * z3.ZeroExt(w, b)
        return z3.And(z3.Concat(hi, lo) == p, keep, _mul_flags(run, z3.UGT(p, (1 << w) - 1)))

    assert prove_paths(group3("MUL", w), claim) == 1


@pytest.mark.parametrize("w", (8, 16, 32))
def test_imul_one_operand_definition(w: int) -> None:
    """IMUL r/m: the 2w-bit signed product; CF = OF iff it lies outside [-2^(w-1), 2^(w-1) - 1]."""

    def claim(run: SymbolicRun) -> Any:
        a, b = low(run.inputs["rax"], w), low(run.inputs["rbx"], w)
        hi, lo, keep = _wide_result(run, w)
        p = z3.SignExt(w, a) * z3.SignExt(w, b)
        fits = z3.And(p >= -(1 << (w - 1)), p <= (1 << (w - 1)) - 1)
        return z3.And(z3.Concat(hi, lo) == p, keep, _mul_flags(run, z3.Not(fits)))

    assert prove_paths(group3("IMUL", w), claim) == 1


@pytest.mark.parametrize("w", (16, 32))
def test_imul_two_operand_definition(w: int) -> None:
    """IMUL r, r/m (0F AF): DEST = low w bits of the product; CF = OF iff the signed product was truncated."""
    code = bytes.fromhex("66" if w == 16 else "") + bytes.fromhex("0fafd3")

    def claim(run: SymbolicRun) -> Any:
        a, b = low(run.inputs["rdx"], w), low(run.inputs["rbx"], w)
        p = z3.SignExt(w, a) * z3.SignExt(w, b)
        fits = z3.And(p >= -(1 << (w - 1)), p <= (1 << (w - 1)) - 1)
        rdx = run.reg("rdx")
        want = z3.ZeroExt(32, a * b) if w == 32 else z3.Concat(z3.Extract(63, 16, run.inputs["rdx"]), a * b)
        return z3.And(rdx == want, _mul_flags(run, z3.Not(fits)))

    prove_paths(code, claim)


# -- divide -------------------------------------------------------------------------------------------

def _dividend(run: SymbolicRun, w: int) -> Any:
    rax, rdx = run.inputs["rax"], run.inputs["rdx"]
    return z3.Extract(15, 0, rax) if w == 8 else z3.Concat(low(rdx, w), low(rax, w))


def _div_claim(run: SymbolicRun, should_fault: Any, ok: Callable[[Any, Any], Any], w: int) -> Any:
    """Faults exactly when ``should_fault`` (with #DE), else ``ok(q, r)`` holds and all flags are undefined
    (values unchanged); a faulting path writes nothing (the CPU rolls back; here: nothing was written)."""
    if run.fault is not None:
        assert run.fault.vector == Vector.DE
        untouched = z3.And([run.reg(r) == run.inputs[r] for r in ("rax", "rdx", "rbx")])
        return z3.And(should_fault, untouched, unchanged(run, STATUS), z3.BoolVal(run.state.undefined == 0))
    hi, lo, keep = _wide_result(run, w)
    return z3.And(z3.Not(should_fault), ok(lo, hi), keep, unchanged(run, STATUS),
                  z3.BoolVal(run.state.undefined == F.STATUS_MASK))


@pytest.mark.parametrize("w", (8, 16))
def test_div_definition(w: int) -> None:
    """DIV: #DE iff divisor = 0 or the quotient dividend / divisor is >= 2^w; otherwise the quotient is the
    *untruncated* integer quotient of the full 2w-bit dividend, the remainder is the integer remainder,
    and r < d.  (The spec tests "high half >= divisor"; this proves it equals the manual's "temp > FFH...".)
    """

    def claim(run: SymbolicRun) -> Any:
        n, d = _dividend(run, w), low(run.inputs["rbx"], w)
        dz = z3.ZeroExt(w, d)
        overflow = z3.And(d != 0, z3.UGT(z3.UDiv(n, dz), (1 << w) - 1))

        def ok(q: Any, r: Any) -> Any:
            return z3.And(z3.ZeroExt(w, q) == z3.UDiv(n, dz), z3.ZeroExt(w, r) == z3.URem(n, dz), z3.ULT(r, d))

        return _div_claim(run, z3.Or(d == 0, overflow), ok, w)

    assert prove_paths(group3("DIV", w), claim, min_paths=3) == 3


@pytest.mark.parametrize("w", (8, 16))
def test_idiv_definition(w: int) -> None:
    """IDIV: #DE iff divisor = 0 or the signed quotient of the full 2w-bit dividend is outside
    [-2^(w-1), 2^(w-1) - 1]; otherwise q is that quotient (truncated toward zero, not truncated in
    width), r the remainder, |r| < |d|, and r is 0 or has the dividend's sign.

    The reference quotient is SMT-LIB bvsdiv at 2w bits.  It wraps only for -2^(2w-1) / -1, where it
    yields -2^(2w-1) -- also outside the w-bit range, so the fault condition stays exact.  (A reference
    2 bits wider avoids even that wrap but makes Z3 prove two different dividers equal: > 30 s.)
    """

    def claim(run: SymbolicRun) -> Any:
        n, d = _dividend(run, w), low(run.inputs["rbx"], w)
        W = 2 * w
        dW = z3.SignExt(w, d)
        exact_q, exact_r = n / dW, z3.SRem(n, dW)  # SMT-LIB bvsdiv/bvsrem: truncation toward zero
        overflow = z3.And(d != 0, z3.Or(exact_q < -(1 << (w - 1)), exact_q > (1 << (w - 1)) - 1))

        def ok(q: Any, r: Any) -> Any:
            rW = z3.SignExt(W - w, r)
            return z3.And(z3.SignExt(W - w, q) == exact_q, rW == exact_r,
                          z3.ULT(z3.If(rW < 0, -rW, rW), z3.If(dW < 0, -dW, dW)),
                          z3.Or(r == 0, (r < 0) == (n < 0)))

        return _div_claim(run, z3.Or(d == 0, overflow), ok, w)

    assert prove_paths(group3("IDIV", w), claim, min_paths=3) == 3
