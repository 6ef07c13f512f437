"""Bit test and bit scan: BT/BTS/BTR/BTC, BSF/BSR, POPCNT, LZCNT/TZCNT (spec/isa/bitops.py).

Every hand-written encoding is checked against iced-x86; properties compare
with reference computations written here with plain ints.
"""

from __future__ import annotations

import pytest
from conftest import check, flag, mask, merge, reg, run_code
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU
from spec.machine import BITS, MODES

M64 = (1 << 64) - 1
u64 = st.integers(0, M64)
MODE_SIZES = [(m, w) for m in MODES for w in (16, 32, 64) if w != 64 or m == "long64"]
R = {16: ("ax", "bx", "cx"), 32: ("eax", "ebx", "ecx"), 64: ("rax", "rbx", "rcx")}
PTR = {16: "word", 32: "dword", 64: "qword"}
BIT_UNDEFINED = (1 << F.OF) | (1 << F.SF) | (1 << F.AF) | (1 << F.PF)
status_flags = st.sets(st.sampled_from(F.STATUS)).map(lambda s: sum(1 << f for f in s))



def pre(mode: str, w: int, mandatory: str = "") -> str:
    """Prefixes for operand size ``w``: 66 (legacy) and the mandatory prefix, then REX.W last."""
    native = 16 if BITS[mode] == 16 else 32
    parts = ["66"] if w not in (native, 64) else []
    if mandatory:
        parts.append(mandatory)
    if w == 64:
        parts.append("48")
    return " ".join(parts)


def absmem(mode: str, r: int, addr: int) -> str:
    if BITS[mode] == 16:
        return f"{(r << 3) | 6:02x} " + addr.to_bytes(2, "little").hex()
    if BITS[mode] == 32:
        return f"{(r << 3) | 5:02x} " + addr.to_bytes(4, "little").hex()
    return f"{(r << 3) | 4:02x} 25 " + addr.to_bytes(4, "little").hex()


def op(mode: str, w: int, body: str, mandatory: str = "") -> str:
    return f"{pre(mode, w, mandatory)} {body}".strip()


def halted(ev) -> None:
    assert ev.kind == "halted", ev.describe()


# -- BT, BTS, BTR, BTC ---------------------------------------------------------------------------

BT_FORMS = (("bt", "a3", 4, None), ("bts", "ab", 5, lambda v, m: v | m),
            ("btr", "b3", 6, lambda v, m: v & ~m), ("btc", "bb", 7, lambda v, m: v ^ m))


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=15)
@given(v=u64, off=u64, imm=st.integers(0, 255), fl=status_flags)
def test_bt_family_register_operand(mode: str, w: int, v: int, off: int, imm: int, fl: int) -> None:
    """Register bit base: the offset (register or imm8) is taken modulo the operand size
    (SDM Vol. 2A BT).  CF = the bit; ZF unchanged; OF SF AF PF undefined (left unchanged)."""
    for name, opc, digit, upd in BT_FORMS:
        for code, pos in (
            (check(mode, op(mode, w, f"0f {opc} c8"), f"{name} {R[w][0]}, {R[w][2]}"), off & (w - 1)),
            (check(mode, op(mode, w, f"0f ba {0xC0 | digit << 3:02x} {imm:02x}"), f"{name} {R[w][0]}, {imm:#x}"),
             imm & (w - 1)),
        ):
            s, ev = run_code(mode, code, rax=v, rcx=off, flags=fl)
            halted(ev)
            x = v & mask(w)
            assert flag(s, F.CF) == bool(x >> pos & 1)
            assert (s.read_rflags() & ~(1 << F.CF) & F.STATUS_MASK) == fl & ~(1 << F.CF)
            assert s.undefined == BIT_UNDEFINED
            if upd is None:
                assert reg(s, "rax") == v  # BT does not write
            else:
                assert reg(s, "rax") == merge(v, upd(x, 1 << pos), w)
            assert reg(s, "rcx") == off


BASE = 0x6400  # bit base in the middle of a RAM page; the string spans [BASE - 0x400, BASE + 0x400)


def signed(v: int, w: int) -> int:
    v &= mask(w)
    return v - (1 << w) if v >> (w - 1) else v


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=20)
@given(off=st.integers(-0x2000, 0x1FC0), data=st.binary(min_size=0x800, max_size=0x800))
def test_bt_family_memory_register_offset(mode: str, w: int, off: int, data: bytes) -> None:
    """SDM Vol. 2A BT ("bit base", "bit offset"; Vol. 1 3.1.1.9 bit strings): with a memory
    operand and a register offset, the offset is signed and selects bit (off mod 8) of the byte
    at ea + floor(off / 8) -- negative offsets reach below the effective address."""
    lo = BASE - 0x400
    byte_addr, bit = BASE + (off >> 3), off & 7
    for name, opc, _digit, upd in BT_FORMS:
        code = check(mode, op(mode, w, f"0f {opc} {absmem(mode, 1, BASE)}"), f"{name} [{BASE:#x}], {R[w][2]}")
        s, ev = run_code(mode, code, rcx=off & M64 if w == 64 else off & mask(w), mem={lo: data})
        halted(ev)
        old = data[byte_addr - lo]
        assert flag(s, F.CF) == bool(old >> bit & 1), (name, off)
        after = bytearray(data)
        if upd is not None:
            after[byte_addr - lo] = upd(old, 1 << bit) & 0xFF
        assert s.mem.phys.read_bytes(lo, 0x800) == bytes(after)


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
def test_bt_memory_negative_offsets_named(mode: str, w: int) -> None:
    """SDM Vol. 2A BT: offset -1 is bit 7 of the byte below the bit base; offset -w is bit 0 of the
    operand-size unit just below it; the largest negative offset of a 16-bit register (-32768)
    reaches 4 KiB below."""
    code = check(mode, op(mode, w, f"0f a3 {absmem(mode, 1, BASE)}"), f"bt [{BASE:#x}], {R[w][2]}")
    for off, addr, value in ((-1, BASE - 1, 0x80), (-w, BASE - w // 8, 0x01), (w, BASE + w // 8, 0x01)):
        s, ev = run_code(mode, code, rcx=off & mask(w), mem={addr: bytes([value])})
        halted(ev)
        assert flag(s, F.CF), off
        s, ev = run_code(mode, code, rcx=off & mask(w), mem={addr: bytes([value ^ 0xFF])})
        assert not flag(s, F.CF), off
    if w == 16:
        s, ev = run_code(mode, code, rcx=0x8000, mem={BASE - 0x1000: b"\x01"})
        halted(ev)
        assert flag(s, F.CF)


def test_bt_memory_offset_wraps_in_16bit_address_size() -> None:
    """The unit address is ea + displacement in the address size: 16-bit offsets wrap at 64 KiB."""
    code = check("real", "0f a3 0f", "bt [bx], cx")
    # BX = FFFE, CX = 32 -> +4 bytes -> offset 0x0002 (wrapped), not linear 0x10002.
    s, ev = run_code("real", code, rbx=0xFFFE, rcx=32, mem={0x0002: b"\x01", 0x10002: b"\x00"})
    halted(ev)
    assert flag(s, F.CF)


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
def test_bt_memory_immediate_is_masked(mode: str, w: int) -> None:
    """SDM Vol. 2A BT: an immediate offset with a memory operand is taken modulo the operand size
    (no displacement): BTS [m], w+1 sets bit 1 of the unit at the effective address."""
    imm = w + 1
    code = check(mode, op(mode, w, f"0f ba {absmem(mode, 5, BASE)} {imm:02x}"),
                 f"bts {PTR[w]} ptr [{BASE:#x}], {imm:#x}")
    s, ev = run_code(mode, code)
    halted(ev)
    assert s.mem.phys.read_bytes(BASE, 16) == b"\x02" + bytes(15)
    assert not flag(s, F.CF)


# -- BSF, BSR ------------------------------------------------------------------------------------

def ctz(v: int, w: int) -> int:
    return (v & -v).bit_length() - 1 if v else w


def clz(v: int, w: int) -> int:
    return w - v.bit_length()


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=25)
@given(old=u64, v=st.one_of(u64, st.integers(0, 64).map(lambda k: (1 << k) & M64), st.just(0)), fl=status_flags)
def test_bsf_bsr(mode: str, w: int, old: int, v: int, fl: int) -> None:
    """0F BC/BD (SDM Vol. 2A BSF, BSR; APM Vol. 3): index of the lowest/highest set bit, ZF = 0.
    Source zero: ZF = 1 and the destination is unchanged -- AMD documents it, Intel leaves it
    undefined; the spec keeps it, upper half included (no 32-bit zero-extension)."""
    x = v & mask(w)
    for name, opc, expect in (("bsf", "bc", ctz(x, w)), ("bsr", "bd", w - 1 - clz(x, w))):
        code = check(mode, op(mode, w, f"0f {opc} c3"), f"{name} {R[w][0]}, {R[w][1]}")
        s, ev = run_code(mode, code, rax=old, rbx=v, flags=fl)
        halted(ev)
        assert flag(s, F.ZF) == (x == 0)
        assert reg(s, "rax") == (old if x == 0 else merge(old, expect, w))
        assert s.undefined == BIT_UNDEFINED | (1 << F.CF)
        assert (s.read_rflags() & F.STATUS_MASK & ~(1 << F.ZF)) == fl & ~(1 << F.ZF)


def test_bsf_bsr_zero_source_keeps_upper_half() -> None:
    """The named edge case: BSF EAX, EBX with EBX = 0 in 64-bit mode leaves RAX whole."""
    for code in ("0f bc c3", "0f bd c3"):
        s, ev = run_code("long64", code, rax=0xAAAA_BBBB_CCCC_DDDD, rbx=0xFFFF_FFFF_0000_0000)
        halted(ev)
        assert reg(s, "rax") == 0xAAAA_BBBB_CCCC_DDDD and flag(s, F.ZF)


@pytest.mark.parametrize("mode", MODES)
def test_bsf_bsr_memory_source(mode: str) -> None:
    w = 16 if BITS[mode] == 16 else 32
    for name, opc, expected in (("bsf", "bc", 4), ("bsr", "bd", 11)):
        code = check(mode, f"0f {opc} {absmem(mode, 0, BASE)}", f"{name} {R[w][0]}, [{BASE:#x}]")
        s, ev = run_code(mode, code, mem={BASE: (0x0810).to_bytes(2, "little")})
        halted(ev)
        assert reg(s, "rax") == expected and not flag(s, F.ZF)


# -- POPCNT, LZCNT, TZCNT ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=25)
@given(old=u64, v=st.one_of(u64, st.just(0), st.just(M64)), fl=status_flags)
def test_popcnt(mode: str, w: int, old: int, v: int, fl: int) -> None:
    """F3 0F B8 (SDM Vol. 2B POPCNT): count of set bits; ZF = (source == 0); OF SF AF CF PF = 0."""
    x = v & mask(w)
    code = check(mode, op(mode, w, "0f b8 c3", "f3"), f"popcnt {R[w][0]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=old, rbx=v, flags=fl)
    halted(ev)
    assert reg(s, "rax") == merge(old, bin(x).count("1"), w)
    assert (s.read_rflags() & F.STATUS_MASK) == ((1 << F.ZF) if x == 0 else 0)
    assert s.undefined == 0


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=25)
@given(old=u64, v=st.one_of(u64, st.just(0), st.integers(0, 63).map(lambda k: 1 << k)), fl=status_flags)
def test_lzcnt_tzcnt(mode: str, w: int, old: int, v: int, fl: int) -> None:
    """F3 0F BD/BC (SDM Vol. 2A LZCNT, Vol. 2B TZCNT): the count (the operand size for a zero
    source); CF = (source == 0), ZF = (result == 0); OF SF AF PF undefined (left unchanged)."""
    x = v & mask(w)
    for name, opc, expect in (("lzcnt", "bd", clz(x, w)), ("tzcnt", "bc", ctz(x, w))):
        code = check(mode, op(mode, w, f"0f {opc} c3", "f3"), f"{name} {R[w][0]}, {R[w][1]}")
        s, ev = run_code(mode, code, rax=old, rbx=v, flags=fl)
        halted(ev)
        assert reg(s, "rax") == merge(old, expect, w)
        assert flag(s, F.CF) == (x == 0) and flag(s, F.ZF) == (expect == 0)
        assert s.undefined == BIT_UNDEFINED
        keep = BIT_UNDEFINED
        assert (s.read_rflags() & keep) == fl & keep


def test_counts_memory_source_and_sixteen_bit() -> None:
    """Memory sources; LZCNT of a zero word is 16 (SDM Vol. 2A LZCNT: "operand size")."""
    code = check("long64", "f3 48 0f b8 04 25 00 64 00 00", "popcnt rax, [0x6400]")
    s, ev = run_code("long64", code, mem={BASE: M64.to_bytes(8, "little")})
    halted(ev)
    assert reg(s, "rax") == 64
    code = check("real", "f3 0f bd 06 00 64", "lzcnt ax, [0x6400]")
    s, ev = run_code("real", code, rax=M64)
    halted(ev)
    assert reg(s, "rax") == (M64 & ~0xFFFF) | 16 and flag(s, F.CF) and not flag(s, F.ZF)


def test_undefined_flags_after_bit_ops_then_defined_again() -> None:
    """BT leaves OF SF AF PF undefined; a following ADD defines all six again."""
    s, ev = run_code("prot32", "0f a3 c8", rax=1, rcx=0)
    halted(ev)
    assert s.undefined == BIT_UNDEFINED and flag(s, F.CF)
    st_, ev = run_code("prot32", "0f a3 c8 01 c0", rax=1, rcx=0)
    assert st_.undefined == 0


def test_bt_does_not_write() -> None:
    """BT only reads its operand (observed: a recording bus sees a read, no write)."""

    class Bus:
        def __init__(self) -> None:
            self.log: list[str] = []

        def read(self, addr: int, n: int) -> int:
            self.log.append(f"r{addr:#x}/{n}")
            return 0

        def write(self, addr: int, n: int, value: int) -> None:
            self.log.append(f"w{addr:#x}/{n}")

    bus = Bus()
    code = check("long64", "0f a3 0c 25 00 90 00 00", "bt [0x9000], ecx")
    s, _ = run_code("long64", code, budget=0, rcx=33)
    s.mem.phys.bus = bus
    halted(SpecCPU(s).run(10))
    assert bus.log == ["r0x9004/4"]
    bus.log.clear()
    code = check("long64", "0f ab 0c 25 00 90 00 00", "bts [0x9000], ecx")
    s, _ = run_code("long64", code, budget=0, rcx=33)
    s.mem.phys.bus = bus
    halted(SpecCPU(s).run(10))
    assert bus.log == ["r0x9004/4", "w0x9004/4"]
