"""VMRUN / #VMEXIT (AMD APM Vol. 2 15.5-15.7, 15.20, 15.21): consistency checks, event injection, exits
during delivery (EXITINTINFO), shutdown, the budget's physical interrupt, virtual interrupts, and the SVM
instructions on the plain spec CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from svm_harness import MODEL, VMCB_PA, compare, machine, make_guest, run_bare, snapshot, state_of

from spec.cpu import SpecCPU
from spec.faults import Vector
from spec.interrupts import EventKind
from spec.machine import CODE, HANDLER_STRIDE, HANDLERS, IDT
from spec.memory import PhysicalMemory
from spec.state import CR0_CD, CR0_NW, CR0_PG, EFER_LME, EFER_SVME, MachineState
from spec.svm.exitcodes import ExitCode
from spec.svm.processor import SVMError, SVMProcessor, consistency_errors
from spec.svm.vmcb import VMCB, EventInj, EventType

E = ExitCode
HLT = b"\xf4"


def _set(st: MachineState, reg: int, value: int) -> None:
    st.gpr[reg] = st.D.const(64, value)


# -- VMRUN consistency checks (APM 15.5.1) -------------------------------------------------------------------

MUTATIONS: dict[str, Callable[[VMCB], None]] = {
    "EFER.SVME = 0": lambda v: setattr(v, "efer", v.efer & ~EFER_SVME),
    "CR0.NW = 1 with CR0.CD = 0": lambda v: setattr(v, "cr0", (v.cr0 | CR0_NW) & ~CR0_CD),
    "CR0[63:32] not zero": lambda v: setattr(v, "cr0", v.cr0 | 1 << 40),
    "CR3 reserved bits set": lambda v: setattr(v, "cr3", v.cr3 | 1 << 60),
    "CR4 reserved bits set": lambda v: setattr(v, "cr4", v.cr4 | 1 << 31),
    "DR6[63:32] not zero": lambda v: setattr(v, "dr6", v.dr6 | 1 << 32),
    "DR7[63:32] not zero": lambda v: setattr(v, "dr7", v.dr7 | 1 << 33),
    "EFER reserved bits set": lambda v: setattr(v, "efer", v.efer | 1 << 20),
    "EFER.LME and CR0.PG with CR4.PAE = 0": lambda v: setattr(v, "cr4", v.cr4 & ~(1 << 5)),
    "EFER.LME and CR0.PG with CR0.PE = 0": lambda v: setattr(v, "cr0", v.cr0 & ~1),
    "VMRUN intercept clear": lambda v: v.set_intercept(E.VMRUN, False),
    "IOPM extends beyond the maximum physical address": lambda v: setattr(v, "iopm_base_pa", (1 << 48) - 0x1000),
    "MSRPM extends beyond the maximum physical address": lambda v: setattr(v, "msrpm_base_pa", (1 << 48) - 0x1000),
    "EVENTINJ reserved type 1": lambda v: setattr(v, "eventinj", EventInj(3, 1).encode()),
    "EVENTINJ exception with vector 2": lambda v: setattr(v, "eventinj", EventInj(2, 3).encode()),
    "EVENTINJ exception with vector 32": lambda v: setattr(v, "eventinj", EventInj(32, 3).encode()),
    "ASID 0 (the host's)": lambda v: setattr(v, "guest_asid", 0),
    "reserved TLB_CONTROL value 2": lambda v: setattr(v, "tlb_control", 2),
}


def _cs_l_and_d(v: VMCB) -> None:
    cs = v.load_segment("cs")
    cs.db = 1
    v.store_segment("cs", cs)


MUTATIONS["EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set"] = _cs_l_and_d


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_vmrun_consistency_check_fails_with_vmexit_invalid(name: str) -> None:
    st = machine("long64", HLT)
    g = make_guest(st, (E.HLT,))
    assert consistency_errors(g.vmcb, MODEL) == []
    MUTATIONS[name](g.vmcb)
    save = g.phys.read_bytes(VMCB_PA + 0x400, 0xC00)
    gprs = list(g.gprs)
    g.run()
    assert g.vmcb.exitcode == E.INVALID and g.vmcb.exitcode_raw == (1 << 64) - 1
    assert name in g.proc.invalid_reasons
    assert g.phys.read_bytes(VMCB_PA + 0x400, 0xC00) == save and g.gprs == gprs and g.proc.icount == 0


def test_a_consistent_vmcb_runs() -> None:
    g = make_guest(machine("long64", HLT), (E.HLT,))
    assert g.run().exitcode == E.HLT


def test_vmrun_rejects_host_misuse() -> None:
    g = make_guest(machine("long64", HLT), (E.HLT,))
    with pytest.raises(SVMError):
        g.proc.vmrun(VMCB_PA + 8, g.gprs, 10)
    with pytest.raises(SVMError):
        g.proc.vmrun(VMCB_PA, g.gprs[:15], 10)


# -- event injection (APM 15.20): frames identical to the bare machine delivering the same event ---------------

INJECTIONS = [
    ("#GP(0x1234)", EventInj(Vector.GP, EventType.EXCEPTION, 0x1234), (Vector.GP, EventKind.EXCEPTION, 0x1234)),
    ("#PF(6)", EventInj(Vector.PF, EventType.EXCEPTION, 6), (Vector.PF, EventKind.EXCEPTION, 6)),
    ("#UD", EventInj(Vector.UD, EventType.EXCEPTION), (Vector.UD, EventKind.EXCEPTION, None)),
    ("INTR 0x30", EventInj(0x30, EventType.INTR), (0x30, EventKind.EXTERNAL, None)),
    ("NMI", EventInj(2, EventType.NMI), (2, EventKind.NMI, None)),
]


@pytest.mark.parametrize("mode", ["long64", "prot32", "real"])
@pytest.mark.parametrize(("name", "inj", "bare_event"), INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_injected_event_frame_equals_the_bare_delivery(mode: str, name: str, inj: EventInj,
                                                       bare_event: tuple) -> None:
    code = bytes.fromhex("90") + HLT
    bare = machine(mode, code)
    bare.write_rflags(bare.D.const(64, 0x202))  # IF = 1
    st = bare.copy()
    vector, kind, ec = bare_event
    cpu = SpecCPU(bare, deliver_exceptions=True)
    assert cpu.inject(vector, kind, None if mode == "real" else ec) is None
    cpu.run(10)
    if mode == "real" and inj.error_code is not None:
        inj = EventInj(inj.vector, inj.type, None)  # real mode pushes no error code
    g = make_guest(st)
    g.vmcb.event_injection = inj
    vmcb = g.run()
    assert vmcb.exitcode == E.INTR and g.proc.last_guest.halted  # type: ignore[union-attr]
    assert vmcb.rip == HANDLERS + HANDLER_STRIDE * inj.vector + 1
    assert not vmcb.eventinj >> 31 & 1  # EVENTINJ.V cleared
    assert not compare(snapshot(bare), snapshot(state_of(g)))


def test_injected_software_interrupt_returns_to_nrip_like_int_n() -> None:
    bare = machine("long64", bytes.fromhex("cd80") + HLT)
    st = bare.copy()
    run_bare(bare)  # INT 0x80 at CODE: the handler halts
    g = make_guest(st)
    g.vmcb.event_injection = EventInj(0x80, EventType.SOFTWARE)
    g.vmcb.nrip = CODE + 2
    g.run()
    after = state_of(g)
    assert not compare(snapshot(bare), snapshot(after))  # same frame: return address CODE + 2


def test_injected_software_interrupt_checks_the_gate_dpl() -> None:
    from spec.machine import enter_user_mode

    st = enter_user_mode(machine("long64", HLT))
    g = make_guest(st, (E.EXCP_GP,))
    g.vmcb.event_injection = EventInj(0x21, EventType.SOFTWARE)  # gate DPL 0 < CPL 3
    g.vmcb.nrip = CODE
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_GP and vmcb.exitinfo1 == 0x21 * 8 + 2
    assert vmcb.exitintinfo == EventInj(0x21, EventType.SOFTWARE).encode()


def test_injected_exception_is_not_intercepted_but_a_fault_while_delivering_it_is() -> None:
    st = machine("long64", HLT)
    st.idtr.limit = 0xF * 16 + 15  # vectors above 15 lie outside the IDT
    g = make_guest(st, (E.EXCP_PF, E.EXCP_GP))
    g.vmcb.event_injection = EventInj(Vector.PF, EventType.EXCEPTION, 2)  # delivered: #PF is not re-intercepted
    assert g.run().exitcode == E.INTR
    st = machine("long64", HLT)
    st.idtr.limit = 0xF * 16 + 15
    g = make_guest(st, (E.EXCP_GP,))
    inj = EventInj(0x30, EventType.INTR)
    g.vmcb.event_injection = inj
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_GP and vmcb.exitinfo1 == 0x30 * 8 + 2 + 1  # IDT, EXT
    assert vmcb.exitintinfo == inj.encode() and vmcb.rip == CODE


def test_exception_during_delivery_reports_the_first_event() -> None:
    """A #PF while delivering #UD (the handler's stack is unmapped), #PF intercepted: EXITINTINFO = #UD."""
    st = machine("long64", bytes.fromhex("0f0b"))
    _set(st, 4, 0x4000_0100)  # the current stack is unmapped: the frame push faults
    g = make_guest(st, (E.EXCP_PF,))
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_PF and vmcb.exitinfo1 == 2 and vmcb.exitinfo2 == 0x4000_00F8
    assert vmcb.exitintinfo == EventInj(Vector.UD, EventType.EXCEPTION).encode()
    assert vmcb.cr2 == 0 and vmcb.rip == CODE


def test_double_fault_intercept_reports_the_first_event() -> None:
    st = machine("long64", bytes.fromhex("0f0b"))
    st.mem.phys.write(IDT + 16 * 6 + 5, 1, 0x0E)  # P = 0: #NP(0x33) while delivering #UD -> serial #NP ...
    st.mem.phys.write(IDT + 16 * 11 + 5, 1, 0x0E)  # ... whose gate is absent too: #NP during #NP -> #DF
    g = make_guest(st, (E.EXCP_DF,))
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_DF and vmcb.exitinfo1 == 0
    assert EventInj.decode(vmcb.exitintinfo).vector == Vector.NP


def test_int_n_whose_delivery_faults_is_undone_with_nrip_for_reinjection() -> None:
    from spec.machine import enter_user_mode

    st = enter_user_mode(machine("long64", bytes.fromhex("cd21")))
    g = make_guest(st, (E.EXCP_GP,))
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_GP and vmcb.rip == CODE and vmcb.nrip == CODE + 2
    assert vmcb.exitintinfo == EventInj(0x21, EventType.SOFTWARE).encode()


def test_triple_fault_is_the_shutdown_intercept() -> None:
    st = machine("long64", bytes.fromhex("0f0b"))
    st.idtr.limit = 0  # every delivery faults: #UD -> #GP -> #DF -> shutdown
    g = make_guest(st)
    vmcb = g.run()
    assert vmcb.exitcode == E.SHUTDOWN and vmcb.rip == CODE
    st = machine("long64", bytes.fromhex("0f0b"))
    st.idtr.limit = 0
    g = make_guest(st)
    g.vmcb.set_intercept(E.SHUTDOWN, False)
    with pytest.raises(SVMError, match="SHUTDOWN intercept clear"):
        g.run()


# -- the physical interrupt (budget), HLT, virtual interrupts ------------------------------------------------

def test_budget_ends_in_vmexit_intr_after_exactly_budget_instructions() -> None:
    st = machine("long64", bytes.fromhex("ebfe"))  # jmp $
    g = make_guest(st)
    vmcb = g.run(budget=37)
    assert vmcb.exitcode == E.INTR and g.proc.icount == 37 and vmcb.rip == CODE and vmcb.nrip == 0
    g.run(budget=5)
    assert g.proc.icount == 42


def test_physical_interrupt_without_the_intr_intercept_is_a_vmm_bug() -> None:
    g = make_guest(machine("long64", bytes.fromhex("ebfe")))
    g.vmcb.set_intercept(E.INTR, False)
    with pytest.raises(SVMError, match="INTR intercept clear"):
        g.run(budget=3)


def test_without_v_intr_masking_the_guest_if_holds_the_physical_interrupt() -> None:
    st = machine("long64", bytes.fromhex("fa" "90" "90" "fb" "90" "ebfe"))  # cli; nop; nop; sti; nop; jmp $
    st.write_rflags(st.D.const(64, 0x202))
    g = make_guest(st, v_intr_masking=False)
    vmcb = g.run(budget=1)
    assert vmcb.exitcode == E.INTR and vmcb.rip == CODE + 5  # after STI and the one shadowed NOP


def test_halted_guest_waits_for_the_host_timer_or_sleeps_forever() -> None:
    g = make_guest(machine("long64", HLT))  # HLT not intercepted, IF = 0, V_INTR_MASKING = 1
    vmcb = g.run()
    assert vmcb.exitcode == E.INTR and vmcb.rip == CODE + 1
    g = make_guest(machine("long64", HLT), v_intr_masking=False)  # IF = 0 masks the host timer
    with pytest.raises(SVMError, match="halted forever"):
        g.run()


def test_virtual_interrupt_is_delivered_like_an_external_interrupt() -> None:
    code = bytes.fromhex("90") + HLT
    bare = machine("long64", code)
    bare.write_rflags(bare.D.const(64, 0x202))
    st = bare.copy()
    cpu = SpecCPU(bare, deliver_exceptions=True)
    cpu.request_interrupt(0x41)
    cpu.run(10)
    g = make_guest(st)
    g.vmcb.v_irq, g.vmcb.v_intr_vector, g.vmcb.v_intr_prio = 1, 0x41, 4
    vmcb = g.run()
    assert vmcb.v_irq == 0 and vmcb.rip == HANDLERS + HANDLER_STRIDE * 0x41 + 1
    assert not compare(snapshot(bare), snapshot(state_of(g)))


def test_virtual_interrupt_wakes_a_guest_halted_in_the_sti_shadow() -> None:
    code = bytes.fromhex("fb") + HLT + HLT  # sti; hlt (in the STI shadow); the handler returns nowhere: HLT
    bare = machine("long64", code)
    st = bare.copy()
    cpu = SpecCPU(bare, deliver_exceptions=True)
    cpu.request_interrupt(0x41)
    assert cpu.run(10).kind == "halted" and bare.rip == CODE + 2  # HLT in the shadow halts ...
    cpu.run(10)  # ... and the interrupt wakes it
    g = make_guest(st)
    g.vmcb.v_irq, g.vmcb.v_intr_vector, g.vmcb.v_ign_tpr = 1, 0x41, 1
    vmcb = g.run()
    assert vmcb.exitcode == E.INTR and vmcb.v_irq == 0 and vmcb.rip == HANDLERS + HANDLER_STRIDE * 0x41 + 1
    assert not compare(snapshot(bare), snapshot(state_of(g)))


def test_virtual_interrupt_waits_for_if_tpr_and_exits_on_vintr() -> None:
    st = machine("long64", bytes.fromhex("fb" "90") + HLT)  # sti; nop; hlt
    g = make_guest(st, (E.VINTR, E.HLT))
    g.vmcb.v_irq, g.vmcb.v_intr_vector, g.vmcb.v_intr_prio, g.vmcb.v_tpr = 1, 0x41, 4, 5
    vmcb = g.run()
    assert vmcb.exitcode == E.HLT and vmcb.v_irq == 1  # priority 4 <= TPR 5: masked
    st = machine("long64", bytes.fromhex("fb" "90") + HLT)
    g = make_guest(st, (E.VINTR, E.HLT))
    g.vmcb.v_irq, g.vmcb.v_intr_vector, g.vmcb.v_ign_tpr = 1, 0x41, 1
    vmcb = g.run()
    assert vmcb.exitcode == E.VINTR and vmcb.rip == CODE + 2  # after the STI shadow
    assert vmcb.v_irq == 1


def test_gif_zero_holds_the_physical_interrupt() -> None:
    st = machine("long64", bytes.fromhex("0f01dd" "90" "90" "0f01dc" "ebfe"))  # clgi; nop; nop; stgi; jmp $
    g = make_guest(st)
    vmcb = g.run(budget=1)
    assert vmcb.exitcode == E.INTR and vmcb.rip == CODE + 8


def test_unmodelled_guest_instruction_raises_unimplemented_with_the_state_saved() -> None:
    from spec.faults import Unimplemented

    st = machine("long64", bytes.fromhex("0f01de"))  # SKINIT, not intercepted
    g = make_guest(st)
    with pytest.raises(Unimplemented, match="SKINIT"):
        g.run()
    assert g.vmcb.rip == CODE


def test_tlb_runs_with_the_guest_asid_and_returns_to_the_host() -> None:
    g = make_guest(machine("long64", bytes.fromhex("488b0425" "00000100") + HLT), (E.HLT,), asid=7)
    g.run()
    assert g.proc.tlb.asid == 0
    assert any(key[0] == 7 for key in g.proc.tlb.entries)


# -- SVM instructions on the plain spec CPU ------------------------------------------------------------------

def _bare_stop(code: str, *, svme: bool = True, user: bool = False, **regs: int) -> tuple[MachineState, object]:
    from spec.machine import enter_user_mode

    st = machine("long64", bytes.fromhex(code) + HLT, idt=False, svme=svme)
    if user:
        enter_user_mode(st)
    for k, v in regs.items():
        _set(st, int(k[1:]), v)
    return st, SpecCPU(st).run(10)


@pytest.mark.parametrize("code", ["0f01d8", "0f01da", "0f01db", "0f01dc", "0f01dd", "0f01de", "0f01df"])
def test_svm_instructions_ud_without_svme_and_gp_at_cpl3(code: str) -> None:
    _, stop = _bare_stop(code, svme=False)
    assert stop.kind == "fault" and stop.vector == Vector.UD  # type: ignore[attr-defined]
    _, stop = _bare_stop(code, user=True)
    assert stop.kind == "fault" and stop.vector == Vector.GP  # type: ignore[attr-defined]
    st = machine("real", bytes.fromhex(code) + HLT, idt=False)
    stop = SpecCPU(st).run(10)
    assert stop.kind == "fault" and stop.vector == Vector.UD


def test_vmmcall_not_intercepted_is_ud_at_any_cpl() -> None:
    for kw in ({"svme": False}, {"user": True}):
        _, stop = _bare_stop("0f01d9", **kw)  # type: ignore[arg-type]
        assert stop.kind == "fault" and stop.vector == Vector.UD  # type: ignore[attr-defined]


def test_vmload_vmsave_move_the_hidden_state() -> None:
    st, stop = _bare_stop("0f01db", r0=0x10000)  # VMSAVE to DATA
    assert stop.kind == "halted"  # type: ignore[attr-defined]
    v = VMCB(st.mem.phys, 0x10000)
    assert v.load_segment("tr") == st.tr and v.load_segment("fs") == st.seg[4]
    v.star = 0x0023_0010_0000_0000
    fs = v.load_segment("fs")
    fs.base = 0x1234_5678
    v.store_segment("fs", fs)
    st.rip = CODE
    st.mem.phys.write_bytes(CODE, bytes.fromhex("0f01da") + HLT)  # VMLOAD
    st.halted = False
    assert SpecCPU(st).run(10).kind == "halted"
    assert st.msrs[0xC000_0081] == 0x0023_0010_0000_0000 and st.seg[4].base == 0x1234_5678
    _, stop = _bare_stop("0f01da", r0=0x10008)  # misaligned
    assert stop.kind == "fault" and stop.vector == Vector.GP  # type: ignore[attr-defined]


def test_clgi_stgi_hold_and_release_interrupts() -> None:
    st, stop = _bare_stop("0f01dd")  # CLGI
    assert stop.kind == "halted" and not st.gif  # type: ignore[attr-defined]
    st = machine("long64", bytes.fromhex("0f01dd" "fb" "90" "0f01dc" "90") + HLT, svme=True)
    cpu = SpecCPU(st, deliver_exceptions=True)
    cpu.request_interrupt(0x40)
    cpu.run(4)  # clgi; sti; nop; stgi: the interrupt waits for GIF
    assert st.rip == CODE + 8 and cpu.pending_interrupts == (0x40,)
    cpu.step()
    assert st.rip == HANDLERS + HANDLER_STRIDE * 0x40


def test_invlpga_records_the_event_without_a_tlb() -> None:
    st = machine("long64", bytes.fromhex("0f01df") + HLT, idt=False)
    st.tlb_events = []
    _set(st, 0, 0x5000)
    _set(st, 1, 3)
    SpecCPU(st).run(5)
    assert st.tlb_events == [("invlpga", 0x5000, 3)]


def test_vmrun_by_x86_code_is_unimplemented_after_its_checks() -> None:
    _, stop = _bare_stop("0f01d8", r0=0x10000)
    assert stop.kind == "unimplemented"  # type: ignore[attr-defined]
    _, stop = _bare_stop("0f01d8", r0=0x10001)
    assert stop.kind == "fault" and stop.vector == Vector.GP  # type: ignore[attr-defined]


def test_processor_defaults() -> None:
    p = SVMProcessor(PhysicalMemory())
    assert p.model.has("svm") and p.tlb.asid == 0 and p.icount == 0
    assert p.host_ctl.cr0 & CR0_PG and p.host_ctl.efer & EFER_LME
