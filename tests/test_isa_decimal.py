"""DAA, DAS, AAA, AAS, AAM, AAD against a plain-int reference written from the SDM pseudo-code.

References: Intel SDM Vol. 2A DAA, DAS, AAA, AAS, AAM, AAD ("Operation", "Flags Affected",
"64-Bit Mode Exceptions"); AMD APM Vol. 3, same entries.  The values the spec leaves in
undefined flags are those documented in :mod:`spec.isa.decimal`; the tests pin both the
value and that the flag is marked undefined.

DAA/DAS/AAA/AAS are swept exhaustively (every AL x CF x AF, AAA/AAS also over several AH
and upper-RAX patterns) in real mode, 16-bit and 32-bit protected mode; AAM/AAD sweep every
AL for the named bases and use hypothesis over arbitrary bases and AX.
"""

from __future__ import annotations

import functools

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU
from spec.faults import Vector
from spec.machine import CODE, flat_machine
from tests.conftest import flag, reg, run_code

LEGACY_MODES = ("real", "prot16", "prot32")
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
HIGH = 0x5A5A_5A5A_C3C3_0000  # bits above AX that must survive (AAA/AAS/AAM/AAD write AX only)


# -- encodings (checked against capstone below) -------------------------------------------------
ENC = {"DAA": "27", "DAS": "2f", "AAA": "37", "AAS": "3f", "AAM": "d40a", "AAD": "d50a"}


@pytest.mark.parametrize(("hexcode", "text"), [
    ("27", "daa"), ("2f", "das"), ("37", "aaa"), ("3f", "aas"), ("d40a", "aam 0xa"), ("d410", "aam 0x10"),
    ("d407", "aam 7"), ("d4ff", "aam 0xff"), ("d400", "aam 0"), ("d50a", "aad 0xa"), ("d510", "aad 0x10"),
    ("d507", "aad 7"), ("d5ff", "aad 0xff"), ("00d8", "add al, bl"), ("28d8", "sub al, bl"),
    ("12c3", "adc al, bl"), ("1ac3", "sbb al, bl"),
])
def test_encodings_match_capstone(hexcode: str, text: str) -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    (ins,) = list(md.disasm(bytes.fromhex(hexcode), 0))
    assert f"{ins.mnemonic} {ins.op_str}".strip() == text


# -- a reusable one-instruction runner (a fresh flat machine per case would dominate the sweep) --
class Stepper:
    """Runs ``code`` (``steps`` instructions) from a reset RIP on one reused flat machine."""

    def __init__(self, mode: str, code: str, steps: int = 1) -> None:
        self.st = flat_machine(mode, bytes.fromhex(code.replace(" ", "")) + b"\xf4")  # type: ignore[arg-type]
        self.cpu = SpecCPU(self.st)
        self.steps = steps

    def set_byte(self, offset: int, value: int) -> None:
        """Patch one code byte (e.g. an imm8); the decode cache is keyed by the bytes, so this is safe."""
        self.st.mem.phys.write_bytes(CODE + offset, bytes([value]))

    def __call__(self, rax: int, flags: int, rbx: int = 0):
        s = self.st
        s.rip, s.halted = CODE, False
        s.gpr[0], s.gpr[3] = rax, rbx
        s.write_rflags(flags | 2)
        ev = None
        for _ in range(self.steps):
            ev = self.cpu.step()
            if ev is not None:
                break
        return s, ev


@functools.cache
def stepper(mode: str, code: str, steps: int = 1) -> Stepper:
    return Stepper(mode, code, steps)


def _flags_in(cf: int, af: int, extra: int = 0) -> int:
    return (cf << F.CF) | (af << F.AF) | extra


def _pf(v: int) -> int:
    return int(bin(v & 0xFF).count("1") % 2 == 0)


def _szp(al: int) -> dict[int, int]:
    return {F.SF: al >> 7, F.ZF: int(al == 0), F.PF: _pf(al)}


def _flags_out(s) -> dict[int, int]:
    return {f: int(bool(s.get_flag(f))) for f in STATUS}


def _undef(*fl: int) -> int:
    return sum(1 << f for f in fl)


# -- independent references: the SDM "Operation" sections, statement by statement ----------------
def ref_daa(al: int, cf: int, af: int) -> tuple[int, int, int]:
    old_al, old_cf = al, cf
    cf = 0
    if (al & 0x0F) > 9 or af == 1:
        t = al + 6
        cf = old_cf | (t > 0xFF)
        al = t & 0xFF
        af = 1
    else:
        af = 0
    if old_al > 0x99 or old_cf == 1:
        al = (al + 0x60) & 0xFF
        cf = 1
    else:
        cf = 0
    return al, cf, af


def ref_das(al: int, cf: int, af: int) -> tuple[int, int, int]:
    old_al, old_cf = al, cf
    cf = 0
    if (al & 0x0F) > 9 or af == 1:
        t = al - 6
        cf = old_cf | (t < 0)
        al = t & 0xFF
        af = 1
    else:
        af = 0
    if old_al > 0x99 or old_cf == 1:
        al = (al - 0x60) & 0xFF
        cf = 1
    return al, cf, af


def ref_aaa(ax: int, af: int) -> tuple[int, int, int]:
    if (ax & 0x0F) > 9 or af == 1:
        ax = (ax + 0x106) & 0xFFFF
        af = cf = 1
    else:
        af = cf = 0
    return ax & 0xFF0F, cf, af


def ref_aas(ax: int, af: int) -> tuple[int, int, int]:
    if (ax & 0x0F) > 9 or af == 1:
        ax = (ax - 6) & 0xFFFF
        ah = ((ax >> 8) - 1) & 0xFF
        ax = (ah << 8) | (ax & 0xFF)
        af = cf = 1
    else:
        af = cf = 0
    return ax & 0xFF0F, cf, af


def ref_aam(al: int, base: int) -> int:
    return ((al // base) << 8) | (al % base)


def ref_aad(ax: int, base: int) -> tuple[int, dict[int, int]]:
    """Result and the flags of the 8-bit ADD AL + (AH * base) mod 256 (the spec's choice for OF/AF/CF)."""
    al, ah = ax & 0xFF, ax >> 8
    p = (ah * base) & 0xFF
    r = (al + p) & 0xFF
    sa, sp, sr = al >> 7, p >> 7, r >> 7
    fl = {F.CF: int(al + p > 0xFF), F.AF: int((al & 0xF) + (p & 0xF) > 0xF), F.OF: int(sa == sp and sr != sa)}
    fl.update(_szp(r))
    return r, fl


# -- DAA / DAS: exhaustive ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize(("mnem", "ref"), [("DAA", ref_daa), ("DAS", ref_das)])
def test_daa_das_exhaustive(mode: str, mnem: str, ref) -> None:
    """All 256 AL x CF x AF; AH and the upper RAX bits are untouched; OF undefined (left 0)."""
    run = stepper(mode, ENC[mnem])
    for other in (0, F.STATUS_MASK & ~((1 << F.CF) | (1 << F.AF))):  # the other flags' inputs don't matter
        for al in range(256):
            for cf in (0, 1):
                for af in (0, 1):
                    s, ev = run(HIGH | 0x3C00 | al, _flags_in(cf, af, other))
                    assert ev is None
                    r, rcf, raf = ref(al, cf, af)
                    assert reg(s, "rax") == HIGH | 0x3C00 | r, (mnem, hex(al), cf, af)
                    want = {F.CF: rcf, F.AF: raf, F.OF: 0, **_szp(r)}
                    assert _flags_out(s) == want, (mnem, hex(al), cf, af)
                    assert s.undefined == _undef(F.OF)
                    assert s.rip == CODE + 1


def test_daa_sdm_example() -> None:
    """SDM Vol. 2A DAA example: ADD AL,BL with 79H + 35H = AEH; DAA -> 14H, CF = AF = 1, S = Z = 0, P = 1."""
    s, ev = run_code("prot32", "00d8 27", rax=0x79, rbx=0x35)
    assert ev.kind == "halted"
    assert reg(s, "rax") == 0x14
    assert (flag(s, F.CF), flag(s, F.AF), flag(s, F.SF), flag(s, F.ZF), flag(s, F.PF)) == (1, 1, 0, 0, 1)


def test_das_sdm_example() -> None:
    """SDM Vol. 2A DAS example: SUB AL,BL with 35H - 47H = EEH; DAS -> 88H, S = A = P = C = 1, Z = 0."""
    s, ev = run_code("real", "28d8 2f", rax=0x35, rbx=0x47)
    assert ev.kind == "halted"
    assert reg(s, "rax") == 0x88
    assert (flag(s, F.SF), flag(s, F.ZF), flag(s, F.AF), flag(s, F.PF), flag(s, F.CF)) == (1, 0, 1, 1, 1)


def test_das_cf_from_low_borrow_only() -> None:
    """SDM DAS: the second IF has no ELSE, so a borrow out of AL - 6 alone sets CF (AL=03H, AF=1, CF=0)."""
    s, _ = run_code("prot32", "2f", rax=0x03, flags=1 << F.AF)
    assert reg(s, "rax") == 0xFD
    assert flag(s, F.CF) and flag(s, F.AF)


@pytest.mark.parametrize("mode", LEGACY_MODES)
@settings(max_examples=60)  # the symbolic twins prove these over all digits
@given(a=st.integers(0, 99), b=st.integers(0, 99), c=st.integers(0, 1))
def test_daa_das_bcd_arithmetic(mode: str, a: int, b: int, c: int) -> None:
    """ADC/SBB of two packed-BCD bytes followed by DAA/DAS gives the BCD sum/difference and the decimal carry."""
    bcd = lambda n: ((n // 10) << 4) | (n % 10)  # noqa: E731
    s, _ = stepper(mode, "12c3 27", 2)(bcd(a), c, rbx=bcd(b))
    assert reg(s, "rax") & 0xFF == bcd((a + b + c) % 100)
    assert flag(s, F.CF) == (a + b + c >= 100)
    s, _ = stepper(mode, "1ac3 2f", 2)(bcd(a), c, rbx=bcd(b))
    assert reg(s, "rax") & 0xFF == bcd((a - b - c) % 100)
    assert flag(s, F.CF) == (a < b + c)


# -- AAA / AAS: exhaustive over AL x CF x AF, several AH ------------------------------------------
@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize(("mnem", "ref"), [("AAA", ref_aaa), ("AAS", ref_aas)])
def test_aaa_aas_exhaustive(mode: str, mnem: str, ref) -> None:
    """AX adjusted as one value; CF = AF = adjustment; SF/ZF/PF (undefined) from AL, OF (undefined) 0."""
    run = stepper(mode, ENC[mnem])
    for ah in (0x00, 0x12, 0x7F, 0xFF):
        for al in range(256):
            for cf in (0, 1):
                for af in (0, 1):
                    ax = (ah << 8) | al
                    s, ev = run(HIGH | ax, _flags_in(cf, af))
                    assert ev is None
                    r, rcf, raf = ref(ax, af)
                    assert reg(s, "rax") == HIGH | r, (mnem, hex(ax), cf, af)
                    want = {F.CF: rcf, F.AF: raf, F.OF: 0, **_szp(r & 0xFF)}
                    assert _flags_out(s) == want, (mnem, hex(ax), cf, af)
                    assert s.undefined == _undef(F.OF, F.SF, F.ZF, F.PF)


def test_aaa_carry_from_al_reaches_ah() -> None:
    """SDM AAA: AX := AX + 106H, so AL = FAH (AF=0) carries into AH twice (8086's AL+6/AH+1 gave 0100H)."""
    s, _ = run_code("real", "37", rax=0x00FA)
    assert reg(s, "rax") == 0x0200
    assert flag(s, F.CF) and flag(s, F.AF)


def test_aas_borrow_from_al_reaches_ah() -> None:
    """SDM AAS: AX := AX - 6; AH := AH - 1, so AX = 0000H, AF = 1 gives FE0AH."""
    s, _ = run_code("prot16", "3f", rax=0x0000, flags=1 << F.AF)
    assert reg(s, "rax") == 0xFE0A
    assert flag(s, F.CF) and flag(s, F.AF)


@pytest.mark.parametrize("mode", LEGACY_MODES)
@settings(max_examples=60)  # the symbolic twins prove these over all digits
@given(a=st.integers(0, 9), b=st.integers(0, 9), hi=st.integers(0, 0xFE))
def test_aaa_aas_unpacked_arithmetic(mode: str, a: int, b: int, hi: int) -> None:
    """ADD/SUB of two unpacked BCD digits followed by AAA/AAS: digit in AL, decimal carry/borrow into AH and CF."""
    s, _ = stepper(mode, "00d8 37", 2)((hi << 8) | a, 0, rbx=b)
    assert reg(s, "rax") & 0xFFFF == (((hi + (a + b >= 10)) & 0xFF) << 8) | ((a + b) % 10)
    assert flag(s, F.CF) == (a + b >= 10)
    s, _ = stepper(mode, "28d8 3f", 2)((hi << 8) | a, 0, rbx=b)
    assert reg(s, "rax") & 0xFFFF == (((hi - (a < b)) & 0xFF) << 8) | ((a - b) % 10)
    assert flag(s, F.CF) == (a < b)


# -- AAM -----------------------------------------------------------------------------------------
NAMED_BASES = (10, 16, 7, 0xFF, 1, 2)


@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize("base", NAMED_BASES)
def test_aam_all_al(mode: str, base: int) -> None:
    """AH := AL / imm8, AL := AL MOD imm8 for every AL; SF/ZF/PF from AL; OF/AF/CF undefined (left 0)."""
    run = stepper(mode, f"d4{base:02x}")
    for al in range(256):
        for fin in (0, F.STATUS_MASK):
            s, ev = run(HIGH | 0xA500 | al, fin)
            assert ev is None
            r = ref_aam(al, base)
            assert reg(s, "rax") == HIGH | r, (base, al)
            assert _flags_out(s) == {F.CF: 0, F.AF: 0, F.OF: 0, **_szp(r & 0xFF)}
            assert s.undefined == _undef(F.OF, F.AF, F.CF)
            assert s.rip == CODE + 2


def test_aam_every_base_every_al() -> None:
    """Exhaustive: all 255 nonzero bases x all 256 AL (32-bit protected mode; the named bases above cover
    the other modes).  Checks the division identity AH * base + AL == AL_old, AL < base, and the flags."""
    run = stepper("prot32", "d4 0a")
    for base in range(1, 256):
        run.set_byte(1, base)
        for al in range(256):
            s, ev = run(HIGH | 0x6600 | al, 0)
            assert ev is None
            got = reg(s, "rax")
            assert got == HIGH | ref_aam(al, base), (base, al)
            q, r = (got >> 8) & 0xFF, got & 0xFF
            assert q * base + r == al and r < base
            assert _flags_out(s) == {F.CF: 0, F.AF: 0, F.OF: 0, **_szp(r)}


@pytest.mark.parametrize("mode", LEGACY_MODES)
def test_aam_zero_is_de(mode: str) -> None:
    """SDM AAM "Protected Mode Exceptions": #DE if imm8 = 0.  Faults are precise: no state change, RIP at AAM."""
    fin = (1 << F.CF) | (1 << F.ZF) | (1 << F.OF)
    s, ev = run_code(mode, "d400", rax=0x1234_5678, flags=fin)
    assert ev.kind == "fault" and ev.vector == Vector.DE
    assert ev.rip == CODE and s.rip == CODE
    assert reg(s, "rax") == 0x1234_5678
    assert _flags_out(s) == {F.CF: 1, F.PF: 0, F.AF: 0, F.ZF: 1, F.SF: 0, F.OF: 1}
    assert s.undefined == 0


# -- AAD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize("base", NAMED_BASES)
def test_aad_all_al(mode: str, base: int) -> None:
    """AL := (AL + AH * imm8) AND FFH; AH := 0; flags as the 8-bit ADD (OF/AF/CF undefined)."""
    run = stepper(mode, f"d5{base:02x}")
    for ah in (0x00, 0x01, 0x09, 0x7F, 0x80, 0xFF):
        for al in range(256):
            ax = (ah << 8) | al
            s, ev = run(HIGH | ax, 0)
            assert ev is None
            r, fl = ref_aad(ax, base)
            assert reg(s, "rax") == HIGH | r, (base, hex(ax))
            assert _flags_out(s) == fl, (base, hex(ax))
            assert s.undefined == _undef(F.OF, F.AF, F.CF)


@pytest.mark.parametrize("mode", LEGACY_MODES)
@settings(max_examples=100)
@given(ax=st.integers(0, 0xFFFF), base=st.integers(0, 255), fin=st.integers(0, 0xFFF))
def test_aad_any_base(mode: str, ax: int, base: int, fin: int) -> None:
    """Base 0 is legal for AAD (no divide): AL unchanged, AH cleared."""
    run = stepper(mode, "d5 0a")
    run.set_byte(1, base)
    s, ev = run(HIGH | ax, fin & F.STATUS_MASK)
    assert ev is None
    r, fl = ref_aad(ax, base)
    assert reg(s, "rax") == HIGH | r
    assert _flags_out(s) == fl


def test_aad_aam_roundtrip() -> None:
    """AAM 10 then AAD 10 restores a binary AL in 0..99 (the documented use: unpacked BCD <-> binary)."""
    for al in range(100):
        s, _ = run_code("prot32", "d40a d50a", rax=al)
        assert reg(s, "rax") == al


# -- mode and prefix checks ----------------------------------------------------------------------
@pytest.mark.parametrize("code", ["27", "2f", "37", "3f", "d40a", "d400", "d50a"])
def test_ud_in_64bit_mode(code: str) -> None:
    """SDM "64-Bit Mode Exceptions": #UD (opcode rows are i64).  Nothing changes, RIP at the instruction.

    AAM 0 is #UD rather than #DE: the invalid opcode is detected before execution.
    """
    s, ev = run_code("long64", code, rax=0x1122_3344_5566_7788, flags=1 << F.AF)
    assert ev.kind == "fault" and ev.vector == Vector.UD
    assert ev.rip == CODE
    assert reg(s, "rax") == 0x1122_3344_5566_7788
    assert flag(s, F.AF)


@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize("code", ["f027", "f0d40a"])
def test_lock_is_ud(mode: str, code: str) -> None:
    """SDM "Protected Mode Exceptions": #UD if the LOCK prefix is used."""
    s, ev = run_code(mode, code, rax=0x99)
    assert ev.kind == "fault" and ev.vector == Vector.UD and ev.rip == CODE
    assert reg(s, "rax") == 0x99


@pytest.mark.parametrize("code", ["6627", "66d50a", "6737", "663f"])
def test_operand_and_address_size_prefixes_ignored(code: str) -> None:
    """The adjustments work on AL/AH only: 66/67 change nothing (prot32)."""
    base = run_code("prot32", code[2:], rax=0xFFFF_FF9B, flags=1 << F.AF)[0]
    s, ev = run_code("prot32", code, rax=0xFFFF_FF9B, flags=1 << F.AF)
    assert ev.kind == "halted"
    assert reg(s, "rax") == reg(base, "rax")
    assert _flags_out(s) == _flags_out(base)
