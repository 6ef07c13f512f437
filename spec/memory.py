"""Physical memory, and the one path every linear memory access takes.

Physical memory is RAM pages plus a *bus* for addresses no page backs (the
VMM attaches MMIO devices there; by default it is an empty bus: reads return
all ones, writes are dropped, as on a PC with nothing decoding the address).

Linear accesses go through :class:`LinearMemory`, whose ``translate`` is the
hook the system-architecture layer extends with segment checks and paging;
here linear = physical.  Accesses are split at 4 KiB page boundaries so that a
translation applies per page, as the hardware does (SDM Vol. 3A 4.1.1).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Protocol

from spec.domain.base import Domain

PAGE = 4096
PAGE_SHIFT = 12


class AccessKind(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


class Bus(Protocol):
    """Something that decodes physical addresses no RAM page backs (MMIO, open bus)."""

    def read(self, addr: int, n: int) -> int: ...

    def write(self, addr: int, n: int, value: int) -> None: ...


class OpenBus:
    """Nothing there: reads float to all ones, writes vanish."""

    def read(self, addr: int, n: int) -> int:
        return (1 << (8 * n)) - 1

    def write(self, addr: int, n: int, value: int) -> None:
        return None


class PhysicalMemory:
    """Concrete physical memory: sparse 4 KiB RAM pages plus a bus for the rest."""

    def __init__(self, bus: Bus | None = None) -> None:
        self.pages: dict[int, bytearray] = {}
        self.bus: Bus = bus or OpenBus()

    def map_page(self, addr: int, data: bytes = b"") -> bytearray:
        """Back the page containing ``addr`` with RAM (zero-filled, then ``data``)."""
        page = bytearray(PAGE)
        page[: len(data)] = data
        self.pages[addr >> PAGE_SHIFT] = page
        return page

    def read(self, addr: int, n: int) -> int:
        page = self.pages.get(addr >> PAGE_SHIFT)
        off = addr & (PAGE - 1)
        if page is not None and off + n <= PAGE:
            return int.from_bytes(page[off:off + n], "little")
        if off + n > PAGE:
            lo = PAGE - off
            return self.read(addr, lo) | (self.read(addr + lo, n - lo) << (8 * lo))
        return self.bus.read(addr, n)

    def write(self, addr: int, n: int, value: int) -> None:
        page = self.pages.get(addr >> PAGE_SHIFT)
        off = addr & (PAGE - 1)
        if page is not None and off + n <= PAGE:
            page[off:off + n] = value.to_bytes(n, "little")
            return
        if off + n > PAGE:
            lo = PAGE - off
            self.write(addr, lo, value & ((1 << (8 * lo)) - 1))
            self.write(addr + lo, n - lo, value >> (8 * lo))
            return
        self.bus.write(addr, n, value)

    def save(self, addr: int, n: int) -> tuple[int, bytes] | None:
        """What undoing a write of ``n`` bytes at ``addr`` needs (RAM only: bus writes stay done)."""
        page = self.pages.get(addr >> PAGE_SHIFT)
        off = addr & (PAGE - 1)
        if page is None or off + n > PAGE:
            return None
        return addr, bytes(page[off:off + n])

    def restore(self, saved: tuple[int, bytes] | None) -> None:
        if saved is not None:
            addr, data = saved
            off = addr & (PAGE - 1)
            self.pages[addr >> PAGE_SHIFT][off:off + len(data)] = data

    def read_bytes(self, addr: int, n: int) -> bytes:
        return self.read(addr, n).to_bytes(n, "little") if n else b""

    def write_bytes(self, addr: int, data: bytes) -> None:
        if data:
            self.write(addr, len(data), int.from_bytes(data, "little"))

    def copy(self) -> PhysicalMemory:
        m = PhysicalMemory(self.bus)
        m.pages = {k: bytearray(v) for k, v in self.pages.items()}
        return m


class SymbolicMemory:
    """Physical memory as a Z3 array from 64-bit addresses to bytes (symbolic addresses allowed)."""

    def __init__(self, name: str = "mem", array: Any = None) -> None:
        import z3

        self._z3 = z3
        self.array = array if array is not None else z3.Array(name, z3.BitVecSort(64), z3.BitVecSort(8))

    def _addr(self, addr: Any) -> Any:
        return self._z3.BitVecVal(addr, 64) if isinstance(addr, int) else addr

    def read(self, addr: Any, n: int) -> Any:
        z3 = self._z3
        a = self._addr(addr)
        parts = [z3.Select(self.array, a + k) for k in reversed(range(n))]
        return parts[0] if n == 1 else z3.Concat(*parts)

    def write(self, addr: Any, n: int, value: Any) -> None:
        z3 = self._z3
        a = self._addr(addr)
        if isinstance(value, int):
            value = z3.BitVecVal(value, 8 * n)
        arr = self.array
        for k in range(n):
            arr = z3.Store(arr, a + k, z3.Extract(8 * k + 7, 8 * k, value))
        self.array = arr

    def save(self, addr: Any, n: int) -> Any:
        return self.array

    def restore(self, saved: Any) -> None:
        self.array = saved

    def copy(self) -> SymbolicMemory:
        return SymbolicMemory(array=self.array)


class LinearMemory:
    """Linear-address accesses: translate, then access physical memory (split at pages).

    ``translate(linear, kind, user, implicit)`` returns the physical address of
    one byte range that does not cross a page; this base class is the identity
    (no paging).  :class:`spec.mmu.MMU` translates through the page walker and
    raises :class:`spec.faults.Fault` (#PF) on a translation fault.
    """

    def __init__(self, D: Domain, phys: Any) -> None:
        self.D = D
        self.phys = phys
        self.journal: list[Any] | None = None  # undo records of this instruction's writes

    def _store(self, paddr: Any, n: int, value: Any) -> None:
        if self.journal is not None:
            self.journal.append(self.phys.save(paddr, n))
        self.phys.write(paddr, n, value)

    def rollback(self) -> None:
        """Undo the writes journaled since ``journal`` was reset (newest first)."""
        if self.journal:
            for saved in reversed(self.journal):
                self.phys.restore(saved)
            self.journal.clear()

    def translate(self, linear: Any, kind: AccessKind, user: bool, implicit: bool = False) -> Any:
        """Physical address of ``linear`` for this access; the identity here (no paging)."""
        return linear

    def read(self, linear: Any, n: int, kind: AccessKind = AccessKind.READ, user: bool = False,
             implicit: bool = False) -> Any:
        """Read ``n`` bytes; ``user`` marks a CPL-3 access, ``implicit`` an implicit supervisor one."""
        if not isinstance(linear, int):  # symbolic address: one translation, no page split
            return self.phys.read(self.translate(linear, kind, user, implicit), n)
        off = linear & (PAGE - 1)
        if off + n <= PAGE:
            return self.phys.read(self.translate(linear, kind, user, implicit), n)
        lo = PAGE - off
        low = self.read(linear, lo, kind, user, implicit)
        high = self.read((linear + lo) & 0xFFFF_FFFF_FFFF_FFFF, n - lo, kind, user, implicit)
        return self.D.concat(high, low, 8 * lo)

    def write(self, linear: Any, n: int, value: Any, user: bool = False, implicit: bool = False) -> None:
        if not isinstance(linear, int):
            self._store(self.translate(linear, AccessKind.WRITE, user, implicit), n, value)
            return
        off = linear & (PAGE - 1)
        if off + n <= PAGE:
            self._store(self.translate(linear, AccessKind.WRITE, user, implicit), n, value)
            return
        # A page-crossing write is checked on both pages before either is written.
        lo = PAGE - off
        nxt = (linear + lo) & 0xFFFF_FFFF_FFFF_FFFF
        p0 = self.translate(linear, AccessKind.WRITE, user, implicit)
        p1 = self.translate(nxt, AccessKind.WRITE, user, implicit)
        D = self.D
        self._store(p0, lo, D.extract(value, 8 * lo - 1, 0))
        self._store(p1, n - lo, D.extract(value, 8 * n - 1, 8 * lo))
