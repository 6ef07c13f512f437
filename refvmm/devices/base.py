"""The device interface: narrow buses between the vCPU loop and the virtual devices.

A device is reached through one or both of two buses, never through the run loop
(the loop knows no port numbers or addresses):

* the port bus (:class:`refvmm.hooks.PortBus`): a device claims port ranges with
  :meth:`Device.port_ranges` and implements ``io_read(port, size)`` /
  ``io_write(port, size, value)`` -- ``port`` is the absolute port of the access's
  first byte, ``size`` 1, 2 or 4 bytes, as the instruction issued it;
* the guest-physical bus (:class:`refvmm.guest_memory.GuestBus`): an MMIO region of
  the VM configuration binds a device, which implements ``mmio_read(offset, size)`` /
  ``mmio_write(offset, size, value)`` with ``offset`` relative to the region.

Devices write what the guest outputs into the VM's :class:`OutputLog`; ``refvmm run``
prints it.  Device state is plain data, reset at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OutputLog:
    """Everything the guest wrote to output devices, in order, tagged by device name."""

    chunks: list[tuple[str, bytes]] = field(default_factory=list)

    def write(self, source: str, data: bytes) -> None:
        if self.chunks and self.chunks[-1][0] == source:
            self.chunks[-1] = (source, self.chunks[-1][1] + data)
        else:
            self.chunks.append((source, data))

    def data(self, source: str | None = None) -> bytes:
        """All bytes from ``source`` (or from every device), concatenated."""
        return b"".join(d for s, d in self.chunks if source is None or s == source)

    def text(self, source: str | None = None) -> str:
        return self.data(source).decode("latin-1")

    def by_source(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for s, d in self.chunks:
            out[s] = out.get(s, b"") + d
        return out


class Device:
    """Base class: a named device with no ports and no MMIO (subclasses override what they decode)."""

    kind = "device"

    def __init__(self, name: str, log: OutputLog) -> None:
        self.name = name
        self.log = log

    def port_ranges(self) -> list[tuple[int, int]]:
        """``(first port, count)`` ranges this device decodes."""
        return []

    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        return None

    def mmio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        return None

    @property
    def decodes_mmio(self) -> bool:
        """True if the device implements an MMIO register bank (may be bound to an MMIO region)."""
        return False

    def summary(self) -> str:
        """One line describing the device's state for ``refvmm run``."""
        return ""
