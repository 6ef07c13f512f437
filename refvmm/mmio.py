"""Instruction emulation by the spec: how the VMM completes a guest instruction it intercepted.

When a guest instruction touches something the VMM owns -- an MMIO region (shadow #PF
or nested #NPF on a page that is not RAM), an I/O port, an intercepted MSR, RDTSCP --
the VMM does not decode it with a second, smaller emulator.  It runs the **spec** on
the guest's own view of the machine for exactly one instruction:

1. :func:`guest_view` builds a :class:`spec.state.MachineState` that is what the guest
   believes: its GPRs (RAX/RSP from the VMCB), RIP, RFLAGS, segment registers,
   descriptor tables, DR6/DR7 from the VMCB; CR0/CR2/CR3/CR4/EFER as the paging
   strategy says the guest sees them; the MSRs the VMCB switches plus the VM's MSR file;
   the guest's CPU model (CPUID policy); guest-physical memory
   (:meth:`refvmm.guest_memory.GuestMemory.view`: RAM shared with the host pages, MMIO
   regions on the bus routed to the devices, holes reading all ones); the VM's port bus
   for I/O; the guest's instruction count and TSC offset (so a TSC read is the bare
   machine's).
2. :class:`spec.cpu.SpecCPU` ``.step()`` executes the instruction at RIP (one
   iteration of a REP string instruction), fetching through the guest's page tables
   -- accessed/dirty bits included -- exactly as the bare machine would.
3. :func:`write_back` copies the registers back into the VMCB / GPR array, hands
   changed control registers to the strategy (``set_guest_control``), stores MSRs,
   and puts the instruction's successor in the VMCB's nRIP field; the run loop then
   advances RIP to nRIP, the one place RIP moves.

A fault of the emulated instruction is rolled back by the spec (precise faults) and
becomes an :class:`~refvmm.actions.Inject` of that exception -- error code and CR2 as
the bare machine reports them.  A single-step trap after it is injected as #DB.
Device side effects of an instruction that then faults (a read with side effects
followed by a #PF on the second page) are not undone, as on hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from refvmm.actions import Action, Inject, Resume, Stop
from refvmm.paging.base import GuestControlRegs
from spec import flags as F
from spec.cpu import SpecCPU
from spec.domain.concrete import CONCRETE
from spec.faults import Fault, Vector
from spec.isa.system import load_pdptes
from spec.mmu import MMU
from spec.paging import PAE, paging_mode
from spec.state import MachineState
from spec.svm.vmcb import SEG_ORDER
from spec.tlb import TLB_CONTROL_ASID

if TYPE_CHECKING:
    from refvmm.vm import VM

RAX, RSP = 0, 4

# MSRs with guest copies in the VMCB state-save area, by VMCB property (APM Table B-2).
VMCB_MSRS: dict[int, str] = {
    0xC000_0081: "star", 0xC000_0082: "lstar", 0xC000_0083: "cstar", 0xC000_0084: "sfmask",
    0xC000_0102: "kernel_gs_base", 0x174: "sysenter_cs", 0x175: "sysenter_esp", 0x176: "sysenter_eip",
}


def guest_view(vm: VM) -> MachineState:
    """The machine as the guest sees it now (module docstring, step 1)."""
    vmcb = vm.vmcb
    phys = vm.memory.view()
    st = MachineState(D=CONCRETE, mem=MMU(CONCRETE, phys))
    st.gpr = list(vm.gprs)
    st.gpr[RAX] = vmcb.rax
    st.gpr[RSP] = vmcb.rsp
    st.rip = vmcb.rip
    st.write_rflags(vmcb.rflags)
    st.seg = [vmcb.load_segment(name) for name in SEG_ORDER]
    st.ldtr = vmcb.load_segment("ldtr")
    st.tr = vmcb.load_segment("tr")
    st.gdtr = vmcb.load_table("gdtr")
    st.idtr = vmcb.load_table("idtr")
    ctl = vm.paging.guest_control(vm)
    st.cr0, st.cr2, st.cr3, st.cr4, st.efer = ctl.cr0, ctl.cr2, ctl.cr3, ctl.cr4, ctl.efer
    st.dr = [*vm.processor.dr[:6], vmcb.dr6, vmcb.dr7]  # DR0-DR5 stay in the processor (not switched)
    st.msrs = dict(vm.msr_file)
    for index, name in VMCB_MSRS.items():
        value = getattr(vmcb, name)
        if value or index in vm.vmcb_msrs_written:  # an MSR never written reads as its reset value, 0
            st.msrs[index] = value
    st.interrupt_shadow = bool(vmcb.interrupt_shadow)
    st.model = vm.guest_model
    st.io = vm.port_bus
    st.icount = vm.stats.guest_instructions
    st.tsc_offset = vm.guest_tsc_offset
    if paging_mode(st.cr0, st.cr4, st.efer) is PAE:
        # The VMCB holds no PDPTEs: hardware reloads them from guest CR3 at VMRUN (spec.svm.nested).
        try:
            st.pdptes = load_pdptes(st, st.cr3)
        except Fault:
            st.pdptes = [0, 0, 0, 0]
    return st


def write_back(vm: VM, st: MachineState, before: GuestControlRegs) -> None:
    """Copy the view's registers back into the VM (module docstring, step 3); RIP goes to nRIP."""
    vmcb = vm.vmcb
    vm.store_registers(st)
    vmcb.nrip = st.rip
    vm.pending_shadow = st.interrupt_shadow  # applied by VM.advance_rip with the new RIP
    after = GuestControlRegs(cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4, efer=st.efer)
    if after != before:
        if replace(after, cr2=before.cr2) == before:
            vmcb.cr2 = st.cr2  # CR2 is the VMCB's under both strategies (refvmm.paging.base)
        else:
            vm.paging.set_guest_control(vm, after)


def emulate_instruction(vm: VM, *, prepare: Callable[[MachineState], None] | None = None,
                        absorb: Callable[[MachineState], None] | None = None) -> Action:
    """Execute the guest instruction at RIP on the spec over the guest's view; the action to take.

    A paging strategy that owns translations (shadow paging) passes ``prepare`` (adjust the view
    before the step) and ``absorb`` (take a completed instruction's paging effects -- control
    registers, TLB events -- before the registers are written back); without ``absorb`` any TLB
    event flushes the guest's ASID on the next VMRUN.
    """
    st = guest_view(vm)
    if prepare is not None:
        prepare(st)
    before = GuestControlRegs(cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4, efer=st.efer)
    rip = st.rip
    tf = bool(st.rflags_sys >> F.TF & 1)
    st.tlb_events = []
    ev = SpecCPU(st, deliver_exceptions=False).step()
    if st.tlb_events and absorb is None:
        # The instruction changed what translations mean (spec.isa.system "TLB events": a WRMSR to EFER,
        # an emulated MOV to CR0/CR3/CR4, INVLPG) behind the hardware's back: flush the guest's ASID on the
        # next VMRUN (APM 15.16.1).  Flushing more than the architecture requires is always correct.
        vm.vmcb.tlb_control = TLB_CONTROL_ASID

    def complete() -> None:
        if absorb is None:
            write_back(vm, st, before)
        else:
            absorb(st)
            write_back(vm, st, vm.paging.guest_control(vm))

    if ev is None:
        complete()
        return Resume(advance=True)
    if ev.kind == "fault":
        if ev.vector == Vector.DB and tf and ev.detail == "single-step trap":
            # The instruction completed and single-stepped (spec.cpu: TF trap after it): report #DB as a trap.
            complete()
            return Inject(Vector.DB, advance=True)
        return Inject.exception(ev.vector if ev.vector is not None else Vector.GP, ev.error_code, cr2=ev.cr2)
    if ev.kind == "halted":
        complete()
        return Stop("halted", f"HLT at rip={rip:#x}", advance=True)
    return Stop("error", f"emulating the instruction at rip={rip:#x}: {ev.describe()}")


__all__ = ["VMCB_MSRS", "emulate_instruction", "guest_view", "write_back"]

