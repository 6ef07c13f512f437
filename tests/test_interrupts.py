"""Exception and interrupt delivery (spec/interrupts.py, the event logic of spec/cpu.py).

Machines come from ``flat_machine(mode, code, idt=True)``: every vector's
handler is a HLT at ``HANDLERS + 16 * vector``, so a run that stops halted in a
handler leaves the delivered frame on the stack.  Frames are compared with an
independent reference built here from the SDM's frame layout (Vol. 3A
Figures 6-4 and 6-9; Vol. 3A 20.1.4 for real mode).  Every encoding is
checked with iced-x86 (``asm``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.faults import Fault, Vector
from spec.interrupts import DR6_BS, Event, EventKind, deliver
from spec.machine import (
    BITS,
    CODE,
    DATA,
    GATE_INT16,
    GATE_INT32,
    GATE_TASK,
    GATE_TRAP16,
    GATE_TRAP32,
    GDT,
    HANDLER_STRIDE,
    HANDLERS,
    IST1_STACK,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    PAGING_BASE,
    STACK_TOP,
    TSS,
    TSS_SEL,
    USER_CS,
    USER_DS,
    encode_descriptor,
    enter_user_mode,
    flat_machine,
    set_gate,
)
from spec.memory import PAGE
from spec.state import MachineState, Segment

PROTECTED = ("prot16", "prot32", "long64")
MODES = ("real", *PROTECTED)
WIDTH = {"real": 2, "prot16": 2, "prot32": 4, "long64": 8}  # frame slot bytes with the machine's default gates
IF, TF, NT, RF, AC, CF, ZF = (1 << F.IF, 1 << F.TF, 1 << F.NT, 1 << F.RF, 1 << F.AC, 1 << F.CF, 1 << F.ZF)
M64 = (1 << 64) - 1
FREE_SEL = 0x38  # first GDT slot after the TSS descriptor (16 bytes in long mode)
UNMAPPED = 0x4000_0000  # long64 maps only the low 1 GiB

_FMT = Formatter(FormatterSyntax.INTEL)
_FMT.space_after_operand_separator = True
_FMT.hex_prefix = "0x"
_FMT.hex_suffix = ""
_FMT.uppercase_hex = False
_FMT.small_hex_numbers_in_decimal = False


def asm(mode: str, *parts: str) -> bytes:
    """Concatenate ``"hex:text"`` parts, each checked to be one instruction iced-x86 prints as ``text``."""
    out = b""
    for part in parts:
        code, text = part.split(":", 1)
        raw = bytes.fromhex(code.replace(" ", ""))
        insn = next(iter(Decoder(BITS[mode], raw, ip=CODE)))
        assert insn.len == len(raw) and _FMT.format(insn) == text, f"{code}: iced says {_FMT.format(insn)!r}"
        out += raw
    return out


def machine(mode: str, code: bytes, *, flags: int = 0x2, user: bool = False, **regs: int) -> MachineState:
    s = flat_machine(mode, code, idt=True)  # type: ignore[arg-type]
    if user:
        enter_user_mode(s)
    s.write_rflags(flags | 0x2)
    for name, v in regs.items():
        s.gpr[("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi").index(name)] = s.D.const(64, v & M64)
    return s


def cpu(s: MachineState) -> SpecCPU:
    return SpecCPU(s, deliver_exceptions=True)


def run(s: MachineState, budget: int = 50) -> StopEvent:
    return cpu(s).run(budget)


def rsp(s: MachineState) -> int:
    return s.D.concrete(s.gpr[4])


def rflags(s: MachineState) -> int:
    return s.D.concrete(s.read_rflags())


def handler(v: int) -> int:
    return HANDLERS + HANDLER_STRIDE * v


def in_handler(s: MachineState, ev: StopEvent, v: int) -> None:
    """The CPU halted in vector ``v``'s handler stub."""
    assert ev.kind == "halted", ev
    lin = s.seg[1].base + s.rip
    assert lin == handler(v) + 1, f"halted at {lin:#x}, handler of vector {(lin - 1 - HANDLERS) // 16:#x}"


def frame(s: MachineState, n: int, w: int) -> list[int]:
    """``n`` stack slots of ``w`` bytes from RSP upwards (error code first, if any)."""
    base = rsp(s) & 0xFFFF if s.stack_bits == 16 else rsp(s)
    base += s.seg[2].base if not s.long_mode else 0
    return [s.mem.phys.read(base + k * w, w) for k in range(n)]


def add_descriptor(s: MachineState, sel: int, seg: Segment) -> None:
    """Write a descriptor at GDT slot ``sel`` and extend the GDT limit over it."""
    s.mem.phys.write(GDT + (sel & ~7), 8, encode_descriptor(seg))
    s.gdtr.limit = max(s.gdtr.limit, (sel & ~7) + 7)


def code_seg(bits: int, *, dpl: int = 0, p: int = 1, limit: int = 0xFFFF_FFFF, conforming: bool = False) -> Segment:
    return Segment(base=0, limit=limit, type=0xF if conforming else 0xB, s=1, dpl=dpl, p=p, l=int(bits == 64),
                   db=int(bits == 32), g=int(limit > 0xFFFFF))


def small_pages(s: MachineState) -> None:
    """long64: map the first 2 MiB with 4-KiB pages (a page table after the flat tables)."""
    pt = PAGING_BASE + 3 * PAGE
    s.mem.phys.map_page(pt)
    for k in range(512):
        s.mem.phys.write(pt + 8 * k, 8, (k << 12) | 0x7)
    s.mem.phys.write(PAGING_BASE + 2 * PAGE, 8, pt | 0x7)


def unmap(s: MachineState, addr: int) -> None:
    s.mem.phys.write(PAGING_BASE + 3 * PAGE + 8 * (addr >> 12), 8, 0)


def int_n(mode: str, v: int) -> str:
    return f"cd{v:02x}:int 0x{v:x}"


MOV_DS_AX = {"prot16": "8ed8:mov ds, ax", "prot32": "8ed8:mov ds, ax", "long64": "8ed8:mov ds, ax"}
NOP, HLT, UD2, STI, INT3, INT1 = "90:nop", "f4:hlt", "0f0b:ud2", "fb:sti", "cc:int3", "f1:int1"


# -- real-address mode -------------------------------------------------------------------------------

def test_real_mode_int_n_frame_and_flags() -> None:
    """INT n in real mode: FLAGS, CS, IP pushed as words; CS:IP from the IVT; IF, TF, AC cleared
    (SDM Vol. 2A INT n "REAL-ADDRESS-MODE"; Vol. 3A 20.1.4)."""
    s = machine("real", asm("real", NOP, int_n("real", 0x40)), flags=IF | AC | CF | ZF | NT)
    s.mem.phys.write(4 * 0x40, 4, (0x0340 << 16) | 0x1000)  # 0340:1000 = linear 0x4400, vector 0x40's stub
    ev = run(s)
    in_handler(s, ev, 0x40)
    assert (s.seg[1].selector, s.seg[1].base, s.rip) == (0x340, 0x3400, 0x1001)
    assert rsp(s) == STACK_TOP - 6
    assert frame(s, 3, 2) == [CODE + 3, 0, (IF | CF | ZF | NT | 2) & 0xFFFF]
    assert not s.rflags_sys & (IF | TF | AC)
    assert s.icount == 3  # NOP, INT, HLT


def test_real_mode_fault_has_no_error_code() -> None:
    """#DE (DIV by 0) is a fault: IP of the DIV; no error code in real mode (SDM Vol. 3A 20.1.4)."""
    s = machine("real", asm("real", "f6f1:div cl"), rax=5, rcx=0)
    in_handler(s, run(s), Vector.DE)
    assert rsp(s) == STACK_TOP - 6
    assert frame(s, 3, 2) == [CODE, 0, 2]


def test_real_mode_ivt_limit_gp_is_a_fault_of_int() -> None:
    """4 * vector + 3 beyond the IDTR limit: #GP, delivered serially with IP = the INT (a fault of it)."""
    s = machine("real", asm("real", int_n("real", 0x40)))
    s.idtr.limit = 4 * 0x40 + 2
    in_handler(s, run(s), Vector.GP)
    assert frame(s, 3, 2) == [CODE, 0, 2]
    assert s.icount == 1  # only the handler's HLT retired


def test_real_mode_stack_wraps_within_64k() -> None:
    """SP = 0: the pushes wrap to 0xFFFA.. inside the 64-KiB stack segment (no #SS)."""
    s = machine("real", asm("real", int_n("real", 0x40)), rsp=0)
    s.seg[2] = Segment(selector=0x100, base=0x1000, limit=0xFFFF)  # SS = 0100: stack at 0x1000 + offset
    s.mem.phys.map_page(0x10000 + 0xF000)
    in_handler(s, run(s), 0x40)
    assert rsp(s) == 0xFFFA
    assert [s.mem.phys.read(0x1000 + 0xFFFA + 2 * k, 2) for k in range(3)] == [CODE + 2, 0, 2]


# -- protected and 64-bit mode frames ---------------------------------------------------------------------

def expected_frame(mode: str, *, rip: int, cs: int, flags: int, error_code: int | None = None,
                   old: tuple[int, int] | None = None) -> list[int]:
    """Reference frame, lowest address first: (EC,) IP, CS, FLAGS, (SP, SS) (SDM Vol. 3A Figures 6-4, 6-9)."""
    w = WIDTH[mode]
    m = (1 << (8 * w)) - 1
    out = [] if error_code is None else [error_code & m]
    out += [rip & m, cs, flags & m]
    if old is not None:
        out += [old[0] & m, old[1]]
    return out


@pytest.mark.parametrize("mode", PROTECTED)
def test_int_n_at_cpl0(mode: str) -> None:
    s = machine(mode, asm(mode, int_n(mode, 0x40)), flags=IF | CF | ZF)
    in_handler(s, run(s), 0x40)
    if mode == "long64":  # SS:RSP always pushed; RSP aligned to 16 (SDM Vol. 3A 6.14.2)
        assert rsp(s) == STACK_TOP - 40
        assert frame(s, 5, 8) == expected_frame(mode, rip=CODE + 2, cs=KERNEL_CS, flags=IF | CF | ZF | 2,
                                                old=(STACK_TOP, KERNEL_DS))
    else:
        assert rsp(s) == STACK_TOP - 3 * WIDTH[mode]
        assert frame(s, 3, WIDTH[mode]) == expected_frame(mode, rip=CODE + 2, cs=KERNEL_CS, flags=IF | CF | ZF | 2)
    assert s.seg[1].selector == KERNEL_CS and s.cpl == 0
    assert not s.rflags_sys & IF  # interrupt gate


@pytest.mark.parametrize("mode", PROTECTED)
def test_exception_with_error_code_at_cpl0(mode: str) -> None:
    """MOV DS with a selector beyond the GDT: #GP(selector), a fault: RIP of the MOV, RF = 1 pushed
    (SDM Vol. 3A 17.3.1.1; the 16-bit image has no RF)."""
    s = machine(mode, asm(mode, MOV_DS_AX[mode]), rax=FREE_SEL + 8)
    in_handler(s, run(s), Vector.GP)
    n = 6 if mode == "long64" else 4
    img = 2 | (RF if mode != "prot16" else 0)
    old = (STACK_TOP, KERNEL_DS) if mode == "long64" else None
    assert frame(s, n, WIDTH[mode]) == expected_frame(mode, rip=CODE, cs=KERNEL_CS, flags=img,
                                                      error_code=FREE_SEL + 8, old=old)
    assert not s.rflags_sys & RF


@pytest.mark.parametrize("mode", PROTECTED)
@pytest.mark.parametrize("kind", ["int", "fault"])
def test_cpl3_to_cpl0_switches_stack(mode: str, kind: str) -> None:
    """From CPL 3 through a DPL-0 code segment: the TSS stack, old SS:SP pushed first
    (SDM Vol. 2A INT n "INTER-PRIVILEGE-LEVEL-INTERRUPT"; Vol. 3A 6.14.2 for 64-bit)."""
    code = asm(mode, int_n(mode, 0x80)) if kind == "int" else asm(mode, MOV_DS_AX[mode])
    s = machine(mode, code, user=True, flags=IF | CF, rax=FREE_SEL + 8)
    v = 0x80 if kind == "int" else Vector.GP
    in_handler(s, run(s), v)
    ec = None if kind == "int" else FREE_SEL + 8
    rip = CODE + 2 if kind == "int" else CODE
    img = IF | CF | 2 | (RF if kind == "fault" and mode != "prot16" else 0)
    slots = 5 + (ec is not None)
    assert frame(s, slots, WIDTH[mode]) == expected_frame(mode, rip=rip, cs=USER_CS, flags=img, error_code=ec,
                                                          old=(STACK_TOP, USER_DS))
    assert rsp(s) == KERNEL_STACK - slots * WIDTH[mode]
    assert s.cpl == 0 and s.seg[1].selector == KERNEL_CS
    if mode == "long64":
        assert s.seg[2].selector == 0  # null SS with RPL = new CPL (SDM Vol. 3A 6.14.4)
    else:
        assert s.seg[2].selector == KERNEL_DS and s.seg[2].dpl == 0


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_conforming_target_keeps_cpl_and_stack(mode: str) -> None:
    """A conforming code segment runs the handler at the current CPL on the current stack
    (SDM Vol. 2A INT n: "new code segment is conforming ... INTRA-PRIVILEGE-LEVEL-INTERRUPT")."""
    bits = 64 if mode == "long64" else 32
    s = machine(mode, asm(mode, int_n(mode, 0x80)), user=True)
    add_descriptor(s, FREE_SEL, code_seg(bits, conforming=True))
    set_gate(s, 0x80, handler(0x80), FREE_SEL, GATE_INT32, dpl=3)
    ev = run(s)
    # The stub's HLT runs at CPL 3: #GP(0) -> the DPL-0 #GP handler on the TSS stack.
    in_handler(s, ev, Vector.GP)
    assert s.cpl == 0
    # The 0x80 frame is on the user stack, with CS = FREE_SEL | 3 (RPL = CPL).
    n = 5 if mode == "long64" else 3
    w = WIDTH[mode]
    top = (STACK_TOP & ~0xF) if mode == "long64" else STACK_TOP
    user_frame = [s.mem.phys.read(top - n * w + k * w, w) for k in range(n)]
    old = (STACK_TOP, USER_DS) if mode == "long64" else None
    assert user_frame == expected_frame(mode, rip=CODE + 2, cs=USER_CS, flags=2, old=old)


@settings(max_examples=40)
@given(v=st.integers(0x20, 0xFF), sp=st.integers(0x7100, 0x7FFF), status=st.integers(0, 0xFFF))
def test_long_mode_frame_property(v: int, sp: int, status: int) -> None:
    """64-bit gates at CPL 0: RSP aligned down to 16, five 8-byte slots; any vector, any RSP."""
    status &= F.STATUS_MASK
    s = machine("long64", asm("long64", int_n("long64", v)), flags=status | IF, rsp=sp)
    in_handler(s, run(s), v)
    base = (sp & ~0xF) - 40
    assert rsp(s) == base
    assert frame(s, 5, 8) == [CODE + 2, KERNEL_CS, status | IF | 2, sp, KERNEL_DS]


@settings(max_examples=40)
@given(v=st.integers(0x20, 0xFF), sp=st.integers(0x7100, 0x7FFF), status=st.integers(0, 0xFFF))
def test_prot32_frame_property(v: int, sp: int, status: int) -> None:
    """32-bit gates at CPL 0: no alignment, three 4-byte slots below ESP."""
    status &= F.STATUS_MASK
    s = machine("prot32", asm("prot32", int_n("prot32", v)), flags=status | IF, rsp=sp)
    in_handler(s, run(s), v)
    assert rsp(s) == sp - 12
    assert frame(s, 3, 4) == [CODE + 2, KERNEL_CS, status | IF | 2]


def test_ist_without_privilege_change() -> None:
    """IA-32e mode: a gate with IST = 1 switches to IST1 even at CPL 0 (SDM Vol. 3A 6.14.5)."""
    s = machine("long64", asm("long64", int_n("long64", 0x40)), rsp=STACK_TOP - 8)
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32, ist=1)
    in_handler(s, run(s), 0x40)
    assert rsp(s) == IST1_STACK - 40
    assert frame(s, 5, 8) == [CODE + 2, KERNEL_CS, 2, STACK_TOP - 8, KERNEL_DS]
    assert s.seg[2].selector == KERNEL_DS  # no privilege change: SS is kept


def test_ist_overrides_rsp0_from_cpl3() -> None:
    s = machine("long64", asm("long64", int_n("long64", 0x80)), user=True)
    set_gate(s, 0x80, handler(0x80), KERNEL_CS, GATE_INT32, dpl=3, ist=1)
    in_handler(s, run(s), 0x80)
    assert rsp(s) == IST1_STACK - 40
    assert frame(s, 5, 8) == [CODE + 2, USER_CS, 2, STACK_TOP, USER_DS]


def test_ist_is_aligned() -> None:
    s = machine("long64", asm("long64", int_n("long64", 0x40)))
    s.mem.phys.write(TSS + 0x24, 8, IST1_STACK - 4)
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32, ist=1)
    in_handler(s, run(s), 0x40)
    assert rsp(s) == IST1_STACK - 16 - 40


@pytest.mark.parametrize("mode", PROTECTED)
@pytest.mark.parametrize("trap_gate", [False, True])
def test_interrupt_and_trap_gates(mode: str, trap_gate: bool) -> None:
    """TF, NT, RF cleared by every gate; IF only by interrupt gates (SDM Vol. 2A INT n, end of
    TRAP-OR-INTERRUPT-GATE; Vol. 3A 6.12.1.3)."""
    s = machine(mode, asm(mode, int_n(mode, 0x40)), flags=IF | NT)
    gtype = {(16, False): GATE_INT16, (16, True): GATE_TRAP16}.get((BITS[mode], trap_gate),
                                                                   GATE_TRAP32 if trap_gate else GATE_INT32)
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, gtype)
    in_handler(s, run(s), 0x40)
    assert bool(s.rflags_sys & IF) == trap_gate
    assert not s.rflags_sys & (NT | TF | RF)
    w = WIDTH[mode]
    assert frame(s, 3, w)[2] == IF | NT | 2


def test_sixteen_bit_gate_in_prot32() -> None:
    """A 16-bit gate pushes words even from 32-bit code; the offset is 16 bits (SDM Vol. 3A 6.12.1)."""
    s = machine("prot32", asm("prot32", int_n("prot32", 0x40)), flags=IF)
    set_gate(s, 0x40, 0xFFFF_0000 | handler(0x40), KERNEL_CS, GATE_INT16)
    in_handler(s, run(s), 0x40)
    assert rsp(s) == STACK_TOP - 6
    assert frame(s, 3, 2) == [CODE + 2, KERNEL_CS, IF | 2]


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_rf_in_pushed_image(mode: str) -> None:
    """RF: 1 for faults (#UD); 0 for INT n even when set before it (cleared as it starts) (SDM Vol. 3A 17.3.1.1)."""
    s = machine(mode, asm(mode, UD2))
    in_handler(s, run(s), Vector.UD)
    assert frame(s, 3, WIDTH[mode])[2] == RF | 2
    s = machine(mode, asm(mode, int_n(mode, 0x40)), flags=RF)
    in_handler(s, run(s), 0x40)
    assert frame(s, 3, WIDTH[mode])[2] == 2


def test_rf_cleared_after_an_instruction() -> None:
    s = machine("long64", asm("long64", NOP, HLT), flags=RF)
    assert run(s).kind == "halted"
    assert not s.rflags_sys & RF


# -- #PF and CR2 -----------------------------------------------------------------------------------

def test_page_fault_writes_cr2_on_delivery() -> None:
    """#PF delivery loads CR2 with the faulting address; error code 0 = read of a not-present page
    (SDM Vol. 3A 4.7, "Interrupt 14")."""
    code = asm("long64", "488b042500000040:mov rax, [0x40000000]")
    s = machine("long64", code)
    in_handler(s, run(s), Vector.PF)
    assert s.cr2 == UNMAPPED
    assert frame(s, 6, 8) == [0, CODE, KERNEL_CS, RF | 2, STACK_TOP, KERNEL_DS]


def test_page_fault_write_error_code() -> None:
    code = asm("long64", "c604250000004001:mov byte ptr [0x40000000], 0x1")
    s = machine("long64", code)
    in_handler(s, run(s), Vector.PF)
    assert (s.cr2, frame(s, 1, 8)[0]) == (UNMAPPED, 0x2)


def test_page_fault_without_delivery_leaves_cr2() -> None:
    """deliver_exceptions=False: the stop event carries CR2; the register is not written."""
    s = machine("long64", asm("long64", "488b042500000040:mov rax, [0x40000000]"))
    ev = SpecCPU(s).run(5)
    assert (ev.kind, ev.vector, ev.cr2, ev.rip, s.cr2) == ("fault", Vector.PF, UNMAPPED, CODE, 0)


def test_frame_pushes_are_user_accesses_only_at_cpl3() -> None:
    """The frame is written at the new CPL: a supervisor-only stack page is fine for a CPL-0 handler."""
    s = machine("long64", asm("long64", int_n("long64", 0x80)), user=True)
    small_pages(s)
    pte = PAGING_BASE + 3 * PAGE + 8 * ((KERNEL_STACK - 8) >> 12)
    s.mem.phys.write(pte, 8, ((KERNEL_STACK - 8) & ~0xFFF) | 0x3)  # present, writable, supervisor
    in_handler(s, run(s), 0x80)


# -- gate and target checks (spec.interrupts.deliver directly) ---------------------------------------

EXT_CASES = [(EventKind.SOFTWARE, 0), (EventKind.EXCEPTION, 1)]


def gate_fault(s: MachineState, v: int, kind: EventKind) -> tuple[int, int | None]:
    before = (rsp(s), list(s.seg), s.rflags_sys, s.rip)
    with pytest.raises(Fault) as e:
        deliver(s, Event(v, kind), CODE)
    assert (rsp(s), list(s.seg), s.rflags_sys, s.rip) == before  # nothing changed before the checks failed
    return e.value.vector, e.value.error_code


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_idt_limit(mode: str, kind: EventKind, ext: int) -> None:
    s = machine(mode, b"")
    size = 16 if mode == "long64" else 8
    s.idtr.limit = 0x40 * size + size - 2
    assert gate_fault(s, 0x40, kind) == (Vector.GP, 0x40 * 8 + 2 + ext)  # IDT-format error code (SDM 6.13)
    s.idtr.limit += 1
    deliver(s, Event(0x40, kind), CODE)


@pytest.mark.parametrize("mode", ["prot32", "long64"])
@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
@pytest.mark.parametrize("gtype", [0x0, 0x1, 0x4, 0xC, "S=1", "16bit-in-long"])
def test_invalid_gate_type(mode: str, kind: EventKind, ext: int, gtype: int | str) -> None:
    """Not an interrupt/trap (or, outside IA-32e mode, task) gate: #GP(vector * 8 + 2 + EXT)."""
    s = machine(mode, b"")
    if gtype == "16bit-in-long":
        if mode != "long64":
            return
        gtype = GATE_INT16
    if gtype == "S=1":
        set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32)
        off = s.idtr.base + 0x40 * (16 if mode == "long64" else 8) + 5
        s.mem.phys.write(off, 1, s.mem.phys.read(off, 1) | 0x10)
    else:
        set_gate(s, 0x40, handler(0x40), KERNEL_CS, gtype)  # type: ignore[arg-type]
    assert gate_fault(s, 0x40, kind) == (Vector.GP, 0x40 * 8 + 2 + ext)


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_gate_not_present(mode: str, kind: EventKind, ext: int) -> None:
    s = machine(mode, b"")
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32 if mode != "prot16" else GATE_INT16, present=0)
    assert gate_fault(s, 0x40, kind) == (Vector.NP, 0x40 * 8 + 2 + ext)


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
def test_gate_dpl_checked_for_software_interrupts_only(mode: str) -> None:
    """INT n/INT3/INTO at CPL 3 through a DPL-0 gate: #GP(vector * 8 + 2), EXT = 0; hardware
    exceptions and INT1 are not DPL-checked (SDM Vol. 2A INT n; Vol. 3A 6.12.1.1)."""
    s = machine(mode, b"", user=True)
    assert gate_fault(s, 0x40, EventKind.SOFTWARE) == (Vector.GP, 0x40 * 8 + 2)
    deliver(s, Event(0x40, EventKind.EXCEPTION), CODE)


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
def test_int_n_from_cpl3_end_to_end(mode: str) -> None:
    """The #GP of a DPL-checked INT n is a fault of the INT: its frame points at the INT."""
    s = machine(mode, asm(mode, int_n(mode, 0x40)), user=True)
    in_handler(s, run(s), Vector.GP)
    assert frame(s, 2, WIDTH[mode]) == [0x40 * 8 + 2, CODE]
    s = machine(mode, asm(mode, INT3), user=True)  # the machine's INT3 gate has DPL 3
    in_handler(s, run(s), Vector.BP)
    s = machine(mode, asm(mode, INT1), user=True)  # INT1: no DPL check through the DPL-0 #DB gate
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 1, WIDTH[mode]) == [CODE + 1]  # a trap: the next instruction


@pytest.mark.parametrize("mode", ["prot32", "long64"])
@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_target_code_segment_checks(mode: str, kind: EventKind, ext: int) -> None:
    """SDM Vol. 2A INT n "TRAP-OR-INTERRUPT-GATE": null -> #GP(EXT); beyond the table, not code, or
    DPL > CPL -> #GP(sel + EXT); not present -> #NP(sel + EXT)."""
    bits = 64 if mode == "long64" else 32
    s = machine(mode, b"")

    def target(sel: int) -> tuple[int, int | None]:
        set_gate(s, 0x40, handler(0x40), sel, GATE_INT32)
        return gate_fault(s, 0x40, kind)

    assert target(0) == (Vector.GP, ext)
    assert target(3) == (Vector.GP, ext)  # null with RPL 3
    assert target(0x80) == (Vector.GP, 0x80 | ext)
    assert target(KERNEL_DS) == (Vector.GP, KERNEL_DS | ext)
    assert target(USER_CS) == (Vector.GP, (USER_CS & ~3) | ext)
    add_descriptor(s, FREE_SEL, code_seg(bits, p=0))
    assert target(FREE_SEL) == (Vector.NP, FREE_SEL | ext)
    assert target(TSS_SEL) == (Vector.GP, TSS_SEL | ext)  # a system descriptor is not code


@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_long_mode_target_must_be_64bit(kind: EventKind, ext: int) -> None:
    """IA-32e mode: the target must be a 64-bit code segment, else #GP(vector * 8 + 2 + EXT) (SDM 6.14.1)."""
    s = machine("long64", b"")
    add_descriptor(s, FREE_SEL, code_seg(32))
    set_gate(s, 0x40, handler(0x40), FREE_SEL, GATE_INT32)
    assert gate_fault(s, 0x40, kind) == (Vector.GP, 0x40 * 8 + 2 + ext)


@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_handler_offset_checks(kind: EventKind, ext: int) -> None:
    """Offset beyond the new CS limit (legacy) or non-canonical (IA-32e): #GP(EXT)."""
    s = machine("prot32", b"")
    add_descriptor(s, FREE_SEL, code_seg(32, limit=handler(0x40) - 1))
    set_gate(s, 0x40, handler(0x40), FREE_SEL, GATE_INT32)
    assert gate_fault(s, 0x40, kind) == (Vector.GP, ext)
    s = machine("long64", b"")
    set_gate(s, 0x40, 0x0000_8000_0000_0000, KERNEL_CS, GATE_INT32)
    assert gate_fault(s, 0x40, kind) == (Vector.GP, ext)
    set_gate(s, 0x40, 0xFFFF_8000_0000_0000, KERNEL_CS, GATE_INT32)
    deliver(s, Event(0x40, kind), CODE)
    assert s.rip == 0xFFFF_8000_0000_0000


@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_tss_stack_checks_legacy(kind: EventKind, ext: int) -> None:
    """SS0:ESP0 from the 32-bit TSS (SDM Vol. 2A INT n "INTER-PRIVILEGE-LEVEL-INTERRUPT")."""
    def case(ss0: int, *, tr_limit: int = 0x67, desc: Segment | None = None) -> tuple[int, int | None]:
        s = machine("prot32", b"", user=True)
        s.mem.phys.write(TSS + 8, 2, ss0)
        s.tr.limit = tr_limit
        if desc is not None:
            add_descriptor(s, FREE_SEL, desc)
        return gate_fault(s, 0x80, kind)

    assert case(KERNEL_DS, tr_limit=8) == (Vector.TS, TSS_SEL | ext)  # ESP0/SS0 beyond the TSS limit
    assert case(0) == (Vector.TS, ext)  # null SS
    assert case(0x80) == (Vector.TS, 0x80 | ext)  # beyond the GDT
    assert case(KERNEL_DS | 1) == (Vector.TS, KERNEL_DS | ext)  # RPL != new CPL
    assert case(KERNEL_CS) == (Vector.TS, KERNEL_CS | ext)  # code, not writable data
    assert case(USER_DS & ~3) == (Vector.TS, (USER_DS & ~3) | ext)  # DPL 3 != new CPL 0
    ro = Segment(base=0, limit=0xFFFF_FFFF, type=0x1, s=1, dpl=0, p=1, db=1, g=1)
    assert case(FREE_SEL, desc=ro) == (Vector.TS, FREE_SEL | ext)  # read-only data
    np = Segment(base=0, limit=0xFFFF_FFFF, type=0x3, s=1, dpl=0, p=0, db=1, g=1)
    assert case(FREE_SEL, desc=np) == (Vector.SS, FREE_SEL | ext)  # not present: #SS


def test_sixteen_bit_tss() -> None:
    """A 16-bit TSS holds SP0 at +2 and SS0 at +4 (SDM Vol. 2A INT n; Vol. 3A 7.6)."""
    s = machine("prot16", asm("prot16", int_n("prot16", 0x80)), user=True)
    s.tr.type = 0x3  # busy 16-bit TSS
    s.mem.phys.write(TSS + 2, 4, (KERNEL_DS << 16) | 0x5800)
    in_handler(s, run(s), 0x80)
    assert rsp(s) == 0x5800 - 10 and s.seg[2].selector == KERNEL_DS
    assert frame(s, 5, 2) == [CODE + 2, USER_CS, 2, STACK_TOP, USER_DS]
    s = machine("prot16", b"", user=True)
    s.tr.type, s.tr.limit = 0x3, 0x4
    assert gate_fault(s, 0x80, EventKind.SOFTWARE) == (Vector.TS, TSS_SEL)


@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_tss_stack_checks_long(kind: EventKind, ext: int) -> None:
    s = machine("long64", b"", user=True)
    s.tr.limit = 0x0A  # RSP0 is bytes 4..0xB
    assert gate_fault(s, 0x80, kind) == (Vector.TS, TSS_SEL | ext)
    s = machine("long64", b"", user=True)
    s.mem.phys.write(TSS + 4, 8, 0x0000_8000_0000_0000)
    assert gate_fault(s, 0x80, kind) == (Vector.SS, ext)  # non-canonical RSP0
    s = machine("long64", b"")
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32, ist=7)
    s.tr.limit = 0x24 + 8 * 6 + 6
    assert gate_fault(s, 0x40, kind) == (Vector.TS, TSS_SEL | ext)  # IST7 beyond the TSS limit


@pytest.mark.parametrize(("kind", "ext"), EXT_CASES)
def test_stack_room_legacy(kind: EventKind, ext: int) -> None:
    """No room for the frame within SS.limit: #SS(EXT) on the same stack, #SS(SS + EXT) on a new one."""
    s = machine("prot32", b"", rsp=0x8)  # 12 bytes needed, 8 available below ESP ...
    s.seg[2] = Segment(selector=KERNEL_DS, base=0, limit=0xFFFFF, type=0x3, db=1)  # ... without a 4-GiB wrap
    assert gate_fault(s, 0x40, kind) == (Vector.SS, ext)
    s.seg[2] = Segment(selector=KERNEL_DS, base=0, limit=0xFFFF_FFFF, type=0x3, db=1, g=1)
    deliver(s, Event(0x40, kind), CODE)  # a flat stack wraps: ESP 8 - 12 = 0xFFFFFFFC is inside the limit
    assert rsp(s) == 0xFFFF_FFFC
    s = machine("prot32", b"", user=True)
    add_descriptor(s, FREE_SEL, Segment(base=0, limit=0xFFFFF, type=0x3, s=1, dpl=0, p=1, db=1))
    s.mem.phys.write(TSS + 4, 6, (FREE_SEL << 32) | 0x10)  # SS0:ESP0 = FREE_SEL:0x10, 20 bytes needed
    assert gate_fault(s, 0x80, kind) == (Vector.SS, FREE_SEL | ext)
    s = machine("prot32", b"")
    s.seg[2] = Segment(selector=KERNEL_DS, base=0, limit=0x7FF0, type=0x3, db=1)  # limit below ESP
    assert gate_fault(s, 0x40, kind) == (Vector.SS, ext)


def test_expand_down_stack() -> None:
    """An expand-down SS: valid offsets lie above the limit (SDM Vol. 3A 3.4.5.1)."""
    s = machine("prot32", b"", rsp=0x7000)
    s.seg[2] = Segment(selector=KERNEL_DS, base=0, limit=0x6FF8, type=0x7, db=1)
    assert gate_fault(s, 0x40, EventKind.EXTERNAL) == (Vector.SS, 1)
    s.seg[2] = Segment(selector=KERNEL_DS, base=0, limit=0x6FF3, type=0x7, db=1)
    deliver(s, Event(0x40, EventKind.EXTERNAL), CODE)
    assert rsp(s) == 0x7000 - 12


def test_task_gate_is_unimplemented() -> None:
    """Task gates need hardware task switching, outside the model: an unimplemented stop, no change."""
    s = machine("prot32", asm("prot32", int_n("prot32", 0x40)))
    set_gate(s, 0x40, 0, TSS_SEL, GATE_TASK)
    ev = run(s)
    assert ev.kind == "unimplemented" and "task" in ev.detail
    assert (s.rip, rsp(s), s.icount) == (CODE, STACK_TOP, 0)


# -- external interrupts, NMI, shadows, HLT -------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_intr_waits_for_if(mode: str) -> None:
    s = machine(mode, asm(mode, NOP, HLT))
    c = cpu(s)
    c.request_interrupt(0x40)
    assert c.run(10).kind == "halted" and s.rip == CODE + 2
    assert c.pending_interrupts == (0x40,)
    assert c.step().kind == "halted"  # IF = 0: the halted CPU stays halted
    s.rflags_sys |= IF
    assert c.step() is None  # delivered: wakes the CPU
    assert not s.halted and s.rip == handler(0x40)
    w = WIDTH[mode]
    n = 5 if mode == "long64" else 3
    cs = 0 if mode == "real" else KERNEL_CS
    assert frame(s, n, w)[:3] == [CODE + 2, cs, IF | 2]  # return address: past the HLT


@pytest.mark.parametrize("mode", MODES)
def test_intr_at_boundary_pushes_no_error_code(mode: str) -> None:
    """An external interrupt on vector 13 pushes no error code (SDM Vol. 3A 6.13)."""
    s = machine(mode, asm(mode, NOP, NOP, HLT), flags=IF)
    c = cpu(s)
    assert c.step() is None
    c.request_interrupt(Vector.GP)
    assert c.step() is None and s.rip == handler(Vector.GP)
    n = 5 if mode == "long64" else 3
    assert rsp(s) == ((STACK_TOP & ~0xF) - 40 if mode == "long64" else STACK_TOP - 3 * WIDTH[mode])
    assert frame(s, n, WIDTH[mode])[0] == CODE + 1


@pytest.mark.parametrize("mode", MODES)
def test_sti_shadow(mode: str) -> None:
    """STI from IF = 0 blocks interrupts until after the next instruction (SDM Vol. 2B STI)."""
    s = machine(mode, asm(mode, STI, NOP, NOP, HLT))
    c = cpu(s)
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == CODE + 1  # STI
    assert s.interrupt_shadow
    assert c.step() is None and s.rip == CODE + 2  # the NOP in the shadow
    assert c.step() is None and s.rip == handler(0x40)
    assert frame(s, 1, WIDTH[mode]) == [CODE + 2]


def test_sti_with_if_set_has_no_shadow() -> None:
    s = machine("prot32", asm("prot32", STI, NOP, HLT), flags=IF)
    c = cpu(s)
    assert c.step() is None and not s.interrupt_shadow
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == handler(0x40)
    assert frame(s, 1, 4) == [CODE + 1]


@pytest.mark.parametrize("mode", MODES)
def test_mov_ss_shadow(mode: str) -> None:
    """MOV SS inhibits interrupts at the next boundary (SDM Vol. 2B MOV; Vol. 3A 6.8.3)."""
    ss = 0 if mode == "real" else KERNEL_DS
    s = machine(mode, asm(mode, "8ed0:mov ss, ax", NOP, NOP, HLT), flags=IF, rax=ss)
    c = cpu(s)
    assert c.step() is None and s.interrupt_shadow
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == CODE + 3  # the NOP after MOV SS runs
    assert not s.interrupt_shadow
    assert c.step() is None and s.rip == handler(0x40)
    assert frame(s, 1, WIDTH[mode]) == [CODE + 3]


def test_pop_ss_shadow_blocks_nmi() -> None:
    s = machine("prot32", asm("prot32", "17:pop ss", NOP, HLT), rsp=STACK_TOP - 4)
    s.mem.phys.write(STACK_TOP - 4, 4, KERNEL_DS)
    c = cpu(s)
    assert c.step() is None
    c.request_nmi()
    assert c.step() is None and s.rip == CODE + 2
    assert c.step() is None and s.rip == handler(Vector.NMI)


def test_nmi_ignores_if_and_blocks_until_iret() -> None:
    """NMI is delivered with IF = 0, then blocked until an IRET (SDM Vol. 3A 6.7.1)."""
    s = machine("long64", asm("long64", NOP, NOP, HLT))
    s.mem.phys.write_bytes(handler(Vector.NMI), asm("long64", NOP, "48cf:iretq"))
    c = cpu(s)
    c.request_nmi()
    assert c.step() is None and s.rip == handler(Vector.NMI) and s.nmi_blocked
    c.request_nmi()
    assert c.step() is None and s.rip == handler(Vector.NMI) + 1  # blocked: the handler's NOP runs
    assert c.nmi_pending
    assert c.step() is None and s.rip == CODE and not s.nmi_blocked  # IRETQ back to the first NOP
    assert c.step() is None and s.rip == handler(Vector.NMI)  # the second NMI
    assert frame(s, 1, 8) == [CODE]


def test_nmi_before_intr_and_wakes_hlt() -> None:
    s = machine("prot32", asm("prot32", HLT), flags=IF)
    c = cpu(s)
    assert c.run(5).kind == "halted"
    c.request_interrupt(0x40)
    c.request_nmi()
    assert c.step() is None and s.rip == handler(Vector.NMI)  # NMI first (SDM Vol. 3A Table 6-2)
    assert frame(s, 1, 4) == [CODE + 1]
    assert c.pending_interrupts == (0x40,)


class FakePIC:
    """An interrupt controller: asserts INTR until acknowledged."""

    def __init__(self, vector: int) -> None:
        self.vector = vector
        self.acked = 0

    def pending(self) -> bool:
        return self.acked == 0

    def acknowledge(self) -> int:
        self.acked += 1
        return self.vector


def test_interrupt_source() -> None:
    s = machine("long64", asm("long64", NOP, HLT), flags=IF)
    c = cpu(s)
    pic = FakePIC(0x21)
    c.attach_interrupt_source(pic)
    assert c.step() is None and s.rip == handler(0x21) and pic.acked == 1
    assert c.run(5).kind == "halted" and s.rip == handler(0x21) + 1
    c.attach_interrupt_source(None)


def test_inject_exception() -> None:
    """A VMM injecting #PF: error code pushed, CR2 written, RF = 1 (a fault) in the image."""
    s = machine("long64", asm("long64", NOP))
    c = cpu(s)
    assert c.inject(Vector.PF, error_code=0x5, cr2=0x1234) is None
    assert s.rip == handler(Vector.PF) and s.cr2 == 0x1234
    assert frame(s, 4, 8) == [0x5, CODE, KERNEL_CS, RF | 2]


def test_interrupt_between_rep_iterations_pushes_rf() -> None:
    """An interrupt after a REP iteration but the last: RF = 1 in the image, EIP = the REP STOS
    (SDM Vol. 3A 17.3.1.1)."""
    s = machine("prot32", asm("prot32", "f3aa:rep stosb [edi]", HLT), flags=IF, rcx=5, rdi=DATA)
    c = cpu(s)
    assert c.step() is None and s.rip == CODE
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == handler(0x40)
    assert frame(s, 3, 4) == [CODE, KERNEL_CS, RF | IF | 2]


def test_external_interrupt_and_iret_round_trip() -> None:
    """Delivery then IRETQ resumes the interrupted code (the IRET helper's semantics)."""
    code = asm("long64", NOP, NOP, HLT)
    s = machine("long64", code, flags=IF | CF)
    s.mem.phys.write_bytes(handler(0x40), asm("long64", "48cf:iretq"))
    c = cpu(s)
    assert c.step() is None
    c.request_interrupt(0x40)
    assert c.run(10).kind == "halted"
    assert s.rip == CODE + 3 and rsp(s) == STACK_TOP and s.rflags_sys & IF and rflags(s) & CF


def test_no_delivery_mode_still_takes_interrupts() -> None:
    """deliver_exceptions=False (the default): external interrupts are still delivered; a fault in their
    delivery stops the CPU with that fault at the boundary."""
    s = machine("prot32", asm("prot32", NOP, HLT), flags=IF)
    c = SpecCPU(s)
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == handler(0x40)
    s = machine("prot32", asm("prot32", NOP, HLT), flags=IF)
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, GATE_INT32, present=0)
    c = SpecCPU(s)
    c.request_interrupt(0x40)
    ev = c.step()
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.NP, 0x40 * 8 + 3, CODE)


# -- single-step -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_single_step_trap(mode: str) -> None:
    """TF set as an instruction starts: #DB after it, DR6.BS set, TF cleared for the handler; the image
    keeps TF (SDM Vol. 3A 17.3.1.4)."""
    s = machine(mode, asm(mode, NOP, NOP, HLT), flags=TF)
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 3, WIDTH[mode]) == [CODE + 1, 0 if mode == "real" else KERNEL_CS, TF | 2]
    assert s.dr[6] & DR6_BS and not s.rflags_sys & TF


def test_popf_setting_tf_traps_after_the_next_instruction() -> None:
    code = asm("long64", "6802010000:push 0x102", "9d:popfq", NOP, NOP)
    s = machine("long64", code)
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 1, 8) == [CODE + 7]  # after the NOP that follows POPFQ


def test_popf_clearing_tf_still_traps() -> None:
    s = machine("long64", asm("long64", "9d:popfq", NOP), flags=TF, rsp=STACK_TOP - 8)
    s.mem.phys.write(STACK_TOP - 8, 8, 0x2)
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 3, 8) == [CODE + 1, KERNEL_CS, 2]


def test_single_step_held_over_mov_ss() -> None:
    """After MOV SS the single-step trap waits for the next instruction (SDM Vol. 3A 6.8.3)."""
    s = machine("prot32", asm("prot32", "8ed0:mov ss, ax", NOP, NOP), flags=TF, rax=KERNEL_DS)
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 1, 4) == [CODE + 3]


def test_int_n_is_not_single_stepped() -> None:
    """INT n clears TF on entry; no #DB for the INT itself (SDM Vol. 3A 17.3.1.4)."""
    s = machine("prot32", asm("prot32", int_n("prot32", 0x40)), flags=TF)
    in_handler(s, run(s), 0x40)
    assert frame(s, 3, 4) == [CODE + 2, KERNEL_CS, TF | 2]
    assert not s.dr[6] & DR6_BS


def test_single_step_each_rep_iteration() -> None:
    s = machine("prot32", asm("prot32", "f3aa:rep stosb [edi]"), flags=TF, rcx=3, rdi=DATA)
    in_handler(s, run(s), Vector.DB)
    assert frame(s, 3, 4) == [CODE, KERNEL_CS, RF | TF | 2]  # not the last iteration: RF = 1


def test_single_step_without_delivery_is_a_fault_event() -> None:
    s = machine("long64", asm("long64", NOP, NOP), flags=TF)
    ev = SpecCPU(s).run(5)
    assert (ev.kind, ev.vector, ev.rip) == ("fault", Vector.DB, CODE + 1)


# -- priority: fetch before decode ---------------------------------------------------------------------

def test_code_page_fault_before_ud() -> None:
    """UD2 split over an unmapped page: the fetch #PF comes first (SDM Vol. 3A Table 6-2, classes 8 and 9)."""
    s = machine("long64", b"")
    small_pages(s)
    unmap(s, 0x2000)
    s.mem.phys.write_bytes(0x1FFF, b"\x0f")
    s.rip = 0x1FFF
    in_handler(s, run(s), Vector.PF)
    assert s.cr2 == 0x2000 and frame(s, 2, 8)[1] == 0x1FFF


def test_ud_before_the_next_page_is_needed() -> None:
    s = machine("long64", b"")
    small_pages(s)
    unmap(s, 0x2000)
    s.mem.phys.write_bytes(0x1FFE, asm("long64", UD2))
    s.rip = 0x1FFE
    in_handler(s, run(s), Vector.UD)
    assert s.cr2 == 0


# -- symbolic twin: the pushed flags image, for all status-flag values ----------------------------------

@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_symbolic_flags_image(mode: str) -> None:
    """Through the same delivery code on the Z3 domain: the FLAGS slot of the frame is exactly the status
    flags (any values) plus the system bits, and delivery leaves the status flags unchanged."""
    import z3

    from spec.domain.symbolic import SymbolicDomain, prove
    from spec.symexec import symbolic_state

    D = SymbolicDomain()
    s, inputs = symbolic_state(D, mode)  # type: ignore[arg-type]
    conc = machine(mode, b"")  # the same tables, copied into the symbolic memory
    for addr in (*range(0, 0x1000, 8), *range(0x3000, 0x4000, 8)):
        s.mem.phys.write(addr, 8, conc.mem.phys.read(addr, 8))
    s.idtr, s.gdtr, s.tr = conc.idtr, conc.gdtr, conc.tr
    s.gpr[4] = D.const(64, STACK_TOP)
    s.rflags_sys = IF | 2
    deliver(s, Event(0x40, EventKind.EXTERNAL), CODE)
    w = WIDTH[mode]
    slot = s.mem.read((STACK_TOP & ~0xF) - 40 + 16 if mode == "long64" else STACK_TOP - w, w)
    want = z3.BitVecVal(IF | 2, 8 * w)
    for f in F.STATUS:
        want = want | z3.If(inputs[F.NAMES[f]], z3.BitVecVal(1 << f, 8 * w), z3.BitVecVal(0, 8 * w))
    assert prove(slot == want) is None
    assert prove(z3.And(*[s.get_flag(f) == inputs[F.NAMES[f]] for f in F.STATUS])) is None
    assert s.rip == handler(0x40) and not s.rflags_sys & IF
