"""The mutable machine state the semantics run on.

Data that instructions compute with (general-purpose registers, status flags,
memory contents) are *domain values*; system state that selects behaviour
(control registers, EFER, segment descriptor caches, descriptor-table
registers, RIP) is concrete.  Proofs therefore range over all data for one
system configuration at a time, and enumerate configurations when needed.

Status flags are kept lazily (see :class:`Flags`).  The set of status flags
that are currently architecturally *undefined* is tracked exactly: an
instruction that leaves a flag undefined adds it, any later definition of the
flag removes it; comparisons against other implementations mask that set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from spec import flags as F
from spec.cpumodel import DEFAULT_MODEL, CpuModel
from spec.domain.base import Domain
from spec.io import EMPTY_IO_BUS, IOBus
from spec.memory import LinearMemory, PhysicalMemory

if TYPE_CHECKING:
    from spec.svm.intercepts import GuestControls

# Control-register and EFER bits used by mode logic (SDM Vol. 3A 2.5; APM Vol. 2 3.1.7).
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31)
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12

M64 = (1 << 64) - 1

# Segment descriptor type field values for the hidden parts after a reset / typical loads.
CODE_RX_ACCESSED = 0xB
DATA_RW_ACCESSED = 0x3


@dataclass(slots=True)
class Segment:
    """A segment register: visible selector and hidden descriptor cache (SDM Vol. 3A 3.4.3)."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = DATA_RW_ACCESSED
    s: int = 1  # 1 = code/data, 0 = system
    dpl: int = 0
    p: int = 1
    avl: int = 0
    l: int = 0  # 64-bit code segment
    db: int = 0  # default operand size / big
    g: int = 0
    unusable: bool = False

    def copy(self) -> Segment:
        return replace(self)


@dataclass(slots=True)
class TableRegister:
    """GDTR/IDTR: base and limit."""

    base: int = 0
    limit: int = 0xFFFF


class Flags:
    """The six status flags, lazily: a record of the last flag-setting operation plus overrides.

    ``record`` is ``(kind, w, a, b, r, c)`` (see :mod:`spec.flags`); ``vals``
    holds flags written explicitly since (or ``None``: take it from the record).
    """

    __slots__ = ("D", "record", "vals")

    def __init__(self, D: Domain) -> None:
        self.D = D
        self.record: tuple | None = None
        f = D.false()
        self.vals: dict[int, Any] = {flag: f for flag in F.STATUS}

    def get(self, flag: int) -> Any:
        v = self.vals.get(flag)
        if v is None:
            kind, w, a, b, r, c = self.record  # type: ignore[misc]
            v = kind.flag(self.D, flag, w, a, b, r, c)
        return v

    def set(self, flag: int, value: Any) -> None:
        self.vals[flag] = value

    def set_lazy(self, kind: Any, w: int, a: Any, b: Any, r: Any, c: Any, keep: tuple[int, ...] = ()) -> None:
        kept = {f: self.get(f) for f in keep}
        self.record = (kind, w, a, b, r, c)
        self.vals = kept

    def copy(self) -> Flags:
        n = Flags.__new__(Flags)
        n.D, n.record, n.vals = self.D, self.record, dict(self.vals)
        return n


@dataclass
class MachineState:
    """Everything the architecture defines that an instruction may read or write."""

    D: Domain
    mem: LinearMemory
    gpr: list[Any] = field(default_factory=list)
    rip: int = 0
    flags: Flags | None = None
    rflags_sys: int = F.RESERVED_ONE  # RFLAGS with the status bits cleared
    undefined: int = 0  # bit mask (RFLAGS positions) of status flags currently undefined
    seg: list[Segment] = field(default_factory=lambda: [Segment() for _ in range(6)])
    gdtr: TableRegister = field(default_factory=TableRegister)
    idtr: TableRegister = field(default_factory=TableRegister)
    ldtr: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    cr0: int = CR0_ET
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    dr: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400])
    msrs: dict[int, int] = field(default_factory=dict)  # other architectural MSRs by index
    halted: bool = False
    icount: int = 0
    interrupt_shadow: bool = False  # MOV SS / POP SS (and STI) block interrupts for one instruction
    nmi_blocked: bool = False  # NMI delivered, blocked until the next IRET (SDM Vol. 3A 6.7.1)
    pdptes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # PAE PDPTE registers (SDM Vol. 3A 4.4.1)
    pkru: int = 0  # protection-key rights for user pages (SDM Vol. 3A 4.6.2)
    a20: bool = True  # A20 gate: False forces physical address bit 20 to 0 outside long mode
    # Segment-level checks (spec/segmentation.py: limits, types, null segments, canonical form) on data
    # accesses and fetches.  False is the application view the symbolic instruction twins prove over.
    seg_checks: bool = True
    io: IOBus = EMPTY_IO_BUS  # port I/O bus (spec/io.py): host plumbing, not in snapshots; copies share it
    model: CpuModel = DEFAULT_MODEL  # the processor model (spec/cpumodel.py): CPUID, MSRs, TSC; copies share it
    tsc_offset: int = 0  # TSC = (model.tsc(icount) + tsc_offset) mod 2^64; WRMSR to the TSC sets it
    tlb_events: list[tuple] | None = None  # TLB-relevant events (spec/isa/system.py); None: not recorded
    # SVM guest mode (AMD APM Vol. 2 15.5): the running guest's VMCB controls (spec/svm/intercepts.py);
    # None outside guest mode, and then no intercept is ever checked.
    svm: GuestControls | None = None
    gif: bool = True  # SVM global interrupt flag (APM 15.17): CLGI clears it, STGI sets it; 0 holds NMI and INTR

    def __post_init__(self) -> None:
        if hasattr(self.mem, "state"):
            self.mem.state = self  # the MMU translates with this state's control registers
        if not self.gpr:
            self.gpr = [self.D.const(64, 0) for _ in range(16)]
        if self.flags is None:
            self.flags = Flags(self.D)

    @classmethod
    def concrete(cls, phys: PhysicalMemory | None = None) -> MachineState:
        from spec.domain.concrete import CONCRETE
        from spec.mmu import MMU

        return cls(D=CONCRETE, mem=MMU(CONCRETE, phys if phys is not None else PhysicalMemory()))

    # -- mode ------------------------------------------------------------------------
    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & CR0_PE)

    @property
    def code_bits(self) -> int:
        """Default operand/address size of the code segment (SDM Vol. 3A 5.2.1, 3.4.5)."""
        cs = self.seg[1]
        if self.efer & EFER_LMA and cs.l:
            return 64
        if self.cr0 & CR0_PE and not (self.rflags_sys >> F.VM) & 1:
            return 32 if cs.db else 16
        return 16

    @property
    def stack_bits(self) -> int:
        """Stack address size: 64 in 64-bit mode, else SS.B (SDM Vol. 3A 3.4.5)."""
        if self.code_bits == 64:
            return 64
        if self.cr0 & CR0_PE and not (self.rflags_sys >> F.VM) & 1:
            return 32 if self.seg[2].db else 16
        return 16

    @property
    def cpl(self) -> int:
        """Current privilege level: CS.RPL in protected mode (SS.DPL by convention), 0 in real mode."""
        if not self.cr0 & CR0_PE:
            return 0
        if (self.rflags_sys >> F.VM) & 1:
            return 3
        return self.seg[2].dpl

    # -- registers -------------------------------------------------------------------
    def read_gpr(self, reg: int, size: int, high8: bool = False) -> Any:
        v = self.gpr[reg]
        D = self.D
        if size == 64:
            return v
        if high8:
            return D.extract(v, 15, 8)
        return D.extract(v, size - 1, 0)

    def write_gpr(self, reg: int, size: int, value: Any, high8: bool = False) -> None:
        """Write a register part; 32-bit writes zero-extend to 64 bits (SDM Vol. 1 3.4.1.1)."""
        D = self.D
        if size == 64:
            self.gpr[reg] = value
        elif size == 32:
            self.gpr[reg] = D.zext(value, 32, 64)
        elif high8:
            old = self.gpr[reg]
            self.gpr[reg] = D.concat(D.concat(D.extract(old, 63, 16), value, 8), D.extract(old, 7, 0), 8)
        else:
            self.gpr[reg] = D.concat(D.extract(self.gpr[reg], 63, size), value, size)

    # -- RFLAGS ----------------------------------------------------------------------
    def get_flag(self, flag: int) -> Any:
        if flag in F.ALL_STATUS:
            return self.flags.get(flag)  # type: ignore[union-attr]
        return self.D.boolean(bool((self.rflags_sys >> flag) & 1))

    def set_flag(self, flag: int, value: Any) -> None:
        if flag in F.ALL_STATUS:
            self.flags.set(flag, value)  # type: ignore[union-attr]
            self.undefined &= ~(1 << flag)
        else:
            b = self.D.concrete(self.D.from_bool(value, 1)) if not isinstance(value, bool) else int(value)
            self.rflags_sys = (self.rflags_sys & ~(1 << flag)) | (b << flag)

    def read_rflags(self) -> Any:
        """RFLAGS as a 64-bit domain value (status flags evaluated)."""
        D = self.D
        v = D.const(64, self.rflags_sys)
        for flag in F.STATUS:
            v = D.or_(64, v, D.shl(64, D.from_bool(self.flags.get(flag), 64), D.const(64, flag)))  # type: ignore[union-attr]
        return v

    def write_rflags(self, value: Any) -> None:
        """Set every RFLAGS bit from a 64-bit domain value (bits 1 forced to 1; callers mask writability)."""
        D = self.D
        for flag in F.STATUS:
            self.flags.set(flag, D.bit(64, value, flag))  # type: ignore[union-attr]
        self.undefined = 0
        sys_bits = D.concrete(D.and_(64, value, D.const(64, M64 ^ F.STATUS_MASK)))
        self.rflags_sys = sys_bits | F.RESERVED_ONE

    def copy(self) -> MachineState:
        """A deep copy (memory included) for checkpointing and tests."""
        mem = type(self.mem)(self.D, self.mem.phys.copy())
        return MachineState(
            D=self.D, mem=mem, gpr=list(self.gpr), rip=self.rip, flags=self.flags.copy(),  # type: ignore[union-attr]
            rflags_sys=self.rflags_sys, undefined=self.undefined, seg=[s.copy() for s in self.seg],
            gdtr=replace(self.gdtr), idtr=replace(self.idtr), ldtr=self.ldtr.copy(), tr=self.tr.copy(),
            cr0=self.cr0, cr2=self.cr2, cr3=self.cr3, cr4=self.cr4, cr8=self.cr8, efer=self.efer,
            dr=list(self.dr), msrs=dict(self.msrs), halted=self.halted, icount=self.icount,
            interrupt_shadow=self.interrupt_shadow, nmi_blocked=self.nmi_blocked,
            pdptes=list(self.pdptes), pkru=self.pkru, a20=self.a20, seg_checks=self.seg_checks,
            io=self.io, model=self.model, tsc_offset=self.tsc_offset,
            tlb_events=None if self.tlb_events is None else list(self.tlb_events), svm=self.svm, gif=self.gif)
