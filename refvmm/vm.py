"""A virtual machine: one guest on one SVM processor, after Palacios.

``VM(config)`` builds everything from a :class:`refvmm.config.VMConfig`; ``vm.run()``
runs the guest until it stops and returns a :class:`RunResult`.

The run loop (:meth:`VM.run`)::

    while True:
        VMRUN (budget = instructions left)          spec.svm.processor.SVMProcessor.vmrun
        #VMEXIT: EXITCODE, EXITINFO1, EXITINFO2
        action = exits.dispatch(vm, code, info1, info2)    the one dispatch
        apply(action):  advance RIP to nRIP if asked       the one place RIP moves
                        EVENTINJ if Inject
                        return if Stop

API for paging strategies (``refvmm/paging/*``) and handlers
--------------------------------------------------------------

``vm.config``            the :class:`~refvmm.config.VMConfig`
``vm.processor``         the :class:`spec.svm.processor.SVMProcessor` (``.phys``, ``.tlb``, ``.icount``,
                         ``.dr`` -- DR0-DR3 are not switched by VMRUN and live there)
``vm.phys``              host physical memory (= ``vm.processor.phys``)
``vm.vmcb``              the :class:`spec.svm.vmcb.VMCB` of this guest (at ``vm.vmcb_pa``); the VM
                         sets its own intercepts (``exits.INTERCEPTS``), IOPM/MSRPM, ASID
                         (``vm.asid``), TSC_OFFSET; the strategy sets NP/nCR3/CR0/CR3/CR4/EFER and its
                         own intercepts in ``configure``
``vm.gprs``              the 16 guest GPRs the host keeps (list of int); **RAX and RSP live in the
                         VMCB** (``vm.vmcb.rax/rsp``), their slots here are ignored by VMRUN.  Use
                         ``vm.get_gpr(n)`` / ``vm.set_gpr(n, v)`` to read/write any GPR uniformly
``vm.memory``            :class:`refvmm.guest_memory.GuestMemory`: ``gpa_to_hpa``, ``is_ram``,
                         ``mmio_region``, ``read/write(gpa, n)``, ``regions``, ``ram_pages()``,
                         ``host_pages()``, ``view()``
``vm.allocator``         :class:`refvmm.guest_memory.PageAllocator` -- zeroed host pages for VMM
                         tables (never guest RAM): ``alloc(count=1) -> hpa``, ``free(hpa)``
``vm.paging``            the strategy (:class:`refvmm.paging.base.PagingStrategy`)
``vm.entry_control``     the entry state's guest-visible CR0/CR2/CR3/CR4/EFER (for ``configure``)
``vm.guest_cr0`` ...     ``guest_cr0/cr2/cr3/cr4/efer``: what the guest sees (the strategy's answer)
``vm.guest_model``       the guest's CpuModel (CPUID policy applied); ``vm.host_model`` the physical one
``vm.asid``              the guest's ASID (1)
``vm.inject(action)``    put an :class:`~refvmm.actions.Inject` in EVENTINJ (and CR2 for #PF)
``vm.emulate()``         run the guest instruction at RIP once on the spec over the guest's view
                         (:mod:`refvmm.mmio`); returns the Action (use it for MMIO)
``vm.advance_rip()``     RIP := nRIP -- called only by the run loop, for ``advance=True`` actions
``vm.stats``             :class:`refvmm.stats.VMStats`
``vm.output``            :class:`refvmm.devices.base.OutputLog` (console / debug port / hypercall output)
``vm.guest_state()``     the guest's view as a :class:`spec.state.MachineState` (a copy: RAM
                         pages shared) -- ``spec.snapshot.Snapshot.from_state`` of it compares with
                         the bare machine

TSC: the processor's guest RDTSC is ``host TSC + TSC_OFFSET``.  Before each VMRUN the VM
sets TSC_OFFSET so that the guest reads ``guest_model.tsc(guest instructions) +
guest's own offset`` -- the bare spec's value after the same number of guest
instructions, instructions the VMM emulated included (exact for the spec's linear
TscClock: the offset is recomputed at every VMRUN).  A guest WRMSR to the TSC is
emulated and changes the guest's own offset, as on the bare machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from refvmm import exits
from refvmm.actions import Action, Inject, Resume, Stop
from refvmm.config import ConfigError, FlatImage, SnapshotImage, VMConfig
from refvmm.cpuid_policy import CpuidPolicy
from refvmm.devices import Device, OutputLog, make_device
from refvmm.guest_memory import GuestMemory, GuestMemoryError, PageAllocator
from refvmm.hooks import HookError, HookRegistry, PortBus, ValuePort, value_msr
from refvmm.mmio import VMCB_MSRS, emulate_instruction, guest_view
from refvmm.paging.base import GuestControlRegs, PagingStrategy
from refvmm.stats import VMStats
from spec import flags as F
from spec.cpu import StopEvent
from spec.cpumodel import DEFAULT_MODEL, EFER, CpuModel, make_model
from spec.faults import Unimplemented
from spec.machine import STACK_TOP, flat_machine
from spec.memory import PAGE, PhysicalMemory
from spec.snapshot import Snapshot
from spec.state import EFER_SVME, MachineState
from spec.svm.exitcodes import exit_name
from spec.svm.processor import SVMError, SVMProcessor
from spec.svm.vmcb import (
    EVENT_VALID,
    IOPM_SIZE,
    MSRPM_RANGES,
    MSRPM_SIZE,
    SEG_ORDER,
    VMCB,
    EventInj,
    EventType,
    msrpm_set,
)
from spec.tlb import TLB_CONTROL_NOTHING

M64 = (1 << 64) - 1
RAX, RSP = 0, 4
GUEST_ASID = 1
RFLAGS_TF, RFLAGS_RF = 1 << F.TF, 1 << F.RF
DR6_BS = 1 << 14


class RunResult(BaseModel):
    """How a run ended: ``reason`` (halted | shutdown | exit | budget | unhandled-exit | error)."""

    model_config = ConfigDict(extra="forbid")

    reason: str
    detail: str = ""
    exit_code: int | None = None
    rip: int = 0
    stats: VMStats = Field(default_factory=VMStats)
    output: dict[str, str] = Field(default_factory=dict, description="device name -> what the guest wrote")

    def describe(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.reason} at rip={self.rip:#x}{extra}"


def load_entry_state(config: VMConfig) -> tuple[MachineState, bytes | None]:
    """The guest's entry state and flat image bytes (None for a snapshot/case image)."""
    image = config.image
    if image is None:
        raise ConfigError("image: the configuration names no guest image")
    path = Path(image.path)
    if not path.is_file():
        raise ConfigError(f"image.path: {path}: no such file")
    if isinstance(image, SnapshotImage):
        try:
            doc = json.loads(path.read_bytes())
            if image.kind == "case" or (isinstance(doc, dict) and "snapshot" in doc):
                doc = doc["snapshot"]
            return Snapshot.model_validate(doc).to_state(), None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"image.path: {path}: not a valid {image.kind}: {str(e).splitlines()[0]}") from None
    assert isinstance(image, FlatImage)
    data = path.read_bytes()
    if not data:
        raise ConfigError(f"image.path: {path}: empty guest image")
    st = flat_machine(config.entry.mode)
    st.rip = image.load if config.entry.rip is None else config.entry.rip
    st.gpr[RSP] = STACK_TOP if config.entry.rsp is None else config.entry.rsp
    return st, data


class BareMachine:
    """The same guest, memory map and devices on the bare spec CPU, no VMM: the equivalence reference.

    ``state`` is a plain :class:`MachineState` whose physical memory has the VM's RAM pages
    (entry pages and the configured RAM) and whose bus routes the configured MMIO regions
    to device instances of its own; ``state.io`` is a port bus over the same kinds of
    devices.  What the guest sees differs from the VM only where the VMM means it to: the
    CPU model is the VM's guest model (CPUID policy), and VMMCALL is #UD (no hypercalls).
    """

    def __init__(self, config: VMConfig, *, entry: MachineState | None = None,
                 base_model: CpuModel = DEFAULT_MODEL) -> None:
        image = None
        if entry is None:
            entry, image = load_entry_state(config)
        self.output = OutputLog()
        self.hooks = HookRegistry()
        phys = PhysicalMemory()
        ram = GuestMemory(phys)  # laid out like the VM's, then re-based at 0 for the bare machine
        self.devices: dict[str, Device] = {}
        try:
            _build_devices(config, ram, self.hooks, self.devices, self.output)
            _load_ram(config, ram, entry, image)
        except (GuestMemoryError, HookError) as e:
            raise ConfigError(str(e)) from None
        policy = _policy(config, base_model)
        st = entry.copy()
        st.mem.phys = ram.view()
        st.model = policy.model
        st.io = PortBus(self.hooks)
        self.state = st

    def run(self, budget: int | None = None) -> StopEvent:
        """Run on the spec CPU (exceptions delivered through the guest's IDT, as in the VM)."""
        from spec.cpu import SpecCPU

        return SpecCPU(self.state, deliver_exceptions=True).run(budget or 1_000_000)


def _policy(config: VMConfig, base_model: CpuModel) -> CpuidPolicy:
    policy = CpuidPolicy(base_model, hide=frozenset(config.cpuid.hide), hypervisor_bit=config.cpuid.hypervisor_bit,
                         vendor=config.cpuid.vendor, interface_version=exits.HYPERCALL_VERSION)
    for h in config.hooks:
        if h.kind == "cpuid":
            policy.override(h.leaf, h.subleaf, (h.eax, h.ebx, h.ecx, h.edx))
    return policy


def _build_devices(config: VMConfig, memory: GuestMemory, hooks: HookRegistry, devices: dict[str, Device],
                   output: OutputLog) -> None:
    """RAM regions, devices (ports, MMIO regions) and configured port/MSR hooks of ``config``."""
    if config.memory.size:
        memory.add_ram(0, config.memory.size)
    for r in config.memory.regions:
        memory.add_ram(r.gpa, r.size)
    for d in config.devices:
        dev = make_device(d, output)
        devices[dev.name] = dev
        for first, count in dev.port_ranges():
            hooks.hook_ports(first, count, dev.name, dev)
    for k, m in enumerate(config.mmio):
        dev = devices[m.device]
        if not dev.decodes_mmio:
            raise ConfigError(f"mmio[{k}].device: {m.device!r} ({dev.kind}) has no MMIO registers")
        memory.add_mmio(m.gpa, m.size, dev.name, dev)
    for k, h in enumerate(config.hooks):
        if h.kind == "port":
            hooks.hook_ports(h.port, h.size, f"hooks[{k}]", ValuePort(h.value, h.writable))
        elif h.kind == "msr":
            if h.index == EFER:
                raise ConfigError(f"hooks[{k}].index: EFER belongs to the VMM and cannot be hooked")
            hooks.hook_msr(h.index, value_msr(f"hooks[{k}]", h.value, h.writable))


def _load_ram(config: VMConfig, memory: GuestMemory, entry: MachineState, image: bytes | None) -> None:
    """The entry state's pages become guest RAM (same gPA); a flat image is copied at its load address."""
    for gpn, page in entry.mem.phys.pages.items():
        gpa = gpn * PAGE
        if memory.mmio_region(gpa) is not None:
            raise ConfigError(f"mmio: the region at {gpa:#x} overlaps a page of the guest image")
        memory.add_ram_page(gpa, bytes(page))
    if image is not None:
        image_cfg = config.image
        assert isinstance(image_cfg, FlatImage)
        load = image_cfg.load
        for gpa in range(load & ~(PAGE - 1), load + len(image), PAGE):
            if not memory.is_ram(gpa):
                raise ConfigError(f"image.load: the image ({len(image)} bytes at {load:#x}) does not fit in "
                                  f"guest RAM (page {gpa:#x} is not RAM; see memory.size)")
        memory.write_bytes(load, image)


class VM:
    """One guest on one SVM processor (see the module docstring for the API)."""

    def __init__(self, config: VMConfig, *, entry: MachineState | None = None,
                 strategy: PagingStrategy | None = None, base_model: CpuModel = DEFAULT_MODEL) -> None:
        self.config = config
        self.host_model = make_model(add={"svm"}) if base_model is DEFAULT_MODEL else base_model
        self.phys = PhysicalMemory()
        self.processor = SVMProcessor(self.phys, self.host_model)
        self.allocator = PageAllocator(self.phys)
        self.memory = GuestMemory(self.phys)
        self.output = OutputLog()
        self.hooks = HookRegistry()
        self.port_bus = PortBus(self.hooks)
        self.stats = VMStats(paging=config.paging)
        self.asid = GUEST_ASID
        self.msr_file: dict[int, int] = {}  # intercepted MSRs the guest has (values the spec's WRMSR accepted)
        self.vmcb_msrs_written: set[int] = set()  # VMCB-switched MSRs the guest state holds explicitly
        self.guest_tsc_offset = 0
        self.pending_shadow = False  # interrupt shadow set by the instruction being completed (refvmm.mmio)
        self.cpuid = _policy(config, base_model)
        self.guest_model = self.cpuid.model
        self.devices: dict[str, Device] = {}
        self.result: RunResult | None = None
        image = None
        if entry is None:
            entry, image = load_entry_state(config)
        try:
            _build_devices(config, self.memory, self.hooks, self.devices, self.output)
            _load_ram(config, self.memory, entry, image)
        except (GuestMemoryError, HookError) as e:
            raise ConfigError(str(e)) from None
        # The VMCB, IOPM and MSRPM: VMM pages below GUEST_BASE.
        self.vmcb_pa = self.allocator.alloc()
        self.vmcb = VMCB(self.phys, self.vmcb_pa)
        self.vmcb.clear()
        self.iopm_pa = self.allocator.alloc(IOPM_SIZE // PAGE)
        self.msrpm_pa = self.allocator.alloc(MSRPM_SIZE // PAGE)
        self.gprs: list[int] = [0] * 16
        self._load_entry_registers(entry)
        self._program_intercepts()
        if strategy is None:
            from refvmm.paging import make_strategy

            strategy = make_strategy(config.paging)
        self.paging: PagingStrategy = strategy
        self.stats.paging = strategy.name
        strategy.configure(self)

    # -- construction ---------------------------------------------------------------------
    def _load_entry_registers(self, st: MachineState) -> None:
        """The entry state into the VMCB state-save area and the GPR array (APM Table B-2)."""
        v = self.vmcb
        self.store_registers(st)
        v.rip = st.rip
        v.cr2 = st.cr2
        v.interrupt_shadow = int(st.interrupt_shadow)
        v.g_pat = self.host_model.msr_reset.get(0x277, 0x0007_0406_0007_0406)
        self.entry_control = GuestControlRegs(cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4,
                                              efer=st.efer & ~EFER_SVME)
        self.entry_icount = st.icount
        self.halted = st.halted

    def store_registers(self, st: MachineState) -> None:
        """A guest-view machine state's registers into the VM: GPRs (RAX/RSP in the VMCB), RFLAGS,
        segments and descriptor tables, CPL, debug registers, MSRs (VMCB-switched or the VMM's
        file) and the TSC offset.  RIP, CR2, the interrupt shadow and the control registers are
        the caller's: entry and emulation treat them differently."""
        v = self.vmcb
        D = st.D
        gpr = [D.concrete(x) for x in st.gpr]
        self.gprs[:] = gpr
        v.rax, v.rsp = gpr[RAX], gpr[RSP]
        v.rflags = D.concrete(st.read_rflags())
        for name, seg in zip(SEG_ORDER, st.seg):
            v.store_segment(name, seg)
        v.store_segment("ldtr", st.ldtr)
        v.store_segment("tr", st.tr)
        v.store_table("gdtr", st.gdtr)
        v.store_table("idtr", st.idtr)
        v.cpl = st.cpl
        v.dr6, v.dr7 = st.dr[6], st.dr[7]
        self.processor.dr[:6] = st.dr[:6]  # DR0-DR5 are not switched by VMRUN: they stay in the processor
        for index, value in st.msrs.items():
            name = VMCB_MSRS.get(index)
            if name is not None:
                setattr(v, name, value)
                self.vmcb_msrs_written.add(index)
            else:
                self.msr_file[index] = value
        self.guest_tsc_offset = st.tsc_offset

    def _program_intercepts(self) -> None:
        """The VM's intercepts, IOPM (all ports) and MSRPM (derived from the hooks), ASID, TSC_OFFSET."""
        v = self.vmcb
        for code in exits.INTERCEPTS:
            v.set_intercept(code)
        ports = self.hooks.intercepted_ports()
        iopm = bytearray(IOPM_SIZE)
        for p in ports:
            iopm[p >> 3] |= 1 << (p & 7)
        if len(ports) == 0x10000:
            iopm[0x2000:] = b"\xff" * (IOPM_SIZE - 0x2000)  # the bits of wide accesses past port FFFFh
        self.phys.write_bytes(self.iopm_pa, bytes(iopm))
        self.phys.write_bytes(self.msrpm_pa, b"\xff" * MSRPM_SIZE)
        for first, _ in MSRPM_RANGES:
            for msr in range(first, first + 0x2000):
                if not self.hooks.msr_intercepts(msr):
                    msrpm_set(self.phys, self.msrpm_pa, msr, read=False, write=False)
        v.iopm_base_pa = self.iopm_pa
        v.msrpm_base_pa = self.msrpm_pa
        v.guest_asid = self.asid
        # Physical interrupts (the budget timer) are masked by the host's IF, not the guest's (APM 15.21.1), so a
        # guest running with IF = 0 is still preempted; the guest's CR8 becomes V_TPR.
        v.v_intr_masking = 1

    # -- guest-visible state ----------------------------------------------------------------
    @property
    def guest_control(self) -> GuestControlRegs:
        return self.paging.guest_control(self)

    @property
    def guest_cr0(self) -> int:
        return self.guest_control.cr0

    @property
    def guest_cr2(self) -> int:
        return self.vmcb.cr2

    @property
    def guest_cr3(self) -> int:
        return self.guest_control.cr3

    @property
    def guest_cr4(self) -> int:
        return self.guest_control.cr4

    @property
    def guest_efer(self) -> int:
        return self.guest_control.efer

    def get_gpr(self, n: int) -> int:
        if n == RAX:
            return self.vmcb.rax
        if n == RSP:
            return self.vmcb.rsp
        return self.gprs[n]

    def set_gpr(self, n: int, value: int) -> None:
        value &= M64
        if n == RAX:
            self.vmcb.rax = value
        elif n == RSP:
            self.vmcb.rsp = value
        self.gprs[n] = value

    def guest_state(self) -> MachineState:
        """The guest as it sees itself now (RIP, registers, guest-visible CRs, guest-physical RAM)."""
        st = guest_view(self)
        st.halted = self.halted
        return st

    def guest_snapshot(self) -> Snapshot:
        """A snapshot of :meth:`guest_state` (RAM pages only: MMIO and holes are not memory)."""
        return Snapshot.from_state(self.guest_state())

    # -- what handlers ask for ---------------------------------------------------------------
    def emulate(self) -> Action:
        """Emulate the guest instruction at RIP with the spec (refvmm.mmio.emulate_instruction)."""
        return emulate_instruction(self)

    def inject(self, action: Inject) -> None:
        """EVENTINJ := the event (APM 15.20); an injected #PF's CR2 is the VMM's to write."""
        self.vmcb.eventinj = action.eventinj()
        if action.cr2 is not None:
            self.vmcb.cr2 = action.cr2 & M64
        self.stats.record_injection(action.vector)

    def advance_rip(self) -> None:
        """RIP := nRIP: the one place RIP moves past an instruction the VMM completed.

        The instruction retires: it counts as a guest instruction, clears RF (SDM Vol. 3A
        17.3.1.1), and leaves the interrupt shadow it set (MOV SS / POP SS / STI -- the
        emulator reports it in ``pending_shadow``) or ends the one it ran under.  A TF set
        when it started is reported by :meth:`_apply` as a single-step #DB.
        """
        v = self.vmcb
        v.rip = v.nrip
        v.rflags = v.rflags & ~RFLAGS_RF
        v.interrupt_shadow = int(self.pending_shadow)
        self.pending_shadow = False
        self.stats.emulated_instructions += 1

    # -- the run loop -----------------------------------------------------------------------
    def _apply(self, action: Action) -> Stop | None:
        """Carry out a handler's decision; a Stop ends the run."""
        v = self.vmcb
        if action.advance:
            single_step = bool(v.rflags & RFLAGS_TF) and not isinstance(action, Inject)
            self.advance_rip()
            if single_step and isinstance(action, Resume):
                # A single-step trap after the completed instruction (SDM Vol. 3A 17.3.1.4).
                v.dr6 = v.dr6 | DR6_BS
                action = Inject.exception(1)
        if isinstance(action, Stop):
            return action
        if isinstance(action, Inject):
            self.inject(action)
        elif not action.advance and v.exitintinfo & EVENT_VALID:
            # The exit interrupted the delivery of an event (APM 15.7.2) and the handler only fixed what stood
            # in its way (a shadow fill, a nested mapping): the event is delivered again.
            pending = EventInj.decode(v.exitintinfo)
            self.inject(Inject(pending.vector, EventType(pending.type), pending.error_code))
        return None

    def _set_tsc_offset(self) -> None:
        guest_tsc = self.guest_model.tsc(self.entry_icount + self.stats.guest_instructions) + self.guest_tsc_offset
        host_tsc = self.host_model.tsc(self.processor.icount) + self.processor.tsc_adjust
        self.vmcb.tsc_offset = (guest_tsc - host_tsc) & M64

    def run(self, budget: int | None = None) -> RunResult:
        """Run until the guest stops or ``budget`` guest instructions (default: the config's) have retired."""
        limit = self.stats.guest_instructions + (self.config.budget if budget is None else budget)
        stop: Stop | None = None
        if self.halted:
            # Halted, and no device of this VMM can raise the interrupt that would wake it (spec.cpu: a halted
            # CPU stays halted at every boundary until an event arrives).
            stop = Stop("halted", f"the guest is halted at rip={self.vmcb.rip:#x}")
        while stop is None:
            left = limit - self.stats.guest_instructions
            if left <= 0:
                stop = Stop("budget", f"{limit} guest instructions executed")
                break
            self._set_tsc_offset()
            before = self.processor.icount
            self.stats.vmruns += 1
            try:
                self.processor.vmrun(self.vmcb_pa, self.gprs, left)
            except SVMError as e:
                stop = Stop("error", f"VMRUN: {e}")
                break
            except Unimplemented as e:
                stop = Stop("error", f"the guest ran an instruction the spec does not model (unimplemented): {e}")
                break
            finally:
                self.stats.hardware_instructions += self.processor.icount - before
            self.vmcb.tlb_control = TLB_CONTROL_NOTHING  # the VMRUN consumed any flush request (APM 15.16.1)
            code = self.vmcb.exitcode
            self.stats.record_exit(code)
            action = exits.dispatch(self, code, self.vmcb.exitinfo1, self.vmcb.exitinfo2)
            self.stats.mmio_accesses = self.memory.bus.accesses
            self.stats.port_accesses = self.port_bus.accesses
            stop = self._apply(action)
        self.halted = stop.reason == "halted"
        self.result = RunResult(reason=stop.reason, detail=stop.detail, exit_code=stop.exit_code, rip=self.vmcb.rip,
                                stats=self.stats.model_copy(deep=True),
                                output={k: v.decode("latin-1") for k, v in self.output.by_source().items()})
        return self.result

    def describe_exit(self) -> str:
        """The last exit, for messages."""
        return f"VMEXIT_{exit_name(self.vmcb.exitcode)} at rip={self.vmcb.rip:#x}"


__all__ = ["VM", "BareMachine", "RunResult", "load_entry_state"]
