"""Unit tests of the decoder's rules (SDM Vol. 2A chapter 2 / APM Vol. 3 chapter 1), one rule per test.

Every valid hand-written encoding is also decoded by iced-x86 and must have the
same length there (``dec`` does it; ``iced=False`` marks the two documented
places where the references disagree).  The broad random cross-check lives in
tests/test_decoder_crosscheck.py; the encoder/strategy API is exercised at the end.
"""

from __future__ import annotations

import iced_x86 as iced
import pytest
from hypothesis import given, settings

from spec.decode.decoder import MAX_LENGTH, decode
from spec.decode.encode import EncodeError, encode, random_encoding, rows_for, sample
from spec.decode.insn import CR, CS, DR, DS, ES, FAR, FS, GS, IMM, MEM, REG, REL, SEG, SS, Insn, Operand
from spec.decode.opcodes import ROWS
from spec.decode.strategies import instructions
from spec.faults import Fault, Unimplemented, Vector

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


def _bytes(h: str) -> bytes:
    return bytes.fromhex(h.replace(" ", ""))


def dec(h: str, bits: int, *, vendor: str = "amd", iced_check: bool = True) -> Insn:
    """Decode hex ``h``; the whole string must be one instruction, of the length iced-x86 finds too."""
    code = _bytes(h)
    insn = decode(code, bits, vendor=vendor)
    assert insn.length == len(code), f"{h}: decoded {insn.length} of {len(code)} bytes ({insn})"
    if iced_check:
        opts = iced.DecoderOptions.AMD if vendor == "amd" else iced.DecoderOptions.NONE
        ref = iced.Decoder(bits, code, opts).decode()
        assert ref.code != iced.Code.INVALID and ref.len == insn.length, f"{h}: iced length {ref.len}"
    return insn


def fault(h: str, bits: int, *, vendor: str = "amd") -> Fault:
    with pytest.raises(Fault) as e:
        decode(_bytes(h), bits, vendor=vendor)
    return e.value


def reg(num: int, size: int, high8: bool = False) -> Operand:
    return Operand(REG, size, num, high8=high8)


# -- legacy prefixes (SDM Vol. 2A 2.1.1) ---------------------------------------------------------

def test_last_segment_override_wins() -> None:
    """Group 2: only one segment override is used; with several, the last one (SDM Vol. 2A 2.1.1)."""
    assert dec("26 2E 8B 00", 32).operands[1].seg == CS
    assert dec("2E 26 8B 00", 32).operands[1].seg == ES
    assert dec("2E 26 8B 00", 32).seg_override == ES


def test_64bit_segment_prefixes_follow_the_vendor_rule() -> None:
    """In 64-bit mode (decoder docstring; tests/test_decoder_segment_prefix.py has the full matrix):
    Intel ignores ES/CS/SS/DS overrides (SDM Vol. 1 3.3.7), so they cannot cancel FS/GS; on AMD the
    last segment prefix wins, as measured on hardware (corpus/regressions/amd-last-segment-prefix-wins.json)."""
    assert dec("64 26 8B 00", 64, vendor="intel").operands[1].seg == FS
    assert dec("26 64 8B 00", 64, vendor="intel").operands[1].seg == FS
    assert dec("65 64 8B 00", 64, vendor="intel").operands[1].seg == FS
    assert dec("64 65 3E 8B 00", 64, vendor="intel").operands[1].seg == GS
    assert dec("26 8B 00", 64, vendor="intel").seg_override is None
    assert dec("64 26 8B 00", 64).operands[1].seg == ES
    assert dec("26 64 8B 00", 64).operands[1].seg == FS
    assert dec("64 65 3E 8B 00", 64).operands[1].seg == DS
    assert dec("26 8B 00", 64).operands[1].seg == ES  # reported; the semantics ignore its base


def test_repeated_66_is_one_operand_size_override() -> None:
    """Repeating a prefix of a group has the effect of one (SDM Vol. 2A 2.1.1)."""
    i = dec("66 66 66 8B C0", 32)
    assert i.opsize == 16 and i.operands == (reg(RAX, 16), reg(RAX, 16))
    assert dec("66 66 8B C0", 16).opsize == 32


def test_rex_followed_by_legacy_prefix_is_ignored() -> None:
    """REX must immediately precede the opcode (or 0F); otherwise it is ignored (SDM Vol. 2A 2.2.1)."""
    i = dec("48 66 8B C0", 64)
    assert i.rex == 0 and i.opsize == 16
    assert dec("41 F0 01 00", 64).operands[0].base == RAX  # REX.B dropped: [rax], not [r8]
    # The ignored REX does not turn AH into SPL either.
    assert dec("40 66 8A E0", 64).operands[0] == reg(RAX, 8, high8=True)
    assert dec("66 40 8A E0", 64).operands[0] == reg(RSP, 8)


def test_last_rex_prefix_counts() -> None:
    """Of several REX prefixes only the one just before the opcode is used (SDM Vol. 2A 2.2.1)."""
    assert dec("48 41 8B C0", 64).operands == (reg(RAX, 32), reg(8, 32))
    assert dec("41 48 8B C0", 64).operands == (reg(RAX, 64), reg(RAX, 64))


def test_rex_w_beats_66() -> None:
    """REX.W = 1 selects 64-bit operand size; 66 is then ignored (SDM Vol. 2A 2.2.1.2, Table 2-4)."""
    for h in ("66 48 8B C0", "48 8B C0"):
        assert dec(h, 64).opsize == 64
    assert dec("66 8B C0", 64).opsize == 16
    assert dec("8B C0", 64).opsize == 32


def test_rex_is_inc_dec_outside_64bit_mode() -> None:
    """40-4F are INC/DEC outside 64-bit mode (SDM Vol. 2A 2.2.1: REX only in 64-bit mode)."""
    i = dec("41", 32)
    assert i.mnemonic == "INC" and i.operands == (reg(RCX, 32),)
    assert dec("48", 16).mnemonic == "DEC"


# -- byte registers (SDM Vol. 2A 2.2.1.2, Table 3-1 note; Vol. 1 3.4.1.1) ---------------------------

def test_byte_registers_ah_bh_without_rex() -> None:
    i = dec("88 F7", 64)  # mov bh, dh
    assert i.operands == (reg(RBX, 8, high8=True), reg(RDX, 8, high8=True))
    assert dec("88 E0", 32).operands == (reg(RAX, 8), reg(RAX, 8, high8=True))  # mov al, ah (no REX outside 64)
    assert dec("B4 01", 64).operands[0] == reg(RAX, 8, high8=True)  # mov ah, 1


def test_byte_registers_spl_bpl_sil_dil_with_any_rex() -> None:
    """Any REX, even 40 with no bits set, makes encodings 4-7 SPL/BPL/SIL/DIL."""
    assert dec("40 88 F7", 64).operands == (reg(RDI, 8), reg(RSI, 8))
    assert dec("40 88 E0", 64).operands == (reg(RAX, 8), reg(RSP, 8))
    assert dec("44 88 E0", 64).operands == (reg(RAX, 8), reg(12, 8))  # REX.R: r12b
    assert dec("40 B5 01", 64).operands[0] == reg(RBP, 8)  # mov bpl, 1
    assert dec("41 B4 01", 64).operands[0] == reg(12, 8)  # mov r12b, 1


# -- ModRM / SIB (SDM Vol. 2A 2.1.5, Tables 2-2 and 2-3; 2.2.1.3-2.2.1.6) ---------------------------

def test_rbp_base_with_mod0_means_disp32() -> None:
    """mod 00 r/m 101: no base, disp32 (32-bit); SIB base 101 with mod 00 likewise; mod 01 r/m 101 is [rBP+d8]."""
    m = dec("8B 05 78 56 34 12", 32).operands[1]
    assert m.base is None and m.index is None and m.disp == 0x12345678 and not m.rip_rel
    m = dec("8B 04 AD 00 01 00 00", 32).operands[1]  # [ebp*4 + 0x100]: SIB base 101, mod 00
    assert m.base is None and m.index == RBP and m.scale == 2 and m.disp == 0x100
    m = dec("8B 45 FC", 32).operands[1]
    assert m.base == RBP and m.disp == -4 and m.seg == SS
    m = dec("41 8B 45 00", 64).operands[1]  # r13 needs mod 01 with disp8 0
    assert m.base == 13 and m.disp == 0 and m.seg == DS
    m = dec("41 8B 04 25 00 10 00 00", 64).operands[1]  # SIB base 101, mod 00, REX.B: still no base
    assert m.base is None and m.index is None and m.disp == 0x1000 and not m.rip_rel


def test_rsp_index_means_no_index_and_r12_is_an_index() -> None:
    """SIB index 100 is "none"; with REX.X it is r12 (SDM Vol. 2A Table 2-5)."""
    m = dec("8B 04 24", 64).operands[1]
    assert m.base == RSP and m.index is None and m.seg == SS  # rSP base defaults to SS
    m = dec("8B 04 E0", 32).operands[1]  # [eax + none*8]: scale is irrelevant without an index
    assert m.base == RAX and m.index is None
    m = dec("42 8B 04 24", 64).operands[1]
    assert m.base == RSP and m.index == 12 and m.scale == 0


def test_r12_base_needs_sib() -> None:
    """r/m 100 always means SIB, so [r12] is encoded with one (REX.B + SIB base 100); r12/r13 default to DS."""
    m = dec("41 8B 04 24", 64).operands[1]
    assert m.base == 12 and m.index is None and m.seg == DS
    assert dec("41 8B 00", 64).operands[1].base == 8  # without SIB, r/m 000 + REX.B is r8


def test_rip_relative_and_eip_relative() -> None:
    """64-bit mode: mod 00 r/m 101 is RIP + disp32, REX.B ignored (SDM Vol. 2A 2.2.1.6, Table 2-7);
    with 67 it is EIP-relative (the address is truncated to 32 bits)."""
    i = dec("8B 05 10 00 00 00", 64)
    m = i.operands[1]
    assert m.rip_rel and m.base is None and m.disp == 0x10 and i.addrsize == 64
    assert dec("41 8B 05 F0 FF FF FF", 64).operands[1] == Operand(MEM, 32, seg=DS, disp=-16, rip_rel=True)
    i = dec("67 8B 05 10 00 00 00", 64)
    assert i.operands[1].rip_rel and i.addrsize == 32
    assert not dec("8B 05 10 00 00 00", 32).operands[1].rip_rel  # outside 64-bit mode: absolute disp32


def test_16bit_addressing_forms() -> None:
    """SDM Vol. 2A Table 2-1: the eight base/index pairs, disp16 at mod 00 r/m 110."""
    expect = [(RBX, RSI), (RBX, RDI), (RBP, RSI), (RBP, RDI), (RSI, None), (RDI, None), (RBP, None), (RBX, None)]
    for rm, (base, index) in enumerate(expect):
        m = dec(f"8B {0x40 | rm:02X} 80", 16).operands[1]  # mod 01: disp8 -128
        assert (m.base, m.index, m.scale, m.disp) == (base, index, 0, -128)
    m = dec("8B 06 34 12", 16).operands[1]
    assert m.base is None and m.index is None and m.disp == 0x1234 and m.seg == DS
    m = dec("8B 86 00 80", 16).operands[1]  # mod 10: [bp + disp16]
    assert m.base == RBP and m.disp == -0x8000
    i = dec("67 8B 47 02", 32)  # 67 in 32-bit mode selects the 16-bit forms
    assert i.addrsize == 16 and i.operands[1].base == RBX and i.operands[1].disp == 2
    i = dec("67 8B 04 24", 16)  # and in 16-bit mode the 32-bit forms (with SIB)
    assert i.addrsize == 32 and i.operands[1].base == RSP


def test_bp_based_16bit_forms_default_to_ss() -> None:
    """[BP+SI], [BP+DI], [BP+d] use SS (SDM Vol. 1 3.7.4, Table 3-5); an override replaces it."""
    for h in ("8B 02", "8B 03", "8B 46 00", "8B 86 00 01"):
        assert dec(h, 16).operands[1].seg == SS, h
    for h in ("8B 00", "8B 06 00 01", "8B 07"):
        assert dec(h, 16).operands[1].seg == DS, h
    assert dec("3E 8B 02", 16).operands[1].seg == DS


def test_moffs_size_follows_address_size() -> None:
    """A0-A3: the offset is address-size wide, 8 bytes in 64-bit mode (SDM Vol. 2A 2.2.1.4)."""
    for h, bits, disp, addr in (("A1 88 77 66 55 44 33 22 11", 64, 0x1122334455667788, 64),
                                ("67 A1 44 33 22 11", 64, 0x11223344, 32),
                                ("A1 44 33 22 11", 32, 0x11223344, 32),
                                ("67 A1 22 11", 32, 0x1122, 16),
                                ("A1 22 11", 16, 0x1122, 16),
                                ("67 A0 44 33 22 11", 16, 0x11223344, 32)):
        i = dec(h, bits)
        m = i.operands[1] if i.row.opcode[0] in (0xA0, 0xA1) else i.operands[0]
        assert (m.kind, m.disp, m.base, i.addrsize) == (MEM, disp, None, addr), h
    i = dec("48 A3 00 10 00 00 00 00 00 00", 64)
    assert i.operands[0].size == 64 and i.operands[1] == reg(RAX, 64)
    assert dec("64 A0 00 00 00 00", 32).operands[1].seg == FS


# -- immediates (SDM Vol. 2A 2.2.1.5) -------------------------------------------------------------

def test_iz_sign_extends_to_64() -> None:
    i = dec("48 05 00 00 FF FF", 64)
    assert i.operands[1] == Operand(IMM, 64, value=0xFFFF_FFFF_FFFF_0000)
    assert dec("48 81 C1 FF FF FF 7F", 64).operands[1].value == 0x7FFF_FFFF
    assert dec("05 00 00 00 80", 64).operands[1] == Operand(IMM, 32, value=0x8000_0000)
    assert dec("66 05 00 80", 32).operands[1] == Operand(IMM, 16, value=0x8000)
    assert dec("68 00 00 00 80", 64).operands[0] == Operand(IMM, 64, value=0xFFFF_FFFF_8000_0000)


def test_mov_b8_takes_imm64_with_rex_w() -> None:
    """B8+r with REX.W is the only form with a 64-bit immediate (SDM Vol. 2B MOV: MOV r64, imm64)."""
    i = dec("48 B8 88 77 66 55 44 33 22 11", 64)
    assert i.operands == (reg(RAX, 64), Operand(IMM, 64, value=0x1122334455667788))
    assert dec("49 BF FF FF FF FF FF FF FF FF", 64).operands[0] == reg(15, 64)
    assert dec("B8 44 33 22 11", 64).operands[1] == Operand(IMM, 32, value=0x11223344)
    assert dec("48 C7 C0 FF FF FF FF", 64).operands[1].value == (1 << 64) - 1  # C7 /0: Iz, sign-extended


def test_ibs_sign_extends_to_operand_size() -> None:
    assert dec("83 C0 FF", 32).operands[1] == Operand(IMM, 32, value=0xFFFF_FFFF)
    assert dec("66 83 C0 80", 32).operands[1] == Operand(IMM, 16, value=0xFF80)
    assert dec("48 83 C0 80", 64).operands[1] == Operand(IMM, 64, value=0xFFFF_FFFF_FFFF_FF80)
    assert dec("6A FF", 64).operands[0] == Operand(IMM, 64, value=(1 << 64) - 1)
    assert dec("6B C1 FE", 16).operands[2] == Operand(IMM, 16, value=0xFFFE)
    # Plain Ib keeps its 8 bits: shift counts, port numbers, INT n, ENTER's level.
    assert dec("C1 E0 FF", 32).operands[1] == Operand(IMM, 8, value=0xFF)
    assert dec("C8 10 00 FF", 32).operands == (Operand(IMM, 16, value=0x10), Operand(IMM, 8, value=0xFF))


def test_relative_branches() -> None:
    i = dec("E8 FB FF FF FF", 32)
    assert i.operands[0] == Operand(REL, 32, value=-5)
    assert dec("EB 80", 16).operands[0] == Operand(REL, 16, value=-128)
    assert dec("66 E9 00 80", 32).operands[0] == Operand(REL, 16, value=-0x8000)
    assert dec("0F 84 00 00 00 80", 64).operands[0] == Operand(REL, 64, value=-(1 << 31))


def test_far_pointer_immediate() -> None:
    """Ap: offset (operand size), then the selector (SDM Vol. 2B CALL/JMP ptr16:16/32)."""
    assert dec("9A 34 12 00 F0", 16).operands[0] == Operand(FAR, 32, reg=0xF000, value=0x1234)
    assert dec("EA 78 56 34 12 08 00", 32).operands[0] == Operand(FAR, 48, reg=8, value=0x12345678)
    assert dec("66 EA 34 12 08 00", 32).operands[0] == Operand(FAR, 32, reg=8, value=0x1234)


# -- operand sizes in 64-bit mode (SDM Vol. 2A 2.2.1.7, Appendix A.2.5) ------------------------------

def test_d64_default_64_and_66_gives_16() -> None:
    for h, size in (("50", 64), ("66 50", 16), ("48 50", 64), ("40 50", 64), ("41 58", 64), ("66 FF 30", 16),
                    ("0F A0", 64), ("66 0F A9", 16), ("C9", 64), ("9C", 64)):
        assert dec(h, 64).opsize == size, h
    assert dec("41 50", 64).operands[0] == reg(8, 64)  # push r8
    assert dec("50", 32).opsize == 32 and dec("50", 16).opsize == 16


def test_f64_near_branches_vendor_rules() -> None:
    """Near branches are 64-bit in 64-bit mode; with 66 AMD uses 16 bits (APM Vol. 3 1.2.5: rel16, IP
    truncation) while Intel ignores 66 (SDM Vol. 1 3.6.1; rel32)."""
    i = dec("66 E8 10 00", 64)  # vendor amd: call rel16
    assert i.opsize == 16 and i.operands[0] == Operand(REL, 16, value=0x10)
    i = dec("66 E8 10 00 00 00", 64, vendor="intel")
    assert i.opsize == 64 and i.operands[0] == Operand(REL, 64, value=0x10)
    assert dec("66 C3", 64).opsize == 16 and dec("66 C3", 64, vendor="intel").opsize == 64
    assert dec("66 FF E0", 64).operands[0] == reg(RAX, 16)
    assert dec("66 FF E0", 64, vendor="intel").operands[0] == reg(RAX, 64)
    assert dec("FF E0", 64).operands[0] == reg(RAX, 64)  # no REX.W needed
    assert dec("48 66 EB 00", 64).opsize == 16  # the REX is ignored (not last), so 66 applies (AMD)
    assert dec("66 48 EB 00", 64).opsize == 64  # REX.W beats 66


def test_far_pointer_rex_w_vendor_rules() -> None:
    """m16:64 far pointers (REX.W) exist on Intel only; AMD reads m16:32 (APM Vol. 3 CALL (Far), LSS)."""
    assert dec("48 FF 18", 64).operands[0].size == 48
    assert dec("48 FF 18", 64, vendor="intel").operands[0].size == 80
    assert dec("48 0F B2 00", 64).operands == (reg(RAX, 32), Operand(MEM, 48, seg=DS, base=RAX))
    assert dec("66 FF 28", 64).operands[0].size == 32  # m16:16


def test_mov_cr_dr_operand_size_is_the_mode_width() -> None:
    """MOV CR/DR: 64-bit operands in 64-bit mode, 32 otherwise, 66 and REX.W ignored; the mod field is
    ignored (SDM Vol. 2B MOV--Move to/from Control Registers)."""
    assert dec("0F 20 C0", 64).operands == (reg(RAX, 64), Operand(CR, 64, 0))
    assert dec("66 0F 22 D8", 32).operands == (Operand(CR, 32, 3), reg(RAX, 32))
    i = dec("0F 20 05", 32)  # mod 00 r/m 101: still the register EBP, no disp32
    assert i.length == 3 and i.operands == (reg(RBP, 32), Operand(CR, 32, 0))
    assert dec("44 0F 20 C0", 64).operands[1] == Operand(CR, 64, 8)
    assert dec("0F 23 F8", 32).operands[0] == Operand(DR, 32, 7)


def test_nonexistent_control_and_debug_registers_are_ud() -> None:
    """CR1, CR5-CR7, CR9-CR15 and DR8-DR15 do not exist: #UD (SDM Vol. 2B MOV CR/DR)."""
    for h, bits in (("0F 20 C8", 32), ("0F 22 E8", 32), ("0F 20 F8", 64), ("44 0F 20 C8", 64), ("44 0F 21 C0", 64)):
        assert fault(h, bits).vector == Vector.UD, h


def test_lock_mov_cr0_is_cr8_on_amd() -> None:
    """APM Vol. 3 MOV CRn: LOCK MOV CR0 accesses CR8 (AltMovCr8); on Intel LOCK is #UD."""
    i = dec("F0 0F 20 C0", 32)
    assert i.operands[1] == Operand(CR, 32, 8) and not i.lock
    assert dec("F0 0F 22 C0", 64).operands[0] == Operand(CR, 64, 8)
    assert fault("F0 0F 20 C0", 32, vendor="intel").vector == Vector.UD
    assert fault("F0 0F 21 C0", 32).vector == Vector.UD  # not for debug registers


def test_i64_o64_rows() -> None:
    """63 is ARPL outside 64-bit mode and MOVSXD inside (SDM Vol. 2A ARPL, Vol. 2B MOVSX/MOVSXD)."""
    i = dec("63 C1", 32)
    assert i.mnemonic == "ARPL" and i.operands == (reg(RCX, 16), reg(RAX, 16))
    i = dec("48 63 C1", 64)
    assert i.mnemonic == "MOVSXD" and i.operands == (reg(RAX, 64), reg(RCX, 32))
    assert dec("63 C1", 64).operands == (reg(RAX, 32), reg(RCX, 32))
    assert dec("66 63 C1", 64).operands == (reg(RAX, 16), reg(RCX, 16))  # MOVSXD r16, r/m16
    # i64 rows are #UD in 64-bit mode (Appendix A.2.5); o64 rows are #UD outside it.
    for h in ("06", "27", "60", "82 C0 01", "9A 00 00 00 00 00 00", "CE", "D4 0A", "D6", "EA 00 00 00 00 00 00"):
        assert fault(h, 64).vector == Vector.UD, h
        decode(_bytes(h), 32)
    assert fault("0F 01 F8", 32).vector == Vector.UD  # SWAPGS
    assert dec("0F 01 F8", 64).mnemonic == "SWAPGS"


def test_vex_and_evex_escapes_are_not_modelled() -> None:
    """C4/C5 (VEX) and 62 (EVEX) in 64-bit mode, or with ModRM.mod = 11b elsewhere, are not LES/LDS/BOUND
    (SDM Vol. 2A 2.3.5, 2.7): the spec does not model them, which is not #UD."""
    for h, bits in (("C5 F8 77", 64), ("C4 E2 79 00 C0", 64), ("62 F1 7C 48 58 C0", 64), ("C5 C0", 32),
                    ("62 C0", 32)):
        with pytest.raises(Unimplemented):
            decode(_bytes(h), bits)
    assert dec("C5 00", 32).mnemonic == "LDS"
    assert dec("62 00", 32).mnemonic == "BOUND"


# -- #UD and #GP from the decode -------------------------------------------------------------------

def test_15_byte_limit() -> None:
    """More than 15 bytes: #GP(0) (SDM Vol. 2A 2.3.11), before #UD (SDM Vol. 3A 6.9 priorities)."""
    assert dec("66" * 14 + "90", 32).length == 15
    e = fault("66" * 15 + "90", 32)
    assert (e.vector, e.error_code) == (Vector.GP, 0)
    e = fault("2E" * 6 + "C7 80 00 00 00 00 01 00 00 00", 32)  # 16 bytes ending in the immediate
    assert (e.vector, e.error_code) == (Vector.GP, 0)
    assert fault("2E" * 14 + "0F 0B", 32).vector == Vector.GP  # a 16-byte UD2
    assert fault("2E" * 13 + "0F 0B", 32).vector == Vector.UD
    assert MAX_LENGTH == 15


def test_lock_rules() -> None:
    """LOCK is allowed only on the listed read-modify-write instructions with a memory destination;
    elsewhere #UD (SDM Vol. 2A 2.1.1, Vol. 2A LOCK)."""
    for h in ("F0 01 00", "F0 0F C7 08", "F0 86 00", "F0 0F BA 28 01", "F0 FE 00", "F0 F7 18", "F0 0F C1 00"):
        assert dec(h, 32).lock, h
    for h in ("F0 01 C0", "F0 8B 00", "F0 38 00", "F0 90", "F0 A4", "F0 0F A3 00", "F0 F7 00 01 00 00 00",
              "F0 87 C0"):
        assert fault(h, 32).vector == Vector.UD, h


def test_mandatory_f3_prefix() -> None:
    """F3 0F B8/BC/BD are POPCNT/TZCNT/LZCNT; without F3, 0F BC/BD are BSF/BSR and 0F B8 is #UD (JMPE
    exists only on IA-64 processors).  The last F2/F3 is the one that counts (SDM Vol. 2A 2.1.1)."""
    assert dec("F3 0F B8 C1", 32).mnemonic == "POPCNT"
    assert dec("F3 0F BC C1", 32).mnemonic == "TZCNT"
    assert dec("F3 0F BD C1", 32).mnemonic == "LZCNT"
    assert dec("0F BC C1", 32).mnemonic == "BSF"
    assert dec("0F BD C1", 32).mnemonic == "BSR"
    assert dec("F2 0F BC C1", 32).mnemonic == "BSF"
    assert dec("F2 F3 0F BC C1", 32).mnemonic == "TZCNT"
    assert dec("F3 F2 0F BC C1", 32).mnemonic == "BSF"
    i = dec("66 F3 0F BD C1", 32)
    assert i.mnemonic == "LZCNT" and i.opsize == 16 and i.rep is None
    assert fault("0F B8 C1", 32).vector == Vector.UD


def test_nop_pause_and_xchg_r8() -> None:
    """90 is NOP (XCHG eAX, eAX), F3 90 PAUSE, REX.B 90 XCHG r8, rAX (SDM Vol. 2B NOP, PAUSE, XCHG;
    APM Vol. 3 XCHG).  With F3 and REX.B the spec follows REX.B (QEMU and capstone agree; iced-x86 says
    PAUSE -- see tests/test_decoder_crosscheck.py)."""
    for h, bits in (("90", 32), ("66 90", 32), ("48 90", 64), ("F2 90", 64)):
        assert dec(h, bits).mnemonic == "NOP", h
    assert dec("F3 90", 64).mnemonic == "PAUSE" and dec("F3 90", 16).mnemonic == "PAUSE"
    assert dec("F3 90", 32).rep is None
    assert dec("41 90", 64).operands == (reg(8, 32), reg(RAX, 32))
    assert dec("49 90", 64).operands == (reg(8, 64), reg(RAX, 64))
    i = dec("F3 41 90", 64, iced_check=False)
    assert i.mnemonic == "XCHG" and i.operands == (reg(8, 32), reg(RAX, 32))
    assert dec("91", 32).operands == (reg(RCX, 32), reg(RAX, 32))


def test_segment_register_operands() -> None:
    """8C/8E: ModRM.reg is the segment register; 6, 7 are reserved and 8E /1 (load CS) is #UD (SDM Vol. 2B MOV)."""
    assert dec("8E D8", 32).operands == (Operand(SEG, 16, DS), reg(RAX, 16))
    assert dec("8C E0", 32).operands == (reg(RAX, 32), Operand(SEG, 16, 4))  # register: operand size
    assert dec("8C 20", 32).operands[0].size == 16  # memory: 16 bits
    for h in ("8E C8", "8C F0", "8C 38", "8E F8", "8E 08"):
        assert fault(h, 32).vector == Vector.UD, h


def test_modrm_rows_that_were_missing_modrm() -> None:
    """CMOVcc and SETcc take a ModRM byte (SDM Vol. 2A CMOVcc, Vol. 2B SETcc)."""
    i = dec("0F 44 C1", 32)
    assert i.name == "CMOVE" and i.operands == (reg(RAX, 32), reg(RCX, 32))
    i = dec("0F 94 40 10", 32)
    assert i.name == "SETE" and i.operands[0] == Operand(MEM, 8, seg=DS, base=RAX, disp=16)


def test_memory_only_and_system_group_forms() -> None:
    """A register where the row needs memory is #UD (e.g. LEA, 0F C7 /1); in 0F 01 the register forms
    are other instructions, which the map lists by ModRM (SVM) or does not model (MONITOR, XGETBV, ...)."""
    for h in ("8D C0", "0F C7 C8", "FF D8", "0F B2 C0"):
        assert fault(h, 32).vector == Vector.UD, h
    assert dec("0F 01 D8", 32).mnemonic == "VMRUN"
    for h in ("0F 01 C8", "0F 01 D0", "0F 01 FA"):
        with pytest.raises(Unimplemented):
            decode(_bytes(h), 64)
    assert dec("0F 01 38", 32).mnemonic == "INVLPG"


def test_hint_nops_and_prefetch() -> None:
    """0F 18 register forms are reserved NOPs, not #UD (SDM Vol. 2D Table A-6); AMD's 0F 0D needs memory."""
    assert dec("0F 18 C0", 32).mnemonic == "PREFETCHNTA"
    assert dec("0F 1F 44 00 00", 64).mnemonic == "NOP"
    assert fault("0F 0D C0", 32).vector == Vector.UD


def test_bswap_16bit_operand() -> None:
    """66 0F C8+r: the operand is the 16-bit register; the SDM leaves the result undefined."""
    assert dec("66 0F C8", 32).operands == (reg(RAX, 16),)
    assert dec("49 0F CF", 64).operands == (reg(15, 64),)


def test_string_operands() -> None:
    """X = DS:rSI (overridable), Y = ES:rDI (never), sized by the address size (SDM Vol. 2A A.2.1)."""
    i = dec("26 A5", 32)
    assert i.operands == (Operand(MEM, 32, seg=ES, base=RDI), Operand(MEM, 32, seg=ES, base=RSI))
    i = dec("F3 67 48 A5", 64)
    assert i.rep == "rep" and i.addrsize == 32 and i.opsize == 64
    assert dec("F2 A6", 16).rep == "repne" and dec("F3 AE", 16).rep == "repe"


# -- instructions that cross into the next page: the ``more`` callback --------------------------------

def test_more_callback_supplies_the_rest() -> None:
    code = _bytes("48 B8 88 77 66 55 44 33 22 11")
    asked: list[int] = []

    def more(n: int) -> bytes:
        asked.append(n)
        return code[: max(n, 10)]

    i = decode(code[:3], 64, more)
    assert i.length == 10 and i.operands[1].value == 0x1122334455667788 and i.raw == code
    assert asked == [4]


def test_more_callback_fault_propagates_and_is_not_asked_needlessly() -> None:
    def more(n: int) -> bytes:
        raise Fault(Vector.PF, 0x10, cr2=0x2000)

    with pytest.raises(Fault) as e:
        decode(_bytes("B8 44 33"), 32, more)
    assert e.value.vector == Vector.PF and e.value.cr2 == 0x2000
    assert decode(_bytes("90"), 32, more).length == 1  # complete: more() is never called
    with pytest.raises(IndexError):
        decode(_bytes("B8 44"), 32)


# -- the encoder and the strategy ---------------------------------------------------------------------

def _row(key: str):
    return next(r for r in ROWS if r.key == key)


def test_encode_parts() -> None:
    add = _row("01 ADD Ev,Gv")
    assert encode(add, 64, rex=0x48, modrm=0x44, sib=0x24, disp=8) == _bytes("48 01 44 24 08")
    assert encode(add, 16, prefixes=(0x66, 0x67), modrm=0x84, sib=0x00, disp=-1) == _bytes("66 67 01 84 00 FF FF FF FF")
    assert encode(_row("F3 0F B8 POPCNT Gv,Ev"), 32, prefixes=(0x66,), modrm=0xC1) == _bytes("66 F3 0F B8 C1")
    assert encode(_row("C8 ENTER Iw,Ib"), 32, imm=(0x10, 1)) == _bytes("C8 10 00 01")
    with pytest.raises(EncodeError):
        encode(add, 32, rex=0x48, modrm=0xC0)  # REX outside 64-bit mode
    with pytest.raises(EncodeError):
        encode(_row("80 /0 ADD Eb,Ib"), 32, modrm=0xC8, imm=(1,))  # reg field 1 is OR
    with pytest.raises(EncodeError):
        encode(add, 32, prefixes=(0xF0,), modrm=0xC0)  # LOCK with a register destination (strict)
    assert encode(add, 32, prefixes=(0xF0,), modrm=0xC0, strict=False) == _bytes("F0 01 C0")
    with pytest.raises(EncodeError):
        encode(_row("0F BC BSF Gv,Ev"), 32, prefixes=(0xF3,), modrm=0xC0)  # F3 would select TZCNT


def test_sample_encodes_every_row_where_it_exists() -> None:
    n = 0
    for bits in (16, 32, 64):
        for row in rows_for(bits):
            assert decode(sample(row, bits), bits).row is row
            n += 1
    assert n > 1300


@settings(max_examples=100, deadline=None)
@given(enc=instructions(64))
def test_strategy_encodings_decode_as_their_row(enc) -> None:  # type: ignore[no-untyped-def]
    i = decode(enc.code, 64)
    assert (i.row, i.length, i.opsize, i.addrsize) == (enc.row, enc.length, enc.opsize, enc.addrsize)


def test_random_encoding_is_reproducible() -> None:
    row = _row("8B MOV Gv,Ev")
    assert random_encoding(row, 64, 7).code == random_encoding(row, 64, 7).code
