"""The VMM's nested-paging strategy (refvmm/paging/nested.py; AMD APM Vol. 2 15.25).

Tables: exactly guest RAM is mapped (each page at its host page, 2 MiB pages where a
whole aligned block is RAM), nothing else -- checked page by page with the nested
walk here, proved for all gPAs in tests/test_nested_isolation.py.  VMCB: NP_ENABLE,
nCR3, the guest's own control registers, no CR/INVLPG/#PF intercepts, a TLB flush
request after building or after a VMM-side control-register change.  #NPF: MMIO and
holes are emulated (a hole reads all ones, like the bare machine's empty bus), an
#NPF on guest RAM stops the VM with an error.
"""

from __future__ import annotations

import pytest

from refvmm.config import DeviceConfig, MemoryConfig, MmioConfig, RamRegionConfig, VMConfig
from refvmm.guest_memory import GUEST_BASE, GuestMemory, PageAllocator
from refvmm.paging.base import GuestControlRegs
from refvmm.paging.nested import NestedPaging, build_nested_tables
from refvmm.vm import VM, BareMachine
from spec.machine import flat_machine
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.snapshot import Snapshot
from spec.state import MachineState
from spec.svm.exitcodes import ExitCode
from spec.svm.nested import NestedMemory, NestedPageFault
from spec.tlb import TLB_CONTROL_ASID, TLB_CONTROL_NOTHING
from tests.test_nested_paging import HOST_CTL

MMIO_GPA = 0x20_0000
HOLE_GPA = 0x30_0000
EFER_SVME = 1 << 12


class NullDevice:
    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        return None


def test_tables_map_exactly_guest_ram() -> None:
    phys = PhysicalMemory()
    mem = GuestMemory(phys)
    mem.add_ram(0, 0x20_0000)  # one whole 2 MiB block
    mem.add_ram(0x20_0000 + 0x3000, 0x2000)  # two pages after a hole
    mem.add_ram(0x60_0000 - PAGE, 0x20_2000)  # crosses a block: small, large, small
    mem.add_mmio(0x20_0000, 0x1000, "dev", NullDevice())
    alloc = PageAllocator(phys)
    vmcb = alloc.alloc()
    tables = build_nested_tables(mem, alloc)
    assert tables.large_mappings == 2 and tables.small_mappings == 2 + 1 + 1
    assert vmcb not in tables.pages and all(p < GUEST_BASE for p in tables.pages)
    nm = NestedMemory(phys, tables.root, HOST_CTL)
    for gpa in range(0, 0x90_0000, PAGE):
        for kind in (AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH):
            try:
                hpa = nm.translate(gpa + 0x10, kind)
            except NestedPageFault as e:
                assert not mem.is_ram(gpa) and e.info1 & 1 == 0  # not present
                continue
            assert hpa == mem.gpa_to_hpa(gpa + 0x10)


def test_small_pages_only_when_asked() -> None:
    phys = PhysicalMemory()
    mem = GuestMemory(phys)
    mem.add_ram(0, 0x40_0000)
    tables = build_nested_tables(mem, PageAllocator(phys), large_pages=False)
    assert tables.large_mappings == 0 and tables.small_mappings == 0x400


def _config(**kw: object) -> VMConfig:
    base: dict[str, object] = {
        "paging": "nested", "memory": MemoryConfig(size=0), "budget": 10_000,
        "devices": [DeviceConfig(kind="mmio-scratch", name="scratch")],
        "mmio": [MmioConfig(gpa=MMIO_GPA, device="scratch")]}
    base.update(kw)
    return VMConfig(**base)  # type: ignore[arg-type]


def _entry(code: str) -> MachineState:
    return flat_machine("long64", bytes.fromhex(code), idt=True)


def test_configure_programs_the_vmcb() -> None:
    vm = VM(_config(), entry=_entry("f4"))
    v = vm.vmcb
    strategy = vm.paging
    assert isinstance(strategy, NestedPaging) and strategy.tables is not None
    assert v.np_enable == 1 and v.n_cr3 == strategy.tables.root
    for code in (ExitCode.CR0_READ, ExitCode.CR3_WRITE, ExitCode.CR4_WRITE, ExitCode.INVLPG, ExitCode.EXCP_PF):
        assert not v.intercepted(code)
    e = vm.entry_control
    assert (v.cr0, v.cr3, v.cr4, v.efer) == (e.cr0, e.cr3, e.cr4, e.efer | EFER_SVME)
    assert strategy.guest_control(vm) == e
    assert v.tlb_control == TLB_CONTROL_ASID
    assert strategy.handles(ExitCode.NPF) and not strategy.handles(ExitCode.CR3_WRITE)


def test_set_guest_control_requests_a_flush_when_translation_bits_change() -> None:
    vm = VM(_config(), entry=_entry("f4"))
    strategy = vm.paging
    e = vm.entry_control
    vm.vmcb.tlb_control = TLB_CONTROL_NOTHING
    strategy.set_guest_control(vm, GuestControlRegs(e.cr0 ^ 8, 0x1234, e.cr3, e.cr4, e.efer))  # CR0.TS, CR2
    assert vm.vmcb.tlb_control == TLB_CONTROL_NOTHING and vm.vmcb.cr2 == 0x1234 and vm.vmcb.cr0 == e.cr0 ^ 8
    strategy.set_guest_control(vm, GuestControlRegs(e.cr0, 0, e.cr3, e.cr4 | (1 << 7), e.efer))  # CR4.PGE
    assert vm.vmcb.tlb_control == TLB_CONTROL_ASID and vm.vmcb.efer & EFER_SVME


# mov rax, [0x300000] (hole); mov dword [0x300000], 0x1234 (dropped); mov rbx, [0x300000];
# mov dword [0x200010], 0x600d (MMIO scratch); mov ecx, [0x200010]; hlt
HOLE_AND_MMIO = ("488b042500003000c704250000300034120000488b1c2500003000c70425100020000d6000008b0c2510002000f4")


def test_holes_and_mmio_under_nested_paging_equal_the_bare_machine() -> None:
    bare = BareMachine(_config(), entry=_entry(HOLE_AND_MMIO))
    assert bare.run(100).kind == "halted"
    vm = VM(_config(), entry=_entry(HOLE_AND_MMIO))
    r = vm.run()
    assert r.reason == "halted", r.describe()
    got, want = vm.guest_snapshot().model_dump(), Snapshot.from_state(bare.state).model_dump()
    for d in (got, want):
        d.pop("undefined_flags")
        d["regs"]["rflags"] &= ~bare.state.undefined
    assert got == want
    regs = got["regs"]
    assert regs["rax"] == regs["rbx"] == (1 << 64) - 1 and regs["rcx"] == 0x600D
    assert r.stats.exits["NPF"] == 5  # every hole / MMIO access exits once (no CR/INVLPG/#PF intercepts)
    assert vm.vmcb.tlb_control == TLB_CONTROL_NOTHING  # the first #NPF withdrew configure's flush request


def test_npf_on_guest_ram_stops_with_an_error() -> None:
    """A corrupted nested table (a RAM page unmapped) is a VMM bug: fail-stop, never a guess."""
    vm = VM(_config(memory=MemoryConfig(size=0, regions=[RamRegionConfig(gpa=HOLE_GPA, size=PAGE)])),
            entry=_entry(HOLE_AND_MMIO))
    strategy = vm.paging
    assert isinstance(strategy, NestedPaging) and strategy.tables is not None
    nm = NestedMemory(vm.phys, strategy.tables.root, HOST_CTL)
    slot_table = strategy.tables.root
    for shift in (39, 30, 21):  # find HOLE_GPA's PTE and clear it
        slot_table = vm.phys.read(slot_table + 8 * ((HOLE_GPA >> shift) & 0x1FF), 8) & 0xF_FFFF_FFFF_F000
    vm.phys.write(slot_table + 8 * ((HOLE_GPA >> 12) & 0x1FF), 8, 0)
    with pytest.raises(NestedPageFault):
        nm.translate(HOLE_GPA, AccessKind.READ)
    r = vm.run()
    assert r.reason == "error" and f"#NPF on guest RAM at {HOLE_GPA:#x}" in r.detail


def test_reconfigure_frees_the_old_tables() -> None:
    vm = VM(_config(), entry=_entry("f4"))
    strategy = vm.paging
    assert isinstance(strategy, NestedPaging) and strategy.tables is not None
    old = list(strategy.tables.pages)
    strategy.configure(vm)
    assert strategy.tables.pages and sorted(strategy.tables.pages) == sorted(old)  # freed pages reused
    assert vm.vmcb.n_cr3 == strategy.tables.root


def test_npf_during_event_delivery_stops_with_an_error() -> None:
    """INT3 with the stack in a hole: the #NPF interrupts the delivery (EXITINTINFO valid); fail-stop."""
    st = _entry("ccf4")
    st.gpr[4] = HOLE_GPA + 0x10
    r = VM(_config(), entry=st).run()
    assert r.reason == "error" and "event delivery" in r.detail and r.stats.exits == {"NPF": 1}
