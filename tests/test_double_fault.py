"""Exceptions during delivery: serial delivery, double fault, triple fault (SDM Vol. 3A 6.15
"Interrupt 8", Tables 6-4 and 6-5; CR2 rules from "Interrupt 14", Figure 6-9 footnote).

The machines and helpers are those of tests/test_interrupts.py (every handler
is a HLT stub; the frame stays on the stack).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_interrupts import (
    FREE_SEL,
    INT3,
    MOV_DS_AX,
    UD2,
    UNMAPPED,
    WIDTH,
    add_descriptor,
    asm,
    cpu,
    frame,
    handler,
    in_handler,
    int_n,
    machine,
    rsp,
    run,
)

from spec.cpu import SpecCPU
from spec.faults import Vector
from spec.interrupts import Event, EventKind, escalates
from spec.machine import GATE_INT16, GATE_INT32, KERNEL_CS, STACK_TOP, TSS, set_gate
from spec.state import MachineState, Segment

PROTECTED = ("prot16", "prot32", "long64")
RF = 1 << 16

# SDM Vol. 3A Table 6-4, written out independently of spec/interrupts.py.
BENIGN = {1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19}
CONTRIBUTORY = {0, 10, 11, 12, 13, 21}
PAGE_FAULTS = {14, 20}


def reference_class(kind: EventKind, v: int) -> str:
    if kind != EventKind.EXCEPTION or v in BENIGN:
        return "benign"
    if v in CONTRIBUTORY:
        return "contributory"
    if v in PAGE_FAULTS:
        return "page fault"
    return "benign"  # reserved/other vectors raised as exceptions: treated as benign


# Table 6-5: (first, second) -> double fault?
TABLE_6_5 = {
    ("benign", "benign"): False, ("benign", "contributory"): False, ("benign", "page fault"): False,
    ("contributory", "benign"): False, ("contributory", "contributory"): True,
    ("contributory", "page fault"): False,
    ("page fault", "benign"): False, ("page fault", "contributory"): True, ("page fault", "page fault"): True,
}


@given(k1=st.sampled_from(list(EventKind)), v1=st.integers(0, 255), v2=st.integers(0, 31))
def test_escalation_matches_table_6_5(k1: EventKind, v1: int, v2: int) -> None:
    first, second = Event(v1, k1), Event(v2, EventKind.EXCEPTION)
    want = TABLE_6_5[(reference_class(k1, v1), reference_class(EventKind.EXCEPTION, v2))]
    assert escalates(first, second) == want


def gate_type(mode: str) -> int:
    return GATE_INT16 if mode == "prot16" else GATE_INT32


def df_frame(s: MachineState, mode: str) -> list[int]:
    """Error code and return address of a #DF frame."""
    return frame(s, 2, WIDTH[mode])


# -- double fault -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", PROTECTED)
def test_np_while_delivering_gp_is_double_fault(mode: str) -> None:
    """#GP (contributory) whose gate is not present -> #NP (contributory) -> #DF with error code 0,
    return address = the faulting MOV (SDM Vol. 3A Table 6-5)."""
    s = machine(mode, asm(mode, MOV_DS_AX[mode]), rax=0x80)
    set_gate(s, Vector.GP, handler(Vector.GP), KERNEL_CS, gate_type(mode), present=0)
    in_handler(s, run(s), Vector.DF)
    assert df_frame(s, mode) == [0, 0x1000]


@pytest.mark.parametrize("mode", PROTECTED)
def test_gp_while_delivering_np_is_double_fault(mode: str) -> None:
    """MOV DS of a not-present data segment -> #NP; its gate has an invalid type -> #GP -> #DF."""
    s = machine(mode, asm(mode, MOV_DS_AX[mode]), rax=FREE_SEL)
    add_descriptor(s, FREE_SEL, Segment(base=0, limit=0xFFFF, type=0x3, s=1, dpl=0, p=0))
    set_gate(s, Vector.NP, handler(Vector.NP), KERNEL_CS, 0xC)  # a call gate: not valid in the IDT
    in_handler(s, run(s), Vector.DF)
    assert df_frame(s, mode) == [0, 0x1000]


def test_pf_while_delivering_pf_is_double_fault() -> None:
    """#PF whose IST stack is unmapped -> #PF -> #DF; CR2 holds the second fault's address."""
    s = machine("long64", asm("long64", "488b042500000040:mov rax, [0x40000000]"))
    s.mem.phys.write(TSS + 0x24, 8, UNMAPPED + 0x1000)
    set_gate(s, Vector.PF, handler(Vector.PF), KERNEL_CS, GATE_INT32, ist=1)
    in_handler(s, run(s), Vector.DF)
    assert s.cr2 == UNMAPPED + 0x1000 - 8
    assert frame(s, 6, 8) == [0, 0x1000, KERNEL_CS, 2, STACK_TOP, 0x10]  # #DF: an abort, RF as it was


def test_contributory_while_delivering_pf_is_double_fault() -> None:
    s = machine("long64", asm("long64", "488b042500000040:mov rax, [0x40000000]"))
    set_gate(s, Vector.PF, handler(Vector.PF), KERNEL_CS, GATE_INT32, present=0)
    in_handler(s, run(s), Vector.DF)
    assert s.cr2 == UNMAPPED  # written when the first #PF was taken
    assert df_frame(s, "long64") == [0, 0x1000]


# -- serial delivery ----------------------------------------------------------------------------------

def test_pf_while_delivering_contributory_is_serial() -> None:
    """#GP whose IST stack is unmapped -> #PF delivered instead (Table 6-5: contributory then page fault)."""
    s = machine("long64", asm("long64", MOV_DS_AX["long64"]), rax=0x80)
    s.mem.phys.write(TSS + 0x24, 8, UNMAPPED + 0x1000)
    set_gate(s, Vector.GP, handler(Vector.GP), KERNEL_CS, GATE_INT32, ist=1)
    in_handler(s, run(s), Vector.PF)
    assert s.cr2 == UNMAPPED + 0x1000 - 8
    assert frame(s, 4, 8) == [0x2, 0x1000, KERNEL_CS, RF | 2]  # write, not present, supervisor


@pytest.mark.parametrize("mode", PROTECTED)
def test_benign_then_contributory_is_serial(mode: str) -> None:
    """#UD (benign) whose gate is not present -> #NP(6 * 8 + 2 + EXT) delivered; RIP = the UD2."""
    s = machine(mode, asm(mode, UD2))
    set_gate(s, Vector.UD, handler(Vector.UD), KERNEL_CS, gate_type(mode), present=0)
    in_handler(s, run(s), Vector.NP)
    assert frame(s, 2, WIDTH[mode]) == [6 * 8 + 3, 0x1000]


@pytest.mark.parametrize("mode", PROTECTED)
def test_int_n_then_np_is_a_fault_of_the_int(mode: str) -> None:
    """INT n (benign, EXT = 0) through a not-present gate: #NP(vector * 8 + 2), return address = the INT;
    the INT does not retire."""
    s = machine(mode, asm(mode, int_n(mode, 0x40)))
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, gate_type(mode), present=0)
    in_handler(s, run(s), Vector.NP)
    assert frame(s, 2, WIDTH[mode]) == [0x40 * 8 + 2, 0x1000]
    assert s.icount == 1  # the #NP handler's HLT only


@pytest.mark.parametrize("mode", PROTECTED)
def test_external_interrupt_fault_has_ext(mode: str) -> None:
    """A fault while delivering an external interrupt: EXT = 1, return address = the boundary."""
    s = machine(mode, asm(mode, "90:nop", "90:nop"), flags=1 << 9)
    set_gate(s, 0x40, handler(0x40), KERNEL_CS, gate_type(mode), present=0)
    c = cpu(s)
    assert c.step() is None
    c.request_interrupt(0x40)
    assert c.step() is None and s.rip == handler(Vector.NP)
    assert frame(s, 2, WIDTH[mode]) == [0x40 * 8 + 3, 0x1001]


# -- triple fault -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", PROTECTED)
def test_triple_fault_shuts_down(mode: str) -> None:
    """#GP -> #NP -> #DF whose gate is not present -> shutdown; the state is the faulting instruction's."""
    s = machine(mode, asm(mode, MOV_DS_AX[mode]), rax=0x80, flags=1 << 9)
    set_gate(s, Vector.GP, handler(Vector.GP), KERNEL_CS, gate_type(mode), present=0)
    set_gate(s, Vector.DF, handler(Vector.DF), KERNEL_CS, gate_type(mode), present=0)
    before = s.mem.phys.read_bytes(STACK_TOP - 0x100, 0x100)
    c = cpu(s)
    ev = c.run(10)
    assert ev.kind == "shutdown" and "#DF" in ev.detail
    assert (s.rip, rsp(s), s.rflags_sys & (1 << 9), s.icount) == (0x1000, STACK_TOP, 1 << 9, 0)
    assert s.mem.phys.read_bytes(STACK_TOP - 0x100, 0x100) == before
    assert c.step().kind == "shutdown" and c.shutdown is not None
    c.request_interrupt(0x40)
    assert c.step().kind == "shutdown"


def test_real_mode_triple_fault() -> None:
    """IDTR limit 0 in real mode: INT3 -> #GP -> #GP -> #DF -> shutdown (the classic reset)."""
    s = machine("real", asm("real", INT3))
    s.idtr.limit = 0
    ev = run(s)
    assert ev.kind == "shutdown" and ev.rip == 0x1000


def test_real_mode_gp_then_double_fault() -> None:
    """Real mode: an IVT covering #DF (vector 8) but not #GP: INT 0x40 -> #GP -> #GP -> #DF delivered."""
    s = machine("real", asm("real", int_n("real", 0x40)))
    s.idtr.limit = 4 * 9 - 1  # vectors 0-8
    in_handler(s, run(s), Vector.DF)
    assert frame(s, 3, 2) == [0x1000, 0, 2]  # no error code in real mode


def test_page_fault_during_double_fault_updates_cr2() -> None:
    """A #PF while delivering #DF shuts down, and CR2 still records it (Figure 6-9 footnote)."""
    s = machine("long64", asm("long64", MOV_DS_AX["long64"]), rax=0x80)
    set_gate(s, Vector.GP, handler(Vector.GP), KERNEL_CS, GATE_INT32, present=0)
    s.mem.phys.write(TSS + 0x24, 8, UNMAPPED + 0x2000)
    set_gate(s, Vector.DF, handler(Vector.DF), KERNEL_CS, GATE_INT32, ist=1)
    ev = run(s)
    assert ev.kind == "shutdown"
    assert s.cr2 == UNMAPPED + 0x2000 - 8


def test_bad_tss_from_cpl3_triple_faults() -> None:
    """SS0 = 0: INT 0x80 from CPL 3 -> #TS(0); #TS, then #DF, need the same stack -> shutdown."""
    s = machine("prot32", asm("prot32", int_n("prot32", 0x80)), user=True)
    s.mem.phys.write(TSS + 8, 2, 0)
    ev = run(s)
    assert ev.kind == "shutdown" and "#TS" in ev.detail


def test_no_delivery_reports_the_first_exception() -> None:
    """deliver_exceptions=False (difftest mode): the instruction's own exception, nothing nested."""
    s = machine("long64", asm("long64", MOV_DS_AX["long64"]), rax=0x80)
    set_gate(s, Vector.GP, handler(Vector.GP), KERNEL_CS, GATE_INT32, present=0)
    ev = SpecCPU(s).run(5)
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.GP, 0x80, 0x1000)
