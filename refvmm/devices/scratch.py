"""A memory-mapped register bank: an identification register, a counter and scratch registers.

It exists to exercise MMIO emulation (every access is a guest instruction the VMM
emulates with the spec).  Layout within its region (little-endian, any access size
1/2/4/8 at any offset; bytes outside the registers read 0 and ignore writes):

=========  ======  ===================================================================
offset     width   register
=========  ======  ===================================================================
000h       4       ID: ``"RVMM"`` (4D4D5652h), read-only
008h       8       COUNTER: reads return the number of earlier reads of it and then
                   count up (a read has a side effect, so a wrongly repeated read is
                   visible); writes set it
010h-0FFh  240     SCRATCH: plain read/write storage
=========  ======  ===================================================================

``accesses`` records ``("r" | "w", offset, size, value)`` for tests.
"""

from __future__ import annotations

from refvmm.devices.base import Device, OutputLog

ID_VALUE = int.from_bytes(b"RVMM", "little")
REG_ID, REG_COUNTER, SCRATCH_START, SCRATCH_END = 0x000, 0x008, 0x010, 0x100


class MmioScratch(Device):
    kind = "mmio-scratch"

    def __init__(self, name: str, log: OutputLog) -> None:
        super().__init__(name, log)
        self.counter = 0
        self.scratch = bytearray(SCRATCH_END - SCRATCH_START)
        self.accesses: list[tuple[str, int, int, int]] = []

    @property
    def decodes_mmio(self) -> bool:
        return True

    def _image(self) -> bytearray:
        """The register file as bytes 000h-0FFh (before a read's side effect)."""
        img = bytearray(SCRATCH_END)
        img[REG_ID:REG_ID + 4] = ID_VALUE.to_bytes(4, "little")
        img[REG_COUNTER:REG_COUNTER + 8] = self.counter.to_bytes(8, "little")
        img[SCRATCH_START:SCRATCH_END] = self.scratch
        return img

    def mmio_read(self, offset: int, size: int) -> int:
        img = self._image()
        raw = bytes(img[offset:offset + size]).ljust(size, b"\0") if offset < SCRATCH_END else bytes(size)
        value = int.from_bytes(raw, "little")
        if offset < REG_COUNTER + 8 and offset + size > REG_COUNTER:
            self.counter = (self.counter + 1) & ((1 << 64) - 1)
        self.accesses.append(("r", offset, size, value))
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))
        data = value.to_bytes(size, "little")
        for k, b in enumerate(data):
            off = offset + k
            if REG_COUNTER <= off < REG_COUNTER + 8:
                shift = 8 * (off - REG_COUNTER)
                self.counter = (self.counter & ~(0xFF << shift)) | b << shift
            elif SCRATCH_START <= off < SCRATCH_END:
                self.scratch[off - SCRATCH_START] = b

    def summary(self) -> str:
        reads = sum(1 for a in self.accesses if a[0] == "r")
        return f"{reads} reads, {len(self.accesses) - reads} writes, counter={self.counter}"
