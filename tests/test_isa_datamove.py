"""Data movement: MOV, MOVZX/MOVSX/MOVSXD, LEA, XCHG, XADD, CMPXCHG, CMPXCHG8B/16B, BSWAP,
CMOVcc, SETcc, CBW/CWD, XLAT, LAHF/SAHF (spec/isa/datamove.py).

Every hand-written encoding is checked against iced-x86 (``check``): the
disassembly text and that the bytes are exactly one instruction.  Properties
compare the spec with a reference computed here with plain ints.
"""

from __future__ import annotations

import pytest
from conftest import check, flag, mask, merge, reg, run_code
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU
from spec.machine import BITS, MODES
from spec.state import MachineState

M64 = (1 << 64) - 1
DATA = 0x6000  # mapped in every flat mode, reachable with 16-bit offsets
u64 = st.integers(0, M64)



def osz(mode: str, w: int) -> str:
    """Prefix selecting operand size ``w`` (16/32/64) in ``mode``: '', '66' or REX.W '48'."""
    if w == 64:
        assert mode == "long64"
        return "48"
    native = 16 if BITS[mode] == 16 else 32
    return "" if w == native else "66"


def absmem(mode: str, r: int, addr: int = DATA) -> str:
    """ModRM (+SIB) + displacement for ``[addr]`` with reg field ``r`` (no RIP-relative in 64-bit)."""
    if BITS[mode] == 16:
        return f"{(r << 3) | 6:02x} " + addr.to_bytes(2, "little").hex()
    if BITS[mode] == 32:
        return f"{(r << 3) | 5:02x} " + addr.to_bytes(4, "little").hex()
    return f"{(r << 3) | 4:02x} 25 " + addr.to_bytes(4, "little").hex()


MODE_SIZES = [(m, w) for m in MODES for w in (16, 32, 64) if w != 64 or m == "long64"]
MODE_SIZES8 = [(m, w) for m in MODES for w in (8, 16, 32, 64) if w != 64 or m == "long64"]
R = {16: ("ax", "bx", "cx", "dx"), 32: ("eax", "ebx", "ecx", "edx"), 64: ("rax", "rbx", "rcx", "rdx"),
     8: ("al", "bl", "cl", "dl")}


def parity(v: int) -> bool:
    return bin(v & 0xFF).count("1") % 2 == 0


def ref_add(w: int, a: int, b: int) -> dict[int, bool]:
    r = (a + b) & mask(w)
    return {F.CF: a + b > mask(w), F.ZF: r == 0, F.SF: bool(r >> (w - 1)), F.PF: parity(r),
            F.AF: bool((a ^ b ^ r) & 0x10), F.OF: bool(((a ^ r) & (b ^ r)) >> (w - 1) & 1)}


def ref_sub(w: int, a: int, b: int) -> dict[int, bool]:
    r = (a - b) & mask(w)
    return {F.CF: a < b, F.ZF: r == 0, F.SF: bool(r >> (w - 1)), F.PF: parity(r),
            F.AF: bool((a ^ b ^ r) & 0x10), F.OF: bool(((a ^ b) & (a ^ r)) >> (w - 1) & 1)}


def assert_flags(state: MachineState, expected: dict[int, bool]) -> None:
    got = {f: flag(state, f) for f in expected}
    assert got == expected, {F.NAMES[f]: (got[f], expected[f]) for f in expected if got[f] != expected[f]}


def rerun(state_and_event: tuple[MachineState, object], setup) -> MachineState:
    """Run code prepared by ``run_code(..., budget=0)`` after ``setup(state)`` (segment bases, buses)."""
    state, _ = state_and_event
    setup(state)
    ev = SpecCPU(state).run(100)
    assert ev.kind == "halted", ev.describe()
    return state


class RecordingBus:
    """An open bus that records the physical addresses read through it (to observe accesses)."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def read(self, addr: int, n: int) -> int:
        self.reads.append((addr, n))
        return mask(8 * n)

    def write(self, addr: int, n: int, value: int) -> None:
        return None


def halted(ev) -> None:
    assert ev.kind == "halted", ev.describe()


# -- MOV -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "w"), MODE_SIZES8)
@settings(max_examples=25)
@given(a=u64, b=u64)
def test_mov_reg_reg(mode: str, w: int, a: int, b: int) -> None:
    """88/89 /r register forms at every operand size (SDM Vol. 2B MOV)."""
    op = "88 d8" if w == 8 else osz(mode, w) + " 89 d8"
    code = check(mode, op, f"mov {R[w][0]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=a, rbx=b)
    halted(ev)
    assert reg(s, "rax") == merge(a, b, w)
    assert reg(s, "rbx") == b


def test_mov_high8_and_rex_low8() -> None:
    """Without REX, r/m 4-7 are AH..BH; with any REX they are SPL..DIL (SDM Vol. 2A 3.7.2.1)."""
    for mode in MODES:
        s, ev = run_code(mode, check(mode, "88 e7", "mov bh, ah"), rax=0x1234, rbx=0xFFFF)
        halted(ev)
        assert reg(s, "rbx") == 0x12FF
    s, ev = run_code("long64", check("long64", "40 88 e7", "mov dil, spl"), rdi=0xAAAA)
    halted(ev)
    assert reg(s, "rdi") == 0xAA00  # SPL = low byte of RSP (0x8000)


def test_mov_immediates() -> None:
    """B0+r/B8+r (imm64 with REX.W), C6/C7 (Iz sign-extended to 64 bits) (SDM Vol. 2B MOV)."""
    cases = [
        ("prot32", "b9 78 56 34 12", "mov ecx, 0x12345678", 0x12345678),
        ("real", "b9 34 12", "mov cx, 0x1234", 0xFFFF_FFFF_FFFF_1234),
        ("real", "66 b9 78 56 34 12", "mov ecx, 0x12345678", 0x12345678),
        ("long64", "48 b9 88 77 66 55 44 33 22 11", "mov rcx, 0x1122334455667788", 0x1122334455667788),
        ("long64", "b9 ff ff ff ff", "mov ecx, 0xffffffff", 0xFFFF_FFFF),
        ("long64", "48 c7 c1 ff ff ff ff", "mov rcx, 0xffffffffffffffff", M64),
        ("long64", "c7 c1 00 00 00 80", "mov ecx, 0x80000000", 0x8000_0000),
        ("long64", "66 b9 34 12", "mov cx, 0x1234", 0xFFFF_FFFF_FFFF_1234),
        ("long64", "b5 12", "mov ch, 0x12", 0xFFFF_FFFF_FFFF_12FF),
        ("long64", "c6 c1 12", "mov cl, 0x12", 0xFFFF_FFFF_FFFF_FF12),
    ]
    for mode, code, text, expected in cases:
        s, ev = run_code(mode, check(mode, code, text), rcx=M64)
        halted(ev)
        assert reg(s, "rcx") == expected, (mode, text)
    s, ev = run_code("long64", check("long64", "41 b0 12", "mov r8b, 0x12"), r8=M64)
    assert reg(s, "r8") == 0xFFFF_FFFF_FFFF_FF12


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES8)
@settings(max_examples=15)
@given(v=u64, m=u64)
def test_mov_load_store(mode: str, w: int, v: int, m: int) -> None:
    """8A/8B loads and 88/89 stores of each size through an absolute address."""
    p = "" if w == 8 else osz(mode, w)
    load = check(mode, f"{p} {'8a' if w == 8 else '8b'} {absmem(mode, 3)}".strip(), f"mov {R[w][1]}, [0x6000]")
    s, ev = run_code(mode, load, rbx=v, mem={DATA: m.to_bytes(8, "little")})
    halted(ev)
    assert reg(s, "rbx") == merge(v, m, w)
    store = check(mode, f"{p} {'88' if w == 8 else '89'} {absmem(mode, 3)}".strip(), f"mov [0x6000], {R[w][1]}")
    s, ev = run_code(mode, store, rbx=v, mem={DATA: m.to_bytes(8, "little")})
    halted(ev)
    n = w // 8
    assert s.mem.phys.read_bytes(DATA, 8) == (v & mask(w)).to_bytes(n, "little") + m.to_bytes(8, "little")[n:]


def test_mov_moffs() -> None:
    """A0-A3: the offset has the address size (2, 4 or 8 bytes; 67 switches it) (SDM Vol. 2B MOV)."""
    mem = {DATA: bytes(range(0x81, 0x89))}
    q = int.from_bytes(bytes(range(0x81, 0x89)), "little")
    loads = [
        ("real", "a1 00 60", "mov ax, [0x6000]", 16),
        ("real", "a0 00 60", "mov al, [0x6000]", 8),
        ("real", "67 66 a1 00 60 00 00", "addr32 mov eax, [0x6000]", 32),
        ("prot16", "a1 00 60", "mov ax, [0x6000]", 16),
        ("prot32", "a1 00 60 00 00", "mov eax, [0x6000]", 32),
        ("prot32", "67 a1 00 60", "addr16 mov eax, [0x6000]", 32),
        ("long64", "48 a1 00 60 00 00 00 00 00 00", "mov rax, [0x6000]", 64),
        ("long64", "a1 00 60 00 00 00 00 00 00", "mov eax, [0x6000]", 32),
        ("long64", "67 a1 00 60 00 00", "addr32 mov eax, [0x6000]", 32),
    ]
    for mode, code, text, w in loads:
        s, ev = run_code(mode, check(mode, code, text), rax=M64, mem=mem)
        halted(ev)
        assert reg(s, "rax") == merge(M64, q, w), text
    stores = [
        ("real", "a3 00 60", "mov [0x6000], ax", 16),
        ("prot32", "a2 00 60 00 00", "mov [0x6000], al", 8),
        ("long64", "48 a3 00 60 00 00 00 00 00 00", "mov [0x6000], rax", 64),
    ]
    for mode, code, text, w in stores:
        s, ev = run_code(mode, check(mode, code, text), rax=0x1122334455667788, mem=mem)
        halted(ev)
        n = w // 8
        assert s.mem.phys.read_bytes(DATA, 8) == (0x1122334455667788).to_bytes(8, "little")[:n] + mem[DATA][n:]


def test_mov_moffs_segment_override() -> None:
    """Overrides apply to moffs; in 64-bit mode only FS/GS bases count (SDM Vol. 3A 3.2.4)."""
    mem = {DATA: (0x11111111).to_bytes(4, "little"), DATA + 0x100: (0x22222222).to_bytes(4, "little")}

    def fs_base(s: MachineState) -> None:
        s.seg[4].base = 0x100
        s.seg[0].base = 0x100  # ES: ignored in 64-bit mode

    for mode, code, text, expected in [
        ("prot32", "64 a1 00 60 00 00", "mov eax, fs:[0x6000]", 0x22222222),
        ("prot32", "a1 00 60 00 00", "mov eax, [0x6000]", 0x11111111),
        ("long64", "64 a1 00 60 00 00 00 00 00 00", "mov eax, fs:[0x6000]", 0x22222222),
        ("long64", "26 a1 00 60 00 00 00 00 00 00", "mov eax, [0x6000]", 0x11111111)  # iced drops ES,
    ]:
        s = rerun(run_code(mode, check(mode, code, text), budget=0, mem=mem), fs_base)
        assert reg(s, "rax") == expected, (mode, text)


def test_mov_segment_forms_dispatch() -> None:
    """8C/8E share the MOV mnemonic: they go to spec.isa.segments (flat data selector 0x10)."""
    s, ev = run_code("long64", check("long64", "8c d8", "mov eax, ds"), rax=M64)
    halted(ev)
    assert reg(s, "rax") == 0x10
    s, ev = run_code("prot32", check("prot32", "8c d8", "mov eax, ds"), rax=M64)
    halted(ev)
    assert reg(s, "rax") == 0x10
    s, ev = run_code("real", check("real", "8e d8", "mov ds, ax"), rax=0x1234)
    halted(ev)
    assert s.seg[3].selector == 0x1234 and s.seg[3].base == 0x12340


def test_mov_control_register_dispatches_to_system() -> None:
    """0F 20-23 share the MOV mnemonic; their semantics live in spec/isa/system.py (tests/test_isa_system.py)."""
    s, ev = run_code("long64", check("long64", "0f 20 c0", "mov rax, cr0"), rax=5)
    halted(ev)
    assert reg(s, "rax") == s.cr0


# -- MOVZX, MOVSX, MOVSXD ----------------------------------------------------------------------

def sx(v: int, frm: int, to: int) -> int:
    v &= mask(frm)
    return (v | (mask(to) & ~mask(frm))) if v >> (frm - 1) else v


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=15)
@given(old=u64, v=u64)
def test_movzx_movsx(mode: str, w: int, old: int, v: int) -> None:
    """0F B6/B7 zero-extend, 0F BE/BF sign-extend a byte or word (SDM Vol. 2B MOVZX, MOVSX)."""
    d = R[w][0]
    forms = [("0f b6 c3", "movzx", "bl", 8, False), ("0f b7 c3", "movzx", "bx", 16, False),
             ("0f be c3", "movsx", "bl", 8, True), ("0f bf c3", "movsx", "bx", 16, True),
             ("0f b6 c7", "movzx", "bh", 8, False)]
    for op, name, src, sw, signed in forms:
        if src == "bh" and w == 64:
            continue  # with REX.W, r/m 7 is DIL
        code = check(mode, f"{osz(mode, w)} {op}".strip(), f"{name} {d}, {src}")
        s, ev = run_code(mode, code, rax=old, rbx=v)
        halted(ev)
        sv = (v >> 8) & 0xFF if src == "bh" else v & mask(sw)
        res = sx(sv, sw, w) if signed else sv
        assert reg(s, "rax") == merge(old, res, w), code
    # A memory source reads only the source size.
    code = check(mode, f"{osz(mode, w)} 0f be {absmem(mode, 0)}".strip(), f"movsx {d}, byte ptr [0x6000]")
    s, ev = run_code(mode, code, rax=old, mem={DATA: bytes([v & 0xFF, 0x12])})
    halted(ev)
    assert reg(s, "rax") == merge(old, sx(v, 8, w), w)


@settings(max_examples=30)
@given(old=u64, v=u64)
def test_movsxd_forms(old: int, v: int) -> None:
    """63 /r in 64-bit mode (SDM Vol. 2B MOVSX/MOVSXD): REX.W sign-extends r/m32; without REX.W
    it is MOVSXD r32, r/m32 (a move, zero-extending RAX) and with 66 MOVSXD r16, r/m16."""
    s, ev = run_code("long64", check("long64", "48 63 c3", "movsxd rax, ebx"), rax=old, rbx=v)
    halted(ev)
    assert reg(s, "rax") == sx(v, 32, 64)
    s, ev = run_code("long64", check("long64", "63 c3", "movsxd eax, ebx"), rax=old, rbx=v)
    halted(ev)
    assert reg(s, "rax") == v & 0xFFFF_FFFF
    s, ev = run_code("long64", check("long64", "66 63 c3", "movsxd ax, bx"), rax=old, rbx=v)
    halted(ev)
    assert reg(s, "rax") == merge(old, v, 16)
    code = check("long64", "4c 63 04 25 00 60 00 00", "movsxd r8, [0x6000]")
    s, ev = run_code("long64", code, r8=old, mem={DATA: v.to_bytes(8, "little")})
    halted(ev)
    assert reg(s, "r8") == sx(v, 32, 64)


def test_movsxd_r16_reads_only_a_word() -> None:
    """MOVSXD r16, r/m16 reads 2 bytes: a word at the end of RAM does not touch the next page."""
    code = check("long64", "66 63 04 25 fe 7f 00 00", "movsxd ax, [0x7ffe]")
    bus = RecordingBus()
    s = rerun(run_code("long64", code, budget=0, rax=M64, mem={0x7FFE: b"\x34\x12"}),
              lambda s: setattr(s.mem.phys, "bus", bus))
    assert reg(s, "rax") == 0xFFFF_FFFF_FFFF_1234
    assert bus.reads == []
    code = check("long64", "63 04 25 fe 7f 00 00", "movsxd eax, [0x7ffe]")
    bus = RecordingBus()
    s = rerun(run_code("long64", code, budget=0, mem={0x7FFE: b"\x34\x12"}),
              lambda s: setattr(s.mem.phys, "bus", bus))
    assert reg(s, "rax") == 0xFFFF1234 and bus.reads == [(0x8000, 2)]


# -- LEA -------------------------------------------------------------------------------------------

def test_lea_address_and_operand_sizes() -> None:
    """SDM Vol. 2A LEA (tables of operand size vs address size): the address is computed in
    the address size, then truncated to a smaller operand size or zero-extended to a larger one."""
    rbx, rsi = 0xFFFF_FFFF_0000_FFF0, 0xFFFF_FFFF_FFFF_0010
    regs = dict(rax=M64, rbx=rbx, rsi=rsi)
    a64 = (rsi + 4 * rbx + 0x10) & M64
    a32 = ((rsi & 0xFFFF_FFFF) + 4 * (rbx & 0xFFFF_FFFF) + 0x10) & 0xFFFF_FFFF
    a16 = ((rsi & 0xFFFF) + (rbx & 0xFFFF) + 0x10) & 0xFFFF
    assert a16 == 0x10  # the 16-bit sum wraps
    cases = [
        # AS16 OS16: the 16-bit address (wrapped at 64 KiB).
        ("real", "8d 40 10", "lea ax, [bx+si+0x10]", merge(M64, a16, 16)),
        # AS16 OS32: the 16-bit address zero-extended.
        ("real", "66 8d 40 10", "lea eax, [bx+si+0x10]", a16),
        ("prot32", "67 8d 40 10", "lea eax, [bx+si+0x10]", a16),
        # AS32 OS16: the low 16 bits of the 32-bit address.
        ("real", "67 8d 44 1e 10", "lea ax, [esi+ebx+0x10]",
         merge(M64, (rsi + rbx + 0x10) & 0xFFFF, 16)),
        ("prot32", "8d 44 9e 10", "lea eax, [esi+ebx*4+0x10]", a32),
        ("prot32", "66 8d 44 9e 10", "lea ax, [esi+ebx*4+0x10]", merge(M64, a32, 16)),
        # 64-bit mode: AS64 OS64, AS32 OS64 (zero-extended), AS64 OS32 (truncated), AS64 OS16.
        ("long64", "48 8d 44 9e 10", "lea rax, [rsi+rbx*4+0x10]", a64),
        ("long64", "67 48 8d 44 9e 10", "lea rax, [esi+ebx*4+0x10]", a32),
        ("long64", "8d 44 9e 10", "lea eax, [rsi+rbx*4+0x10]", a64 & 0xFFFF_FFFF),
        ("long64", "66 8d 44 9e 10", "lea ax, [rsi+rbx*4+0x10]", merge(M64, a64, 16)),
        # RIP-relative: next RIP + disp; with 67 the 32-bit EIP-relative address.
        ("long64", "48 8d 05 10 00 00 00", "lea rax, [0x1017]", 0x1017),
        ("long64", "67 48 8d 05 f0 ff ff ff", "lea rax, [0xff8]", 0xFF8),
    ]
    for mode, code, text, expected in cases:
        s, ev = run_code(mode, check(mode, code, text), **regs)
        halted(ev)
        assert reg(s, "rax") == expected, (mode, text, hex(reg(s, "rax")))


def test_lea_register_operand_is_ud() -> None:
    """LEA with a register r/m is #UD (SDM Vol. 2A LEA exceptions)."""
    _, ev = run_code("prot32", "8d c0")
    assert ev.kind == "fault" and ev.vector == 6


# -- XCHG, XADD ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "w"), MODE_SIZES8)
@settings(max_examples=15)
@given(a=u64, b=u64, m=u64)
def test_xchg(mode: str, w: int, a: int, b: int, m: int) -> None:
    """86/87 /r (register and memory) and 90+r (SDM Vol. 2B XCHG)."""
    p = "" if w == 8 else osz(mode, w)
    code = check(mode, f"{p} {'86' if w == 8 else '87'} d8".strip(), f"xchg {R[w][0]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=a, rbx=b)
    halted(ev)
    assert (reg(s, "rax"), reg(s, "rbx")) == (merge(a, b, w), merge(b, a, w))
    code = check(mode, f"{p} {'86' if w == 8 else '87'} {absmem(mode, 3)}".strip(), f"xchg [0x6000], {R[w][1]}")
    s, ev = run_code(mode, code, rbx=b, mem={DATA: m.to_bytes(8, "little")})
    halted(ev)
    n = w // 8
    assert reg(s, "rbx") == merge(b, m, w)
    assert s.mem.phys.read_bytes(DATA, 8) == (b & mask(w)).to_bytes(n, "little") + m.to_bytes(8, "little")[n:]
    if w != 8:
        code = check(mode, f"{p} 93".strip(), f"xchg {R[w][1]}, {R[w][0]}")
        s, ev = run_code(mode, code, rax=a, rbx=b)
        halted(ev)
        assert (reg(s, "rax"), reg(s, "rbx")) == (merge(a, b, w), merge(b, a, w))


def test_xchg_64bit_mode_nop_and_rex_b() -> None:
    """90 is NOP (EAX not zero-extended); 41 90 is XCHG R8D, EAX; 87 C0 writes EAX (SDM Vol. 2B
    XCHG: "XCHG (E)AX, (E)AX (encoded instruction byte is 90H) is an alias for NOP")."""
    hi = 0xAAAA_BBBB_CCCC_DDDD
    s, ev = run_code("long64", "90", rax=hi)
    halted(ev)
    assert reg(s, "rax") == hi
    s, ev = run_code("long64", check("long64", "87 c0", "xchg eax, eax"), rax=hi)
    assert reg(s, "rax") == 0xCCCC_DDDD
    s, ev = run_code("long64", check("long64", "41 90", "xchg r8d, eax"), rax=hi, r8=0x1111_2222_3333_4444)
    assert (reg(s, "rax"), reg(s, "r8")) == (0x3333_4444, 0xCCCC_DDDD)
    s, ev = run_code("long64", check("long64", "49 90", "xchg r8, rax"), rax=hi, r8=7)
    assert (reg(s, "rax"), reg(s, "r8")) == (7, hi)


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES8)
@settings(max_examples=20)
@given(a=u64, b=u64)
def test_xadd(mode: str, w: int, a: int, b: int) -> None:
    """0F C0/C1: SRC = old DEST, DEST = sum, flags as ADD (SDM Vol. 2B XADD)."""
    p = "" if w == 8 else osz(mode, w)
    code = check(mode, f"{p} 0f {'c0' if w == 8 else 'c1'} d8".strip(), f"xadd {R[w][0]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=a, rbx=b)
    halted(ev)
    x, y = a & mask(w), b & mask(w)
    assert reg(s, "rax") == merge(a, x + y, w)
    assert reg(s, "rbx") == merge(b, x, w)
    assert_flags(s, ref_add(w, x, y))
    assert s.undefined == 0


def test_xadd_same_register_and_memory() -> None:
    """XADD EAX, EAX: DEST is written last, so EAX = 2*EAX; the memory form adds into memory."""
    s, ev = run_code("prot32", check("prot32", "0f c1 c0", "xadd eax, eax"), rax=0x4000_0001)
    halted(ev)
    assert reg(s, "rax") == 0x8000_0002
    code = check("long64", "48 0f c1 1c 25 00 60 00 00", "xadd [0x6000], rbx")
    s, ev = run_code("long64", code, rbx=5, mem={DATA: (M64).to_bytes(8, "little")})
    halted(ev)
    assert reg(s, "rbx") == M64 and s.mem.phys.read(DATA, 8) == 4 and flag(s, F.CF) and flag(s, F.ZF) is False


# -- CMPXCHG -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "w"), MODE_SIZES8)
@settings(max_examples=25)
@given(acc=u64, dst=u64, src=u64, equal=st.booleans())
def test_cmpxchg_register(mode: str, w: int, acc: int, dst: int, src: int, equal: bool) -> None:
    """0F B0/B1 with a register destination (SDM Vol. 2A CMPXCHG; APM Vol. 3 CMPXCHG).

    Flags as CMP accumulator, DEST.  Success: DEST = SRC, accumulator untouched
    (RAX keeps its upper half for 32-bit).  Failure: accumulator = DEST
    (zero-extended for 32-bit); the register DEST is not written (upper half kept).
    """
    if equal:
        dst = (dst & ~mask(w) & M64) | (acc & mask(w))
    p = "" if w == 8 else osz(mode, w)
    code = check(mode, f"{p} 0f {'b0' if w == 8 else 'b1'} d9".strip(), f"cmpxchg {R[w][2]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=acc, rcx=dst, rbx=src)
    halted(ev)
    a, d = acc & mask(w), dst & mask(w)
    assert_flags(s, ref_sub(w, a, d))
    if a == d:
        assert reg(s, "rcx") == merge(dst, src, w)
        assert reg(s, "rax") == acc
    else:
        assert reg(s, "rcx") == dst
        assert reg(s, "rax") == merge(acc, d, w)


@pytest.mark.parametrize("mode", MODES)
def test_cmpxchg_memory(mode: str) -> None:
    """Memory destination: success stores SRC; failure loads the accumulator and writes the
    old value back (SDM Vol. 2A CMPXCHG: the destination always receives a write cycle)."""
    w = 16 if BITS[mode] == 16 else 32
    code = check(mode, f"0f b1 {absmem(mode, 3)}", f"cmpxchg [0x6000], {R[w][1]}")
    v = 0x11223344 & mask(w)
    mem = {DATA: (0x11223344).to_bytes(4, "little")}
    s, ev = run_code(mode, code, rax=0xFFFF_FFFF_0000_0000 | v, rbx=0x55667788, mem=mem)
    halted(ev)
    assert flag(s, F.ZF) and reg(s, "rax") == 0xFFFF_FFFF_0000_0000 | v
    assert s.mem.phys.read(DATA, 4) == (0x11223344 & ~mask(w)) | (0x55667788 & mask(w))
    s, ev = run_code(mode, code, rax=0xFFFF_FFFF_0000_0000, rbx=0x55667788, mem=mem)
    halted(ev)
    assert not flag(s, F.ZF) and flag(s, F.CF)  # 0 - v borrows
    assert reg(s, "rax") == merge(0xFFFF_FFFF_0000_0000, v, w)
    assert s.mem.phys.read(DATA, 4) == 0x11223344


def test_cmpxchg_failure_still_writes_memory() -> None:
    """SDM Vol. 2A CMPXCHG / CMPXCHG8B: "the destination operand is written back if the comparison
    fails" (the locked read-modify-write always writes).  Observed on a bus: read, then a write of
    the value read; a register destination is not written (its upper half stays, above)."""

    class Bus:
        def __init__(self) -> None:
            self.log: list[tuple[str, int, int, int]] = []

        def read(self, addr: int, n: int) -> int:
            self.log.append(("r", addr, n, 0x11223344 & mask(8 * n)))
            return 0x11223344 & mask(8 * n)

        def write(self, addr: int, n: int, value: int) -> None:
            self.log.append(("w", addr, n, value))

    for code, text, n in (("0f b1 1c 25 00 90 00 00", "cmpxchg [0x9000], ebx", 4),
                          ("0f c7 0c 25 00 90 00 00", "cmpxchg8b [0x9000]", 8)):
        bus = Bus()
        s = rerun(run_code("long64", check("long64", code, text), budget=0, rax=5, rbx=6),
                  lambda s, bus=bus: setattr(s.mem.phys, "bus", bus))
        assert not flag(s, F.ZF)
        assert bus.log == [("r", 0x9000, n, 0x11223344), ("w", 0x9000, n, 0x11223344)]


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10)
@given(rax=u64, rdx=u64, rbx=u64, rcx=u64, m=u64, equal=st.booleans())
def test_cmpxchg8b(mode: str, rax: int, rdx: int, rbx: int, rcx: int, m: int, equal: bool) -> None:
    """0F C7 /1 (SDM Vol. 2A CMPXCHG8B): only ZF changes; on failure EDX:EAX = m64 (32-bit writes
    zero-extend RAX/RDX), on success EDX:EAX are not written."""
    if equal:
        m = ((rdx & 0xFFFF_FFFF) << 32) | (rax & 0xFFFF_FFFF)
    code = check(mode, f"0f c7 {absmem(mode, 1)}", "cmpxchg8b [0x6000]")
    flags = 0x895  # CF PF AF SF OF set, ZF clear
    s, ev = run_code(mode, code, rax=rax, rdx=rdx, rbx=rbx, rcx=rcx, flags=flags, mem={DATA: m.to_bytes(8, "little")})
    halted(ev)
    eq = m == ((rdx & 0xFFFF_FFFF) << 32) | (rax & 0xFFFF_FFFF)
    assert flag(s, F.ZF) == eq
    assert all(flag(s, f) for f in (F.CF, F.PF, F.AF, F.SF, F.OF))
    if eq:
        assert s.mem.phys.read(DATA, 8) == ((rcx & 0xFFFF_FFFF) << 32) | (rbx & 0xFFFF_FFFF)
        assert (reg(s, "rax"), reg(s, "rdx")) == (rax, rdx)
    else:
        assert s.mem.phys.read(DATA, 8) == m
        assert (reg(s, "rax"), reg(s, "rdx")) == (m & 0xFFFF_FFFF, m >> 32)


@settings(max_examples=20)
@given(rax=u64, rdx=u64, rbx=u64, rcx=u64, m=st.integers(0, (1 << 128) - 1), equal=st.booleans())
def test_cmpxchg16b(rax: int, rdx: int, rbx: int, rcx: int, m: int, equal: bool) -> None:
    """REX.W 0F C7 /1 (SDM Vol. 2A CMPXCHG16B): RDX:RAX vs m128; only ZF changes."""
    if equal:
        m = (rdx << 64) | rax
    code = check("long64", "48 0f c7 0c 25 00 60 00 00", "cmpxchg16b [0x6000]")
    s, ev = run_code("long64", code, rax=rax, rdx=rdx, rbx=rbx, rcx=rcx, mem={DATA: m.to_bytes(16, "little")})
    halted(ev)
    eq = m == (rdx << 64) | rax
    assert flag(s, F.ZF) == eq
    if eq:
        assert s.mem.phys.read(DATA, 16) == (rcx << 64) | rbx
        assert (reg(s, "rax"), reg(s, "rdx")) == (rax, rdx)
    else:
        assert s.mem.phys.read(DATA, 16) == m
        assert (reg(s, "rax"), reg(s, "rdx")) == (m & M64, m >> 64)


def test_cmpxchg16b_alignment_and_register_operand() -> None:
    """CMPXCHG16B: #GP(0) for an operand not 16-byte aligned (SDM Vol. 2A CMPXCHG16B exceptions),
    nothing written; a register operand (mod = 3) is #UD for both forms."""
    code = check("long64", "48 0f c7 0c 25 08 60 00 00", "cmpxchg16b [0x6008]")
    s, ev = run_code("long64", code, rax=0, rdx=0, rbx=1, rcx=1)
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", 13, 0, 0x1000)
    assert s.mem.phys.read(0x6008, 16) == 0
    # The alignment is checked on the linear address (FS base added).
    code = check("long64", "64 48 0f c7 0c 25 08 60 00 00", "cmpxchg16b fs:[0x6008]")
    s = rerun(run_code("long64", code, budget=0, rax=0, rdx=0, rbx=1, rcx=2),
              lambda s: setattr(s.seg[4], "base", 8))
    assert s.mem.phys.read(0x6010, 16) == (2 << 64) | 1
    for mode, code in (("long64", "48 0f c7 c9"), ("prot32", "0f c7 c9")):
        _, ev = run_code(mode, code)
        assert (ev.kind, ev.vector) == ("fault", 6)


# -- BSWAP -------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(v=u64)
def test_bswap(v: int) -> None:
    """0F C8+r (SDM Vol. 2A BSWAP): 32-bit (zero-extends in 64-bit mode), REX.W 64-bit, REX.B."""
    for mode in MODES:
        s, ev = run_code(mode, check(mode, "0f cb" if BITS[mode] != 16 else "66 0f cb", "bswap ebx"), rbx=v)
        halted(ev)
        assert reg(s, "rbx") == int.from_bytes((v & 0xFFFF_FFFF).to_bytes(4, "little"), "big")
    s, ev = run_code("long64", check("long64", "48 0f cb", "bswap rbx"), rbx=v)
    assert reg(s, "rbx") == int.from_bytes(v.to_bytes(8, "little"), "big")
    s, ev = run_code("long64", check("long64", "49 0f c8", "bswap r8"), r8=v)
    assert reg(s, "r8") == int.from_bytes(v.to_bytes(8, "little"), "big")


def test_bswap_16bit_operand_clears_the_word() -> None:
    """SDM Vol. 2A BSWAP: a 16-bit operand gives an undefined result; the spec's documented
    choice (reported hardware behaviour, Bochs): the 16-bit register becomes 0, bits 63:16 kept."""
    s, ev = run_code("long64", check("long64", "66 0f cb", "bswap bx"), rbx=0x1122_3344_5566_7788)
    halted(ev)
    assert reg(s, "rbx") == 0x1122_3344_5566_0000
    s, ev = run_code("real", check("real", "0f cb", "bswap bx"), rbx=0x5566_7788)
    assert reg(s, "rbx") == 0x5566_0000


# -- CMOVcc, SETcc ---------------------------------------------------------------------------------

def textbook(cc: int, fl: int) -> bool:
    """SDM Vol. 1 Appendix B (Table B-1), written out per condition."""
    cf, pf, zf, sf, of = (bool(fl >> b & 1) for b in (F.CF, F.PF, F.ZF, F.SF, F.OF))
    return [of, not of, cf, not cf, zf, not zf, cf or zf, not cf and not zf, sf, not sf, pf, not pf,
            sf != of, sf == of, zf or sf != of, not zf and sf == of][cc]


NAMES_CC = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
status_flags = st.sets(st.sampled_from(F.STATUS)).map(lambda s: sum(1 << f for f in s))


@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=30)
@given(cc=st.integers(0, 15), fl=status_flags, a=u64, b=u64)
def test_cmovcc(mode: str, w: int, cc: int, fl: int, a: int, b: int) -> None:
    """0F 40+cc (SDM Vol. 2A CMOVcc): move iff the condition holds; flags unchanged.  A 32-bit
    CMOV writes (so zero-extends) the destination even when the condition is false."""
    code = check(mode, f"{osz(mode, w)} 0f {0x40 + cc:02x} c3".strip(), f"cmov{NAMES_CC[cc]} {R[w][0]}, {R[w][1]}")
    s, ev = run_code(mode, code, rax=a, rbx=b, flags=fl)
    halted(ev)
    assert reg(s, "rax") == merge(a, b if textbook(cc, fl) else a, w)
    assert (s.read_rflags() & F.STATUS_MASK) == fl


def test_cmov_32bit_false_zero_extends() -> None:
    """SDM Vol. 2A CMOVcc: in 64-bit mode a 32-bit CMOV with a false condition still clears RAX[63:32]."""
    s, ev = run_code("long64", check("long64", "0f 44 c3", "cmove eax, ebx"), rax=0xAAAA_BBBB_CCCC_DDDD, flags=0)
    halted(ev)
    assert reg(s, "rax") == 0xCCCC_DDDD
    s, ev = run_code("long64", check("long64", "66 0f 44 c3", "cmove ax, bx"), rax=0xAAAA_BBBB_CCCC_DDDD, flags=0)
    assert reg(s, "rax") == 0xAAAA_BBBB_CCCC_DDDD


def test_cmov_reads_memory_when_false() -> None:
    """SDM Vol. 2A CMOVcc: the source operand is read whatever the condition (observed on a bus)."""
    code = check("long64", "0f 44 04 25 00 90 00 00", "cmove eax, [0x9000]")  # 0x9000: no RAM, bus
    bus = RecordingBus()
    s = rerun(run_code("long64", code, budget=0, rax=5, flags=0), lambda s: setattr(s.mem.phys, "bus", bus))
    assert bus.reads == [(0x9000, 4)] and reg(s, "rax") == 5


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30)
@given(cc=st.integers(0, 15), fl=status_flags, a=u64)
def test_setcc(mode: str, cc: int, fl: int, a: int) -> None:
    """0F 90+cc (SDM Vol. 2B SETcc): byte = condition, to AL, AH and memory."""
    t = textbook(cc, fl)
    s, ev = run_code(mode, check(mode, f"0f {0x90 + cc:02x} c0", f"set{NAMES_CC[cc]} al"), rax=a, flags=fl)
    halted(ev)
    assert reg(s, "rax") == (a & ~0xFF & M64) | t
    s, ev = run_code(mode, check(mode, f"0f {0x90 + cc:02x} c4", f"set{NAMES_CC[cc]} ah"), rax=a, flags=fl)
    assert reg(s, "rax") == (a & ~0xFF00 & M64) | (t << 8)
    code = check(mode, f"0f {0x90 + cc:02x} {absmem(mode, 0)}", f"set{NAMES_CC[cc]} [0x6000]")
    s, ev = run_code(mode, code, flags=fl, mem={DATA: b"\xAA\xBB"})
    assert s.mem.phys.read_bytes(DATA, 2) == bytes([t, 0xBB])
    assert (s.read_rflags() & F.STATUS_MASK) == fl


def test_setcc_rex_spl() -> None:
    s, ev = run_code("long64", check("long64", "40 0f 94 c4", "sete spl"), flags=1 << F.ZF)
    halted(ev)
    assert reg(s, "rsp") == 0x8001


# -- CBW/CWDE/CDQE, CWD/CDQ/CQO ------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "w"), MODE_SIZES)
@settings(max_examples=25)
@given(a=u64, d=u64)
def test_cbw_cwd_families(mode: str, w: int, a: int, d: int) -> None:
    """98: rAX = sext(half of rAX); 99: rDX = sign fill of rAX (SDM Vol. 2A CBW/CWDE/CDQE, CWD/CDQ/CQO)."""
    names98 = {16: "cbw", 32: "cwde", 64: "cdqe"}
    names99 = {16: "cwd", 32: "cdq", 64: "cqo"}
    p = osz(mode, w)
    s, ev = run_code(mode, check(mode, f"{p} 98".strip(), names98[w]), rax=a, rdx=d)
    halted(ev)
    assert reg(s, "rax") == merge(a, sx(a, w // 2, w), w) and reg(s, "rdx") == d
    s, ev = run_code(mode, check(mode, f"{p} 99".strip(), names99[w]), rax=a, rdx=d)
    halted(ev)
    fill = mask(w) if a >> (w - 1) & 1 else 0
    assert reg(s, "rdx") == merge(d, fill, w) and reg(s, "rax") == a


# -- XLAT ------------------------------------------------------------------------------------------

def test_xlat_address_sizes_and_overrides() -> None:
    """D7 (SDM Vol. 2B XLAT): AL = [seg:rBX + zext(AL)], rBX of the address size, DS unless
    overridden; in 64-bit mode only an FS/GS override adds a base."""
    table = bytes(range(256))[::-1]  # table[i] = 255 - i
    mem = {DATA: table}
    cases = [
        ("real", "d7", "xlat [bx]", dict(rbx=DATA, rax=0xFF80), 0xFF7F),
        ("prot16", "d7", "xlat [bx]", dict(rbx=0xFFFF_0000 | DATA, rax=0x05), 0xFA),
        ("prot32", "d7", "xlat [ebx]", dict(rbx=0xFFFF_FFFF_0000_0000 | DATA, rax=0x10), 0xEF),
        ("long64", "d7", "xlat [rbx]", dict(rbx=DATA, rax=0xFFFF_FFFF_FFFF_FF01), 0xFFFF_FFFF_FFFF_FFFE),
        ("long64", "67 d7", "xlat [ebx]", dict(rbx=0x1234_5678_0000_0000 | DATA, rax=0x02), 0xFD),
        ("real", "67 d7", "xlat [ebx]", dict(rbx=DATA, rax=0x03), 0xFC),
    ]
    for mode, code, text, regs, expected in cases:
        s, ev = run_code(mode, check(mode, code, text), mem=mem, **regs)
        halted(ev)
        assert reg(s, "rax") == expected, (mode, text)

    def bases(s: MachineState) -> None:
        s.seg[0].base = 0x100  # ES
        s.seg[3].base = 0x200  # DS
        s.seg[4].base = 0x300  # FS

    mem = {DATA + k: bytes([k >> 8]) for k in (0, 0x100, 0x200, 0x300)}
    for mode, code, text, expected in [
        ("real", "d7", "xlat [bx]", 2), ("real", "26 d7", "xlat es:[bx]", 1),
        ("prot32", "64 d7", "xlat fs:[ebx]", 3),
        ("long64", "d7", "xlat [rbx]", 0), ("long64", "26 d7", "xlat [rbx]", 0),
        ("long64", "64 d7", "xlat fs:[rbx]", 3),
    ]:
        s = rerun(run_code(mode, check(mode, code, text), budget=0, mem=mem, rbx=DATA, rax=0), bases)
        assert reg(s, "rax") == expected, (mode, text)


def test_xlat_16bit_offset_wraps() -> None:
    """With a 16-bit address size BX + AL wraps at 64 KiB (SDM Vol. 1 3.3.6)."""
    s, ev = run_code("real", "d7", rbx=0xFFFF, rax=0x02, mem={0x0001: b"\x5A"})
    halted(ev)
    assert reg(s, "rax") == 0x5A


# -- LAHF, SAHF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30)
@given(fl=status_flags, a=u64)
def test_lahf(mode: str, fl: int, a: int) -> None:
    """9F (SDM Vol. 2A LAHF): AH = SF:ZF:0:AF:0:PF:1:CF; flags unchanged."""
    s, ev = run_code(mode, check(mode, "9f", "lahf"), rax=a, flags=fl)
    halted(ev)
    assert reg(s, "rax") == (a & ~0xFF00 & M64) | (((fl & 0xD5) | 2) << 8)
    assert (s.read_rflags() & F.STATUS_MASK) == fl


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=30)
@given(fl=status_flags, ah=st.integers(0, 255))
def test_sahf(mode: str, fl: int, ah: int) -> None:
    """9E (SDM Vol. 2B SAHF): SF ZF AF PF CF = AH bits 7 6 4 2 0; OF unchanged; AH unchanged."""
    s, ev = run_code(mode, check(mode, "9e", "sahf"), rax=ah << 8, flags=fl)
    halted(ev)
    expected = (ah & 0xD5) | (fl & (1 << F.OF))
    assert (s.read_rflags() & F.STATUS_MASK) == expected
    assert reg(s, "rax") == ah << 8
    assert s.undefined == 0


def test_sahf_defines_flags_left_undefined() -> None:
    """After BSF (CF/OF/SF/AF/PF undefined), SAHF defines CF PF AF ZF SF again; OF stays undefined."""
    s, ev = run_code("prot32", "0f bc c3 9e", rbx=1, rax=0)
    halted(ev)
    assert s.undefined == 1 << F.OF
