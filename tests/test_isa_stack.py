"""Stack instructions (spec/isa/stack.py): PUSH, POP, PUSHF/POPF, PUSHA/POPA, ENTER, LEAVE.

Expected values are computed here with plain ints from the SDM pseudo-code and
tables (stack address size = SS.B or 64, operand size from 66/REX.W); every
hand-written encoding is checked against capstone.  Symbolic twins prove the
PUSH/POP/POPF data paths for all register and flag values.
"""

from __future__ import annotations

import random

import capstone
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE, STACK_TOP, flat_machine
from spec.state import MachineState, Segment
from spec.symexec import run_symbolic, symbolic_state

M64 = (1 << 64) - 1
ES, CS, SS, DS, FS, GS = range(6)
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
STACK_BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}
# Operand size with and without a 66 prefix.
OPSIZES = {"real": (16, 32), "prot16": (16, 32), "prot32": (32, 16), "long64": (64, 16)}
GDT = 0x20000


def mask(w: int) -> int:
    return (1 << w) - 1


def machine(mode: str, code: bytes | str, *, cpl: int = 0, iopl: int = 0, **regs: int) -> MachineState:
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    for name, v in regs.items():
        s.gpr[GPR.index(name)] = v & M64
    if cpl and mode != "real":
        for r in (CS, SS):
            seg = s.seg[r].copy()
            seg.dpl, seg.selector = cpl, seg.selector | cpl
            s.seg[r] = seg
    s.rflags_sys |= iopl << F.IOPL_SHIFT
    return s


def with_gdt(s: MachineState) -> MachineState:
    """A GDT with a flat RW data segment at 0x10 and one with base 0x12345 at 0x18 (SDM Vol. 3A 3.4.5)."""
    s.mem.phys.map_page(GDT)
    s.mem.phys.write(GDT + 0x08, 8, 0x00CF9B000000FFFF)
    s.mem.phys.write(GDT + 0x10, 8, 0x00CF93000000FFFF)
    s.mem.phys.write(GDT + 0x18, 8, 0x0040930123450FFF)
    s.gdtr.base, s.gdtr.limit = GDT, 0x1F
    return s


def run(s: MachineState, budget: int = 100) -> StopEvent:
    return SpecCPU(s).run(budget)


def step(s: MachineState, n: int = 1) -> StopEvent:
    """Execute exactly ``n`` instructions (a stop before that is returned)."""
    return SpecCPU(s).run(n)


def r(s: MachineState, name: str) -> int:
    return s.D.concrete(s.gpr[GPR.index(name)])


def rflags(s: MachineState) -> int:
    return s.D.concrete(s.read_rflags())


def mem(s: MachineState, addr: int, n: int) -> int:
    return s.mem.phys.read(addr, n)


def set_sp(mode: str, rsp: int, sp: int) -> int:
    """rSP with its stack-size part replaced by ``sp``.

    With a 32-bit stack the upper half is 0: every ESP write zero-extends (SDM Vol. 1 3.4.1.1), so a
    test starting with garbage there would only test that.
    """
    w = STACK_BITS[mode]
    v = (rsp & ~mask(w) & M64) | (sp & mask(w))
    return v & mask(32) if w == 32 else v


def dis(bits: int, code: bytes) -> str:
    md = capstone.Cs(capstone.CS_ARCH_X86, {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32,
                                            64: capstone.CS_MODE_64}[bits])
    insns = list(md.disasm(code, 0))
    assert len(insns) == 1 and insns[0].size == len(code), (code.hex(), insns)
    return f"{insns[0].mnemonic} {insns[0].op_str}".strip()


# -- encodings, checked against capstone ---------------------------------------------------------

ENCODINGS = [
    (16, "50", "push ax"), (16, "6650", "push eax"), (32, "50", "push eax"), (32, "6650", "push ax"),
    (64, "50", "push rax"), (64, "6650", "push ax"), (64, "4150", "push r8"), (64, "664157", "push r15w"),
    (16, "58", "pop ax"), (32, "665f", "pop di"), (64, "415f", "pop r15"), (64, "54", "push rsp"),
    (16, "54", "push sp"), (32, "54", "push esp"), (64, "5c", "pop rsp"), (32, "5c", "pop esp"),
    (32, "665c", "pop sp"), (16, "5c", "pop sp"),
    (64, "8f0424", "pop qword ptr [rsp]"), (32, "8f0424", "pop dword ptr [esp]"),
    (32, "8f442404", "pop dword ptr [esp + 4]"), (16, "678f0424", "pop word ptr [esp]"),
    (64, "668f0424", "pop word ptr [rsp]"), (64, "ff33", "push qword ptr [rbx]"),
    (32, "ff33", "push dword ptr [ebx]"), (16, "ff37", "push word ptr [bx]"), (64, "66ff33", "push word ptr [rbx]"),
    (64, "fff1", "push rcx"), (64, "8fc1", "pop rcx"), (32, "ff3424", "push dword ptr [esp]"),
    (16, "6a80", "push -0x80"), (32, "6a80", "push -0x80"), (64, "6a80", "push -0x80"),
    (64, "6880000080", "push -0x7fffff80"), (64, "6878563412", "push 0x12345678"),
    (64, "666834 12", "push 0x1234"), (32, "68785634 12", "push 0x12345678"), (16, "683412", "push 0x1234"),
    (16, "66 68 78563412", "push 0x12345678"), (32, "666a80", "push -0x80"), (32, "666a7f", "push 0x7f"),
    (16, "678f442402", "pop word ptr [esp + 2]"), (32, "66683412", "push 0x1234"), (64, "666a80", "push -0x80"),
    (16, "666a80", "push -0x80"), (16, "6a80", "push -0x80"),
    (16, "06", "push es"), (16, "0e", "push cs"), (16, "16", "push ss"), (16, "1e", "push ds"),
    (16, "0fa0", "push fs"), (16, "0fa8", "push gs"), (16, "07", "pop es"), (16, "17", "pop ss"),
    (16, "1f", "pop ds"), (16, "0fa1", "pop fs"), (16, "0fa9", "pop gs"), (64, "0fa0", "push fs"),
    (64, "0fa1", "pop fs"), (64, "0fa9", "pop gs"), (64, "0fa8", "push gs"),
    (16, "9c", "pushf"), (16, "669c", "pushfd"), (32, "9c", "pushfd"), (32, "669c", "pushf"),
    (64, "9c", "pushfq"), (64, "669c", "pushf"), (16, "9d", "popf"), (32, "9d", "popfd"), (64, "9d", "popfq"),
    (64, "669d", "popf"), (32, "669d", "popf"), (16, "669d", "popfd"),
    (16, "60", "pushaw"), (16, "6660", "pushal"), (32, "60", "pushal"), (32, "6660", "pushaw"),
    (16, "61", "popaw"), (32, "61", "popal"), (32, "6661", "popaw"), (16, "6661", "popal"),
    (16, "c8100000", "enter 0x10, 0"), (32, "c8341201", "enter 0x1234, 1"), (64, "c8080003", "enter 8, 3"),
    (64, "66c8080003", "enter 8, 3"), (16, "c9", "leave"), (32, "c9", "leave"), (64, "c9", "leave"),
    (64, "66c9", "leave"),
]


@pytest.mark.parametrize(("bits", "hexcode", "text"), ENCODINGS)
def test_encodings_disassemble(bits: int, hexcode: str, text: str) -> None:
    assert dis(bits, bytes.fromhex(hexcode.replace(" ", ""))) == text


def test_row_names() -> None:
    """Names by operand size come from the opcode map rows (PUSHF/PUSHFD/PUSHFQ, PUSHA/PUSHAD)."""
    assert decode(bytes.fromhex("9c"), 64).name == "PUSHFQ"
    assert decode(bytes.fromhex("669c"), 64).name == "PUSHF"
    assert decode(bytes.fromhex("9d"), 32).name == "POPFD"
    assert decode(bytes.fromhex("60"), 32).name == "PUSHAD"
    assert decode(bytes.fromhex("6661"), 32).name == "POPA"


# -- PUSH / POP of general registers -----------------------------------------------------------------

def _zv(op: int, reg: int, p66: bool) -> bytes:
    return (b"\x66" if p66 else b"") + (b"\x41" if reg >= 8 else b"") + bytes([op + (reg & 7)])


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(data=st.data())
@settings(max_examples=40)
def test_push_pop_register(mode: str, p66: bool, data: st.DataObject) -> None:
    """PUSH r then POP r' (50+r / 58+r, REX.B for r8-r15): rSP moves by the operand size at the stack
    address size (upper rSP bits untouched), memory holds the value, POP writes the register part
    (a 16-bit pop keeps the upper bits; SDM Vol. 2B PUSH/POP; Vol. 1 6.2.3)."""
    nregs = 16 if mode == "long64" else 8
    src = data.draw(st.integers(0, nregs - 1).filter(lambda k: k != 4), label="src")
    dst = data.draw(st.integers(0, nregs - 1).filter(lambda k: k != 4), label="dst")
    value = data.draw(st.integers(0, M64), label="value")
    old_dst = data.draw(st.integers(0, M64), label="old_dst")
    upper = data.draw(st.integers(0, M64), label="rsp_upper") if STACK_BITS[mode] < 64 else 0
    size = OPSIZES[mode][p66]
    rsp0 = set_sp(mode, upper, STACK_TOP)
    regs = {GPR[dst]: old_dst, GPR[src]: value} if src != dst else {GPR[src]: value}
    s = machine(mode, _zv(0x50, src, p66) + _zv(0x58, dst, p66), rsp=rsp0, **regs)
    ev = step(s, 1)
    assert ev.kind == "budget"
    n = size // 8
    assert r(s, "rsp") == set_sp(mode, rsp0, STACK_TOP - n)
    assert mem(s, STACK_TOP - n, n) == value & mask(size)
    assert step(s, 1).kind == "budget"
    assert r(s, "rsp") == rsp0
    prior = value if src == dst else old_dst
    expected = (prior & ~mask(16) & M64) | (value & 0xFFFF) if size == 16 else value & mask(size)
    assert r(s, GPR[dst]) == expected


@pytest.mark.parametrize("mode", [m for m in ("real", "prot16", "prot32", "long64") if STACK_BITS[m] == 16])
def test_push_sp_wraps_at_stack_size(mode: str) -> None:
    """A 16-bit stack wraps SP within 64 KiB and leaves ESP[31:16] alone (SDM Vol. 1 6.2.3)."""
    s = machine(mode, "50", rsp=0xABCD_0000, rax=0x1234)
    assert step(s).kind == "budget"
    assert r(s, "rsp") == 0xABCD_FFFE


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
def test_push_rsp_pushes_old_value(mode: str, p66: bool) -> None:
    """PUSH rSP stores rSP as it was before the instruction (SDM Vol. 2B PUSH)."""
    size = OPSIZES[mode][p66]
    n = size // 8
    rsp0 = set_sp(mode, 0x1111_2222_3333_4444, STACK_TOP)
    s = machine(mode, ("66" if p66 else "") + "54", rsp=rsp0)
    assert step(s).kind == "budget"
    assert mem(s, STACK_TOP - n, n) == rsp0 & mask(size)


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
def test_pop_rsp_gets_popped_value(mode: str, p66: bool) -> None:
    """POP rSP: rSP is incremented, then the popped value written to it (SDM Vol. 2B POP)."""
    size = OPSIZES[mode][p66]
    n = size // 8
    rsp0 = set_sp(mode, 0x1111_2222_3333_4444, STACK_TOP - 8)
    s = machine(mode, ("66" if p66 else "") + "5c", rsp=rsp0)
    s.mem.phys.write(STACK_TOP - 8, 8, 0x8877_6655_4433_2211)
    assert step(s).kind == "budget"
    v = 0x8877_6655_4433_2211 & mask(size)
    incremented = set_sp(mode, rsp0, STACK_TOP - 8 + n)
    expected = (incremented & ~0xFFFF & M64) | v if size == 16 else v
    assert r(s, "rsp") == expected


@pytest.mark.parametrize(("mode", "hexcode", "disp"), [
    ("long64", "8f0424", 0), ("prot32", "8f0424", 0), ("prot32", "8f442404", 4), ("real", "678f0424", 0),
    ("long64", "668f0424", 0), ("prot16", "678f442402", 2),
])
def test_pop_memory_rsp_based_address(mode: str, hexcode: str, disp: int) -> None:
    """POP m with an rSP base: the address is computed after rSP is incremented (SDM Vol. 2B POP)."""
    size = OPSIZES[mode][hexcode.startswith("66")]
    n = size // 8
    s = machine(mode, hexcode, rsp=0x7F00)
    s.mem.phys.write_bytes(0x7F00, bytes(range(1, 17)))
    before = s.mem.phys.read_bytes(0x7F00, 16)
    assert step(s).kind == "budget"
    assert r(s, "rsp") == 0x7F00 + n
    value = int.from_bytes(before[:n], "little")
    assert mem(s, 0x7F00 + n + disp, n) == value


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(value=st.integers(0, M64), old=st.integers(0, M64))
@settings(max_examples=20)
def test_push_pop_memory_and_ff_8f_register_forms(mode: str, p66: bool, value: int, old: int) -> None:
    """FF /6 PUSH m, 8F /0 POP r (register form), FF /6 register form."""
    size = OPSIZES[mode][p66]
    n = size // 8
    pfx = "66" if p66 else ""
    # push [bx]/[ebx]/[rbx]; pop cx via 8F /0; push cx via FF /6; pop dx
    code = pfx + ("ff37" if BITS[mode] == 16 else "ff33") + pfx + "8fc1" + pfx + "fff1" + pfx + "5a"
    s = machine(mode, code, rbx=0x2000, rcx=old, rdx=old)
    s.mem.phys.write(0x2000, 8, value)
    assert run(s).kind == "halted"
    expect = (old & ~0xFFFF & M64) | (value & 0xFFFF) if size == 16 else value & mask(size)
    assert r(s, "rcx") == expect and r(s, "rdx") == expect
    assert mem(s, STACK_TOP - n, n) == value & mask(size)
    assert r(s, "rsp") & mask(STACK_BITS[mode]) == STACK_TOP


@pytest.mark.parametrize(("mode", "hexcode", "size", "value"), [
    ("real", "6a80", 16, 0xFF80), ("real", "666a80", 32, 0xFFFF_FF80), ("real", "683412", 16, 0x1234),
    ("real", "666878563412", 32, 0x12345678), ("prot32", "6a80", 32, 0xFFFF_FF80),
    ("prot32", "666a7f", 16, 0x7F), ("prot32", "6878563412", 32, 0x12345678),
    ("prot32", "66683412", 16, 0x1234), ("long64", "6a80", 64, M64 - 0x7F),
    ("long64", "6880000080", 64, 0xFFFF_FFFF_8000_0080), ("long64", "66683412", 16, 0x1234),
    ("long64", "666a80", 16, 0xFF80), ("prot16", "6a80", 16, 0xFF80),
])
def test_push_immediate(mode: str, hexcode: str, size: int, value: int) -> None:
    """6A Ibs / 68 Iz: sign-extended to and pushed at the operand size (SDM Vol. 2B PUSH)."""
    s = machine(mode, hexcode)
    assert step(s).kind == "budget"
    n = size // 8
    assert r(s, "rsp") == STACK_TOP - n
    assert mem(s, STACK_TOP - n, n) == value


# -- segment registers ----------------------------------------------------------------------------------

PUSH_SEG = {ES: "06", CS: "0e", SS: "16", DS: "1e", FS: "0fa0", GS: "0fa8"}
POP_SEG = {ES: "07", SS: "17", DS: "1f", FS: "0fa1", GS: "0fa9"}


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("sreg", [ES, CS, SS, DS, FS, GS])
@pytest.mark.parametrize("p66", [False, True])
def test_push_segment(mode: str, sreg: int, p66: bool) -> None:
    """PUSH Sreg: rSP drops by the operand size; only 16 bits are written ("all recent Intel Core and
    Intel Atom processors perform a 16-bit move, leaving the upper portion of the stack location
    unmodified", SDM Vol. 2B PUSH).  06/0E/16/1E are #UD in 64-bit mode (i64)."""
    s = machine(mode, ("66" if p66 else "") + PUSH_SEG[sreg])
    seg = s.seg[sreg].copy()
    seg.selector = 0xA5C3
    s.seg[sreg] = seg
    s.mem.phys.write(STACK_TOP - 8, 8, 0x1122_3344_5566_7788)
    ev = step(s)
    if mode == "long64" and sreg < FS:
        assert (ev.kind, ev.vector, ev.rip) == ("fault", Vector.UD, CODE)
        return
    size = OPSIZES[mode][p66]
    n = size // 8
    assert r(s, "rsp") == STACK_TOP - n
    untouched = 0x1122_3344_5566_7788 >> (8 * (8 - n)) & mask(size)
    assert mem(s, STACK_TOP - n, n) == (untouched & ~0xFFFF) | 0xA5C3


@pytest.mark.parametrize("sreg", [ES, SS, DS, FS, GS])
@pytest.mark.parametrize("p66", [False, True])
def test_pop_segment_real_mode(sreg: int, p66: bool) -> None:
    """POP Sreg in real mode: base = selector << 4; the operand size worth of stack is released;
    POP SS sets the interrupt shadow (SDM Vol. 2B POP)."""
    s = machine("real", ("66" if p66 else "") + POP_SEG[sreg], rsp=STACK_TOP - 4)
    s.mem.phys.write(STACK_TOP - 4, 4, 0xFFFF_1234)
    assert step(s).kind == "budget"
    n = 4 if p66 else 2
    assert r(s, "rsp") == STACK_TOP - 4 + n
    assert (s.seg[sreg].selector, s.seg[sreg].base) == (0x1234, 0x12340)
    assert s.interrupt_shadow == (sreg == SS)


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize("sreg", [ES, SS, DS, FS, GS])
def test_pop_segment_protected(mode: str, sreg: int) -> None:
    """POP Sreg in protected/64-bit mode loads the descriptor (through load_segment); in 64-bit mode
    07/17/1F are #UD."""
    s = with_gdt(machine(mode, POP_SEG[sreg], rsp=STACK_TOP - 8))
    s.mem.phys.write(STACK_TOP - 8, 8, 0xFFFF_FFFF_FFFF_0018 if sreg != SS else 0x10)
    ev = step(s)
    if mode == "long64" and sreg < FS:
        assert (ev.kind, ev.vector) == ("fault", Vector.UD)
        return
    assert ev.kind == "budget", ev
    n = OPSIZES[mode][0] // 8
    assert r(s, "rsp") == STACK_TOP - 8 + n
    if sreg == SS:
        assert s.seg[SS].selector == 0x10 and s.interrupt_shadow
    else:
        assert (s.seg[sreg].selector, s.seg[sreg].base, s.seg[sreg].limit) == (0x18, 0x12345, 0xFFF)


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_pop_ss_fault_is_precise(mode: str) -> None:
    """POP SS with a bad selector: #GP(selector) and rSP/SS unchanged (SDM Vol. 2B POP)."""
    s = with_gdt(machine(mode, "17", rsp=STACK_TOP - 4))
    s.mem.phys.write(STACK_TOP - 4, 4, 0x18 | 3)  # RPL 3 != CPL 0
    ss = s.seg[SS].copy()
    ev = step(s)
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.GP, 0x18, CODE)
    assert r(s, "rsp") == STACK_TOP - 4 and s.seg[SS] == ss and not s.interrupt_shadow


def test_pop_fs_64bit_operand_sizes() -> None:
    """0F A1 in 64-bit mode pops 8 bytes (66: 2 bytes) and loads the low 16 bits (SDM Vol. 2B POP)."""
    for code, n in (("0fa1", 8), ("660fa1", 2)):
        s = with_gdt(machine("long64", code, rsp=STACK_TOP - 8))
        s.mem.phys.write(STACK_TOP - 8, 8, 0xDEAD_BEEF_0000_0010)
        assert step(s).kind == "budget"
        assert r(s, "rsp") == STACK_TOP - 8 + n and s.seg[FS].selector == 0x10


# -- PUSHF / POPF ------------------------------------------------------------------------------------------

SYS_BITS = (F.TF, F.IF, F.DF, F.NT, F.RF, F.AC, F.VIF, F.VIP, F.ID)


def initial_flags(data: st.DataObject, iopl: int) -> int:
    status = data.draw(st.sets(st.sampled_from(F.STATUS)), label="status")
    sysb = data.draw(st.sets(st.sampled_from(SYS_BITS)), label="sys")
    return sum(1 << b for b in (*status, *sysb)) | (iopl << F.IOPL_SHIFT) | 2


def set_flags(s: MachineState, value: int) -> None:
    s.write_rflags(value)


def assert_completed(ev: StopEvent, flags_before: int) -> None:
    """The one instruction retired: no stop, or -- if TF was set when it began -- the single-step
    #DB trap that follows it (SDM Vol. 3A 17.3.1.4), which the non-delivering CPU reports."""
    if flags_before >> F.TF & 1:
        assert (ev.kind, ev.vector) == ("fault", Vector.DB), ev
    else:
        assert ev.kind == "budget", ev


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(data=st.data())
@settings(max_examples=25)
def test_pushf_image(mode: str, p66: bool, data: st.DataObject) -> None:
    """PUSHF pushes (R/E)FLAGS AND 00FCFFFFH: RF and VM read as 0 (SDM Vol. 2B PUSHF)."""
    iopl = data.draw(st.integers(0, 3))
    flags = initial_flags(data, iopl)
    s = machine(mode, ("66" if p66 else "") + "9c")
    set_flags(s, flags)
    assert_completed(step(s), flags)
    size = OPSIZES[mode][p66]
    n = size // 8
    assert mem(s, STACK_TOP - n, n) == flags & 0x00FC_FFFF & mask(size)


def test_pushf_reads_lazy_status_flags() -> None:
    """The pushed image carries the flags of the last arithmetic result (CMP 1,2: CF SF AF PF)."""
    s = machine("long64", "b801000000 83f802 9c")  # mov eax,1; cmp eax,2; pushfq
    assert run(s).kind == "halted"
    assert mem(s, STACK_TOP - 8, 8) == (1 << F.CF) | (1 << F.PF) | (1 << F.AF) | (1 << F.SF) | 2


# The SDM table of flags affected by POPF, as data: per flag, S (from the stack), N (no change) or
# 0 (cleared).  Columns: ID VIP VIF AC VM RF NT IOPL OF DF IF TF SF ZF AF PF CF.
POPF_COLUMNS = (F.ID, F.VIP, F.VIF, F.AC, F.VM, F.RF, F.NT, "IOPL", F.OF, F.DF, F.IF, F.TF, F.SF, F.ZF,
                F.AF, F.PF, F.CF)
POPF_TABLE = {
    # (real?, 16-bit?, CPL 0?, IOPL >= CPL?)
    ("real", 16): "NNNNNNSSSSSSSSSSS",
    ("real", 32): "SNNSN0SSSSSSSSSSS",
    ("cpl0", 16): "NNNNNNSSSSSSSSSSS",
    ("iopl<cpl", 16): "NNNNNNSNSSNSSSSSS",
    ("iopl>=cpl", 16): "NNNNNNSNSSSSSSSSS",
    ("cpl0", 32): "SNNSN0SSSSSSSSSSS",
    ("iopl<cpl", 32): "SNNSN0SNSSNSSSSSS",
    ("iopl>=cpl", 32): "SNNSN0SNSSSSSSSSS",
    ("v86 iopl3", 16): "NNNNNNSNSSSSSSSSS",
    ("v86 iopl3", 32): "SNNSN0SNSSSSSSSSS",
}


def popf_reference(row: str, old: int, popped: int) -> int:
    new = old
    for col, code in zip(POPF_COLUMNS, row, strict=True):
        bits = (3 << F.IOPL_SHIFT) if col == "IOPL" else 1 << col  # type: ignore[operator]
        if code == "S":
            new = (new & ~bits) | (popped & bits)
        elif code == "0":
            new &= ~bits
    return new | 2


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(data=st.data())
@settings(max_examples=60)
def test_popf_matrix(mode: str, p66: bool, data: st.DataObject) -> None:
    """POPF writability across mode, operand size, CPL and IOPL (SDM Vol. 2B POPF table "Effect of
    POPF/POPFD on the EFLAGS Register"); bit 1 stays 1, reserved bits stay 0, status flags defined."""
    cpl = 0 if mode == "real" else data.draw(st.integers(0, 3), label="cpl")
    iopl = data.draw(st.integers(0, 3), label="iopl")
    old = initial_flags(data, iopl)
    popped = data.draw(st.integers(0, M64), label="popped")
    size = OPSIZES[mode][p66]
    s = machine(mode, ("66" if p66 else "") + "9d", cpl=cpl)
    set_flags(s, old)
    s.undefined = 1 << F.AF
    s.mem.phys.write(STACK_TOP - 8, 8, popped)
    s.gpr[4] = STACK_TOP - 8
    assert_completed(step(s), old)
    col16 = 16 if size == 16 else 32
    if mode == "real":
        key = ("real", col16)
    elif cpl == 0:
        key = ("cpl0", col16)
    else:
        key = ("iopl>=cpl" if iopl >= cpl else "iopl<cpl", col16)
    # RF is cleared when the instruction completes (SDM Vol. 3A 17.3.1.1), whatever POPF left in it.
    assert rflags(s) == popf_reference(POPF_TABLE[key], old, popped & mask(size)) & ~(1 << F.RF)
    assert s.undefined == 0
    assert r(s, "rsp") == STACK_TOP - 8 + size // 8


def v86_machine(code: str, iopl: int, vme: bool = False) -> MachineState:
    s = machine("prot32", code)
    s.seg[CS] = Segment(selector=0, base=0, limit=0xFFFF, type=0xB)
    s.seg[SS] = Segment(selector=0, base=0, limit=0xFFFF, type=0x3, dpl=3)
    s.rflags_sys |= (1 << F.VM) | (iopl << F.IOPL_SHIFT)
    if vme:
        s.cr4 |= 1
    s.gpr[4] = STACK_TOP - 8
    return s


@pytest.mark.parametrize("p66", [False, True])
@given(popped=st.integers(0, 0xFFFF_FFFF), status=st.integers(0, 0xFFF))
@settings(max_examples=20)
def test_popf_v86_iopl3(p66: bool, popped: int, status: int) -> None:
    """Virtual-8086 mode, IOPL 3: IOPL, VM, VIP, VIF not changed, IF is (SDM Vol. 2B POPF table)."""
    s = v86_machine(("66" if p66 else "") + "9d", 3)
    s.mem.phys.write(STACK_TOP - 8, 4, popped)
    old = rflags(s)
    assert step(s).kind == "budget"
    size = 32 if p66 else 16
    assert rflags(s) == popf_reference(POPF_TABLE[("v86 iopl3", size)], old, popped & mask(size))


@pytest.mark.parametrize("code", ["9d", "669d", "9c", "669c"])
@pytest.mark.parametrize("iopl", [0, 1, 2])
def test_popf_pushf_v86_iopl_below_3_faults(code: str, iopl: int) -> None:
    """Virtual-8086 mode, IOPL < 3, CR4.VME = 0: #GP(0) (SDM Vol. 2B POPF/PUSHF)."""
    s = v86_machine(code, iopl)
    ev = step(s)
    assert (ev.kind, ev.vector, ev.error_code) == ("fault", Vector.GP, 0)
    assert r(s, "rsp") == STACK_TOP - 8


def test_popf_vme() -> None:
    """CR4.VME, IOPL < 3, 16-bit POPF: bit 9 goes to VIF, IF/IOPL unchanged; #GP(0) if the image
    sets TF, or sets IF while VIP = 1; a 32-bit POPF is #GP(0) (SDM Vol. 2B POPF Operation)."""
    s = v86_machine("9d", 1, vme=True)
    s.mem.phys.write(STACK_TOP - 8, 2, 0x3ED5)  # IF=1 IOPL=3 NT=1 DF=1 OF=1 + status, TF=0
    assert step(s).kind == "budget"
    fl = rflags(s)
    assert (fl >> F.VIF) & 1 and not (fl >> F.IF) & 1 and (fl >> F.IOPL_SHIFT) & 3 == 1
    assert fl & 0xFFF & ~(1 << F.IF) == 0x3ED5 & 0xFFF & ~(1 << F.IF) | 2
    for image, vip in ((0x0100, 0), (0x0200, 1)):
        s = v86_machine("9d", 0, vme=True)
        s.rflags_sys |= vip << F.VIP
        s.mem.phys.write(STACK_TOP - 8, 2, image)
        ev = step(s)
        assert (ev.kind, ev.vector) == ("fault", Vector.GP)
    s = v86_machine("669d", 0, vme=True)
    assert step(s).vector == Vector.GP


def test_pushf_vme() -> None:
    """CR4.VME, IOPL < 3, 16-bit PUSHF: IF position holds VIF, IOPL reads 3 (SDM Vol. 2B PUSHF)."""
    s = v86_machine("9c", 0, vme=True)
    s.rflags_sys |= 1 << F.VIF
    assert step(s).kind == "budget"
    assert mem(s, STACK_TOP - 10, 2) == (1 << F.IF) | (3 << F.IOPL_SHIFT) | 2
    s = v86_machine("669c", 0, vme=True)
    assert step(s).vector == Vector.GP


def test_pushf_v86_clears_vm_in_image() -> None:
    s = v86_machine("669c", 3)
    assert step(s).kind == "budget"
    assert mem(s, STACK_TOP - 12, 4) == (3 << F.IOPL_SHIFT) | 2


# -- PUSHA / POPA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["real", "prot16", "prot32"])
@pytest.mark.parametrize("p66", [False, True])
@given(values=st.lists(st.integers(0, M64), min_size=8, max_size=8))
@settings(max_examples=20)
def test_pusha_popa(mode: str, p66: bool, values: list[int]) -> None:
    """PUSHA pushes AX CX DX BX SP(original) BP SI DI; POPA pops them back except SP, whose slot is
    skipped (SDM Vol. 2B PUSHA/POPA)."""
    size = OPSIZES[mode][p66]
    n = size // 8
    regs = {GPR[k]: values[k] for k in range(8)}
    regs["rsp"] = set_sp(mode, values[4], STACK_TOP)
    pfx = "66" if p66 else ""
    s = machine(mode, pfx + "60", **regs)
    assert step(s).kind == "budget"
    sp_after = STACK_TOP - 8 * n
    for k in range(8):
        expect = regs[GPR[k]] & mask(size)
        assert mem(s, STACK_TOP - (k + 1) * n, n) == expect
    assert r(s, "rsp") == set_sp(mode, regs["rsp"], sp_after)
    # POPA with different slot contents: every register but rSP takes its slot.
    s = machine(mode, pfx + "61", **regs)
    s.gpr[4] = set_sp(mode, regs["rsp"], sp_after)
    slots = [(0x0102_0304_0506_0708 * (k + 1)) & mask(size) for k in range(8)]
    for k in range(8):
        s.mem.phys.write(STACK_TOP - (k + 1) * n, n, slots[k])
    assert step(s).kind == "budget"
    for k in range(8):
        if k == 4:
            continue
        old = regs[GPR[k]]
        expect = (old & ~0xFFFF & M64) | slots[k] if size == 16 else slots[k]
        assert r(s, GPR[k]) == expect
    assert r(s, "rsp") == regs["rsp"]


@pytest.mark.parametrize("code", ["60", "61", "6660"])
def test_pusha_popa_invalid_in_64bit_mode(code: str) -> None:
    ev = step(machine("long64", code))
    assert (ev.kind, ev.vector) == ("fault", Vector.UD)


# -- ENTER / LEAVE -------------------------------------------------------------------------------------

def enter_reference(memory: bytearray, base: int, rsp: int, rbp: int, alloc: int, level: int, size: int,
                    sw: int, bits: int) -> tuple[int, int]:
    """SDM Vol. 2A ENTER Operation over a byte array at ``base``; returns (rsp, rbp)."""
    n = size // 8
    sm = mask(sw)

    def rd(a: int) -> int:
        return int.from_bytes(memory[a - base:a - base + n], "little")

    def push(v: int) -> None:
        nonlocal rsp
        sp = ((rsp & sm) - n) & sm
        rsp = (rsp & ~sm & M64) | sp
        memory[sp - base:sp - base + n] = (v & mask(size)).to_bytes(n, "little")

    level %= 32
    push(rbp)
    frame_temp = rsp & mask(size)
    if level > 0:
        bp = rbp & sm
        for _ in range(level - 1):
            bp = (bp - n) & sm
            push(rd(bp))
        push(frame_temp)
    if size == 16:
        rbp = (rbp & ~0xFFFF & M64) | frame_temp
    else:
        rbp = frame_temp  # a 32-bit register write zero-extends (SDM Vol. 1 3.4.1.1)
    rsp = (rsp & ~sm & M64) | (((rsp & sm) - alloc) & sm)
    return rsp, rbp


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(data=st.data())
@settings(max_examples=25)
def test_enter(mode: str, p66: bool, data: st.DataObject) -> None:
    """ENTER imm16, imm8: nesting level imm8 MOD 32; level 0, 1 and deeper levels copy outer frame
    pointers (SDM Vol. 2A ENTER)."""
    level = data.draw(st.one_of(st.sampled_from([0, 1, 3, 31, 32, 33]), st.integers(0, 255)), label="level")
    alloc = data.draw(st.integers(0, 0xFFFF), label="alloc")
    rbp_off = data.draw(st.integers(0x1100, 0x1F00), label="rbp")
    sp_off = data.draw(st.integers(0x0800, 0x1000), label="sp")
    upper = data.draw(st.integers(0, M64), label="upper")
    pattern = random.Random(data.draw(st.integers(0, 2**32), label="seed")).randbytes(0x2000)
    size = OPSIZES[mode][p66]
    sw = STACK_BITS[mode]
    base = 0x6000
    rsp0 = set_sp(mode, upper, base + sp_off)
    rbp0 = set_sp(mode, upper, base + rbp_off)
    code = ("66" if p66 else "") + "c8" + alloc.to_bytes(2, "little").hex() + f"{level:02x}"
    s = machine(mode, code, rsp=rsp0, rbp=rbp0)
    s.mem.phys.write_bytes(base, pattern)
    model = bytearray(pattern)
    exp_rsp, exp_rbp = enter_reference(model, base, rsp0, rbp0, alloc, level, size, sw, BITS[mode])
    assert step(s).kind == "budget"
    assert (r(s, "rsp"), r(s, "rbp")) == (exp_rsp, exp_rbp)
    assert s.mem.phys.read_bytes(base, 0x2000) == bytes(model)


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_enter_nesting_examples(mode: str) -> None:
    """ENTER 16, 3 with a known chain: the two outer frame pointers then the new frame pointer."""
    size = OPSIZES[mode][0]
    n = size // 8
    s = machine(mode, "c8100003", rbp=0x7000)
    s.mem.phys.write(0x7000 - n, n, 0xAAAA)
    s.mem.phys.write(0x7000 - 2 * n, n, 0xBBBB)
    assert step(s).kind == "budget"
    frame = STACK_TOP - n
    assert [mem(s, STACK_TOP - k * n, n) for k in (1, 2, 3, 4)] == [0x7000, 0xAAAA, 0xBBBB, frame]
    assert r(s, "rbp") == frame
    assert r(s, "rsp") == STACK_TOP - 4 * n - 16


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("p66", [False, True])
@given(saved=st.integers(0, M64), upper=st.integers(0, M64))
@settings(max_examples=15)
def test_leave(mode: str, p66: bool, saved: int, upper: int) -> None:
    """LEAVE: rSP <- rBP at the stack address size, then pop rBP at the operand size (SDM Vol. 2A LEAVE)."""
    size = OPSIZES[mode][p66]
    sw = STACK_BITS[mode]
    n = size // 8
    rbp0 = set_sp(mode, upper, 0x7F00)
    s = machine(mode, ("66" if p66 else "") + "c9", rbp=rbp0, rsp=set_sp(mode, ~upper & M64, 0x7000))
    s.mem.phys.write(0x7F00, 8, saved)
    assert step(s).kind == "budget"
    exp_rsp = (set_sp(mode, ~upper & M64, 0x7F00 + n)) if sw < 64 else 0x7F00 + n
    assert r(s, "rsp") == exp_rsp
    exp_rbp = (rbp0 & ~0xFFFF & M64) | (saved & 0xFFFF) if size == 16 else saved & mask(size)
    assert r(s, "rbp") == exp_rbp


def test_enter_leave_round_trip() -> None:
    s = machine("prot32", "c8200002 c9", rbp=0x7800)
    assert run(s).kind == "halted"
    assert (r(s, "rsp"), r(s, "rbp")) == (STACK_TOP, 0x7800)


# -- symbolic twins ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "push", "pop", "size"), [
    ("long64", "50", "5b", 64), ("long64", "6650", "665b", 16), ("prot32", "50", "5b", 32),
    ("real", "50", "5b", 16), ("real", "6650", "665b", 32),
])
def test_symbolic_push_pop(mode: str, push: str, pop: str, size: int) -> None:
    """For all rAX and rSP: PUSH stores rAX's low ``size`` bits at SS:rSP - n and moves rSP; POP reads
    them back (one path each)."""
    sw = STACK_BITS[mode]
    n = size // 8

    def go(D: SymbolicDomain):  # type: ignore[no-untyped-def]
        return run_symbolic(D, mode, bytes.fromhex(push))

    (path,) = explore(go)
    run1 = path.result
    rsp0 = run1.inputs["rsp"]
    new_sp = z3.Extract(sw - 1, 0, rsp0) - n
    assert prove(z3.Extract(sw - 1, 0, run1.reg("rsp")) == new_sp) is None
    addr = z3.ZeroExt(64 - sw, new_sp) if sw < 64 else new_sp
    stored = run1.state.mem.phys.read(addr, n)
    assert prove(stored == z3.Extract(size - 1, 0, run1.inputs["rax"])) is None

    def go_pop(D: SymbolicDomain):  # type: ignore[no-untyped-def]
        return run_symbolic(D, mode, bytes.fromhex(pop))

    (path,) = explore(go_pop)
    run2 = path.result
    rsp0 = run2.inputs["rsp"]
    sp = z3.Extract(sw - 1, 0, rsp0)
    addr = z3.ZeroExt(64 - sw, sp) if sw < 64 else sp
    mem0 = run2.inputs["mem"]
    loaded = z3.Concat(*[z3.Select(mem0, addr + k) for k in reversed(range(n))]) if n > 1 else z3.Select(mem0, addr)
    assert prove(z3.Extract(size - 1, 0, run2.reg("rbx")) == loaded) is None
    assert prove(z3.Extract(sw - 1, 0, run2.reg("rsp")) == sp + n) is None


@pytest.mark.parametrize(("mode", "push", "pop"), [("long64", "9c", "9d"), ("prot32", "9c", "9d"),
                                                   ("real", "9c", "9d"), ("long64", "669c", "669d")])
def test_symbolic_pushf_popf_status_flags(mode: str, push: str, pop: str) -> None:
    """For all status-flag values: PUSHF then POPF restores the six status flags, and the pushed image
    holds each flag at its RFLAGS bit (SDM Vol. 1 3.4.3; Vol. 2B PUSHF/POPF)."""
    D = SymbolicDomain()
    s, inputs = symbolic_state(D, mode)  # type: ignore[arg-type]
    s.gpr[4] = D.const(64, STACK_TOP)
    x = Exec(s)
    for code in (push, pop):
        insn = decode(bytes.fromhex(code), BITS[mode])
        x.i = insn
        x.next_rip = CODE + insn.length
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    for f in F.STATUS:
        assert prove(s.get_flag(f) == inputs[F.NAMES[f]]) is None
    n = 2 if push.startswith("66") or mode == "real" else (8 if mode == "long64" else 4)
    image = s.mem.phys.read(STACK_TOP - n, n)
    for f in F.STATUS:
        assert prove((z3.Extract(f, f, image) == 1) == inputs[F.NAMES[f]]) is None
    assert s.D.concrete(s.gpr[4]) == STACK_TOP
