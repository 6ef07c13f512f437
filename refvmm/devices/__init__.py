"""Virtual devices, registered by kind (the ``kind`` of a VM configuration's ``devices`` entries).

==============  ===================================  ==========================================
kind            decodes                              module
==============  ===================================  ==========================================
uart16550       8 ports at ``port`` (default 3F8h)   :mod:`refvmm.devices.uart16550`
debugcon        ports E9h (console), 80h (POST)      :mod:`refvmm.devices.debugcon`
mmio-scratch    an MMIO region (``mmio`` entries)    :mod:`refvmm.devices.scratch`
==============  ===================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

from refvmm.config import DeviceConfig
from refvmm.devices.base import Device, OutputLog
from refvmm.devices.debugcon import DebugPorts
from refvmm.devices.scratch import MmioScratch
from refvmm.devices.uart16550 import COM1, Uart16550

DEVICE_KINDS: dict[str, Callable[[DeviceConfig, OutputLog], Device]] = {
    "uart16550": lambda c, log: Uart16550(c.instance, log, COM1 if c.port is None else c.port),
    "debugcon": lambda c, log: DebugPorts(c.instance, log, c.ports),
    "mmio-scratch": lambda c, log: MmioScratch(c.instance, log),
}


def make_device(config: DeviceConfig, log: OutputLog) -> Device:
    """The device a configuration entry describes (its kind is validated by the config)."""
    return DEVICE_KINDS[config.kind](config, log)


__all__ = ["DEVICE_KINDS", "DebugPorts", "Device", "MmioScratch", "OutputLog", "Uart16550", "make_device"]
