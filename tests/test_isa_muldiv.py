"""MUL, IMUL (one, two and three operands), DIV, IDIV (spec/isa/muldiv.py) against plain-int references.

Encodings are checked with capstone first.  Register operands: the explicit
source is rBX (BL/BX/EBX/RBX); the two/three-operand IMUL destination is rDX.
"""

from __future__ import annotations

import capstone
import pytest
from conftest import flag, reg, run_code
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.faults import Vector
from spec.machine import BITS, CODE, MODES
from spec.state import MachineState

STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
GROUP3 = {"MUL": 4, "IMUL": 5, "DIV": 6, "IDIV": 7}
REGS = {8: "bl", 16: "bx", 32: "ebx", 64: "rbx"}
DREG = {16: "dx", 32: "edx", 64: "rdx"}


def widths(mode: str) -> tuple[int, ...]:
    return (8, 16, 32, 64) if mode == "long64" else (8, 16, 32)


def size_prefix(mode: str, w: int) -> bytes:
    bits = BITS[mode]
    if w == 64:
        return b"\x48"
    if w in (16, 32) and w != (16 if bits == 16 else 32):
        return b"\x66"
    return b""


def enc_group3(mode: str, op: str, w: int) -> bytes:
    """``MUL/IMUL/DIV/IDIV r/m`` (F6/F7 /4../7) with rBX as the operand."""
    return size_prefix(mode, w) + bytes([0xF6 if w == 8 else 0xF7, 0xC0 | GROUP3[op] << 3 | 3])


def enc_imul2(mode: str, w: int) -> bytes:
    """``IMUL rDX, rBX`` (0F AF /r)."""
    return size_prefix(mode, w) + b"\x0f\xaf\xd3"


def enc_imul3(mode: str, w: int, imm: int, short: bool) -> bytes:
    """``IMUL rDX, rBX, imm`` -- 6B /r ib (imm8 sign-extended) or 69 /r iz (imm16/imm32, sign-extended for 64)."""
    if short:
        return size_prefix(mode, w) + b"\x6b\xd3" + bytes([imm & 0xFF])
    n = 2 if w == 16 else 4
    return size_prefix(mode, w) + b"\x69\xd3" + (imm & ((1 << (8 * n)) - 1)).to_bytes(n, "little")


def disasm(mode: str, code: bytes) -> str:
    md = capstone.Cs(capstone.CS_ARCH_X86, CS_MODE[BITS[mode]])
    insns = list(md.disasm(code, 0))
    assert len(insns) == 1 and insns[0].size == len(code), code.hex()
    return f"{insns[0].mnemonic} {insns[0].op_str}"


def test_encodings_match_capstone() -> None:
    for mode in MODES:
        for w in widths(mode):
            for op in GROUP3:
                assert disasm(mode, enc_group3(mode, op, w)) == f"{op.lower()} {REGS[w]}"
            if w == 8:
                continue
            assert disasm(mode, enc_imul2(mode, w)) == f"imul {DREG[w]}, {REGS[w]}"
            assert disasm(mode, enc_imul3(mode, w, -2, True)) == f"imul {DREG[w]}, {REGS[w]}, -2"
            assert disasm(mode, enc_imul3(mode, w, 0x1234, False)) == f"imul {DREG[w]}, {REGS[w]}, 0x1234"


# -- references (plain ints) ------------------------------------------------------------------------

def signed(v: int, w: int) -> int:
    return v - (1 << w) if v >> (w - 1) & 1 else v


def put(old: int, w: int, v: int) -> int:
    """A register after writing ``v`` to its ``w``-bit part (32-bit writes zero-extend)."""
    return v if w >= 32 else (old & ~((1 << w) - 1)) | v


def ref_wide(op: str, w: int, rax: int, rdx: int, src: int) -> tuple[int, int] | None:
    """New (rax, rdx) after one-operand MUL/IMUL/DIV/IDIV, or None for #DE (SDM Vol. 2 MUL/IMUL/DIV/IDIV)."""
    m = (1 << w) - 1
    if w == 8:
        lo, hi = rax & 0xFF, (rax >> 8) & 0xFF
    else:
        lo, hi = rax & m, rdx & m
    if op in ("MUL", "IMUL"):
        p = lo * src if op == "MUL" else signed(lo, w) * signed(src, w)
        p &= (1 << 2 * w) - 1
        new_lo, new_hi = p & m, p >> w
    else:
        n = hi << w | lo
        if src == 0:
            return None
        if op == "DIV":
            q, r = divmod(n, src)
            if q > m:
                return None
        else:
            sn, sd = signed(n, 2 * w), signed(src, w)
            q = abs(sn) // abs(sd) * (1 if (sn < 0) == (sd < 0) else -1)  # truncate toward zero
            r = sn - q * sd
            if not -(1 << (w - 1)) <= q < 1 << (w - 1):
                return None
        new_lo, new_hi = q & m, r & m
    if w == 8:
        return put(rax, 16, new_hi << 8 | new_lo), rdx
    return put(rax, w, new_lo), put(rdx, w, new_hi)


def mul_cf(op: str, w: int, a: int, b: int) -> bool:
    """CF = OF: MUL -- upper half nonzero; IMUL -- signed product does not fit w bits."""
    if op == "MUL":
        return (a * b) >> w != 0
    p = signed(a, w) * signed(b, w)
    return not -(1 << (w - 1)) <= p < 1 << (w - 1)


# -- strategies ---------------------------------------------------------------------------------------

def reg_value(mode: str) -> st.SearchStrategy[int]:
    top = 64 if mode == "long64" else 32
    edge = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
    if top == 64:
        edge += [(1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    return st.one_of(st.integers(0, (1 << top) - 1), st.sampled_from(edge))


status_bits = st.fixed_dictionaries({f: st.booleans() for f in STATUS})


def rflags_of(bits: dict[int, bool]) -> int:
    return sum(1 << f for f, b in bits.items() if b)


def unchanged(s: MachineState, fl: dict[int, bool], which: tuple[int, ...]) -> None:
    for f in which:
        assert flag(s, f) == fl[f], F.NAMES[f]


# -- properties -----------------------------------------------------------------------------------------

@settings(max_examples=400)
@given(data=st.data(), op=st.sampled_from(tuple(GROUP3)), fl=status_bits)
def test_one_operand_forms_match_reference(data: st.DataObject, op: str, fl: dict[int, bool]) -> None:
    """MUL/IMUL/DIV/IDIV r/m (F6/F7 /4-/7), every mode and operand size, including #DE."""
    mode = data.draw(st.sampled_from(MODES))
    w = data.draw(st.sampled_from(widths(mode)))
    rax, rdx, rbx = (data.draw(reg_value(mode)) for _ in range(3))
    m = (1 << w) - 1
    if op in ("DIV", "IDIV") and data.draw(st.booleans()):
        # Mostly-valid divisions: build the dividend from a quotient and remainder in range.
        d = data.draw(st.integers(1, m))
        if op == "DIV":
            q, r = data.draw(st.integers(0, m)), data.draw(st.integers(0, d - 1))
            n = q * d + r
        else:
            sd = signed(d, w)
            q = data.draw(st.integers(-(1 << (w - 1)), (1 << (w - 1)) - 1))
            r = data.draw(st.integers(0, abs(sd) - 1))
            n = q * sd + (r if q * sd >= 0 else -r)
            n &= (1 << 2 * w) - 1
        rbx = (rbx & ~m) | d
        if w == 8:
            rax = (rax & ~0xFFFF) | n
        else:
            rax, rdx = (rax & ~m) | (n & m), (rdx & ~m) | (n >> w)
    s, ev = run_code(mode, enc_group3(mode, op, w), rax=rax, rdx=rdx, rbx=rbx, flags=rflags_of(fl))
    want = ref_wide(op, w, rax, rdx, rbx & m)
    if want is None:
        # #DE is a fault: RIP at the instruction, nothing written (SDM Vol. 3A 6.5, Table 6-1).
        assert ev.kind == "fault" and ev.vector == Vector.DE and ev.rip == CODE, ev
        assert (reg(s, "rax"), reg(s, "rdx")) == (rax, rdx)
        unchanged(s, fl, STATUS)
        assert s.undefined == 0
        return
    assert ev.kind == "halted", ev
    assert (reg(s, "rax"), reg(s, "rdx"), reg(s, "rbx")) == (*want, rbx)
    if op in ("MUL", "IMUL"):
        a = rax & m
        cf = mul_cf(op, w, a, rbx & m)
        assert flag(s, F.CF) == cf and flag(s, F.OF) == cf
        unchanged(s, fl, (F.SF, F.ZF, F.AF, F.PF))  # undefined; left unchanged as on AMD
        assert s.undefined == 1 << F.SF | 1 << F.ZF | 1 << F.AF | 1 << F.PF
    else:
        unchanged(s, fl, STATUS)  # all undefined; the spec leaves them unchanged
        assert s.undefined == F.STATUS_MASK


@settings(max_examples=300)
@given(data=st.data(), form=st.sampled_from(("2", "3b", "3z")), fl=status_bits)
def test_imul_two_and_three_operand_forms(data: st.DataObject, form: str, fl: dict[int, bool]) -> None:
    """IMUL r, r/m (0F AF) and IMUL r, r/m, imm (6B ib, 69 iz): truncated product, CF = OF = truncation.

    SDM Vol. 2A IMUL: the immediate is sign-extended to the operand size (imm32 for 64-bit).
    """
    mode = data.draw(st.sampled_from(MODES))
    w = data.draw(st.sampled_from(widths(mode)[1:]))
    m = (1 << w) - 1
    rdx, rbx = data.draw(reg_value(mode)), data.draw(reg_value(mode))
    if form == "2":
        code = enc_imul2(mode, w)
        a, b = rdx & m, rbx & m
    else:
        short = form == "3b"
        ibits = 8 if short else min(w, 32)
        imm = data.draw(st.integers(-(1 << (ibits - 1)), (1 << (ibits - 1)) - 1))
        code = enc_imul3(mode, w, imm, short)
        a, b = rbx & m, imm & m
    s, ev = run_code(mode, code, rdx=rdx, rbx=rbx, flags=rflags_of(fl))
    assert ev.kind == "halted", ev
    assert reg(s, "rdx") == put(rdx, w, (signed(a, w) * signed(b, w)) & m)
    assert reg(s, "rbx") == rbx
    cf = mul_cf("IMUL", w, a, b)
    assert flag(s, F.CF) == cf and flag(s, F.OF) == cf
    unchanged(s, fl, (F.SF, F.ZF, F.AF, F.PF))
    assert s.undefined == 1 << F.SF | 1 << F.ZF | 1 << F.AF | 1 << F.PF


# -- named edge cases -------------------------------------------------------------------------------

def de(mode: str, code: bytes, **regs: int) -> None:
    s, ev = run_code(mode, code, **regs)
    assert ev.kind == "fault" and ev.vector == Vector.DE and ev.rip == CODE, ev
    for k, v in regs.items():
        assert reg(s, k) == v


@pytest.mark.parametrize("mode", MODES)
def test_divide_by_zero(mode: str) -> None:
    """SDM Vol. 2A DIV/IDIV: #DE if the source operand (divisor) is 0."""
    for w in widths(mode):
        for op in ("DIV", "IDIV"):
            de(mode, enc_group3(mode, op, w), rax=5, rdx=0, rbx=0)


@pytest.mark.parametrize("mode", MODES)
def test_quotient_overflow(mode: str) -> None:
    """SDM Vol. 2A DIV: #DE if the quotient is too large for the destination (temp > FFH/FFFFH/...)."""
    for w in widths(mode):
        m = (1 << w) - 1
        code = enc_group3(mode, "DIV", w)
        if w == 8:
            de(mode, code, rax=0x100, rbx=1)  # 0x100 / 1 = 0x100 > FFH
            s, ev = run_code(mode, code, rax=0xFF, rbx=1)
            assert ev.kind == "halted" and reg(s, "rax") == 0xFF
        else:
            de(mode, code, rax=0, rdx=3, rbx=3)  # high half == divisor: quotient = 2^w
            s, ev = run_code(mode, code, rax=m, rdx=2, rbx=3)  # (3 * 2^w - 1) / 3 = 2^w - 1 rem 2
            assert ev.kind == "halted" and reg(s, "rax") == m and reg(s, "rdx") == 2


@pytest.mark.parametrize("mode", MODES)
def test_idiv_signed_overflow(mode: str) -> None:
    """SDM Vol. 2A IDIV: #DE if the quotient is outside the signed range; -2^(2w-1) / -1 and -2^w / -1.

    -2^w / -2 = 2^(w-1) does not fit either, while -2^w / 2 = -2^(w-1) fits exactly.
    """
    for w in widths(mode):
        m = (1 << w) - 1
        code = enc_group3(mode, "IDIV", w)
        if w == 8:
            de(mode, code, rax=0x8000, rbx=0xFF)  # -32768 / -1
            de(mode, code, rax=0xFF80, rbx=0xFF)  # -128 / -1 = 128
            de(mode, code, rax=0xFF00, rbx=0xFE)  # -256 / -2 = 128
            s, ev = run_code(mode, code, rax=0xFF00, rbx=2)  # -256 / 2 = -128
            assert ev.kind == "halted" and reg(s, "rax") == 0x0080
        else:
            de(mode, code, rax=0, rdx=1 << (w - 1), rbx=m)  # -2^(2w-1) / -1
            de(mode, code, rax=1 << (w - 1), rdx=m, rbx=m)  # -2^(w-1) / -1 = 2^(w-1)
            s, ev = run_code(mode, code, rax=0, rdx=m, rbx=2)  # -2^w / 2 = -2^(w-1), remainder 0
            assert ev.kind == "halted" and reg(s, "rax") & m == 1 << (w - 1) and reg(s, "rdx") & m == 0


@pytest.mark.parametrize("mode", MODES)
def test_idiv_rounds_toward_zero(mode: str) -> None:
    """SDM Vol. 2A IDIV: the quotient is truncated toward zero; the remainder has the dividend's sign."""
    s, ev = run_code(mode, enc_group3(mode, "IDIV", 8), rax=(-7) & 0xFFFF, rbx=2)
    assert ev.kind == "halted"
    assert reg(s, "rax") & 0xFF == (-3) & 0xFF and reg(s, "rax") >> 8 & 0xFF == (-1) & 0xFF
    s, ev = run_code(mode, enc_group3(mode, "IDIV", 16), rax=7, rdx=0, rbx=(-2) & 0xFFFF)
    assert reg(s, "rax") & 0xFFFF == (-3) & 0xFFFF and reg(s, "rdx") & 0xFFFF == 1


@pytest.mark.parametrize("mode", MODES)
def test_8bit_forms_use_ax_only(mode: str) -> None:
    """MUL r/m8: AX = AL * src; DIV r/m8: AL = quotient, AH = remainder; DX is never touched."""
    s, _ = run_code(mode, enc_group3(mode, "MUL", 8), rax=0xABCD_0010, rdx=0x5555, rbx=0x20)
    assert reg(s, "rax") == 0xABCD_0200 and reg(s, "rdx") == 0x5555
    assert flag(s, F.CF) and flag(s, F.OF)  # AH = 2 is significant
    s, _ = run_code(mode, enc_group3(mode, "DIV", 8), rax=0xABCD_0107, rdx=0x5555, rbx=0x10)
    assert reg(s, "rax") == 0xABCD_0710 and reg(s, "rdx") == 0x5555  # 263 = 16 * 16 + 7


def test_32bit_results_zero_extend_in_64bit_mode() -> None:
    """SDM Vol. 1 3.4.1.1: EAX and EDX written by 32-bit MUL/DIV are zero-extended (both of them)."""
    hi = 0xFFFF_FFFF_0000_0000
    s, _ = run_code("long64", enc_group3("long64", "MUL", 32), rax=hi | 2, rdx=hi | 7, rbx=hi | 3)
    assert reg(s, "rax") == 6 and reg(s, "rdx") == 0 and not flag(s, F.CF)
    s, _ = run_code("long64", enc_group3("long64", "DIV", 32), rax=hi | 7, rdx=hi, rbx=2)
    assert reg(s, "rax") == 3 and reg(s, "rdx") == 1
    s, _ = run_code("long64", enc_imul2("long64", 32), rdx=hi | 0xFFFF_FFFF, rbx=hi | 0xFFFF_FFFF)
    assert reg(s, "rdx") == 1 and not flag(s, F.CF)  # (-1) * (-1) = 1 fits


def test_64bit_forms() -> None:
    """RDX:RAX = RAX * r/m64 (MUL/IMUL) and RDX:RAX / r/m64 (DIV/IDIV), with REX.W."""
    m = (1 << 64) - 1
    s, _ = run_code("long64", enc_group3("long64", "MUL", 64), rax=m, rbx=m)
    assert reg(s, "rax") == 1 and reg(s, "rdx") == m - 1 and flag(s, F.CF)
    s, _ = run_code("long64", enc_group3("long64", "IMUL", 64), rax=m, rbx=m)  # (-1) * (-1)
    assert reg(s, "rax") == 1 and reg(s, "rdx") == 0 and not flag(s, F.CF)
    s, _ = run_code("long64", enc_group3("long64", "DIV", 64), rax=5, rdx=1, rbx=1 << 63)
    assert reg(s, "rax") == 2 and reg(s, "rdx") == 5
    s, _ = run_code("long64", enc_imul3("long64", 64, -1, False), rbx=5)  # imm32 sign-extended to 64
    assert reg(s, "rdx") == m - 4


@pytest.mark.parametrize("mode", MODES)
def test_mul_imul_leave_sf_zf_af_pf_unchanged(mode: str) -> None:
    """SDM: SF, ZF, AF, PF undefined after MUL/IMUL; the spec keeps them, as AMD does (ORACLES.md)."""
    for fl in (0, 1 << F.SF | 1 << F.ZF | 1 << F.AF | 1 << F.PF):
        for code in (enc_group3(mode, "MUL", 16), enc_group3(mode, "IMUL", 32), enc_imul2(mode, 16)):
            s, _ = run_code(mode, code, rax=0, rbx=0, rdx=0, flags=fl | 1 << F.CF | 1 << F.OF)
            for f in (F.SF, F.ZF, F.AF, F.PF):
                assert flag(s, f) == bool(fl >> f & 1)
                assert s.undefined >> f & 1
            assert not flag(s, F.CF) and not flag(s, F.OF)  # 0 * 0: upper half not significant


@pytest.mark.parametrize("mode", MODES)
def test_imul_one_operand_sign_extension_is_not_overflow(mode: str) -> None:
    """IMUL r/m: CF = OF = 0 when the upper half is only the sign extension of the lower half."""
    s, _ = run_code(mode, enc_group3(mode, "IMUL", 8), rax=0xFF, rbx=0x7F)  # -1 * 127 = -127
    assert reg(s, "rax") & 0xFFFF == (-127) & 0xFFFF and not flag(s, F.CF)
    s, _ = run_code(mode, enc_group3(mode, "IMUL", 8), rax=0x80, rbx=0xFF)  # -128 * -1 = 128
    assert reg(s, "rax") & 0xFFFF == 0x0080 and flag(s, F.CF) and flag(s, F.OF)


@pytest.mark.parametrize("mode", MODES)
def test_memory_source(mode: str) -> None:
    """DIV/MUL with a memory operand: F7 /6 with [bx] (16-bit addressing) or [ebx]/[rbx]."""
    addr = 0x6000
    modrm = 0x37 if BITS[mode] == 16 else 0x33  # /6, [bx] or [ebx]/[rbx]
    code = size_prefix(mode, 32) + bytes([0xF7, modrm])
    assert disasm(mode, code).startswith("div dword ptr [")
    s, ev = run_code(mode, code, rax=100, rdx=0, rbx=addr, mem={addr: (7).to_bytes(4, "little")})
    assert ev.kind == "halted" and reg(s, "rax") == 14 and reg(s, "rdx") == 2
    s, ev = run_code(mode, code, rax=100, rdx=0, rbx=addr, mem={addr: bytes(4)})
    assert ev.kind == "fault" and ev.vector == Vector.DE
