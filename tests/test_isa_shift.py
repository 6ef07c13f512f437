"""Shifts and rotates (spec/isa/shift.py) against an independent bit-loop reference.

The reference below follows the manuals' "Operation" pseudocode one bit at a
time (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR, SHLD, SHRD), with plain
Python ints; the spec computes closed forms through the domain.  Every
encoding the tests build is checked against capstone first.
"""

from __future__ import annotations

import capstone
import pytest
from conftest import flag, reg, run_code
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.machine import BITS, MODES
from spec.state import MachineState

STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
DIGIT = {"ROL": 0, "ROR": 1, "RCL": 2, "RCR": 3, "SHL": 4, "SHR": 5, "SAL": 6, "SAR": 7}
OPS = tuple(DIGIT)
FORMS = ("1", "CL", "Ib")
CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}


def widths(mode: str) -> tuple[int, ...]:
    return (8, 16, 32, 64) if mode == "long64" else (8, 16, 32)


def size_prefix(mode: str, w: int) -> bytes:
    """66 / REX.W needed for operand size ``w`` in ``mode`` (SDM Vol. 2A 2.2.1.2, Table 3-4)."""
    bits = BITS[mode]
    if w == 64:
        return b"\x48"
    if w in (16, 32) and w != (16 if bits == 16 else 32):
        return b"\x66"
    return b""


def enc_shift(mode: str, op: str, w: int, form: str, count: int = 0, rm: int = 3) -> bytes:
    """``op rm, 1|CL|imm8`` with a register destination (rm 3 = BL/BX/EBX/RBX, 4 = AH for 8 bits)."""
    base = {"1": 0xD0, "CL": 0xD2, "Ib": 0xC0}[form] + (0 if w == 8 else 1)
    code = size_prefix(mode, w) + bytes([base, 0xC0 | DIGIT[op] << 3 | rm])
    return code + (bytes([count & 0xFF]) if form == "Ib" else b"")


def enc_double(mode: str, left: bool, w: int, form: str, count: int = 0) -> bytes:
    """``SHLD/SHRD rBX, rDX, imm8|CL``."""
    op = (0xA4 if left else 0xAC) + (1 if form == "CL" else 0)
    code = size_prefix(mode, w) + bytes([0x0F, op, 0xD3])
    return code + (bytes([count & 0xFF]) if form == "Ib" else b"")


def disasm(mode: str, code: bytes) -> str:
    md = capstone.Cs(capstone.CS_ARCH_X86, CS_MODE[BITS[mode]])
    insns = list(md.disasm(code, 0))
    assert len(insns) == 1 and insns[0].size == len(code), code.hex()
    return f"{insns[0].mnemonic} {insns[0].op_str}"


REGS = {8: "bl", 16: "bx", 32: "ebx", 64: "rbx"}
SRC = {16: "dx", 32: "edx", 64: "rdx"}


def test_encodings_match_capstone() -> None:
    for mode in MODES:
        for w in widths(mode):
            for op in OPS:
                for form in FORMS:
                    text = disasm(mode, enc_shift(mode, op, w, form, 5))
                    cnt = {"1": "1", "CL": "cl", "Ib": "5"}[form]
                    assert text == f"{op.lower()} {REGS[w]}, {cnt}", (mode, op, w, form, text)
            if w != 8:
                for left in (True, False):
                    for form in ("CL", "Ib"):
                        text = disasm(mode, enc_double(mode, left, w, form, 5))
                        cnt = "cl" if form == "CL" else "5"
                        name = "shld" if left else "shrd"
                        assert text == f"{name} {REGS[w]}, {SRC[w]}, {cnt}", (mode, w, text)


# -- the reference ------------------------------------------------------------------------------

def parity(v: int) -> bool:
    return bin(v & 0xFF).count("1") % 2 == 0


def ref_shift(op: str, w: int, a: int, raw: int, cf_in: bool) -> tuple[int, dict[int, bool], set[int]]:
    """Result, defined flags (others unchanged) and undefined flags, by the SDM's bit loops."""
    m = (1 << w) - 1
    msb = 1 << (w - 1)
    cnt = raw & (0x3F if w == 64 else 0x1F)
    if cnt == 0:
        return a, {}, set()
    if op in ("ROL", "ROR"):
        t = cnt % w
    elif op in ("RCL", "RCR"):
        t = cnt % (w + 1)  # the SDM's MOD 9 / MOD 17; a no-op for 32/64 bits (cnt <= w)
    else:
        t = cnt
    d, cf = a, cf_in
    for _ in range(t):
        if op in ("SHL", "SAL"):
            cf, d = bool(d & msb), (d << 1) & m
        elif op == "SHR":
            cf, d = bool(d & 1), d >> 1
        elif op == "SAR":
            cf, d = bool(d & 1), (d >> 1) | (d & msb)
        elif op == "ROL":
            d = ((d << 1) | (d >> (w - 1))) & m
        elif op == "ROR":
            d = (d >> 1) | ((d & 1) << (w - 1))
        elif op == "RCL":
            cf, d = bool(d & msb), ((d << 1) | cf) & m
        else:  # RCR
            cf, d = bool(d & 1), (d >> 1) | (int(cf) << (w - 1))
    if op == "ROL":
        cf = bool(d & 1)
    elif op == "ROR":
        cf = bool(d & msb)
    flags = {F.CF: cf}
    undef: set[int] = set()
    top = bool(d & msb)
    if cnt == 1:
        flags[F.OF] = {
            "SHL": top != cf, "SAL": top != cf, "SHR": bool(a & msb), "SAR": False,
            "ROL": top != cf, "ROR": top != bool(d & (msb >> 1)),
            "RCL": top != cf, "RCR": bool(a & msb) != cf_in,
        }[op]
    else:
        undef.add(F.OF)
    if op in ("SHL", "SAL", "SHR", "SAR"):
        flags.update({F.SF: top, F.ZF: d == 0, F.PF: parity(d)})
        undef.add(F.AF)
        if op != "SAR" and cnt >= w:
            undef.add(F.CF)
    for f in undef:
        flags.pop(f, None)
    return d, flags, undef


def ref_double(left: bool, w: int, dest: int, src: int, raw: int) -> tuple[int | None, dict[int, bool], set[int]]:
    """SHLD/SHRD by the SDM loops; result ``None`` when the manual leaves it undefined (count > size)."""
    cnt = raw & (0x3F if w == 64 else 0x1F)
    if cnt == 0:
        return dest, {}, set()
    if cnt > w:
        return None, {}, set(STATUS)

    def bit(v: int, i: int) -> int:
        return (v >> i) & 1

    d = 0
    if left:
        cf = bit(dest, w - cnt)
        for i in range(w - 1, cnt - 1, -1):
            d |= bit(dest, i - cnt) << i
        for i in range(cnt - 1, -1, -1):
            d |= bit(src, i - cnt + w) << i
    else:
        cf = bit(dest, cnt - 1)
        for i in range(w - cnt):
            d |= bit(dest, i + cnt) << i
        for i in range(w - cnt, w):
            d |= bit(src, i + cnt - w) << i
    top = bool(bit(d, w - 1))
    flags = {F.CF: bool(cf), F.SF: top, F.ZF: d == 0, F.PF: parity(d)}
    undef = {F.AF}
    if cnt == 1:
        flags[F.OF] = top != bool(bit(dest, w - 1))
    else:
        undef.add(F.OF)
    return d, flags, undef


# -- helpers ------------------------------------------------------------------------------------

def put(old: int, w: int, v: int, high8: bool = False) -> int:
    """A register after writing ``v`` to its ``w``-bit part (32-bit writes zero-extend, SDM Vol. 1 3.4.1.1)."""
    if high8:
        return (old & ~0xFF00) | (v << 8)
    if w >= 32:
        return v
    return (old & ~((1 << w) - 1)) | v


def rflags_of(bits: dict[int, bool]) -> int:
    return sum(1 << f for f, b in bits.items() if b)


def check_flags(s: MachineState, before: dict[int, bool], defined: dict[int, bool], undef: set[int]) -> None:
    for f in STATUS:
        if f in undef:
            continue
        want = defined.get(f, before[f])
        assert flag(s, f) == want, f"{F.NAMES[f]}: got {flag(s, f)}, want {want}"
    assert s.undefined == sum(1 << f for f in undef), (F.names({f for f in STATUS if s.undefined >> f & 1}),
                                                      F.names(undef))


def reg_value(mode: str) -> st.SearchStrategy[int]:
    top = 64 if mode == "long64" else 32
    edge = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x8000_0000, 0xFFFF_FFFF]
    if top == 64:
        edge += [1 << 63, (1 << 64) - 1, 0xFFFF_FFFF_0000_0001]
    return st.one_of(st.integers(0, (1 << top) - 1), st.sampled_from(edge))


status_bits = st.fixed_dictionaries({f: st.booleans() for f in STATUS})
counts = st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]))


# -- properties ---------------------------------------------------------------------------------

@settings(max_examples=500)
@given(data=st.data(), op=st.sampled_from(OPS), form=st.sampled_from(FORMS), raw=counts, fl=status_bits)
def test_shift_rotate_matches_reference(data: st.DataObject, op: str, form: str, raw: int,
                                        fl: dict[int, bool]) -> None:
    """Every SHL/SAL/SHR/SAR/ROL/ROR/RCL/RCR form (by 1, CL, imm8), every mode and operand size."""
    mode = data.draw(st.sampled_from(MODES))
    w = data.draw(st.sampled_from(widths(mode)))
    rbx = data.draw(reg_value(mode))
    rcx = data.draw(reg_value(mode))
    if form == "1":
        raw = 1
    elif form == "CL":
        rcx = (rcx & ~0xFF) | raw
    s, ev = run_code(mode, enc_shift(mode, op, w, form, raw), rbx=rbx, rcx=rcx, flags=rflags_of(fl))
    assert ev.kind == "halted", ev
    a = rbx & ((1 << w) - 1)
    r, defined, undef = ref_shift(op, w, a, raw, fl[F.CF])
    assert reg(s, "rbx") == put(rbx, w, r)
    assert reg(s, "rcx") == rcx
    check_flags(s, fl, defined, undef)


@settings(max_examples=300)
@given(data=st.data(), left=st.booleans(), form=st.sampled_from(("CL", "Ib")), raw=counts, fl=status_bits)
def test_shld_shrd_matches_reference(data: st.DataObject, left: bool, form: str, raw: int,
                                     fl: dict[int, bool]) -> None:
    """SHLD/SHRD, imm8 and CL forms, 16/32/64-bit operands, every mode."""
    mode = data.draw(st.sampled_from(MODES))
    w = data.draw(st.sampled_from(widths(mode)[1:]))
    rbx, rdx = data.draw(reg_value(mode)), data.draw(reg_value(mode))
    rcx = raw if form == "CL" else 0
    s, ev = run_code(mode, enc_double(mode, left, w, form, raw), rbx=rbx, rdx=rdx, rcx=rcx, flags=rflags_of(fl))
    assert ev.kind == "halted", ev
    m = (1 << w) - 1
    r, defined, undef = ref_double(left, w, rbx & m, rdx & m, raw)
    if r is not None:
        assert reg(s, "rbx") == put(rbx, w, r)
    assert reg(s, "rdx") == rdx
    check_flags(s, fl, defined, undef)


# -- named edge cases -----------------------------------------------------------------------------

def run1(mode: str, code: bytes, **kw: int) -> MachineState:
    s, ev = run_code(mode, code, **kw)
    assert ev.kind == "halted", ev
    return s


@pytest.mark.parametrize("mode", MODES)
def test_count_is_masked_to_5_bits(mode: str) -> None:
    """SDM Vol. 2B SAL/SAR/SHL/SHR: count masked to 5 bits for 8/16/32-bit operands (33 acts as 1)."""
    for w in (8, 16, 32):
        s = run1(mode, enc_shift(mode, "SHL", w, "Ib", 33), rbx=0x41)
        assert reg(s, "rbx") == 0x82
        assert not s.undefined >> F.OF & 1  # masked count 1: OF defined


def test_count_is_masked_to_6_bits_for_64() -> None:
    """SDM Vol. 2B SAL/SAR/SHL/SHR: with REX.W the mask is 3FH (65 acts as 1, 64 as 0)."""
    s = run1("long64", enc_shift("long64", "SHL", 64, "CL"), rbx=1 << 62, rcx=65)
    assert reg(s, "rbx") == 1 << 63 and flag(s, F.OF)
    s = run1("long64", enc_shift("long64", "ROR", 64, "Ib", 64), rbx=3, flags=1 << F.CF)
    assert reg(s, "rbx") == 3 and flag(s, F.CF)  # count 0: CF not touched
    # A 32-bit operand in 64-bit mode keeps the 5-bit mask: 32 acts as 0.
    s = run1("long64", enc_shift("long64", "SHL", 32, "Ib", 32), rbx=0xFFFF_FFFF_8000_0001)
    assert reg(s, "rbx") == 0x8000_0001


@pytest.mark.parametrize("op", OPS)
def test_zero_count_changes_no_flag_and_keeps_undefined_set(op: str) -> None:
    """SDM Vol. 2B: "If the count is 0, the flags are not affected" -- not even the undefined marks.

    The first instruction (SHL EBX, 2) leaves OF and AF undefined; the count-0
    second instruction must neither define them nor change any flag value.
    """
    for mode in MODES:
        code = enc_shift(mode, "SHL", 32, "Ib", 2) + enc_shift(mode, op, 32, "CL")
        first = run1(mode, enc_shift(mode, "SHL", 32, "Ib", 2), rbx=0xC000_0001, rcx=0x20)
        s = run1(mode, code, rbx=0xC000_0001, rcx=0x20)
        assert reg(s, "rbx") == 4
        assert s.undefined == first.undefined == (1 << F.OF | 1 << F.AF)
        assert [flag(s, f) for f in STATUS] == [flag(first, f) for f in STATUS]


@pytest.mark.parametrize("op", OPS)
def test_zero_count_still_zero_extends_32bit_register(op: str) -> None:
    """A 32-bit destination in 64-bit mode is zero-extended even for a masked count of 0.

    SDM Vol. 1 3.4.1.1 / APM Vol. 1 3.1.2.3: 32-bit results zero-extend to 64
    bits; neither manual excepts a zero-count shift (see spec/isa/shift.py).
    """
    for form, cnt in (("CL", 0), ("Ib", 0), ("Ib", 32)):
        s = run1("long64", enc_shift("long64", op, 32, form, cnt), rbx=0xDEAD_BEEF_1234_5678, rcx=cnt)
        assert reg(s, "rbx") == 0x1234_5678
        assert s.undefined == 0
    for left in (True, False):
        s = run1("long64", enc_double("long64", left, 32, "CL"), rbx=0xDEAD_BEEF_1234_5678, rcx=0x20)
        assert reg(s, "rbx") == 0x1234_5678
    # 8/16-bit destinations keep the rest of the register.
    s = run1("long64", enc_shift("long64", op, 16, "CL"), rbx=0xDEAD_BEEF_1234_5678, rcx=0)
    assert reg(s, "rbx") == 0xDEAD_BEEF_1234_5678


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["SHL", "SHR"])
def test_shl_shr_cf_undefined_from_operand_size(mode: str, op: str) -> None:
    """SDM Vol. 2B SAL/SAR/SHL/SHR: CF is undefined for SHL/SHR when count >= operand size.

    The spec keeps the last bit shifted out: count = size gives the operand's
    LSB (SHL) / MSB (SHR); larger counts give 0; the result is 0.
    """
    for w in (8, 16):
        a = (1 << (w - 1)) | 1
        for cnt, want_cf in ((w, True), (w + 1, False), (31, False)):
            s = run1(mode, enc_shift(mode, op, w, "Ib", cnt), rbx=a)
            assert reg(s, "rbx") & ((1 << w) - 1) == 0
            assert s.undefined == (1 << F.CF | 1 << F.OF | 1 << F.AF)
            assert flag(s, F.CF) == want_cf and flag(s, F.ZF)
        s = run1(mode, enc_shift(mode, op, w, "Ib", w - 1), rbx=(1 << w) - 1)
        assert not s.undefined >> F.CF & 1 and flag(s, F.CF)


@pytest.mark.parametrize("mode", MODES)
def test_sar_fills_with_sign_and_cf_stays_defined(mode: str) -> None:
    """SAR by >= size: every bit becomes the sign; CF = the sign (defined: the SDM excepts only SHL/SHR)."""
    for w in (8, 16):
        s = run1(mode, enc_shift(mode, "SAR", w, "Ib", 31), rbx=1 << (w - 1))
        assert reg(s, "rbx") == (1 << w) - 1 and flag(s, F.CF) and flag(s, F.SF)
        assert s.undefined == (1 << F.OF | 1 << F.AF)


@pytest.mark.parametrize("mode", MODES)
def test_overflow_flag_for_count_one(mode: str) -> None:
    """SDM Vol. 2B: OF for 1-bit shifts -- SHL: MSB(result) XOR CF; SHR: MSB(original); SAR: 0."""
    s = run1(mode, enc_shift(mode, "SHL", 8, "1"), rbx=0x40)
    assert reg(s, "rbx") == 0x80 and flag(s, F.OF) and not flag(s, F.CF)
    s = run1(mode, enc_shift(mode, "SHL", 8, "1"), rbx=0xC0)
    assert reg(s, "rbx") == 0x80 and not flag(s, F.OF) and flag(s, F.CF)
    s = run1(mode, enc_shift(mode, "SHR", 8, "1"), rbx=0x81)
    assert reg(s, "rbx") == 0x40 and flag(s, F.OF) and flag(s, F.CF)
    s = run1(mode, enc_shift(mode, "SAR", 8, "1"), rbx=0x81, flags=1 << F.OF)
    assert reg(s, "rbx") == 0xC0 and not flag(s, F.OF) and flag(s, F.CF)
    assert s.undefined == 1 << F.AF


@pytest.mark.parametrize("mode", MODES)
def test_rotates_touch_only_cf_and_of(mode: str) -> None:
    """SDM Vol. 2B RCL/RCR/ROL/ROR "Flags Affected": only CF and OF; SF/ZF/AF/PF keep their values."""
    others = 1 << F.SF | 1 << F.ZF | 1 << F.AF | 1 << F.PF
    for op in ("ROL", "ROR", "RCL", "RCR"):
        s = run1(mode, enc_shift(mode, op, 8, "Ib", 3), rbx=0x11, flags=others)
        assert all(flag(s, f) for f in (F.SF, F.ZF, F.AF, F.PF))
        assert s.undefined == 1 << F.OF


@pytest.mark.parametrize("mode", MODES)
def test_rotate_by_multiple_of_size(mode: str) -> None:
    """ROL/ROR rotate by count mod size: ROL r8 by 8 leaves the value, yet CF = LSB (masked count is nonzero)."""
    s = run1(mode, enc_shift(mode, "ROL", 8, "Ib", 8), rbx=0x81)
    assert reg(s, "rbx") == 0x81 and flag(s, F.CF) and s.undefined == 1 << F.OF
    s = run1(mode, enc_shift(mode, "ROR", 16, "Ib", 16), rbx=0x8001)
    assert reg(s, "rbx") == 0x8001 and flag(s, F.CF)


@pytest.mark.parametrize("mode", MODES)
def test_rcl_rcr_count_modulo_9_and_17(mode: str) -> None:
    """SDM Vol. 2B RCL/RCR: tempCOUNT = (COUNT AND 1FH) MOD 9 (8-bit) / MOD 17 (16-bit).

    By 9 (resp. 17) DEST and CF are unchanged; OF is undefined (masked count != 1).
    By 10 the effect is that of a 1-bit rotation (but OF is still undefined).
    """
    for op in ("RCL", "RCR"):
        for w, ring in ((8, 9), (16, 17)):
            for cf in (False, True):
                s = run1(mode, enc_shift(mode, op, w, "Ib", ring), rbx=0x5A, flags=int(cf))
                assert reg(s, "rbx") == 0x5A and flag(s, F.CF) == cf and s.undefined == 1 << F.OF
            s10 = run1(mode, enc_shift(mode, op, w, "Ib", ring + 1), rbx=0x5A, flags=1)
            s1 = run1(mode, enc_shift(mode, op, w, "1"), rbx=0x5A, flags=1)
            assert reg(s10, "rbx") == reg(s1, "rbx") and flag(s10, F.CF) == flag(s1, F.CF)
            assert s10.undefined == 1 << F.OF and s1.undefined == 0
    # 8-bit RCL by 1 with CF=1: 0x80 -> 0x01, CF=1, OF = MSB(result) XOR CF = 1.
    s = run1(mode, enc_shift(mode, "RCL", 8, "1"), rbx=0x80, flags=1)
    assert reg(s, "rbx") == 0x01 and flag(s, F.CF) and flag(s, F.OF)


@pytest.mark.parametrize("mode", MODES)
def test_sal_is_shl(mode: str) -> None:
    """SDM Vol. 2B SAL/SAR/SHL/SHR: SAL and SHL are the same operation (/6 is an alias of /4)."""
    for w in widths(mode):
        for cnt in (1, 3, 17):
            a = 0xC3A5_5A3C_F00F_0FF0 & ((1 << w) - 1)
            s4 = run1(mode, enc_shift(mode, "SHL", w, "Ib", cnt), rbx=a)
            s6 = run1(mode, enc_shift(mode, "SAL", w, "Ib", cnt), rbx=a)
            assert reg(s4, "rbx") == reg(s6, "rbx")
            assert [flag(s4, f) for f in STATUS] == [flag(s6, f) for f in STATUS]
            assert s4.undefined == s6.undefined


@pytest.mark.parametrize("mode", MODES)
def test_high_byte_register_and_memory_destination(mode: str) -> None:
    """8-bit AH destination (ModRM rm 4 without REX) and a memory destination (read-modify-write)."""
    s = run1(mode, enc_shift(mode, "SHR", 8, "1", rm=4), rax=0x8123)
    assert reg(s, "rax") == 0x4023 and flag(s, F.CF)
    # shl dword [bx]/[ebx]/[rbx], cl  (D3 /4; ModRM 0x27 = [bx] in 16-bit addressing, 0x23 = [ebx]/[rbx]).
    addr = 0x6000  # mapped RAM inside the real-mode 64 KiB segment
    code = size_prefix(mode, 32) + bytes([0xD3, 0x27 if BITS[mode] == 16 else 0x23])
    assert disasm(mode, code) in ("shl dword ptr [bx], cl", "shl dword ptr [ebx], cl", "shl dword ptr [rbx], cl")
    s = run1(mode, code, rbx=addr, rcx=4, mem={addr: (0x1234_5678).to_bytes(4, "little")})
    assert s.mem.phys.read(addr, 4) == 0x2345_6780 and flag(s, F.CF)


@pytest.mark.parametrize("mode", MODES)
def test_shld_shrd_edges(mode: str) -> None:
    """SDM Vol. 2B SHLD/SHRD: count = size moves SRC in whole; count > size (16-bit) is undefined.

    For counts 17..31 on 16-bit operands the manual leaves DEST and all six
    flags undefined; the spec documents its result (upper half of
    (DEST:SRC) << count, resp. lower half of (SRC:DEST) >> count) and marks
    every status flag undefined.
    """
    w = 16
    s = run1(mode, enc_double(mode, True, w, "Ib", 16), rbx=0x8001, rdx=0xBEEF)
    assert reg(s, "rbx") == 0xBEEF and flag(s, F.CF) and s.undefined == 1 << F.OF | 1 << F.AF
    s = run1(mode, enc_double(mode, False, w, "Ib", 16), rbx=0x8001, rdx=0xBEEF)
    assert reg(s, "rbx") == 0xBEEF and flag(s, F.CF)
    for cnt in (17, 24, 31):
        s = run1(mode, enc_double(mode, True, w, "CL"), rbx=0x8001, rdx=0xBEEF, rcx=cnt)
        assert reg(s, "rbx") == ((0x8001_BEEF << cnt) >> 16) & 0xFFFF
        assert s.undefined == F.STATUS_MASK
        s = run1(mode, enc_double(mode, False, w, "CL"), rbx=0x8001, rdx=0xBEEF, rcx=cnt)
        assert reg(s, "rbx") == (0xBEEF_8001 >> cnt) & 0xFFFF
        assert s.undefined == F.STATUS_MASK
    # OF on a 1-bit shift: set iff DEST's sign changed.
    s = run1(mode, enc_double(mode, True, 32, "Ib", 1), rbx=0x4000_0000, rdx=0x8000_0000)
    assert reg(s, "rbx") == 0x8000_0001 and flag(s, F.OF) and not flag(s, F.CF)


def test_shld_shrd_64() -> None:
    """64-bit SHLD/SHRD (REX.W: count mask 3FH)."""
    s = run1("long64", enc_double("long64", True, 64, "CL"), rbx=0x0123_4567_89AB_CDEF, rdx=0xFEDC_BA98_7654_3210,
             rcx=0x44)
    assert reg(s, "rbx") == 0x1234_5678_9ABC_DEFF
    s = run1("long64", enc_double("long64", False, 64, "Ib", 63), rbx=1 << 63, rdx=1)
    assert reg(s, "rbx") == 3 and not flag(s, F.CF)


def test_documented_undefined_values() -> None:
    """The values the spec leaves in undefined flags (docstrings of spec/isa/shift.py).

    AF = 1 after a shift with nonzero count (AMD hardware, /work/shared/ORACLES.md); OF
    for counts > 1 is the count-1 formula on the actual operands and result.
    """
    s = run1("long64", enc_shift("long64", "SHR", 32, "Ib", 4), rbx=0x80)
    assert flag(s, F.AF) and s.undefined >> F.AF & 1
    s = run1("long64", enc_shift("long64", "SHL", 8, "Ib", 2), rbx=0x60)  # result 0x80, CF 1
    assert reg(s, "rbx") == 0x80 and not flag(s, F.OF)
    s = run1("long64", enc_double("long64", False, 32, "Ib", 4), rbx=0x10, rdx=0)
    assert flag(s, F.AF)
