"""Guest memory: where a VM's guest-physical address space lives in host physical memory.

The SVM processor has one host physical memory (:class:`spec.memory.PhysicalMemory`).
A VM carves it up as follows (one VM per processor):

=====================================  =================================================
host physical range                    contents
=====================================  =================================================
``0 .. VMM_LIMIT``                     VMM structures: the VMCB, IOPM (12 KiB), MSRPM
                                       (8 KiB), shadow / nested page tables -- pages handed
                                       out by :class:`PageAllocator`, never guest RAM
``GUEST_BASE + gpa``                   guest RAM page ``gpa`` (the region map below)
=====================================  =================================================

Guest-physical address space (page granular): a page is *RAM* (backed by the host page
at ``GUEST_BASE + gpa``), *MMIO* (inside a region bound to a device, see
:mod:`refvmm.mmio`), or a *hole* (neither).  Holes behave as an empty bus: reads return
all ones, writes are dropped -- exactly what the bare spec's :class:`spec.memory.OpenBus`
does for an address no page backs, so a guest that probes a hole sees the same thing on
the VMM as on the bare machine.  Neither strategy maps MMIO or holes: the guest's access
exits (shadow #PF / nested #NPF) and the VMM emulates the instruction against this map.

:meth:`GuestMemory.view` is the guest's own view of its physical memory: a
:class:`PhysicalMemory` whose RAM pages are the *same* bytearrays as the host pages
(no copy: writes through the view land in guest RAM) and whose bus is the MMIO map.
The spec CPU runs on it when the VMM emulates a guest instruction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from spec.memory import PAGE, PAGE_SHIFT, PhysicalMemory

GUEST_BASE = 0x1_0000_0000
"""Host physical address of guest-physical address 0."""

GUEST_LIMIT = 1 << 40
"""Largest guest-physical address space a VM may have (1 TiB; host addresses stay below 2^41)."""

VMM_BASE = 0x10_0000
"""First page the VMM's page allocator hands out (the first MiB of host memory stays unused)."""

VMM_LIMIT = GUEST_BASE
"""The allocator never crosses into guest RAM."""


class GuestMemoryError(ValueError):
    """A guest-memory layout error (overlap, misalignment, allocator exhausted)."""


class MmioHandler(Protocol):
    """A device behind an MMIO region: ``offset`` is relative to the region's base."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RamRegion:
    """A contiguous run of guest RAM: guest-physical ``gpa .. gpa+size-1`` at host ``hpa``."""

    gpa: int
    size: int

    @property
    def hpa(self) -> int:
        return GUEST_BASE + self.gpa

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True, slots=True)
class MmioRegion:
    """Guest-physical ``gpa .. gpa+size-1`` decoded by ``handler`` (a device), named ``name``."""

    gpa: int
    size: int
    name: str
    handler: MmioHandler

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.end


class GuestBus:
    """The guest-physical bus for addresses no RAM page backs: MMIO regions, else an empty bus.

    Accesses are dispatched to the region containing the first byte; an access that runs
    past a region's end is split so that each device sees only its own bytes.
    """

    def __init__(self) -> None:
        self.regions: list[MmioRegion] = []
        self.accesses = 0  # MMIO accesses that reached a device (statistics)

    def find(self, gpa: int) -> MmioRegion | None:
        for r in self.regions:
            if r.contains(gpa):
                return r
        return None

    def read(self, addr: int, n: int) -> int:
        r = self.find(addr)
        if r is None:
            nxt = min((x.gpa for x in self.regions if addr < x.gpa < addr + n), default=None)
            if nxt is None:
                return (1 << (8 * n)) - 1  # empty bus: all ones
            lo = nxt - addr
            return self.read(addr, lo) | self.read(nxt, n - lo) << (8 * lo)
        if addr + n > r.end:
            lo = r.end - addr
            return self.read(addr, lo) | self.read(r.end, n - lo) << (8 * lo)
        self.accesses += 1
        return r.handler.mmio_read(addr - r.gpa, n) & ((1 << (8 * n)) - 1)

    def write(self, addr: int, n: int, value: int) -> None:
        value &= (1 << (8 * n)) - 1
        r = self.find(addr)
        if r is None:
            nxt = min((x.gpa for x in self.regions if addr < x.gpa < addr + n), default=None)
            if nxt is not None:
                lo = nxt - addr
                self.write(nxt, n - lo, value >> (8 * lo))
            return  # the bytes on the empty bus are dropped
        if addr + n > r.end:
            lo = r.end - addr
            self.write(addr, lo, value & ((1 << (8 * lo)) - 1))
            self.write(r.end, n - lo, value >> (8 * lo))
            return
        self.accesses += 1
        r.handler.mmio_write(addr - r.gpa, n, value)


class GuestMemory:
    """A VM's guest-physical memory map over host physical memory ``phys`` (see the module docstring)."""

    def __init__(self, phys: PhysicalMemory) -> None:
        self.phys = phys
        self.bus = GuestBus()
        self._ram: set[int] = set()  # guest page numbers backed by RAM

    # -- layout ------------------------------------------------------------------------
    def add_ram(self, gpa: int, size: int) -> RamRegion:
        """Back ``gpa .. gpa+size-1`` (page aligned) with zeroed RAM; existing RAM pages are kept."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} is not page aligned")
        if gpa + size > GUEST_LIMIT:
            raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} exceeds the guest-physical limit {GUEST_LIMIT:#x}")
        for r in self.bus.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(f"RAM region {gpa:#x}+{size:#x} overlaps MMIO region {r.name!r}")
        for gpn in range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT):
            if gpn not in self._ram:
                self._ram.add(gpn)
                self.phys.map_page(GUEST_BASE + (gpn << PAGE_SHIFT))
        return RamRegion(gpa, size)

    def add_ram_page(self, gpa: int, data: bytes = b"") -> None:
        """Back the page containing ``gpa`` with RAM holding ``data`` (a snapshot page)."""
        self.add_ram(gpa & ~(PAGE - 1), PAGE)
        if data:
            self.phys.write_bytes(GUEST_BASE + (gpa & ~(PAGE - 1)), bytes(data[:PAGE]))

    def add_mmio(self, gpa: int, size: int, name: str, handler: MmioHandler) -> MmioRegion:
        """Bind guest-physical ``gpa .. gpa+size-1`` (page aligned, not RAM, not another region) to a device."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise GuestMemoryError(f"MMIO region {name!r} at {gpa:#x}+{size:#x} is not page aligned")
        if gpa + size > GUEST_LIMIT:
            raise GuestMemoryError(f"MMIO region {name!r} exceeds the guest-physical limit {GUEST_LIMIT:#x}")
        for gpn in range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT):
            if gpn in self._ram:
                raise GuestMemoryError(f"MMIO region {name!r} at {gpa:#x}+{size:#x} overlaps guest RAM")
        for r in self.bus.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(f"MMIO region {name!r} overlaps MMIO region {r.name!r}")
        region = MmioRegion(gpa, size, name, handler)
        self.bus.regions.append(region)
        return region

    # -- queries -----------------------------------------------------------------------
    def is_ram(self, gpa: int) -> bool:
        return (gpa >> PAGE_SHIFT) in self._ram

    def gpa_to_hpa(self, gpa: int) -> int | None:
        """The host physical address of guest RAM byte ``gpa``, or ``None`` (MMIO or hole)."""
        if (gpa >> PAGE_SHIFT) in self._ram:
            return GUEST_BASE + gpa
        return None

    def mmio_region(self, gpa: int) -> MmioRegion | None:
        return self.bus.find(gpa)

    def ram_pages(self) -> list[int]:
        """Guest-physical addresses of every RAM page, ascending."""
        return [gpn << PAGE_SHIFT for gpn in sorted(self._ram)]

    def host_pages(self) -> list[int]:
        """Host physical addresses of every guest RAM page, ascending."""
        return [GUEST_BASE + (gpn << PAGE_SHIFT) for gpn in sorted(self._ram)]

    @property
    def regions(self) -> list[RamRegion]:
        """Guest RAM as maximal contiguous runs, ascending."""
        out: list[RamRegion] = []
        for gpn in sorted(self._ram):
            gpa = gpn << PAGE_SHIFT
            if out and out[-1].end == gpa:
                out[-1] = RamRegion(out[-1].gpa, out[-1].size + PAGE)
            else:
                out.append(RamRegion(gpa, PAGE))
        return out

    @property
    def mmio_regions(self) -> list[MmioRegion]:
        return list(self.bus.regions)

    @property
    def ram_size(self) -> int:
        return len(self._ram) * PAGE

    def host_owned(self, hpa: int) -> bool:
        """True if host page ``hpa`` is guest RAM (the VMM's own structures never are)."""
        return hpa >= GUEST_BASE and ((hpa - GUEST_BASE) >> PAGE_SHIFT) in self._ram

    # -- access by guest-physical address --------------------------------------------
    def read(self, gpa: int, n: int) -> int:
        """Read ``n`` bytes at ``gpa`` as the guest would (RAM, device, or all ones)."""
        off = gpa & (PAGE - 1)
        if off + n > PAGE:
            lo = PAGE - off
            return self.read(gpa, lo) | self.read(gpa + lo, n - lo) << (8 * lo)
        if (gpa >> PAGE_SHIFT) in self._ram:
            return self.phys.read(GUEST_BASE + gpa, n)
        return self.bus.read(gpa, n)

    def write(self, gpa: int, n: int, value: int) -> None:
        """Write ``n`` bytes at ``gpa`` as the guest would (RAM, device, or dropped)."""
        off = gpa & (PAGE - 1)
        if off + n > PAGE:
            lo = PAGE - off
            self.write(gpa, lo, value & ((1 << (8 * lo)) - 1))
            self.write(gpa + lo, n - lo, value >> (8 * lo))
            return
        if (gpa >> PAGE_SHIFT) in self._ram:
            self.phys.write(GUEST_BASE + gpa, n, value)
        else:
            self.bus.write(gpa, n, value)

    def read_bytes(self, gpa: int, n: int) -> bytes:
        return self.read(gpa, n).to_bytes(n, "little") if n else b""

    def write_bytes(self, gpa: int, data: bytes) -> None:
        if data:
            self.write(gpa, len(data), int.from_bytes(data, "little"))

    def pages(self) -> Iterator[tuple[int, bytearray]]:
        """``(gpa, page bytes)`` for every RAM page (the live host bytearrays)."""
        host = self.phys.pages
        for gpn in sorted(self._ram):
            yield gpn << PAGE_SHIFT, host[(GUEST_BASE >> PAGE_SHIFT) + gpn]

    def view(self) -> PhysicalMemory:
        """The guest-physical address space as a :class:`PhysicalMemory` sharing the RAM pages."""
        v = PhysicalMemory(self.bus)
        host = self.phys.pages
        base = GUEST_BASE >> PAGE_SHIFT
        v.pages = {gpn: host[base + gpn] for gpn in self._ram}
        return v


class PageAllocator:
    """Hands out zeroed 4 KiB host pages for VMM structures, from ``VMM_BASE`` up to ``VMM_LIMIT``.

    Freed pages are reused (most recently freed first).  Allocated pages are RAM in the
    host physical memory and never overlap guest RAM (which starts at ``GUEST_BASE``).
    """

    def __init__(self, phys: PhysicalMemory, base: int = VMM_BASE, limit: int = VMM_LIMIT) -> None:
        self.phys = phys
        self._next = base
        self._limit = limit
        self._free: list[int] = []
        self.allocated: set[int] = set()

    def alloc(self, count: int = 1) -> int:
        """Host physical address of ``count`` contiguous zeroed pages."""
        if count == 1 and self._free:
            hpa = self._free.pop()
            self.phys.map_page(hpa)
            self.allocated.add(hpa)
            return hpa
        hpa = self._next
        if hpa + count * PAGE > self._limit:
            raise GuestMemoryError("VMM page allocator exhausted")
        self._next += count * PAGE
        for k in range(count):
            self.phys.map_page(hpa + k * PAGE)
            self.allocated.add(hpa + k * PAGE)
        return hpa

    def free(self, hpa: int) -> None:
        """Return one page; it is unmapped from host memory (a stale reference then reads all ones)."""
        if hpa not in self.allocated:
            raise GuestMemoryError(f"freeing page {hpa:#x} that was not allocated")
        self.allocated.discard(hpa)
        self.phys.pages.pop(hpa >> PAGE_SHIFT, None)
        self._free.append(hpa)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.allocated))


__all__ = ["GUEST_BASE", "VMM_BASE", "VMM_LIMIT", "GuestBus", "GuestMemory", "GuestMemoryError", "MmioHandler",
           "MmioRegion", "PageAllocator", "RamRegion"]
