"""Nested paging: a guest's physical memory seen through the VMM's nested page tables (AMD APM Vol. 2 15.25).

With NP_ENABLE = 1 in the VMCB, every address the guest calls physical is a
*guest-physical* address (gPA), translated by a second page walk -- the nested
walk, rooted at nCR3 -- into a host (system) physical address (hPA).  That is
the two-dimensional walk of APM 15.25.5: the guest's own walk reads its page
tables at guest-physical addresses, so each guest page-table read and each
accessed/dirty update of a guest entry is itself translated by the nested
tables, and so is the final guest-physical address of the access.

:class:`NestedMemory` is that guest-physical address space: it has the
interface of :class:`spec.memory.PhysicalMemory` (``read``/``write``/``save``/
``restore``/...), and translates every access through the nested tables over
the host's :class:`~spec.memory.PhysicalMemory`.  The nested walk is the
walker of :mod:`spec.paging`, run in the *host's* paging mode (4-level for
our host) with the host's EFER.NXE and CR4 paging bits (APM 15.25.5):

* every nested access is a **user-mode** access (APM 15.25.5: the U/S bit of
  each nested entry must be 1, and SMEP/SMAP/protection keys -- supervisor or
  user-page policies of the host -- never apply; CR0.WP is irrelevant to user
  writes);
* the **final** translation of an access has the access's kind (read, write,
  instruction fetch: a fetch needs XD = 0 in the nested entries when the
  host's EFER.NXE = 1);
* **guest page-table accesses** -- the reads of guest entries, the A/D updates
  of guest entries, and loads of a PAE guest's PDPTEs -- are treated as user
  *writes* at the nested level (APM 15.25.5: a guest page-table walk may update
  A/D bits, so the nested tables must map guest page tables writable; the
  nested entries get their D bit);
* the nested walk sets A (and D for a write) in the nested entries, exactly as
  the host walker does (SDM 4.8 / APM 5.4.2).

A failed nested translation raises :class:`NestedPageFault` -- #VMEXIT(NPF),
exit code 0x400 (APM 15.25.6) -- with EXITINFO1 = the #PF-style error code of
the nested walk: P (bit 0: the nested entry was present), RW (bit 1: the nested
access was a write -- always for guest page-table accesses), US (bit 2: always
1), RSV (bit 3: reserved bit in a nested entry), ID (bit 4: code fetch, with
host NXE) plus bit 32 (the fault happened translating the final guest-physical
address) or bit 33 (it happened translating a guest page-table access); and
EXITINFO2 = the faulting guest-physical address.  Fault order (APM 15.25.6):
the guest walk runs level by level, so a nested fault on a guest table comes
before a guest #PF found at a later level; a guest #PF comes before the final
translation (the guest handles it; the VMM never sees it); a nested fault on
the final address comes last.

PAE guests (SDM 4.4.1; the VMCB holds no PDPTEs): the four PDPTE registers are loaded
from guest CR3 through the nested tables -- at VMRUN (:func:`load_guest_pdptes`,
called by :func:`attach_guest_memory`) and whenever a guest MOV CR3/CR0/CR4
that executes in hardware reloads them (:func:`spec.isa.system.load_pdptes`
reads through the MMU's ``tables`` view).  At VMRUN the values are taken as
they are (a reserved bit shows up as #PF with RSVD when the guest uses the
entry); a MOV CR3 keeps its #GP check.

Nested translations are cached in the hardware TLB's nested half
(:attr:`spec.tlb.ModelTLB.nested`, see :mod:`spec.tlb`), tagged with the
guest's ASID; only TLB_CONTROL flushes them.

:func:`attach_guest_memory` / :func:`detach_guest_memory` put a guest
:class:`~spec.state.MachineState` on its memory for the run between VMRUN
and #VMEXIT: a :class:`~spec.mmu.GuestMMU` using the TLB of the ASID, over
host memory (no nested paging) or a :class:`NestedMemory`, and the TLB events
of the guest's instructions wired to the TLB.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from spec.domain.concrete import CONCRETE
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.mmu import MMU, GuestMMU
from spec.paging import (
    CR4_PGE,
    CR4_PKE,
    CR4_SMAP,
    CR4_SMEP,
    PAE,
    Access,
    PagingControl,
    PagingMode,
    paging_mode,
    walk,
)
from spec.svm.exitcodes import NPF_FINAL_TRANSLATION, NPF_GUEST_PAGE_TABLE, ExitCode
from spec.svm.intercepts import VMExit
from spec.tlb import CR4_PCIDE, HardwareTLBEvents, ModelTLB

if TYPE_CHECKING:
    from spec.state import MachineState

# Host CR4 bits that do not shape the nested walk: supervisor policies (SMEP, SMAP), protection keys
# (nested accesses are not subject to PKRU), and TLB tagging (nested translations are never global,
# their tag is the ASID, not a PCID).
_NOT_NESTED_CR4 = CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PGE | CR4_PCIDE


class NestedPageFault(VMExit):
    """#VMEXIT(NPF): EXITINFO1 = ``error_code`` (P/RW/US/RSV/ID + bit 32 or 33), EXITINFO2 = ``gpa`` (APM 15.25.6)."""

    def __init__(self, error_code: int, gpa: int) -> None:
        super().__init__(ExitCode.NPF, error_code, gpa)
        self.error_code = error_code
        self.gpa = gpa

    def __str__(self) -> str:
        where = "guest page-table access" if self.error_code & NPF_GUEST_PAGE_TABLE else "final translation"
        return f"#NPF at guest-physical {self.gpa:#x}, error code {self.error_code:#x} ({where})"


def nested_control(host_ctl: PagingControl, ncr3: int) -> PagingControl:
    """The paging control of the nested walk: the host's mode bits, root nCR3 (APM 15.25.5)."""
    return PagingControl(cr0=host_ctl.cr0, cr3=ncr3, cr4=host_ctl.cr4 & ~_NOT_NESTED_CR4, efer=host_ctl.efer,
                         maxphyaddr=host_ctl.maxphyaddr)


class _GuestTableAccess:
    """The guest walker's view of guest-physical memory: page-table accesses (nested user writes, bit 33)."""

    def __init__(self, nested: NestedMemory) -> None:
        self.nested = nested

    def read(self, gpa: int, n: int) -> int:
        nm = self.nested
        return nm.host.read(nm.translate(gpa, AccessKind.WRITE, NPF_GUEST_PAGE_TABLE), n)

    def write(self, gpa: int, n: int, value: int) -> None:
        nm = self.nested
        nm.host.write(nm.translate(gpa, AccessKind.WRITE, NPF_GUEST_PAGE_TABLE), n, value)


class NestedMemory:
    """Guest-physical memory: host physical memory ``host`` through the nested tables at ``ncr3``.

    ``host_ctl`` is the host's paging control at VMRUN (its CR0/CR4/EFER and
    MAXPHYADDR select the nested paging mode; its CR3 is not used).  ``tlb``
    (optional) is the processor's TLB: nested translations are cached in
    ``tlb.nested`` under ``asid``.  Plain ``read``/``write``/``save`` are the
    *final* guest-physical accesses of the guest's instructions; ``tables`` is
    the view the guest's page walk uses.
    """

    def __init__(self, host: PhysicalMemory, ncr3: int, host_ctl: PagingControl, tlb: ModelTLB | None = None,
                 asid: int = 1) -> None:
        mode = paging_mode(host_ctl.cr0, host_ctl.cr4, host_ctl.efer)
        if mode is None:
            raise ValueError("nested paging needs host paging enabled (host CR0.PG = 1)")
        self.host = host
        self.ncr3 = ncr3
        self.host_ctl = host_ctl
        self.mode: PagingMode = mode
        self.ctl = nested_control(host_ctl, ncr3)
        self.tlb = tlb
        self.asid = asid
        self.tables = _GuestTableAccess(self)
        # Guest-physical addresses the nested walk can index: its linear width (48 bits for 4-level).
        self.limit = 1 << (mode.index_shift(mode.levels) + mode.index_bits[-1])

    # -- translation ---------------------------------------------------------------------------------
    def _pae_control(self) -> PagingControl:
        """A PAE host: the nested PDPTEs are read from nCR3 at each walk."""
        base = self.ncr3 & 0xFFFF_FFE0
        return replace(self.ctl, pdptes=tuple(self.host.read(base + 8 * k, 8) for k in range(4)))

    def translate(self, gpa: int, kind: AccessKind, origin: int = NPF_FINAL_TRANSLATION) -> int:
        """The host physical address of ``gpa`` for a nested access of ``kind`` (always user-level).

        ``origin`` is the EXITINFO1 bit a fault carries: :data:`NPF_FINAL_TRANSLATION`
        or :data:`NPF_GUEST_PAGE_TABLE`.  Raises :class:`NestedPageFault`.
        """
        acc = Access(kind, 3)
        if gpa >= self.limit:  # beyond what any nested entry can map: no translation (not present)
            code = 4 | (2 if kind == AccessKind.WRITE else 0)
            raise NestedPageFault(code | origin, gpa)
        ctl = self.ctl if self.mode is not PAE else self._pae_control()
        tlb = self.tlb
        if tlb is not None:
            nested = tlb.nested
            if nested.asid != self.asid:
                tlb.switch_asid(self.asid)
            t = nested.translate(CONCRETE, self.host, self.mode, ctl, gpa, acc)
            fault, hpa = t.fault, t.phys
        else:
            w = walk(CONCRETE, self.host, self.mode, ctl, gpa, acc)
            fault, hpa = w.fault, w.phys
        if fault is not None:
            raise NestedPageFault(fault | origin, gpa)
        return hpa  # type: ignore[no-any-return]

    def check_final(self, gpa: int, kind: AccessKind) -> None:
        """Translate the final guest-physical address of an access of ``kind`` (the MMU calls this).

        A read needs no separate check: the ``read`` that follows translates it
        with the same kind at once.  A fetch is checked as a fetch (NX), a write
        here so that both pages of a page-crossing write are checked before
        either is written."""
        if kind != AccessKind.READ:
            self.translate(gpa, kind)

    # -- the PhysicalMemory interface (final accesses) ---------------------------------------------------
    def read(self, gpa: int, n: int) -> int:
        off = gpa & (PAGE - 1)
        if off + n > PAGE:
            lo = PAGE - off
            return self.read(gpa, lo) | (self.read(gpa + lo, n - lo) << (8 * lo))
        return self.host.read(self.translate(gpa, AccessKind.READ), n)

    def write(self, gpa: int, n: int, value: int) -> None:
        off = gpa & (PAGE - 1)
        if off + n > PAGE:  # both pages are translated before either is written
            lo = PAGE - off
            h0 = self.translate(gpa, AccessKind.WRITE)
            h1 = self.translate(gpa + lo, AccessKind.WRITE)
            self.host.write(h0, lo, value & ((1 << (8 * lo)) - 1))
            self.host.write(h1, n - lo, value >> (8 * lo))
            return
        self.host.write(self.translate(gpa, AccessKind.WRITE), n, value)

    def save(self, gpa: int, n: int) -> tuple[int, bytes] | None:
        """The undo record of a write (of host memory: ``restore`` needs no translation)."""
        return self.host.save(self.translate(gpa, AccessKind.WRITE), n)

    def restore(self, saved: tuple[int, bytes] | None) -> None:
        self.host.restore(saved)

    def read_bytes(self, gpa: int, n: int) -> bytes:
        return self.read(gpa, n).to_bytes(n, "little") if n else b""

    def write_bytes(self, gpa: int, data: bytes) -> None:
        if data:
            self.write(gpa, len(data), int.from_bytes(data, "little"))

    def copy(self) -> NestedMemory:
        """The same view over a copy of host memory (no TLB: a copy is a checkpoint, not a processor)."""
        return NestedMemory(self.host.copy(), self.ncr3, self.host_ctl, None, self.asid)


# -- a guest on its memory: VMRUN .. #VMEXIT ---------------------------------------------------------------

def load_guest_pdptes(state: MachineState) -> None:
    """Load a PAE guest's PDPTE registers from its CR3 (through the nested tables with nested paging).

    A no-op unless the guest uses PAE paging.  The values are loaded as they are;
    an NPF on the PDPT raises :class:`NestedPageFault` (bit 33).
    """
    if paging_mode(state.cr0, state.cr4, state.efer) is not PAE:
        return
    tables: Any = getattr(state.mem, "tables", state.mem.phys)
    base = state.cr3 & 0xFFFF_FFE0
    state.pdptes = [tables.read(base + 8 * k, 8) for k in range(4)]


def attach_guest_memory(state: MachineState, host_phys: PhysicalMemory, *, np_enable: bool, ncr3: int,
                        host_ctl: PagingControl, tlb: ModelTLB | None, asid: int) -> GuestMMU:
    """Put ``state`` (a guest whose control registers are loaded) on its memory for a run in guest mode.

    ``state.mem`` becomes a :class:`~spec.mmu.GuestMMU` translating through
    ``tlb`` under ``asid`` (the TLB is switched to it), over ``host_phys``
    (``np_enable`` false: the guest's CR3 is a host-physical table, e.g. a
    shadow table) or a :class:`NestedMemory` rooted at ``ncr3``.  The guest's
    TLB events (MOV CR3, INVLPG, CR0/CR4/EFER writes) go to ``tlb``; a list that
    was recording ``state.tlb_events`` keeps receiving them.  A PAE guest's
    PDPTEs are loaded (:func:`load_guest_pdptes`; may raise :class:`NestedPageFault`).
    """
    phys: Any = NestedMemory(host_phys, ncr3, host_ctl, tlb, asid) if np_enable else host_phys
    mmu = GuestMMU(state.D, phys, tlb=tlb, asid=asid)
    mmu.state = state
    state.mem = mmu
    previous = state.tlb_events
    if isinstance(previous, HardwareTLBEvents):
        previous = previous.forward
    if tlb is not None:
        tlb.switch_asid(asid)
        state.tlb_events = HardwareTLBEvents(state, tlb, previous)  # type: ignore[assignment]
    else:
        state.tlb_events = previous
    load_guest_pdptes(state)
    return mmu


def detach_guest_memory(state: MachineState) -> None:
    """#VMEXIT: back to a plain MMU over host memory; the TLB returns to ASID 0 (the host); nothing is flushed."""
    mem = state.mem
    phys: Any = mem.phys
    host = phys.host if isinstance(phys, NestedMemory) else phys
    tlb = getattr(mem, "tlb", None)
    if tlb is not None:
        tlb.switch_asid(0)
    events = state.tlb_events
    if isinstance(events, HardwareTLBEvents):
        state.tlb_events = events.forward
    plain = MMU(state.D, host)
    plain.state = state
    state.mem = plain


__all__ = ["NestedMemory", "NestedPageFault", "attach_guest_memory", "detach_guest_memory", "load_guest_pdptes",
           "nested_control"]
