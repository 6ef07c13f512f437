"""Nested paging: the hardware walks the guest's own tables, then the VMM's nested tables (AMD APM Vol. 2 15.25).

With NP_ENABLE = 1 the guest owns its paging completely: the VMCB's CR0/CR3/CR4/EFER
are the guest's real registers, the guest's MOV CR, INVLPG and #PF run in hardware
(no intercepts), and the guest's page tables are walked by the processor at
guest-physical addresses.  The VMM's only job is the second dimension: *nested
tables* (rooted at nCR3, in the host's 4-level format) that translate guest-physical
to host-physical addresses (:mod:`spec.svm.nested` is the hardware side).

The nested tables are a function of the VM's memory map
(:class:`refvmm.guest_memory.GuestMemory`), built once by :func:`build_nested_tables`:

* **guest RAM only.**  Each guest RAM page maps to its host page
  (``memory.gpa_to_hpa``), user + writable + executable (nested accesses are user
  accesses, APM 15.25.5; guest page tables must be writable at the nested level since
  the walker's accesses to them are nested writes).  Nothing else is mapped: never a
  VMM page (VMCB, IOPM, MSRPM, the nested tables themselves) -- host isolation, proved
  with Z3 in ``tests/test_nested_isolation.py``.
* **2 MiB pages where a region allows.**  A 2 MiB-aligned guest-physical block that is
  RAM throughout and whose host pages are one aligned 2 MiB block is one PDE with
  PS = 1; the rest are 4 KiB PTEs.
* **MMIO regions and holes are left not present**, so a guest access exits with #NPF.

#NPF handling (:meth:`NestedPaging.handle_exit`), by the faulting guest-physical address
(EXITINFO2), whether it was the final translation (EXITINFO1 bit 32) or a guest
page-table access (bit 33):

* **MMIO region** -- the faulting instruction is emulated by the spec over the
  guest's view (``vm.emulate()``, :mod:`refvmm.mmio`): its access reaches the device.
* **hole** (neither RAM nor MMIO) -- a guest access to nothing.  Chosen behaviour:
  the same emulation, over the guest's view, whose bus answers a hole like an empty
  bus (reads all ones, writes dropped), exactly what the bare machine's
  :class:`spec.memory.OpenBus` does; so a guest probing a hole sees the same values on
  the VMM as on the bare spec.
* **guest RAM** -- impossible with intact tables (every RAM page is mapped user,
  writable, executable): the VM stops with reason "error" naming the address and the
  error code, never a guess.
* **during event delivery** (EXITINTINFO valid, APM 15.7.2: the guest's IDT, GDT,
  TSS or stack lies in MMIO or a hole) -- re-executing the instruction at RIP would be
  wrong (the event comes first) and the VMM does not emulate event delivery: the VM
  stops with reason "error" (as the shadow strategy does).

No CR3/INVLPG/#PF intercepts: the guest-visible control registers *are* the VMCB's
(EFER without SVME, which the VM owns).  TLB: the nested tables never change after
:meth:`NestedPaging.configure`, which asks for a flush of the guest's ASID
(TLB_CONTROL = 3) at the first VMRUN; a VMM-side change of the guest's paging
registers (:meth:`NestedPaging.set_guest_control`, after an emulated instruction or a
guest EFER write changed them) asks for one again, since hardware sees no MOV CR for
it.  The request is withdrawn at the next exit this strategy handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from refvmm.actions import Action, Stop
from refvmm.guest_memory import GuestMemory, PageAllocator
from refvmm.paging.base import GuestControlRegs
from spec.memory import PAGE, PhysicalMemory
from spec.paging import PS, RW, US
from spec.paging import P as PRESENT
from spec.svm.exitcodes import NPF_GUEST_PAGE_TABLE, ExitCode
from spec.svm.vmcb import EventInj
from spec.tlb import TLB_CONTROL_ASID, TLB_CONTROL_NOTHING

if TYPE_CHECKING:
    from refvmm.vm import VM

EFER_SVME = 1 << 12
LARGE = 1 << 21  # a 2 MiB nested page (PDE with PS = 1)
TABLE_FLAGS = PRESENT | RW | US  # non-leaf nested entries: the leaf decides
LEAF_FLAGS = PRESENT | RW | US  # guest RAM: readable, writable, executable, by a user-level (nested) access
LEVEL_SHIFTS = (39, 30, 21, 12)  # PML4, PDPT, PD, PT index positions (APM 5.3.3, 4-level)
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE - 1)

# Control-register bits whose change invalidates cached translations (spec.tlb: CR0.PG/WP, CR4 paging bits,
# EFER.NXE/LME); a VMM-side change of them needs a TLB flush of the guest's ASID.
CR0_TLB_BITS = (1 << 31) | (1 << 16)
CR4_TLB_BITS = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 12) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 22)
EFER_TLB_BITS = (1 << 11) | (1 << 8)


@dataclass
class NestedTables:
    """Nested page tables in host memory: the root (nCR3) and every table page (VMM pages)."""

    root: int
    pages: list[int] = field(default_factory=list)
    large_mappings: int = 0  # 2 MiB leaves
    small_mappings: int = 0  # 4 KiB leaves


class _TableWriter:
    """Allocates table pages and writes 4-level entries (APM 5.3.3) into host memory."""

    def __init__(self, phys: PhysicalMemory, allocator: PageAllocator) -> None:
        self.phys, self.allocator = phys, allocator
        self.tables = NestedTables(root=allocator.alloc())
        self.tables.pages.append(self.tables.root)

    def _next_table(self, table: int, index: int) -> int:
        """The table the entry ``index`` of ``table`` points to, allocated on first use."""
        slot = table + 8 * index
        entry = self.phys.read(slot, 8)
        if entry & PRESENT:
            return entry & ADDR_MASK
        page = self.allocator.alloc()
        self.tables.pages.append(page)
        self.phys.write(slot, 8, page | TABLE_FLAGS)
        return page

    def map(self, gpa: int, hpa: int, large: bool) -> None:
        """Map the 4 KiB (or 2 MiB) guest-physical page ``gpa`` to ``hpa``."""
        table = self.tables.root
        depth = 3 if large else 4  # PML4 -> PDPT -> PD (-> PT)
        for shift in LEVEL_SHIFTS[: depth - 1]:
            table = self._next_table(table, (gpa >> shift) & 0x1FF)
        index = (gpa >> LEVEL_SHIFTS[depth - 1]) & 0x1FF
        self.phys.write(table + 8 * index, 8, hpa | LEAF_FLAGS | (PS if large else 0))
        if large:
            self.tables.large_mappings += 1
        else:
            self.tables.small_mappings += 1


def build_nested_tables(memory: GuestMemory, allocator: PageAllocator, *, large_pages: bool = True) -> NestedTables:
    """Nested tables mapping exactly the guest RAM of ``memory`` (module docstring), in pages from ``allocator``."""
    writer = _TableWriter(memory.phys, allocator)
    ram = memory.ram_pages()
    ram_set = set(ram)
    done_large: set[int] = set()
    for gpa in ram:
        block = gpa & ~(LARGE - 1)
        if block in done_large:
            continue
        hpa = memory.gpa_to_hpa(gpa)
        assert hpa is not None
        if large_pages and _large_block(memory, ram_set, block):
            base = memory.gpa_to_hpa(block)
            assert base is not None
            writer.map(block, base, large=True)
            done_large.add(block)
            continue
        writer.map(gpa, hpa, large=False)
    return writer.tables


def _large_block(memory: GuestMemory, ram: set[int], block: int) -> bool:
    """The 2 MiB block at ``block`` is RAM throughout, backed by one aligned 2 MiB host block."""
    base = memory.gpa_to_hpa(block)
    if base is None or base & (LARGE - 1):
        return False
    for off in range(0, LARGE, PAGE):
        if block + off not in ram or memory.gpa_to_hpa(block + off) != base + off:
            return False
    return True


class NestedPaging:
    """The ``nested`` paging strategy (:class:`refvmm.paging.base.PagingStrategy`; module docstring)."""

    name = "nested"

    def __init__(self, *, large_pages: bool = True) -> None:
        self.large_pages = large_pages
        self.tables: NestedTables | None = None

    def configure(self, vm: VM) -> None:
        """Build the nested tables from the memory map; NP_ENABLE, nCR3, the guest's own control registers."""
        if self.tables is not None:
            for page in self.tables.pages:
                vm.allocator.free(page)
        self.tables = build_nested_tables(vm.memory, vm.allocator, large_pages=self.large_pages)
        v = vm.vmcb
        v.np_enable = 1
        v.n_cr3 = self.tables.root
        entry = vm.entry_control
        v.cr0, v.cr2, v.cr3, v.cr4 = entry.cr0, entry.cr2, entry.cr3, entry.cr4
        v.efer = entry.efer | EFER_SVME
        for code in (ExitCode.CR0_READ, ExitCode.CR3_READ, ExitCode.CR4_READ, ExitCode.CR0_WRITE,
                     ExitCode.CR3_WRITE, ExitCode.CR4_WRITE, ExitCode.INVLPG, ExitCode.EXCP_PF):
            v.set_intercept(int(code), False)
        v.tlb_control = TLB_CONTROL_ASID  # new tables: nothing cached for this ASID may survive (APM 15.16.1)

    def handles(self, exitcode: int) -> bool:
        return exitcode == ExitCode.NPF

    def handle_exit(self, vm: VM, exitcode: int, info1: int, info2: int) -> Action:
        """#NPF: MMIO or a hole -> emulate the instruction over the guest's view; guest RAM -> stop (a VMM bug)."""
        vm.vmcb.tlb_control = TLB_CONTROL_NOTHING  # the VMRUN that led here consumed any flush request
        gpa = info2
        if EventInj.decode(vm.vmcb.exitintinfo).valid:
            return Stop("error", f"event delivery touches guest-physical {gpa:#x} (MMIO or a hole), "
                                 "which the VMM does not emulate")
        if vm.memory.is_ram(gpa):
            where = "a guest page-table access" if info1 & NPF_GUEST_PAGE_TABLE else "the final translation"
            return Stop("error", f"#NPF on guest RAM at {gpa:#x} (error code {info1:#x}, {where}): "
                                 "the nested tables do not map guest RAM as built")
        return vm.emulate()

    def guest_control(self, vm: VM) -> GuestControlRegs:
        """The VMCB's registers are the guest's own (EFER without SVME)."""
        v = vm.vmcb
        return GuestControlRegs(cr0=v.cr0, cr2=v.cr2, cr3=v.cr3, cr4=v.cr4, efer=v.efer & ~EFER_SVME)

    def set_guest_control(self, vm: VM, regs: GuestControlRegs) -> None:
        """Load new guest registers into the VMCB; flush the ASID if a translation-relevant bit changed."""
        v = vm.vmcb
        old = self.guest_control(vm)
        v.cr0, v.cr2, v.cr3, v.cr4 = regs.cr0, regs.cr2, regs.cr3, regs.cr4
        v.efer = regs.efer | EFER_SVME
        if ((old.cr0 ^ regs.cr0) & CR0_TLB_BITS or (old.cr4 ^ regs.cr4) & CR4_TLB_BITS
                or (old.efer ^ regs.efer) & EFER_TLB_BITS or old.cr3 != regs.cr3):
            v.tlb_control = TLB_CONTROL_ASID


__all__ = ["NestedPaging", "NestedTables", "build_nested_tables"]
