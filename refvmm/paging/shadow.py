"""Shadow paging: the VMM's software TLB over the guest's own page tables (a "virtual TLB").

The hardware runs the guest on *shadow tables* the VMM builds in its own pages; the
guest's page tables are only data in guest RAM, read by the VMM with the spec's walker
(:func:`spec.paging.walk`) over guest-physical memory.  The shadow tables play the role
a TLB plays for the guest's tables, and obey the same rules (SDM Vol. 3A 4.10; APM Vol. 2
5.5, 15.16):

* **start empty, fill on a miss.**  Every guest #PF is intercepted (exception intercept
  14, APM 15.12).  :func:`decide` -- the one place that tells "the guest's own fault,
  inject it" from "a shadow miss, fill it" -- walks the guest's tables for the faulting
  access with the guest-visible CR0/CR3/CR4/EFER (and PDPTE registers): a failed walk
  is injected as the #PF the bare machine raises (the walker's error code; CR2 = the
  address); a successful one becomes one 4 KiB shadow leaf (guest large pages are
  splintered), pointing at the host page of the guest frame.
* **flush on CR3 writes**, and **rebuild on CR0/CR4/EFER changes** (paging mode, WP,
  SMEP, SMAP, PKE, NXE, PGE ...): all shadow leaves go.  **INVLPG drops** the shadow
  leaves of the guest page containing the address (every 4 KiB piece of a large page).
  The guest's MOV CR, INVLPG and the EFER MSR are intercepted and emulated by the spec
  itself on the guest's view (:meth:`ShadowPaging.emulate`), so every architectural
  check (#GP on reserved bits, PDPTE loads, LMA) is the bare machine's.
* **accessed and dirty flags** are set in the guest's own entries by the guest walk at
  fill time (SDM 4.8): a read or fetch fill maps the page read-only unless the guest
  leaf is already dirty, so the first write faults again and its walk sets D.
* **rights are the guest's** (SDM 4.6): the leaf gets the guest path's U/S, R/W (and D)
  and XD, and the protection key; the hardware runs with CR0.WP = 1, CR4.SMEP/SMAP/PKE
  as the guest has them and EFER.NXE = 1 (so a fetch fault reports I/D, APM 8.4.2).
  With those, the hardware refuses an access through a shadow leaf whenever the guest
  would (proved with Z3 in tests/test_shadow_proofs.py).  The one case the hardware
  cannot express -- a supervisor write the guest allows only because its CR0.WP = 0 --
  is emulated instruction by instruction.
* **guest-visible vs real registers.**  The guest reads CR0/CR3/CR4 and EFER through
  intercepts answered from the guest-visible values; the real ones (:func:`real_control`)
  add PG (paged real mode runs a paging-off guest on identity shadow tables, APM
  15.19), WP, PAE and NXE, drop PSE/PGE/PCIDE, and keep LME = LMA = the guest's LMA.
  Real mode is PAE paging for a legacy guest, 4-level paging for a long-mode guest.
* **the hardware TLB** (ASID-tagged, :class:`spec.tlb.ModelTLB`) caches shadow
  translations, so every removal is followed by the flush real hardware needs: INVLPGA
  of the page for a dropped leaf, TLB_CONTROL = flush this ASID at the next VMRUN for a
  flush or rebuild.  Filling a not-present leaf or upgrading the leaf whose use just
  faulted needs none (not-present is never cached; a #PF drops the entry, SDM 4.10.4.1).
* **faults during event delivery** (EXITINTINFO valid, APM 15.7.2): after a fill the
  interrupted event is re-injected -- INT n, INT3 and INTO with nRIP = the instruction
  after them, which the VMM decodes (the CPU provides none for such an exit) --; the
  guest's own #PF combines with it by the double-fault rules (SDM Vol. 3A 6.15).  INT1
  (ICEBP) is intercepted and its #DB injected past it, for the same reason.
* **only guest RAM is mapped.**  Shadow leaves point to host pages of guest RAM only;
  a guest frame that is MMIO or a hole stays unmapped, so the access exits and the
  instruction is emulated against the guest's bus.

Not covered (fail-stop with a reason): 5-level guest paging (the real format is 4-level:
the first shadow miss stops the VM), hardware task switches (they would load CR3 behind
the VMM's back).  A paging-off guest is mapped with the A20 gate open (the VMM keeps no
A20 state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from spec.cpu import SpecCPU
from spec.domain.base import Domain
from spec.domain.concrete import CONCRETE
from spec.faults import Vector
from spec.interrupts import Event, EventKind, escalates
from spec.memory import PAGE, AccessKind
from spec.paging import (
    ACCESSED,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    DIRTY,
    EFER_NXE,
    LEVEL4,
    LEVEL5,
    PAE,
    PF_ID,
    PF_U,
    PF_W,
    RW,
    US,
    XD,
    Access,
    PagingControl,
    PagingMode,
    PhysAccess,
    Walk,
    _denied,
    paging_mode,
    walk,
)
from spec.paging import P as PRESENT
from spec.state import MachineState
from spec.svm.exitcodes import ExitCode
from spec.svm.vmcb import EventInj, EventType
from spec.tlb import TLB_CONTROL_ASID, TLB_CONTROL_NOTHING

if TYPE_CHECKING:
    from refvmm.actions import Action
    from refvmm.paging.base import GuestControlRegs
    from refvmm.vm import VM

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PCIDE = 1 << 17
EFER_LME, EFER_LMA, EFER_SVME = 1 << 8, 1 << 10, 1 << 12
MSR_EFER = 0xC000_0080
PAGE_MASK = ~(PAGE - 1)
M32 = 0xFFFF_FFFF
M64 = (1 << 64) - 1

# CR4 bits the real CR4 never takes from the guest: the shadow format decides them (no large pages, no global
# entries, no PCIDs, no 5-level paging); SMEP/SMAP/PKE are passed through only while guest paging is on.
_CR4_OWN = CR4_PSE | CR4_PGE | CR4_PCIDE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PAE


# -- the guest-visible paging state ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestPaging:
    """What the guest believes its paging registers are: CR0/CR3/CR4/EFER and the PAE PDPTE registers."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    pdptes: tuple[int, ...] = (0, 0, 0, 0)
    maxphyaddr: int = 48

    @property
    def mode(self) -> PagingMode | None:
        return paging_mode(self.cr0, self.cr4, self.efer)

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def control(self, *, pkru: int = 0, ac: bool = False) -> PagingControl:
        return PagingControl(cr0=self.cr0, cr3=self.cr3, cr4=self.cr4, efer=self.efer, maxphyaddr=self.maxphyaddr,
                             pdptes=self.pdptes, pkru=pkru, ac=ac)


@dataclass(frozen=True)
class RealControl:
    """The CR0/CR4/EFER the hardware runs the guest with, and the shadow tables' format."""

    cr0: int
    cr4: int
    efer: int
    mode: PagingMode  # PAE or LEVEL4

    def control(self, cr3: int, *, pkru: int = 0, ac: bool = False, maxphyaddr: int = 48,
                pdptes: tuple[int, ...] = (0, 0, 0, 0)) -> PagingControl:
        return PagingControl(cr0=self.cr0, cr3=cr3, cr4=self.cr4, efer=self.efer, maxphyaddr=maxphyaddr,
                             pdptes=pdptes, pkru=pkru, ac=ac)


def real_control(g: GuestPaging) -> RealControl:
    """The real registers for guest-visible ``g`` (see the module docstring; APM 15.19 for paged real mode).

    CR0: the guest's, plus PG (a paging-off guest runs on identity shadow tables) and WP
    (so read-only shadow leaves bind the supervisor too -- dirty-bit emulation).  CR4: PAE
    always (the shadow format maps host addresses above 4 GiB), SMEP/SMAP/PKE as the guest
    has them while its paging is on, no PSE/PGE/PCIDE/LA57.  EFER: NXE (XD in shadow leaves,
    I/D in error codes) and SVME (VMRUN requires it, APM 15.5.1), LME = LMA = the guest's LMA.
    """
    mode = g.mode
    cr0 = g.cr0 | CR0_PG | CR0_WP
    cr4 = (g.cr4 & ~_CR4_OWN) | CR4_PAE
    if mode is not None:
        cr4 |= g.cr4 & (CR4_SMEP | CR4_SMAP)
        if mode.pk_capable:
            cr4 |= g.cr4 & CR4_PKE
    lma = g.long_mode
    efer = (g.efer & ~(EFER_LME | EFER_LMA)) | EFER_NXE | EFER_SVME | ((EFER_LME | EFER_LMA) if lma else 0)
    return RealControl(cr0=cr0, cr4=cr4, efer=efer, mode=LEVEL4 if lma else PAE)


def faulting_access(error_code: int, cpl: int) -> Access:
    """The access a hardware #PF error code describes (SDM 4.7): I/D fetch, else W/R; U/S with the CPL.

    At CPL 3 a supervisor-mode fault (U/S = 0) is an implicit supervisor access (descriptor
    tables, IDT, TSS, SDM 4.6).  The real EFER.NXE = 1 makes the I/D flag always reported.
    """
    kind = AccessKind.FETCH if error_code & PF_ID else AccessKind.WRITE if error_code & PF_W else AccessKind.READ
    user = bool(error_code & PF_U)
    if user:
        return Access(kind, 3)
    return Access(kind, cpl if cpl < 3 else 0, implicit=cpl == 3)


# -- the decision: the guest's fault, or a shadow miss ------------------------------------------------------------

@dataclass(frozen=True)
class ShadowRights:
    """What a shadow leaf grants: the guest path's rights, write only once the guest leaf is dirty."""

    user: Any
    writable: Any
    executable: Any
    pkey: Any = 0


def shadow_rights(D: Domain, w: Walk, acc: Access, ctl: PagingControl) -> ShadowRights:
    """The rights of the shadow leaf filled from successful guest walk ``w`` for ``acc`` (domain values).

    U/S and XD are the guest path's (SDM 4.6: AND of U/S, OR of XD with NXE).  R/W is the
    guest path's AND the leaf's dirty flag as the walk left it (D was set by the walk if
    ``acc`` is a write): a clean page is mapped read-only so its first write faults and
    sets D in the guest leaf (SDM 4.8).  The protection key is the leaf's (IA-32e, CR4.PKE).
    """
    dirty = D.bor(D.bit(64, w.leaf, 6), D.boolean(acc.write))
    pkey: Any = 0
    if w.mode.pk_capable and ctl.cr4 & CR4_PKE:
        pkey = D.extract(w.leaf, 62, 59)
    return ShadowRights(user=w.user, writable=D.band(w.writable, dirty), executable=w.executable, pkey=pkey)


@dataclass(frozen=True)
class Fill:
    """A shadow miss: map the 4 KiB linear page to guest-physical ``gpa`` with ``rights``.

    ``guest_page``/``guest_shift`` name the guest page the translation came from (a large
    page covers many 4 KiB shadow leaves; INVLPG on any address in it drops them all).
    """

    linear: int
    gpa: int
    rights: ShadowRights
    guest_page: int
    guest_shift: int


@dataclass(frozen=True)
class GuestFault:
    """The guest's own #PF: inject it with this error code and CR2 = ``linear`` (SDM 4.7)."""

    error_code: int
    linear: int


@dataclass(frozen=True)
class Emulate:
    """The guest allows the access but no shadow leaf can express it: emulate the instruction.

    ``fill`` is the leaf the guest's translation gives (mapped in by nothing: its rights
    would refuse the access on the hardware).
    """

    reason: str
    fill: Fill


Decision = Fill | GuestFault | Emulate

ALL_RIGHTS = ShadowRights(user=True, writable=True, executable=True)


def hardware_permits(rights: ShadowRights, acc: Access, real: PagingControl, mode: PagingMode) -> bool:
    """Would the hardware (running with ``real``) allow ``acc`` through a leaf with ``rights``?  (SDM 4.6)"""
    deny, pk = _denied(CONCRETE, mode, real, acc, int(rights.pkey) << 59, bool(rights.user), bool(rights.writable),
                       not rights.executable)
    return not (deny or pk)


def decide(gphys: PhysAccess, guest: GuestPaging, linear: int, acc: Access, *, pkru: int = 0,
           ac: bool = False) -> Decision:
    """THE decision for a shadow #PF on ``linear``: the guest's fault, a fill, or emulation.

    Walks the guest's tables (guest-physical memory ``gphys``) exactly as the bare machine
    would for ``acc`` -- setting A, and D for a write, in the guest's entries -- with the
    guest-visible control registers.  Paging off: linear = guest-physical, every right.
    A walk that succeeds but yields rights the hardware would still refuse for ``acc``
    (CR0.WP = 0 lets the supervisor write a read-only page; a protection key's WD does not
    bind supervisor writes then) asks for emulation.
    """
    page = linear & PAGE_MASK
    mode = guest.mode
    if mode is None:
        return Fill(linear=page, gpa=page & M32, rights=ALL_RIGHTS, guest_page=page, guest_shift=12)
    ctl = guest.control(pkru=pkru, ac=ac)
    w = walk(CONCRETE, gphys, mode, ctl, linear, acc)
    if w.fault is not None:
        return GuestFault(error_code=w.fault, linear=linear)
    rights = shadow_rights(CONCRETE, w, acc, ctl)
    rights = ShadowRights(bool(rights.user), bool(rights.writable), bool(rights.executable), int(rights.pkey))
    shift = w.page_shift
    fill = Fill(linear=page, gpa=w.phys & PAGE_MASK, rights=rights, guest_page=linear & ~((1 << shift) - 1),
                guest_shift=shift)
    real = real_control(guest)
    if not hardware_permits(rights, acc, real.control(0, pkru=pkru, ac=ac), real.mode):
        return Emulate("a supervisor write the guest allows only through CR0.WP=0", fill)
    return fill


# -- the shadow tables ------------------------------------------------------------------------------------------

@dataclass
class ShadowLeaf:
    """Bookkeeping for one filled 4 KiB leaf."""

    hpa: int
    rights: ShadowRights
    guest_page: int
    guest_shift: int

    def covers(self, linear: int) -> bool:
        return linear >> self.guest_shift == self.guest_page >> self.guest_shift


@dataclass
class ShadowTables:
    """Paging structures in VMM pages, in the real format ``mode`` (PAE or 4-level), 4 KiB leaves only.

    Non-leaf entries grant everything (P, R/W, U/S; no XD), so a leaf alone carries the
    rights.  With PAE the four PDPTEs are fixed at creation (PDPTE registers never go
    stale: SDM 4.4.1) and only the page directories below them change.  Leaves carry A
    and, when writable, D already set, so the hardware has nothing to update in them.
    """

    phys: Any  # host physical memory
    alloc: Callable[[], int]
    free: Callable[[int], None]
    mode: PagingMode
    root: int = 0
    leaves: dict[int, ShadowLeaf] = field(default_factory=dict)  # linear page -> leaf
    _tables: dict[tuple[int, int], int] = field(default_factory=dict)  # (level, linear prefix) -> table hpa
    _fixed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in (PAE, LEVEL4):
            raise ValueError(f"shadow tables in {self.mode.name} format are not supported")
        self.root = self.alloc()
        if self.mode is PAE:
            pds = []
            for k in range(4):
                pd = self.alloc()
                pds.append(pd)
                self.phys.write(self.root + 8 * k, 8, pd | PRESENT)
                self._tables[(2, k)] = pd
            self._fixed = tuple(pds)

    @property
    def pdptes(self) -> tuple[int, ...]:
        """The PDPTE registers the hardware loads from the root (PAE format; zeros otherwise)."""
        if self.mode is not PAE:
            return (0, 0, 0, 0)
        return tuple(pd | PRESENT for pd in self._fixed)

    @property
    def pages(self) -> list[int]:
        """Every host page these tables occupy (root first)."""
        return [self.root, *sorted(set(self._tables.values()))]

    def _index(self, linear: int, level: int) -> int:
        m = self.mode
        return (linear >> m.index_shift(level)) & ((1 << m.index_bits[level - 1]) - 1)

    def _leaf_address(self, linear: int, create: bool) -> int | None:
        """Host address of the level-1 entry for ``linear`` (allocating tables when ``create``)."""
        m = self.mode
        table = self.root
        for level in range(m.levels, 1, -1):
            key = (level - 1, linear >> m.index_shift(level))
            nxt = self._tables.get(key)
            if nxt is None:
                if not create:
                    return None
                nxt = self.alloc()
                self._tables[key] = nxt
                self.phys.write(table + 8 * self._index(linear, level), 8, nxt | PRESENT | RW | US | ACCESSED)
            table = nxt
        return table + 8 * self._index(linear, 1)

    @staticmethod
    def leaf_value(hpa: int, rights: ShadowRights) -> int:
        v = hpa | PRESENT | ACCESSED
        if rights.user:
            v |= US
        if rights.writable:
            v |= RW | DIRTY
        if not rights.executable:
            v |= XD
        return v | int(rights.pkey) << 59

    def map(self, linear: int, hpa: int, rights: ShadowRights, guest_page: int, guest_shift: int) -> None:
        addr = self._leaf_address(linear, create=True)
        assert addr is not None
        self.phys.write(addr, 8, self.leaf_value(hpa, rights))
        self.leaves[linear & PAGE_MASK] = ShadowLeaf(hpa, rights, guest_page, guest_shift)

    def lookup(self, linear: int) -> ShadowLeaf | None:
        return self.leaves.get(linear & PAGE_MASK)

    def unmap(self, linear: int) -> bool:
        page = linear & PAGE_MASK
        if self.leaves.pop(page, None) is None:
            return False
        addr = self._leaf_address(page, create=False)
        assert addr is not None
        self.phys.write(addr, 8, 0)
        return True

    def invalidate(self, linear: int) -> list[int]:
        """Drop every leaf of the guest page containing ``linear`` (INVLPG); the pages dropped."""
        dropped = [p for p, leaf in self.leaves.items() if leaf.covers(linear)]
        for p in dropped:
            self.unmap(p)
        return dropped

    def clear(self) -> None:
        """Drop every leaf and every table below the root (PAE: below the fixed page directories)."""
        fixed = set(self._fixed)
        for hpa in set(self._tables.values()) - fixed:
            self.free(hpa)
        self._tables = {k: v for k, v in self._tables.items() if v in fixed}
        for hpa in (self.root,) if self.mode is LEVEL4 else self._fixed:
            self.phys.write_bytes(hpa, bytes(PAGE))
        self.leaves.clear()

    def release(self) -> None:
        """Give every page back to the allocator."""
        for hpa in set(self._tables.values()):
            self.free(hpa)
        self.free(self.root)
        self._tables.clear()
        self.leaves.clear()
        self.root = 0


# -- the paging strategy ----------------------------------------------------------------------------------------

_CR_EXITS = frozenset({ExitCode.CR0_READ, ExitCode.CR3_READ, ExitCode.CR4_READ,
                       ExitCode.CR0_WRITE, ExitCode.CR3_WRITE, ExitCode.CR4_WRITE})
_PAGING_BITS_CR0 = CR0_PG | CR0_WP | CR0_PE
_PAGING_BITS_CR4 = CR4_PAE | CR4_PSE | CR4_PGE | CR4_PCIDE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE
_PAGING_BITS_EFER = EFER_NXE | EFER_LME | EFER_LMA
_OWN_EXITS = frozenset({*_CR_EXITS, ExitCode.INVLPG, ExitCode.EXCP_PF, ExitCode.ICEBP, ExitCode.TASK_SWITCH})
_EVENT_KINDS = {0: EventKind.EXTERNAL, 2: EventKind.NMI, 3: EventKind.EXCEPTION, 4: EventKind.SOFTWARE}


@dataclass
class ShadowCounters:
    """What the shadow pager did (statistics; tests check the paths they mean to exercise were taken)."""

    fills: int = 0
    guest_faults: int = 0
    emulated: int = 0
    flushes: int = 0
    invlpg: int = 0
    dropped: int = 0
    mmio: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ShadowPaging:
    """The ``shadow`` paging strategy (:class:`refvmm.paging.base.PagingStrategy`; module docstring).

    The hooks below are the places a deliberately broken pager (tests/test_shadow_mutations.py)
    overrides: :meth:`flush_hardware_tlb`, :meth:`drop_hardware_entry`, :meth:`invalidate`,
    :meth:`flush`, :meth:`fill`.
    """

    name = "shadow"

    def __init__(self) -> None:
        self.guest = GuestPaging(cr0=0x10, cr3=0, cr4=0, efer=0)
        self.real = real_control(self.guest)
        self.tables: ShadowTables | None = None
        self.counters = ShadowCounters()

    # -- the PagingStrategy protocol ------------------------------------------------------------------------
    def configure(self, vm: VM) -> None:
        """Guest-visible registers from the entry state; intercepts; empty shadow tables; the real registers."""
        entry = vm.entry_control
        guest = GuestPaging(cr0=entry.cr0, cr3=entry.cr3, cr4=entry.cr4, efer=entry.efer,
                            maxphyaddr=vm.guest_model.maxphyaddr)
        # The entry PDPTE registers of a PAE guest: as its last MOV CR3 loaded them (SDM 4.4.1).
        self.guest = replace(guest, pdptes=self._load_pdptes(vm, guest))
        vmcb = vm.vmcb
        vmcb.cr2 = entry.cr2
        for code in _OWN_EXITS:
            vmcb.set_intercept(int(code))
        vmcb.np_enable = 0
        self._rebuild(vm)

    def handles(self, exitcode: int) -> bool:
        return exitcode in _OWN_EXITS

    def handle_exit(self, vm: VM, exitcode: int, info1: int, info2: int) -> Action:
        from refvmm.actions import Inject, Stop

        vm.vmcb.tlb_control = TLB_CONTROL_NOTHING  # the VMRUN that led here consumed any flush request
        if exitcode == ExitCode.EXCP_PF:
            return self.page_fault(vm, info1 & M32, info2)
        if exitcode in _CR_EXITS or exitcode == ExitCode.INVLPG:
            return self.emulate(vm)
        if exitcode == ExitCode.ICEBP:
            # INT1 retires and raises #DB as a trap (SDM Vol. 2A INT1): inject it with RIP already past INT1, so
            # that a shadow miss during its delivery re-injects it with the right return address.
            return Inject(Vector.DB, advance=True)
        if exitcode == ExitCode.TASK_SWITCH:
            return Stop("error", "a hardware task switch under shadow paging (it would load CR3 behind the VMM)")
        return Stop("error", f"shadow paging was handed exit {exitcode:#x}")

    def guest_control(self, vm: VM) -> GuestControlRegs:
        from refvmm.paging.base import GuestControlRegs

        g = self.guest
        return GuestControlRegs(cr0=g.cr0, cr2=vm.vmcb.cr2, cr3=g.cr3, cr4=g.cr4, efer=g.efer)

    def set_guest_control(self, vm: VM, regs: GuestControlRegs) -> None:
        """New guest-visible registers (emulation changed them): CR2 to the VMCB; a paging change rebuilds."""
        vm.vmcb.cr2 = regs.cr2
        old = self.guest
        new = replace(old, cr0=regs.cr0, cr3=regs.cr3, cr4=regs.cr4, efer=regs.efer)
        if new.mode is PAE and (new.cr3 != old.cr3 or old.mode is not PAE):
            new = replace(new, pdptes=self._load_pdptes(vm, new))
        self.guest = new
        if self._paging_changed(old, new):
            self._rebuild(vm)

    def wants_msr_write(self, msr: int) -> bool:
        return msr == MSR_EFER  # the real EFER differs from the guest's (NXE, SVME, LME): reads too (refvmm.hooks)

    @property
    def guest_pdptes(self) -> tuple[int, ...]:
        """The guest's PAE PDPTE registers (loaded when its CR3/paging mode changed, SDM 4.4.1)."""
        return self.guest.pdptes

    # -- #PF: the guest's fault or a shadow miss ----------------------------------------------------------
    def page_fault(self, vm: VM, error_code: int, linear: int) -> Action:
        """A #PF intercepted while the guest ran on the shadow tables (EXITINFO1 = error code, 2 = address).

        If the fault interrupted the delivery of an event (EXITINTINFO valid, APM 15.7.2), a
        fill re-injects that event, and the guest's own #PF combines with it as on the bare
        machine (SDM Vol. 3A 6.15: #DF, or a triple fault while delivering #DF).
        """
        from refvmm.actions import Inject, Resume, Stop

        vmcb = vm.vmcb
        assert self.tables is not None
        if self.guest.mode is LEVEL5:
            return Stop("error", "5-level guest paging is not supported by the shadow pager (its tables are 4-level)")
        pending = EventInj.decode(vmcb.exitintinfo)
        acc = faulting_access(error_code, vmcb.cpl)
        ac = bool(vmcb.rflags >> 18 & 1)
        gphys = vm.memory.view()
        pkru = self._pkru(vm)
        decision = decide(gphys, self.guest, linear, acc, pkru=pkru, ac=ac)
        if isinstance(decision, Fill) and self._in_place(vm, decision) and not acc.implicit and acc.cpl < 3:
            # The hardware refused an access the explicit reading allows through this very leaf: it was an
            # implicit supervisor access (SDM 4.6: SMAP binds those whatever RFLAGS.AC says).
            decision = decide(gphys, self.guest, linear, replace(acc, implicit=True), pkru=pkru, ac=ac)
        if isinstance(decision, GuestFault):
            self.counters.guest_faults += 1
            if pending.valid:
                return self._fault_during_delivery(vm, pending, decision)
            return Inject.exception(Vector.PF, decision.error_code, cr2=linear)
        hpa = None if isinstance(decision, Emulate) else vm.memory.gpa_to_hpa(decision.gpa)
        if hpa is None:
            if pending.valid:
                return Stop("error", f"event delivery touches {linear:#x}, which no shadow leaf can map")
            if isinstance(decision, Emulate):
                self.counters.emulated += 1
            else:
                self.counters.mmio += 1  # MMIO or a hole: never mapped, the instruction is emulated on the bus
            return self.emulate(vm)
        assert isinstance(decision, Fill)
        if self._in_place(vm, decision):
            return Stop("error", f"shadow fill for {linear:#x} ({acc}) does not let the access through")
        self.fill(vm, decision, hpa)
        if pending.valid:
            if pending.type == EventType.SOFTWARE or (pending.type == EventType.EXCEPTION
                                                           and pending.vector in (Vector.BP, Vector.OF)):
                # INT n / INT3 / INTO return past themselves; the CPU gives no nRIP for an exception that
                # interrupted their delivery, so the VMM decodes the instruction (re-injection returns to nRIP).
                vmcb.nrip = self._next_rip(vm)
            return Inject(pending.vector, EventType(pending.type), pending.error_code)
        return Resume()

    def _next_rip(self, vm: VM) -> int:
        """RIP of the instruction after the guest's current one (decoded through the guest's own view)."""
        from refvmm import mmio

        st = mmio.guest_view(vm)
        st.pdptes = list(self.guest.pdptes)
        insn = SpecCPU(st).fetch_decode()
        return (st.rip + insn.length) & (M64 if st.code_bits == 64 else M32)

    def _in_place(self, vm: VM, fill: Fill) -> bool:
        """Is the leaf ``fill`` would write already there (so writing it again cannot let the access through)?"""
        assert self.tables is not None
        leaf = self.tables.lookup(fill.linear)
        return leaf is not None and leaf.rights == fill.rights and leaf.hpa == vm.memory.gpa_to_hpa(fill.gpa)

    @staticmethod
    def _fault_during_delivery(vm: VM, pending: EventInj, fault: GuestFault) -> Action:
        """The guest's #PF while delivering ``pending``: serial, #DF, or shutdown (SDM Vol. 3A 6.15)."""
        from refvmm.actions import Inject, Stop

        kind = _EVENT_KINDS.get(pending.type, EventKind.EXCEPTION)
        first = Event(pending.vector, kind, pending.error_code)
        if kind == EventKind.EXCEPTION and pending.vector == Vector.DF:
            vm.vmcb.cr2 = fault.linear  # CR2 is written even for the #PF that shuts down (SDM Figure 6-9 note)
            return Stop("shutdown", f"triple fault: #PF({fault.error_code:#x}) at {fault.linear:#x} while "
                                    "delivering #DF")
        second = Event(Vector.PF, EventKind.EXCEPTION, fault.error_code, cr2=fault.linear)
        if escalates(first, second):
            vm.vmcb.cr2 = fault.linear
            return Inject.exception(Vector.DF, 0)
        return Inject.exception(Vector.PF, fault.error_code, cr2=fault.linear)

    # -- the hooks a broken pager overrides ---------------------------------------------------------------
    def fill(self, vm: VM, fill: Fill, hpa: int) -> None:
        """Write the shadow leaf.  A present leaf being replaced (an upgrade after its own fault) needs no
        hardware flush: the #PF dropped the hardware's entry for that page (SDM 4.10.4.1)."""
        assert self.tables is not None
        self.tables.map(fill.linear, hpa, fill.rights, fill.guest_page, fill.guest_shift)
        self.counters.fills += 1

    def invalidate(self, vm: VM, linear: int) -> None:
        """Guest INVLPG: drop the shadow leaves of the guest page containing ``linear``, and their hardware
        TLB entries (INVLPGA, APM 15.16.3)."""
        assert self.tables is not None
        self.counters.invlpg += 1
        for page in self.tables.invalidate(linear):
            self.counters.dropped += 1
            self.drop_hardware_entry(vm, page)

    def flush(self, vm: VM) -> None:
        """Guest CR3 write: every shadow leaf goes (a CR3 write flushes the guest's TLB, SDM 4.10.4.1)."""
        assert self.tables is not None
        self.counters.flushes += 1
        self.tables.clear()
        self.flush_hardware_tlb(vm)

    def drop_hardware_entry(self, vm: VM, page: int) -> None:
        """INVLPGA ``page``, the guest's ASID: the hardware TLB forgets the dropped leaf (APM 15.16.3)."""
        vm.processor.tlb.invlpga(page, vm.vmcb.guest_asid)

    def flush_hardware_tlb(self, vm: VM) -> None:
        """TLB_CONTROL = flush this ASID at the next VMRUN (APM 15.16.1)."""
        vm.vmcb.tlb_control = TLB_CONTROL_ASID

    # -- emulation of the intercepted instruction -------------------------------------------------------------
    def emulate(self, vm: VM) -> Action:
        """Execute the guest instruction at RIP on the spec over the guest's view (:mod:`refvmm.mmio`), then
        apply what it did to translations: TLB events (SDM 4.10.4.1) become shadow flushes/invalidations."""
        from refvmm import mmio

        def prepare(st: MachineState) -> None:
            st.pdptes = list(self.guest.pdptes)  # the guest's PDPTE registers, not memory (SDM 4.4.1)

        return mmio.emulate_instruction(vm, prepare=prepare, absorb=lambda st: self._absorb(vm, st))

    def _absorb(self, vm: VM, st: MachineState) -> None:
        """Take an emulated instruction's paging effects: new guest registers and PDPTEs, its TLB events."""
        old = self.guest
        new = replace(old, cr0=st.cr0, cr3=st.cr3, cr4=st.cr4, efer=st.efer, pdptes=tuple(st.pdptes))
        self.guest = new
        vm.vmcb.cr2 = st.cr2
        if self._paging_changed(old, new):
            self._rebuild(vm)
            return
        for event in st.tlb_events or ():
            if event[0] in ("cr3", "cr3_keep"):
                self.flush(vm)  # one shadow root per VM: a CR3 switch always empties it
            elif event[0] == "invlpg":
                self.invalidate(vm, event[1])

    # -- real registers and the tables ------------------------------------------------------------------------
    @staticmethod
    def _paging_changed(old: GuestPaging, new: GuestPaging) -> bool:
        return bool((old.cr0 ^ new.cr0) & _PAGING_BITS_CR0 or (old.cr4 ^ new.cr4) & _PAGING_BITS_CR4
                    or (old.efer ^ new.efer) & _PAGING_BITS_EFER or old.pdptes != new.pdptes
                    or old.cr3 != new.cr3)

    def _rebuild(self, vm: VM) -> None:
        """Recompute the real registers; empty (or re-create, when the format changes) the shadow tables."""
        self.real = real = real_control(self.guest)
        vmcb = vm.vmcb
        if self.tables is not None and self.tables.mode is real.mode:
            self.flush(vm)
        else:
            if self.tables is not None:
                self.tables.release()
            alloc = vm.allocator
            self.tables = ShadowTables(vm.processor.phys, alloc.alloc, alloc.free, real.mode)
            self.counters.flushes += 1
            self.flush_hardware_tlb(vm)
        vmcb.cr0, vmcb.cr4, vmcb.efer = real.cr0, real.cr4, real.efer
        vmcb.cr3 = self.tables.root

    @staticmethod
    def _load_pdptes(vm: VM, g: GuestPaging) -> tuple[int, ...]:
        """The PDPTEs at the guest's CR3 (SDM 4.4.1; guest-physical reads), for a PAE guest."""
        if g.mode is not PAE:
            return (0, 0, 0, 0)
        base = g.cr3 & 0xFFFF_FFE0
        return tuple(vm.memory.read(base + 8 * k, 8) for k in range(4))

    @staticmethod
    def _pkru(vm: VM) -> int:
        """The guest's PKRU: SVM does not switch it, so it is the processor's (APM 15.5)."""
        return vm.processor.pkru


__all__ = [
    "ALL_RIGHTS", "Decision", "Emulate", "Fill", "GuestFault", "GuestPaging", "RealControl", "ShadowCounters",
    "ShadowLeaf", "ShadowPaging", "ShadowRights", "ShadowTables", "decide", "faulting_access", "hardware_permits",
    "real_control", "shadow_rights",
]
