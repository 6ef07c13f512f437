"""The debug ports: the Bochs/QEMU "port E9h hack" console and the POST-code port 80h.

* Port E9h: a byte written is console output; a read returns E9h, which is how
  software detects the port (Bochs and QEMU's ``debugcon`` behave so).
* Port 80h (the PC POST diagnostic port): a byte written is recorded as a POST code
  (shown by ``refvmm run``), not printed as text; reads return all ones like any
  write-only port.

Other ports given in the configuration behave like 80h.  Wider writes use the low byte
(the byte on the port itself).
"""

from __future__ import annotations

from refvmm.devices.base import Device, OutputLog

CONSOLE_PORT = 0xE9
POST_PORT = 0x80


class DebugPorts(Device):
    kind = "debugcon"

    def __init__(self, name: str, log: OutputLog, ports: list[int] | None = None) -> None:
        super().__init__(name, log)
        self.ports = list(ports) if ports else [CONSOLE_PORT, POST_PORT]
        self.post_codes: list[int] = []

    def port_ranges(self) -> list[tuple[int, int]]:
        return [(p, 1) for p in self.ports]

    def io_read(self, port: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if port == CONSOLE_PORT:
            return ones & ~0xFF | CONSOLE_PORT
        return ones

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == CONSOLE_PORT:
            self.log.write(self.name, bytes([value & 0xFF]))
        else:
            self.post_codes.append(value & 0xFF)

    def summary(self) -> str:
        if not self.post_codes:
            return ""
        shown = " ".join(f"{c:02x}" for c in self.post_codes[-16:])
        return f"POST codes ({len(self.post_codes)}): {shown}"
