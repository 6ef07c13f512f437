"""A 16550 UART, the subset a polled console needs (National Semiconductor PC16550D datasheet, "Registers").

Eight byte registers at ``base .. base+7`` (COM1: 3F8h):

=======  ============================  ==========================================
offset   read                          write
=======  ============================  ==========================================
0        RBR (DLAB=0): 0, no input     THR (DLAB=0): transmit -> console output
         DLL (DLAB=1)                  DLL (DLAB=1): divisor latch, low byte
1        IER (DLAB=0) / DLM (DLAB=1)   IER: bits 3:0 kept / DLM
2        IIR: 01h (no interrupt)        FCR: FIFO control, kept
3        LCR                           LCR (bit 7 = DLAB)
4        MCR                           MCR: bits 4:0 kept
5        LSR: 60h (THRE, TEMT: the     (writes ignored: factory test)
         transmitter is always empty)
6        MSR: B0h (DCD, DSR, CTS)       (read-only)
7        SCR                           SCR: scratch
=======  ============================  ==========================================

Transmission is instantaneous, so a guest polling LSR.THRE (bit 5) never waits; there
is no receive path (LSR.DR = 0, RBR reads 0) and no interrupt line (IIR always "none
pending"; this VMM has no interrupt controller, so IER is stored but never asserts).
Loopback mode (MCR bit 4) sends THR bytes nowhere, as the datasheet says the serial
output is held in the marking state.  Wider accesses are split into byte accesses.
"""

from __future__ import annotations

from refvmm.devices.base import Device, OutputLog

COM1 = 0x3F8
LSR_THRE, LSR_TEMT = 1 << 5, 1 << 6
LCR_DLAB = 1 << 7
MCR_LOOP = 1 << 4


class Uart16550(Device):
    kind = "uart16550"

    def __init__(self, name: str, log: OutputLog, base: int = COM1) -> None:
        super().__init__(name, log)
        self.base = base
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud at 1.8432 MHz (the usual BIOS setting)
        self.transmitted = 0

    def port_ranges(self) -> list[tuple[int, int]]:
        return [(self.base, 8)]

    def io_read(self, port: int, size: int) -> int:
        return sum(self._read(port + k - self.base) << (8 * k) for k in range(size))

    def io_write(self, port: int, size: int, value: int) -> None:
        for k in range(size):
            self._write(port + k - self.base, (value >> (8 * k)) & 0xFF)

    def _read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == 0:
            return self.dll if dlab else 0
        if reg == 1:
            return self.dlm if dlab else self.ier
        if reg == 2:
            return 0x01 | (0xC0 if self.fcr & 1 else 0)  # no interrupt pending; FIFOs enabled bits
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return LSR_THRE | LSR_TEMT
        if reg == 6:
            return 0xB0
        if reg == 7:
            return self.scr
        return 0xFF  # beyond the eight registers (a wide access running past base+7)

    def _write(self, reg: int, v: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == 0:
            if dlab:
                self.dll = v
            elif not self.mcr & MCR_LOOP:
                self.transmitted += 1
                self.log.write(self.name, bytes([v]))
        elif reg == 1:
            if dlab:
                self.dlm = v
            else:
                self.ier = v & 0x0F
        elif reg == 2:
            self.fcr = v
        elif reg == 3:
            self.lcr = v
        elif reg == 4:
            self.mcr = v & 0x1F
        elif reg == 7:
            self.scr = v

    def summary(self) -> str:
        return f"{self.transmitted} bytes transmitted"
