"""Hooks, devices, guest memory and the CPUID policy -- the VMM's parts, tested on their own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refvmm.cpuid_policy import HYPERVISOR_LEAF, CpuidPolicy
from refvmm.devices import DebugPorts, MmioScratch, OutputLog, Uart16550
from refvmm.devices.scratch import ID_VALUE
from refvmm.guest_memory import GUEST_BASE, GuestMemory, GuestMemoryError, PageAllocator
from refvmm.hooks import VMCB_SWITCHED_MSRS, HookError, HookRegistry, PortBus, ValuePort, value_msr
from spec.cpumodel import DEFAULT_MODEL, EFER
from spec.faults import Fault
from spec.machine import flat_machine
from spec.memory import PhysicalMemory

# -- ports ---------------------------------------------------------------------------------------


def _bus() -> tuple[PortBus, Uart16550, OutputLog]:
    log = OutputLog()
    reg = HookRegistry()
    uart = Uart16550("com1", log)
    reg.hook_ports(0x3F8, 8, "com1", uart)
    reg.hook_ports(0x61, 1, "sysctl", ValuePort(0x20, writable=False))
    return PortBus(reg), uart, log


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]))
def test_unhooked_port_reads_all_ones_and_ignores_writes(port: int, size: int) -> None:
    bus, _, log = _bus()
    hooked = set(range(0x3F8, 0x400)) | {0x61}
    if any((port + k) & 0xFFFF in hooked for k in range(size)):
        return
    bus.write(port, size, 0)
    assert bus.read(port, size) == (1 << (8 * size)) - 1
    assert log.chunks == []


def test_hooked_ports_reach_their_device() -> None:
    bus, uart, log = _bus()
    for ch in b"hi":
        assert bus.read(0x3FD, 1) & 0x20  # LSR.THRE: the transmitter is always ready
        bus.write(0x3F8, 1, ch)
    assert log.text("com1") == "hi" and uart.transmitted == 2
    assert bus.read(0x61, 1) == 0x20
    bus.write(0x61, 1, 0)  # read-only value port
    assert bus.read(0x61, 1) == 0x20
    # A word access straddling a hooked and an unhooked port: bytes dispatched separately.
    assert bus.read(0x60, 2) == 0x20FF


def test_every_port_is_intercepted() -> None:
    """Resource control: the derived IOPM covers every hooked port (and, by design, all others)."""
    _, _, _ = _bus()
    reg = HookRegistry()
    reg.hook_ports(0x3F8, 8, "com1", Uart16550("com1", OutputLog()))
    assert set(reg.ports) <= set(reg.intercepted_ports())
    assert len(reg.intercepted_ports()) == 0x10000


def test_double_hook_is_refused() -> None:
    reg = HookRegistry()
    reg.hook_ports(0x3F8, 8, "com1", Uart16550("com1", OutputLog()))
    with pytest.raises(HookError, match="already hooked by com1"):
        reg.hook_ports(0x3FF, 1, "other", ValuePort(0, True))
    reg.hook_msr(0x10, value_msr("a", 0, True))
    with pytest.raises(HookError):
        reg.hook_msr(0x10, value_msr("b", 0, True))


def test_uart_registers() -> None:
    log = OutputLog()
    u = Uart16550("com1", log)
    u.io_write(0x3FB, 1, 0x80)  # DLAB
    u.io_write(0x3F8, 1, 0x01)
    assert log.chunks == [] and u.io_read(0x3F8, 1) == 0x01  # divisor latch, not transmitted
    u.io_write(0x3FB, 1, 0x03)
    u.io_write(0x3FF, 1, 0x5A)
    assert u.io_read(0x3FF, 1) == 0x5A and u.io_read(0x3FA, 1) & 1  # scratch; IIR: no interrupt
    u.io_write(0x3F8, 2, 0x4241)  # a word write is two byte writes: 'A' to THR, 'B' to IER
    assert log.text() == "A" and u.io_read(0x3F9, 1) == 0x02


def test_debug_ports() -> None:
    log = OutputLog()
    d = DebugPorts("debug", log)
    d.io_write(0xE9, 1, ord("x"))
    d.io_write(0x80, 1, 0x42)
    assert log.text("debug") == "x" and d.post_codes == [0x42]
    assert d.io_read(0xE9, 1) == 0xE9 and d.io_read(0x80, 1) == 0xFF
    assert "42" in d.summary()


# -- MSRs ------------------------------------------------------------------------------------------


def test_msr_intercepts_derived_from_hooks() -> None:
    reg = HookRegistry()
    for msr in VMCB_SWITCHED_MSRS:
        assert not reg.msr_intercepts(msr)
    for msr in (EFER, 0x10, 0x1B, 0x277, 0xC000_0103, 0xC001_1029, 0x4000_0000):
        assert reg.msr_intercepts(msr)
    reg.hook_msr(0xC000_0081, value_msr("star", 0, True))  # hooking a VMCB-switched MSR intercepts it
    assert reg.msr_intercepts(0xC000_0081)


def test_msr_hooks_read_write_and_read_only() -> None:
    reg = HookRegistry()
    reg.hook_msr(0xC001_1029, value_msr("rw", 5, True))
    reg.hook_msr(0xC001_102A, value_msr("ro", 9, False))
    assert reg.msr_read(0xC001_1029) == 5
    reg.msr_write(0xC001_1029, 1 << 40)
    assert reg.msr_read(0xC001_1029) == 1 << 40
    with pytest.raises(Fault) as e:
        reg.msr_write(0xC001_102A, 0)
    assert e.value.vector == 13 and e.value.error_code == 0
    assert reg.msr_read(0xC001_102A) == 9


# -- MMIO device and guest memory -------------------------------------------------------------------


def test_mmio_scratch_registers() -> None:
    d = MmioScratch("s", OutputLog())
    assert d.mmio_read(0, 4) == ID_VALUE
    assert [d.mmio_read(8, 8) for _ in range(3)] == [0, 1, 2]  # the counter counts reads
    d.mmio_write(0x10, 8, 0x1122334455667788)
    assert d.mmio_read(0x12, 2) == 0x5566
    d.mmio_write(0, 4, 0)  # ID is read-only
    assert d.mmio_read(0, 4) == ID_VALUE
    assert d.mmio_read(0x800, 4) == 0


def test_guest_memory_layout() -> None:
    phys = PhysicalMemory()
    mem = GuestMemory(phys)
    mem.add_ram(0, 0x4000)
    mem.add_ram(0x10000, 0x1000)
    dev = MmioScratch("s", OutputLog())
    mem.add_mmio(0x20000, 0x1000, "s", dev)
    assert mem.gpa_to_hpa(0x1234) == GUEST_BASE + 0x1234
    assert mem.gpa_to_hpa(0x20000) is None and mem.gpa_to_hpa(0x30000) is None
    assert [(r.gpa, r.size) for r in mem.regions] == [(0, 0x4000), (0x10000, 0x1000)]
    mem.write(0x2FFE, 4, 0xAABBCCDD)  # crosses into the next RAM page
    assert phys.read(GUEST_BASE + 0x2FFE, 4) == 0xAABBCCDD
    mem.write(0x3FFE, 4, 0xAABBCCDD)  # crosses into a hole: those bytes are dropped, and read as all ones
    assert mem.read(0x3FFE, 4) == 0xFFFFCCDD
    assert mem.read(0x5000, 4) == 0xFFFF_FFFF  # a hole reads as an empty bus
    mem.write(0x5000, 4, 0)
    assert mem.read(0x20000, 4) == ID_VALUE  # MMIO reaches the device
    view = mem.view()
    view.write(0x100, 2, 0xBEEF)  # the view shares the RAM pages
    assert mem.read(0x100, 2) == 0xBEEF
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_mmio(0x3000, 0x1000, "x", dev)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_ram(0x20000, 0x1000)
    with pytest.raises(GuestMemoryError, match="aligned"):
        mem.add_ram(0x100, 0x1000)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=20))
def test_allocator_never_hands_out_guest_ram(counts: list[int]) -> None:
    phys = PhysicalMemory()
    mem = GuestMemory(phys)
    mem.add_ram(0, 0x10000)
    alloc = PageAllocator(phys)
    seen: set[int] = set()
    for n in counts:
        hpa = alloc.alloc(n)
        pages = {hpa + 0x1000 * k for k in range(n)}
        assert not pages & seen
        seen |= pages
        for p in pages:
            assert not mem.host_owned(p) and p < GUEST_BASE and phys.read(p, 8) == 0
    one = next(iter(seen))
    alloc.free(one)
    assert alloc.alloc() == one


# -- CPUID policy ---------------------------------------------------------------------------------


def test_cpuid_policy_bits() -> None:
    p = CpuidPolicy()
    s = flat_machine("long64")
    assert p.leaf(s, 1, 0)[2] >> 31 & 1  # hypervisor present
    assert not DEFAULT_MODEL.leaves[(1, 0)][2] >> 31 & 1  # ... which the bare model does not say
    assert not p.leaf(s, 0x8000_0001, 0)[2] >> 2 & 1  # SVM hidden
    assert not p.leaf(s, 1, 0)[3] >> 9 & 1 and not p.leaf(s, 0x8000_0001, 0)[3] >> 9 & 1  # APIC hidden, both leaves
    assert not p.leaf(s, 7, 0)[2] >> 3 & 1 and not p.leaf(s, 7, 0)[2] >> 16 & 1  # PKU, LA57 hidden
    a, b, c, d = p.leaf(s, HYPERVISOR_LEAF, 0)
    assert a >= HYPERVISOR_LEAF + 1
    assert b.to_bytes(4, "little") + c.to_bytes(4, "little") + d.to_bytes(4, "little") == b"refvmm\0\0\0\0\0\0"
    # hiding a feature hides it everywhere: CR4 bits and MSRs of the guest model
    assert not p.model.cr4_allowed & (1 << 22) and not p.model.cr4_allowed & (1 << 12)
    assert 0x1B not in p.model.msr_reserved
    # the rest is the bare model's: SYSCALL survives hiding the leaf-1 EDX bits AMD mirrors
    assert p.leaf(s, 0x8000_0001, 0)[3] >> 11 & 1 and p.has("nx") and p.has("lm")


def test_cpuid_policy_transparent_and_overrides() -> None:
    s = flat_machine("prot32")
    p = CpuidPolicy(hide=set(), hypervisor_bit=False)
    from spec.isa.cpuid import cpuid_leaf

    for leaf in (0, 1, 7, 0x8000_0000, 0x8000_0001, 0x8000_0008, HYPERVISOR_LEAF):
        assert p.leaf(s, leaf, 0) == cpuid_leaf(s, leaf, 0)
    p.override(0x4000_0010, 0, (1, 2, 3, 4))
    assert p.leaf(s, 0x4000_0010, 0) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown CPUID"):
        CpuidPolicy(hide={"warp"})
