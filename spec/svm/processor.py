"""One physical SVM processor: VMRUN executed by host software, the guest's run, #VMEXIT
(AMD APM Vol. 2 15.5-15.7, 15.16, 15.20, 15.21).

The VMM of this project is Python host code, so the processor's VMRUN is a
method, :meth:`SVMProcessor.vmrun`; the guest runs on the spec CPU
(:class:`spec.cpu.SpecCPU`) with ``state.svm`` set, until #VMEXIT.  What
``vmrun`` does, in the APM's order:

1. **Consistency checks** on the VMCB (APM 15.5.1, :func:`consistency_errors`);
   a failure is #VMEXIT with EXITCODE = VMEXIT_INVALID (-1) and nothing else
   changes (the guest never ran).
2. **Load**: the control area (:class:`~spec.svm.intercepts.GuestControls`),
   the guest state VMRUN loads (:func:`~spec.svm.vmcb.load_guest_state`)
   and -- as every SVM hypervisor brackets VMRUN with VMLOAD/VMSAVE of the
   same VMCB -- the VMLOAD state (FS, GS, TR, LDTR, KernelGSBase, STAR,
   LSTAR, CSTAR, SFMASK, SYSENTER_*), so that the VMCB holds the whole guest
   state.  RAX and RSP come from the VMCB; the other 14 GPRs from the
   ``gprs`` list (hardware leaves them to software).  State SVM does not
   switch stays in the processor across runs: DR0-DR3, the physical TPR
   (CR8), PKRU, the other MSRs, NMI blocking, the TSC.  GIF is set.
3. **TLB**: TLB_CONTROL is applied, then the TLB runs with the guest's ASID
   (APM 15.16); the guest's memory is host-physical or, with NP_ENABLE,
   guest-physical through nCR3 (:func:`spec.svm.nested.attach_guest_memory`).
4. **Event injection** (APM 15.20): a valid EVENTINJ is delivered through
   the guest IDT before the first guest instruction, exempt from the
   exception intercepts; an exit while delivering it records it in
   EXITINTINFO.  Software interrupts (type 4) and injected #BP/#OF return to
   nRIP (the NRIPS rule KVM relies on).
5. **Run** until #VMEXIT.  At each instruction boundary: the physical INTR
   (below), then the virtual interrupt (V_IRQ, APM 15.21.4: taken when
   V_IRQ = 1, guest RFLAGS.IF = 1, no interrupt shadow, GIF = 1 and
   V_INTR_PRIO > V_TPR unless V_IGN_TPR; the VINTR intercept exits instead of
   delivering it; delivered as an external interrupt of vector V_INTR_VECTOR,
   and V_IRQ is cleared).
6. **#VMEXIT** (APM 15.6, 15.7): guest state and VMLOAD state saved to the
   VMCB, EXITCODE / EXITINFO1 / EXITINFO2 / EXITINTINFO / nRIP written,
   V_TPR, V_IRQ, INTERRUPT_SHADOW and the guest's RFLAGS.IF (GUEST_INTERRUPT_MASK)
   written back, EVENTINJ.V cleared, guest instruction bytes stored for #PF
   and #NPF exits (decode assist, APM 15.33.4), the 14 GPRs written to
   ``gprs``; the TLB returns to ASID 0.

``budget`` models host timer preemption: once the guest has retired
``budget`` instructions in this run a physical interrupt is pending.  It is
recognized when GIF = 1 and, with V_INTR_MASKING = 0, the guest's RFLAGS.IF
= 1 and no interrupt shadow (with V_INTR_MASKING = 1 the host's IF, always 1
here, decides: APM 15.21.1).  Intercepted, it is #VMEXIT(INTR); not
intercepted it would be delivered to the guest -- a VMM bug, :class:`SVMError`.
A guest that halts (HLT not intercepted) waits for it: #VMEXIT(INTR) at once
if it can be recognized, else it would sleep forever (:class:`SVMError`).
A guest that keeps a pending physical interrupt masked for
:data:`MASKED_INTR_LIMIT` more instructions ends with :class:`SVMError`
(a bound of the model, so that every ``vmrun`` terminates).

The TSC: the processor's TSC is ``model.tsc(icount) + tsc_adjust`` where
``icount`` counts guest instructions (host code takes no time); the guest
reads it plus TSC_OFFSET (APM 15.30.4); a guest WRMSR to the TSC that is not
intercepted writes the processor's TSC.

Triple fault in the guest: #VMEXIT(SHUTDOWN) when intercepted, else the
processor would shut down -- :class:`SVMError`.  A guest instruction the
spec does not model raises :class:`spec.faults.Unimplemented` after the
guest state is saved to the VMCB (EXITCODE is left as it was).

Physical NMI, SMI and INIT have no source in the model, so their intercepts
never fire; FERR_FREEZE (no x87) and task switches (hardware task switching
is not modeled) likewise.
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.cpumodel import IA32_PAT, CpuModel, make_model
from spec.domain.concrete import CONCRETE
from spec.faults import Fault, Unimplemented, Vector
from spec.interrupts import Event, EventKind
from spec.io import EMPTY_IO_BUS, IOBus
from spec.memory import AccessKind, PhysicalMemory
from spec.paging import PagingControl
from spec.state import (
    CR0_CD,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    EFER_LMA,
    EFER_LME,
    EFER_SVME,
    MachineState,
)
from spec.svm.exitcodes import ExitCode
from spec.svm.intercepts import GuestControls, VMExit
from spec.svm.nested import attach_guest_memory, detach_guest_memory
from spec.svm.vmcb import (
    EVENT_VALID,
    IOPM_SIZE,
    MSRPM_SIZE,
    VMCB,
    EventInj,
    EventType,
    load_guest_state,
    save_guest_state,
    vmload_state,
    vmsave_state,
)
from spec.tlb import (
    TLB_CONTROL_ALL,
    TLB_CONTROL_ASID,
    TLB_CONTROL_ASID_NONGLOBAL,
    TLB_CONTROL_NOTHING,
    ModelTLB,
)

_IF = 1 << F.IF
_M64 = (1 << 64) - 1
CR4_PAE = 1 << 5
TLB_CONTROLS = frozenset({TLB_CONTROL_NOTHING, TLB_CONTROL_ALL, TLB_CONTROL_ASID, TLB_CONTROL_ASID_NONGLOBAL})
MASKED_INTR_LIMIT = 1_000_000
"""Guest instructions a pending physical interrupt may stay masked before ``vmrun`` gives up (a model bound)."""

HOST_CONTROL = PagingControl(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | (1 << 11))
"""The host's paging mode at VMRUN (the nested walk uses it): 4-level paging with NXE (APM 15.25.5)."""


class SVMError(Exception):
    """The host software misused the processor (a VMM bug), or the model cannot continue: not a guest event."""


def consistency_errors(vmcb: VMCB, model: CpuModel) -> list[str]:
    """The VMRUN consistency checks that fail (APM 15.5.1 "Canonicalization and Consistency Checks").

    An empty list: VMRUN proceeds.  Checked: EFER.SVME = 0; CR0.CD = 0 with
    CR0.NW = 1; CR0[63:32] != 0; CR3 bits beyond MAXPHYADDR (long mode) or
    63:32; a CR4 bit the model does not implement; DR6[63:32] or DR7[63:32]
    != 0; an EFER bit the model does not implement; LME or LMA without long
    mode support; LME and PG with PAE = 0, or with PE = 0; LME, PG, PAE, CS.L
    and CS.D all set; the VMRUN intercept clear; the IOPM/MSRPM extending past
    MAXPHYADDR; an illegal EVENTINJ (reserved type, exception with vector 2
    or above 31, APM 15.20); ASID 0.  Model additions (documented choices):
    a reserved TLB_CONTROL value, and an nCR3 beyond MAXPHYADDR with NP on.
    """
    errs: list[str] = []
    maxphy = model.maxphyaddr
    efer, cr0, cr3, cr4 = vmcb.efer, vmcb.cr0, vmcb.cr3, vmcb.cr4
    if not efer & EFER_SVME:
        errs.append("EFER.SVME = 0")
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        errs.append("CR0.NW = 1 with CR0.CD = 0")
    if cr0 >> 32:
        errs.append("CR0[63:32] not zero")
    long_mode = efer & EFER_LME and cr0 & CR0_PG
    if cr3 >> (maxphy if long_mode else 32):
        errs.append("CR3 reserved bits set")
    if cr4 & ~model.cr4_allowed:
        errs.append("CR4 reserved bits set")
    if vmcb.dr6 >> 32:
        errs.append("DR6[63:32] not zero")
    if vmcb.dr7 >> 32:
        errs.append("DR7[63:32] not zero")
    if efer & ~model.efer_allowed:
        errs.append("EFER reserved bits set")
    if efer & (EFER_LME | EFER_LMA) and not model.has("lm"):
        errs.append("EFER.LME/LMA without long mode support")
    if long_mode and not cr4 & CR4_PAE:
        errs.append("EFER.LME and CR0.PG with CR4.PAE = 0")
    if long_mode and not cr0 & CR0_PE:
        errs.append("EFER.LME and CR0.PG with CR0.PE = 0")
    cs = vmcb.load_segment("cs")
    if long_mode and cr4 & CR4_PAE and cs.l and cs.db:
        errs.append("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set")
    if not vmcb.intercepted(ExitCode.VMRUN):
        errs.append("VMRUN intercept clear")
    if (vmcb.iopm_base_pa & ~0xFFF) + IOPM_SIZE > 1 << maxphy:
        errs.append("IOPM extends beyond the maximum physical address")
    if (vmcb.msrpm_base_pa & ~0xFFF) + MSRPM_SIZE > 1 << maxphy:
        errs.append("MSRPM extends beyond the maximum physical address")
    inj = EventInj.decode(vmcb.eventinj)
    if inj.valid:
        if inj.type not in (EventType.INTR, EventType.NMI, EventType.EXCEPTION, EventType.SOFTWARE):
            errs.append(f"EVENTINJ reserved type {inj.type}")
        elif inj.type == EventType.EXCEPTION and (inj.vector == Vector.NMI or inj.vector > 31):
            errs.append(f"EVENTINJ exception with vector {inj.vector}")
    if vmcb.guest_asid == 0:
        errs.append("ASID 0 (the host's)")
    if vmcb.tlb_control not in TLB_CONTROLS:
        errs.append(f"reserved TLB_CONTROL value {vmcb.tlb_control}")
    if vmcb.np_enable and vmcb.n_cr3 >> maxphy:
        errs.append("nCR3 beyond the maximum physical address")
    return errs


def injected_event(inj: EventInj) -> tuple[Event, bool]:
    """The :class:`Event` EVENTINJ delivers and whether it returns to nRIP (APM 15.20; module docstring)."""
    t = inj.type
    if t == EventType.INTR:
        return Event(inj.vector, EventKind.EXTERNAL), False
    if t == EventType.NMI:
        return Event(Vector.NMI, EventKind.NMI), False
    if t == EventType.SOFTWARE:
        return Event(inj.vector, EventKind.SOFTWARE), True
    soft = inj.vector in (Vector.BP, Vector.OF)
    rf = not soft and inj.vector not in (Vector.DB, Vector.DF, Vector.MC)  # fault class: RF = 1 in the image
    return Event(inj.vector, EventKind.EXCEPTION, inj.error_code, rf), soft


class SVMProcessor:
    """One physical processor with SVM (the module docstring says what ``vmrun`` does)."""

    def __init__(self, phys: PhysicalMemory, model: CpuModel | None = None, *, io: IOBus = EMPTY_IO_BUS) -> None:
        self.phys = phys
        self.model = model or make_model(add={"svm"})
        self.tlb = ModelTLB()
        self.icount = 0
        self.io = io
        self.host_ctl = PagingControl(cr0=HOST_CONTROL.cr0, cr4=HOST_CONTROL.cr4, efer=HOST_CONTROL.efer,
                                      maxphyaddr=self.model.maxphyaddr)
        # Registers SVM does not switch: they stay in the processor across VMRUN / #VMEXIT.
        self.dr: list[int] = [0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400]
        self.cr8 = 0
        self.pkru = 0
        self.msrs: dict[int, int] = {}
        self.nmi_blocked = False
        self.tsc_adjust = 0
        self.invalid_reasons: list[str] = []  # why the last VMRUN failed its consistency checks
        self.last_guest: MachineState | None = None  # the guest state of the last run (for inspection)

    # -- VMRUN -------------------------------------------------------------------------------------
    def vmrun(self, vmcb_pa: int, gprs: list[int], budget: int) -> None:
        """VMRUN with the VMCB at ``vmcb_pa``; returns at #VMEXIT with the VMCB written (module docstring)."""
        if vmcb_pa & 0xFFF or vmcb_pa >> self.model.maxphyaddr:
            raise SVMError(f"VMRUN: VMCB address {vmcb_pa:#x} is not a 4 KiB-aligned physical address")
        if len(gprs) != 16:
            raise SVMError(f"VMRUN: {len(gprs)} GPRs passed, 16 expected")
        if budget < 0:
            raise SVMError(f"VMRUN: negative budget {budget}")
        vmcb = VMCB(self.phys, vmcb_pa)
        self.invalid_reasons = consistency_errors(vmcb, self.model)
        if self.invalid_reasons:
            vmcb.exitcode = ExitCode.INVALID
            return
        ctl = GuestControls.from_vmcb(vmcb)
        g = self._load(vmcb, ctl, gprs)
        self.tlb.tlb_control(vmcb.tlb_control, ctl.asid)
        cpu = SpecCPU(g, deliver_exceptions=True)
        try:
            attach_guest_memory(g, self.phys, np_enable=ctl.np_enable, ncr3=ctl.ncr3, host_ctl=self.host_ctl,
                                tlb=self.tlb, asid=ctl.asid)
        except VMExit as e:  # a nested page fault loading a PAE guest's PDPTEs
            self._exit(vmcb, g, ctl, gprs, cpu._vmexit(e), injected=False)
            return
        raw = vmcb.eventinj
        injected = bool(raw & EVENT_VALID)
        stop: StopEvent | None = None
        if injected:
            ev, to_nrip = injected_event(EventInj.decode(raw))
            stop = cpu.deliver(ev, vmcb.nrip if to_nrip else None, intercept=False)
        if stop is None:
            stop = self._run(cpu, ctl, budget)
        self._finish(vmcb, g, ctl, gprs, stop, injected)

    def _load(self, vmcb: VMCB, ctl: GuestControls, gprs: list[int]) -> MachineState:
        g = MachineState.concrete(self.phys)
        g.model, g.io = self.model, self.io
        g.msrs = dict(self.msrs)
        g.dr = list(self.dr)
        g.cr8, g.pkru, g.nmi_blocked = self.cr8, self.pkru, self.nmi_blocked
        g.icount = self.icount
        vmload_state(vmcb, g)
        load_guest_state(vmcb, g)
        D = CONCRETE
        gpr = list(g.gpr)
        for k in range(16):
            if k not in (0, 4):
                gpr[k] = D.const(64, gprs[k] & _M64)
        g.gpr = gpr
        g.tsc_offset = (self.tsc_adjust + ctl.tsc_offset) & _M64
        g.interrupt_shadow = bool(vmcb.interrupt_shadow)
        g.gif = True
        g.svm = ctl
        return g

    # -- the guest's run ------------------------------------------------------------------------------
    def _run(self, cpu: SpecCPU, ctl: GuestControls, budget: int) -> StopEvent:
        g = cpu.state
        start = g.icount
        intr_exit = ctl.intercepts(ExitCode.INTR)
        while True:
            if g.icount - start >= budget and self._intr_recognized(g, ctl):
                return self._physical_intr(cpu, intr_exit)
            if g.icount - start >= budget + MASKED_INTR_LIMIT:
                raise SVMError(f"the guest kept a physical interrupt masked for {MASKED_INTR_LIMIT} instructions "
                               "(V_INTR_MASKING = 0 and RFLAGS.IF = 0, or GIF = 0)")
            if ctl.v_irq and self._vintr_ready(g, ctl):
                if ctl.intercepts(ExitCode.VINTR):
                    return cpu._vmexit(VMExit(ExitCode.VINTR))
                ctl.v_irq = False
                stop = cpu.deliver(Event(ctl.v_intr_vector, EventKind.EXTERNAL))
                if stop is not None:
                    return stop
                continue
            stop = cpu.step()
            if stop is None:
                continue
            if stop.kind == "halted":
                if ctl.v_irq and self._vintr_ready(g, ctl):
                    continue  # the virtual interrupt wakes the guest at the next boundary
                # Nothing the guest can take is pending: time passes until the host timer interrupt.
                if self._intr_recognized(g, ctl):
                    return self._physical_intr(cpu, intr_exit)
                raise SVMError("guest halted forever: HLT not intercepted and no interrupt can wake it")
            return stop

    @staticmethod
    def _intr_recognized(g: MachineState, ctl: GuestControls) -> bool:
        """Is a physical INTR recognized now (APM 15.17, 15.21.1)?"""
        if not g.gif:
            return False
        return ctl.v_intr_masking or bool(g.rflags_sys & _IF and not g.interrupt_shadow)

    @staticmethod
    def _vintr_ready(g: MachineState, ctl: GuestControls) -> bool:
        """Can the virtual interrupt be taken now (APM 15.21.4)?"""
        if not g.gif or not g.rflags_sys & _IF or g.interrupt_shadow:
            return False
        return ctl.v_ign_tpr or ctl.v_intr_prio > ctl.v_tpr

    @staticmethod
    def _physical_intr(cpu: SpecCPU, intercepted: bool) -> StopEvent:
        if not intercepted:
            raise SVMError("physical interrupt with the INTR intercept clear: it would be delivered to the guest")
        return cpu._vmexit(VMExit(ExitCode.INTR))

    # -- #VMEXIT ------------------------------------------------------------------------------------
    def _finish(self, vmcb: VMCB, g: MachineState, ctl: GuestControls, gprs: list[int], stop: StopEvent,
                injected: bool) -> None:
        if stop.kind == "shutdown":
            if not ctl.intercepts(ExitCode.SHUTDOWN):
                raise SVMError(f"guest shutdown ({stop.detail}) with the SHUTDOWN intercept clear: "
                               "the processor shuts down")
            stop = StopEvent(kind="vmexit", rip=g.rip, exitcode=ExitCode.SHUTDOWN, detail=stop.detail)
        if stop.kind == "unimplemented":
            self._exit(vmcb, g, ctl, gprs, None, injected)
            raise Unimplemented(f"guest at rip={stop.rip:#x}: {stop.detail}")
        if stop.kind != "vmexit":
            raise SVMError(f"unexpected stop in guest mode: {stop.describe()}")
        self._exit(vmcb, g, ctl, gprs, stop, injected)

    def _exit(self, vmcb: VMCB, g: MachineState, ctl: GuestControls, gprs: list[int], stop: StopEvent | None,
              injected: bool) -> None:
        """Write the VMCB and the GPRs, keep the unswitched registers, leave guest mode (APM 15.6, 15.7)."""
        save_guest_state(g, vmcb)
        vmsave_state(g, vmcb)
        if stop is not None:
            code = stop.exitcode
            assert code is not None
            vmcb.exitcode = code
            vmcb.exitinfo1, vmcb.exitinfo2 = stop.exitinfo1, stop.exitinfo2
            vmcb.exitintinfo = stop.exitintinfo
            vmcb.nrip = stop.nrip
            if code in (ExitCode.EXCP_PF, ExitCode.NPF):
                vmcb.set_guest_insn_bytes(self._insn_bytes(g))
            else:
                vmcb.guest_insn_len = 0
        vmcb.interrupt_shadow = int(g.interrupt_shadow)
        vmcb.guest_interrupt_mask = int(bool(g.rflags_sys & _IF))
        vmcb.v_tpr = ctl.v_tpr
        vmcb.v_irq = int(ctl.v_irq)
        if injected:
            vmcb.eventinj = vmcb.eventinj & ~EVENT_VALID
        D = CONCRETE
        for k in range(16):
            if k not in (0, 4):
                gprs[k] = D.concrete(g.gpr[k])
        host_pat = self.msrs.get(IA32_PAT)
        self.msrs = dict(g.msrs)
        if ctl.np_enable:  # the guest's PAT was G_PAT, saved in the VMCB; the host's is untouched
            if host_pat is None:
                self.msrs.pop(IA32_PAT, None)
            else:
                self.msrs[IA32_PAT] = host_pat
        self.dr = list(g.dr)
        self.cr8, self.pkru, self.nmi_blocked = g.cr8, g.pkru, g.nmi_blocked
        self.tsc_adjust = (g.tsc_offset - ctl.tsc_offset) & _M64
        self.icount = g.icount
        g.svm = None
        detach_guest_memory(g)
        self.last_guest = g

    @staticmethod
    def _insn_bytes(g: MachineState) -> bytes:
        """The bytes of the guest instruction at CS:RIP that can be fetched, up to 15 (APM 15.33.4)."""
        out = bytearray()
        sixty_four = g.code_bits == 64
        cs = g.seg[1]
        user = g.cpl == 3
        for k in range(15):
            off = g.rip + k
            if not sixty_four and off > cs.limit:
                break
            lin = off & _M64 if sixty_four else (cs.base + off) & 0xFFFF_FFFF
            try:
                b: Any = g.mem.read(lin, 1, AccessKind.FETCH, user)
            except (Fault, VMExit):
                break
            out.append(CONCRETE.concrete(b))
        return bytes(out)


__all__ = ["HOST_CONTROL", "MASKED_INTR_LIMIT", "SVMError", "SVMProcessor", "consistency_errors", "injected_event"]
