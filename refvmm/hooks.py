"""Hooks: the VMM's registry of what it emulates, with a documented default for everything else.

A hook is ``(key, read, write)``; the registry holds three kinds (CPUID overrides live in
:mod:`refvmm.cpuid_policy`, MMIO regions in :mod:`refvmm.guest_memory`):

I/O ports -- :meth:`HookRegistry.hook_ports`
    Devices claim port ranges.  **Every** port is intercepted (the IOPM is all ones):
    an unhooked port must read all ones and ignore writes, like an empty ISA bus, and
    the only way to guarantee that for the guest is to answer it in the VMM.  Passing
    unhooked ports through to the host bus would hand the guest the *host's* devices --
    the opposite of resource control (Popek and Goldberg) -- and make the guest's view
    depend on the host.  The cost is one exit per port access, which for a polled
    console is what Palacios pays too.  :meth:`HookRegistry.intercepted_ports` is the
    IOPM derived from this rule; a test checks every hooked port is in it.

    The IN/OUT/INS/OUTS instruction itself is emulated by the spec
    (:meth:`refvmm.vm.VM.emulate`) with :class:`PortBus` as its I/O bus, so operand
    sizes, string addressing, REP and the I/O permission checks are the spec's.

MSRs -- :meth:`HookRegistry.hook_msr`
    A hooked MSR is served by its hook: ``read()`` gives EDX:EAX, ``write(value)``
    stores (a hook without ``write`` is read-only: WRMSR raises #GP(0)).  An unhooked
    MSR is emulated by the spec on the guest's view, with the VM's MSR file holding the
    values -- so an MSR the guest's CPU model does not have raises #GP(0) exactly as
    on hardware, and reserved bits are checked.  The MSRPM (:meth:`msr_intercepts`)
    intercepts everything except the MSRs whose guest values the VMCB itself switches
    on VMRUN/#VMEXIT (STAR, LSTAR, CSTAR, SFMASK, KernelGSBase, SYSENTER_CS/ESP/EIP,
    FS/GS base: APM Vol. 2 15.5.1 and Table B-2) -- those run at hardware speed --
    unless a hook claims one.  EFER is always intercepted: its real value has SVME set
    (APM 15.5.1) and the guest must see its own (see :mod:`refvmm.paging.base`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spec.cpumodel import (
    CSTAR,
    FS_BASE,
    GS_BASE,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_EIP,
    IA32_SYSENTER_ESP,
    KERNEL_GS_BASE,
    LSTAR,
    SFMASK,
    STAR,
)
from spec.faults import Fault, Vector

PORTS = 0x10000

VMCB_SWITCHED_MSRS = frozenset({STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, IA32_SYSENTER_CS, IA32_SYSENTER_ESP,
                                IA32_SYSENTER_EIP, FS_BASE, GS_BASE})
"""MSRs with guest copies in the VMCB state-save area (APM Table B-2): not intercepted unless hooked."""


class HookError(ValueError):
    """Two hooks claim the same key (a configuration error)."""


class PortHandler(Protocol):
    """Whoever answers a hooked port (a device)."""

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class MsrHook:
    """An emulated MSR: ``read() -> value``; ``write(value)`` or None (read-only: #GP(0) on WRMSR)."""

    name: str
    read: Callable[[], int]
    write: Callable[[int], None] | None = None


class HookRegistry:
    """Port and MSR hooks of one VM (see the module docstring for the defaults)."""

    def __init__(self) -> None:
        self.ports: dict[int, tuple[str, PortHandler]] = {}
        self.msrs: dict[int, MsrHook] = {}

    # -- registration --------------------------------------------------------------------
    def hook_ports(self, first: int, count: int, name: str, handler: PortHandler) -> None:
        """``handler`` answers ports ``first .. first+count-1``."""
        if not (0 <= first and count > 0 and first + count <= PORTS):
            raise HookError(f"{name}: port range {first:#x}+{count} outside 0..0xFFFF")
        for p in range(first, first + count):
            if p in self.ports:
                raise HookError(f"{name}: port {p:#x} is already hooked by {self.ports[p][0]}")
        for p in range(first, first + count):
            self.ports[p] = (name, handler)

    def hook_msr(self, index: int, hook: MsrHook) -> None:
        if index in self.msrs:
            raise HookError(f"{hook.name}: MSR {index:#x} is already hooked by {self.msrs[index].name}")
        self.msrs[index] = hook

    # -- derived permission maps -----------------------------------------------------------
    def intercepted_ports(self) -> range:
        """The ports the IOPM intercepts: all of them (module docstring)."""
        return range(PORTS)

    def msr_intercepts(self, index: int) -> bool:
        """Is RDMSR/WRMSR of ``index`` intercepted (MSRPM)?  Everything but the VMCB-switched MSRs, and hooked ones."""
        return index in self.msrs or index not in VMCB_SWITCHED_MSRS

    # -- MSR access by a hook ------------------------------------------------------------
    def msr_read(self, index: int) -> int:
        return self.msrs[index].read() & ((1 << 64) - 1)

    def msr_write(self, index: int, value: int) -> None:
        """WRMSR through a hook; #GP(0) (a :class:`Fault`) for a read-only hook."""
        hook = self.msrs[index]
        if hook.write is None:
            raise Fault(Vector.GP, 0)
        hook.write(value)


class PortBus:
    """The guest's I/O bus as the VMM emulates it: hooked ports go to their device, others float.

    An access of ``size`` bytes at ``port`` goes to the device hooking ``port`` when it
    also hooks the other bytes' ports (one access, as issued); otherwise each byte is
    dispatched on its own, and bytes of unhooked ports read FFh / are dropped.
    """

    def __init__(self, registry: HookRegistry) -> None:
        self.registry = registry
        self.accesses = 0

    def _whole(self, port: int, size: int) -> PortHandler | None:
        ports = self.registry.ports
        first = ports.get(port)
        if first is None:
            return None
        for p in range(port + 1, port + size):
            other = ports.get(p & 0xFFFF)
            if other is None or other[1] is not first[1]:
                return None
        return first[1]

    def read(self, port: int, size: int) -> int:
        self.accesses += 1
        h = self._whole(port, size)
        if h is not None:
            return h.io_read(port, size) & ((1 << (8 * size)) - 1)
        value = 0
        for k in range(size):
            entry = self.registry.ports.get((port + k) & 0xFFFF)
            byte = 0xFF if entry is None else entry[1].io_read((port + k) & 0xFFFF, 1) & 0xFF
            value |= byte << (8 * k)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        self.accesses += 1
        value &= (1 << (8 * size)) - 1
        h = self._whole(port, size)
        if h is not None:
            h.io_write(port, size, value)
            return
        for k in range(size):
            entry = self.registry.ports.get((port + k) & 0xFFFF)
            if entry is not None:
                entry[1].io_write((port + k) & 0xFFFF, 1, (value >> (8 * k)) & 0xFF)


def value_msr(name: str, value: int, writable: bool) -> MsrHook:
    """A configuration MSR hook: holds ``value``; writes store it (or #GP(0) when read-only)."""
    cell = [value & ((1 << 64) - 1)]

    def read() -> int:
        return cell[0]

    def write(v: int) -> None:
        cell[0] = v

    return MsrHook(name, read, write if writable else None)


class ValuePort:
    """A configuration port hook: reads ``value`` (masked to the access), writes store when ``writable``."""

    def __init__(self, value: int, writable: bool) -> None:
        self.value = value
        self.writable = writable

    def io_read(self, port: int, size: int) -> int:
        return self.value & ((1 << (8 * size)) - 1)

    def io_write(self, port: int, size: int, value: int) -> None:
        if self.writable:
            self.value = value


__all__ = ["PORTS", "VMCB_SWITCHED_MSRS", "HookError", "HookRegistry", "MsrHook", "PortBus", "PortHandler",
           "ValuePort", "value_msr"]
