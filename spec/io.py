"""The I/O address space: the port bus the CPU's IN/OUT/INS/OUTS talk to.

x86 has a separate 64 Ki-port I/O address space (SDM Vol. 1 19.2; APM Vol. 2
13.1).  The spec does not model any device: the machine state holds an
:class:`IOBus` (``MachineState.io``) that the VMM (or a test) provides, and
the I/O instructions call it *after* their architectural checks (I/O
privilege, I/O permission bitmap) pass.  The bus is host plumbing, not
architectural state: it is not part of a snapshot, and a state copy shares it
(as :class:`spec.memory.PhysicalMemory` shares its MMIO bus).

Sizes are in bytes (1, 2 or 4), as for the memory bus.  An access of ``size``
bytes at ``port`` addresses the ports ``port .. port+size-1`` (SDM Vol. 1 19.3:
a word/doubleword port is two/four consecutive byte ports); the bus sees it as
one access, exactly as the instruction issued it.  ``read`` returns an
unsigned integer of ``8*size`` bits (higher bits are ignored); ``write``
receives one.

The default is :class:`EmptyIOBus`: nothing decodes the address, reads float
to all ones, writes are dropped -- what a PC returns for an unclaimed port.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class IOBus(Protocol):
    """Port I/O as the CPU issues it: one call per IN/OUT (per INS/OUTS element)."""

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


class EmptyIOBus:
    """No device anywhere: reads return all ones, writes vanish."""

    __slots__ = ()

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        return None

    def __repr__(self) -> str:
        return "EmptyIOBus()"


EMPTY_IO_BUS = EmptyIOBus()
"""The shared default bus (stateless)."""


class RecordingIOBus:
    """A bus for tests: ports hold values in a dict, and every access is logged in order.

    ``ports`` maps a port to the value a read of it returns (``default``,
    all ones masked to the size, when absent); a write stores its value there,
    so a later read of the same port and size gives it back.  ``inputs``, when
    given, maps a port to a list of values returned by successive reads (a FIFO
    such as a UART receive register); when it runs dry, reads fall back to
    ``ports``.  ``log`` records ``("in" | "out", port, size, value)`` tuples.
    """

    def __init__(self, ports: dict[int, int] | None = None, *, inputs: dict[int, list[int]] | None = None,
                 default: int | None = None) -> None:
        self.ports: dict[int, int] = dict(ports or {})
        self.inputs: dict[int, list[int]] = {p: list(v) for p, v in (inputs or {}).items()}
        self.default = default
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, port: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        queue = self.inputs.get(port)
        if queue:
            value = queue.pop(0) & mask
        elif port in self.ports:
            value = self.ports[port] & mask
        else:
            value = mask if self.default is None else self.default & mask
        self.log.append(("in", port, size, value))
        return value

    def write(self, port: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.ports[port] = value
        self.log.append(("out", port, size, value))


__all__ = ["EMPTY_IO_BUS", "EmptyIOBus", "IOBus", "RecordingIOBus"]
