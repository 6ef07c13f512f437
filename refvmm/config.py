"""The VM configuration file (JSON or TOML), validated by pydantic.

One file describes one virtual machine::

    name     = "hello"
    paging   = "nested"                   # shadow | nested
    budget   = 1_000_000                  # guest instructions before the VM is stopped

    [memory]
    size    = "2M"                        # RAM at guest-physical 0 .. size-1
    regions = [{ gpa = "0x200000", size = "64K" }]   # more RAM (page aligned)

    [[mmio]]                              # guest-physical ranges decoded by a device
    gpa = "0xFEB00000"
    size = "4K"
    device = "scratch"

    [[devices]]                           # devices by kind (refvmm.devices.DEVICE_KINDS)
    kind = "uart16550"
    name = "com1"
    port = "0x3F8"

    [[hooks]]                             # extra hooks: port / msr / cpuid (refvmm.hooks)
    kind = "msr"
    index = "0xC0011029"
    value = 0

    [cpuid]
    hide = ["pku", "la57", "apic"]        # features the guest must not see (SVM is always hidden)

    [image]                               # flat binary at a gPA, or a snapshot / corpus case
    kind = "flat"
    path = "../guests/boot.bin"           # relative to the config file
    load = "0x7C00"

    [entry]                               # entry state of a flat image
    mode = "real"                         # real | prot16 | prot32 | long64 (spec.machine.flat_machine)
    rip  = "0x7C00"

Numbers may be integers or strings: hex (``"0x1000"``) or sizes with a ``K``/``M``/``G``
suffix (``"2M"``).  Every model forbids unknown keys, so a typo is an error naming the field.
:func:`load_config` turns any problem into :class:`ConfigError` whose message is one line
naming the file and the field (the CLI prints it and exits with status 2).

The JSON Schema of this format is ``corpus/schema/vm.schema.json`` (``refvmm schema``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from spec.cpumodel import FEATURE_BITS

PAGE = 4096
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class ConfigError(ValueError):
    """A bad VM configuration: the message is one line naming the file and the field."""


def parse_number(v: Any) -> int:
    """An integer from a number, a hex/decimal string, or a size with a K/M/G suffix."""
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        text = v.strip().replace("_", "")
        mult = 1
        if text[-1:].upper() in _SUFFIX and not text.lower().startswith("0x"):
            mult = _SUFFIX[text[-1].upper()]
            text = text[:-1]
        try:
            return int(text, 0) * mult
        except ValueError:
            raise ValueError(f"not a number: {v!r}") from None
    raise ValueError(f"expected a number or a string, got {type(v).__name__}")


_NUMBER_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0},
                            {"type": "string", "pattern": r"^(0[xX][0-9a-fA-F_]+|[0-9_]+[kKmMgG]?)$"}]}


def _number(lo: int, hi: int, what: str) -> Any:
    def check(v: Any) -> int:
        n = parse_number(v)
        if not lo <= n <= hi:
            raise ValueError(f"{what} {n:#x} out of range [{lo:#x}, {hi:#x}]")
        return n

    return Annotated[int, BeforeValidator(check), WithJsonSchema({**_NUMBER_SCHEMA, "description": what})]


Address = _number(0, (1 << 40) - 1, "guest-physical address")
Size = _number(PAGE, 1 << 40, "size in bytes (a multiple of 4 KiB)")
Port = _number(0, 0xFFFF, "I/O port")
U32 = _number(0, (1 << 32) - 1, "32-bit value")
U64 = _number(0, (1 << 64) - 1, "64-bit value")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _page_aligned(v: int, what: str) -> int:
    if v % PAGE:
        raise ValueError(f"{what} {v:#x} is not a multiple of 4 KiB")
    return v


class RamRegionConfig(_Model):
    """A contiguous range of guest RAM."""

    gpa: Address
    size: Size

    @model_validator(mode="after")
    def _aligned(self) -> RamRegionConfig:
        _page_aligned(self.gpa, "gpa")
        _page_aligned(self.size, "size")
        return self


class MemoryConfig(_Model):
    """Guest RAM: ``size`` bytes at guest-physical 0, plus ``regions``."""

    size: Annotated[int, BeforeValidator(lambda v: _page_aligned(parse_number(v), "size")),
                    WithJsonSchema({**_NUMBER_SCHEMA, "description": "RAM at gPA 0 (multiple of 4 KiB; 0: none)"})
                    ] = 2 << 20
    regions: list[RamRegionConfig] = Field(default_factory=list)


class MmioConfig(_Model):
    """A guest-physical range whose accesses are emulated against device ``device``."""

    gpa: Address
    size: Size = PAGE
    device: str = Field(min_length=1, description="name of a device in `devices`")

    @model_validator(mode="after")
    def _aligned(self) -> MmioConfig:
        _page_aligned(self.gpa, "gpa")
        _page_aligned(self.size, "size")
        return self


class DeviceConfig(_Model):
    """A device instance; ``kind`` selects the implementation (refvmm.devices.DEVICE_KINDS)."""

    kind: Literal["uart16550", "debugcon", "mmio-scratch"]
    name: str = Field(default="", description="instance name (default: the kind); MMIO regions refer to it")
    port: Port | None = Field(default=None, description="base I/O port (uart16550: default 0x3F8)")
    ports: list[Port] | None = Field(default=None, description="output ports (debugcon: default [0xE9, 0x80])")

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> DeviceConfig:
        if self.port is not None and self.kind != "uart16550":
            raise ValueError(f"port: only a uart16550 has a base port ({self.kind} does not)")
        if self.ports is not None and self.kind != "debugcon":
            raise ValueError(f"ports: only a debugcon has a port list ({self.kind} does not)")
        return self

    @property
    def instance(self) -> str:
        return self.name or self.kind


class PortHookConfig(_Model):
    """A port that reads as ``value`` (and keeps what is written when ``writable``)."""

    kind: Literal["port"]
    port: Port
    size: Literal[1, 2, 4] = 1
    value: U32 = 0
    writable: bool = True


class MsrHookConfig(_Model):
    """An MSR the guest may read (``value``) and, when ``writable``, write; otherwise #GP on write."""

    kind: Literal["msr"]
    index: U32
    value: U64 = 0
    writable: bool = True


class CpuidHookConfig(_Model):
    """Replace the registers of one CPUID leaf (and subleaf)."""

    kind: Literal["cpuid"]
    leaf: U32
    subleaf: U32 = 0
    eax: U32 = 0
    ebx: U32 = 0
    ecx: U32 = 0
    edx: U32 = 0


HookConfig = Annotated[PortHookConfig | MsrHookConfig | CpuidHookConfig, Field(discriminator="kind")]

Feature = Annotated[str, BeforeValidator(lambda v: _feature(v)),
                    WithJsonSchema({"type": "string", "enum": sorted(FEATURE_BITS)})]


def _feature(v: Any) -> str:
    if not isinstance(v, str) or v not in FEATURE_BITS:
        raise ValueError(f"unknown CPUID feature {v!r}")
    return v


class CpuidConfig(_Model):
    """The CPUID policy (refvmm.cpuid_policy): what the guest's CPUID says."""

    hide: list[Feature] = Field(default_factory=lambda: ["pku", "la57", "apic"],
                                description="features hidden from the guest (SVM is always hidden)")
    hypervisor_bit: bool = Field(default=True, description="set CPUID.1:ECX[31] (hypervisor present)")
    vendor: str = Field(default="refvmm", max_length=12, pattern=r"^[\x20-\x7e]*$",
                        description="hypervisor vendor signature in leaf 0x40000000 EBX:ECX:EDX")


class FlatImage(_Model):
    """A flat binary placed in guest RAM at ``load``; the entry state comes from ``entry``."""

    kind: Literal["flat"]
    path: str
    load: Address = 0x1000


class SnapshotImage(_Model):
    """A machine snapshot (spec.snapshot) or a corpus case (its ``snapshot``): pages become guest RAM,
    registers the entry state."""

    kind: Literal["snapshot", "case"]
    path: str


ImageConfig = Annotated[FlatImage | SnapshotImage, Field(discriminator="kind")]


class EntryConfig(_Model):
    """Entry state of a flat image: a flat machine in ``mode`` (spec.machine.flat_machine)."""

    mode: Literal["real", "prot16", "prot32", "long64"] = "long64"
    rip: U64 | None = Field(default=None, description="default: the image's load address")
    rsp: U64 | None = Field(default=None, description="default: spec.machine.STACK_TOP")


class VMConfig(_Model):
    """One virtual machine."""

    name: str = "vm"
    paging: Literal["shadow", "nested"] = "nested"
    budget: int = Field(default=1_000_000, ge=1, description="guest instructions before the VM stops")
    hypercalls: bool = Field(default=True, description="VMMCALL is the hypercall interface (False: #UD, as on "
                                                         "a processor without SVM)")
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    mmio: list[MmioConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=lambda: [DeviceConfig(kind="uart16550"),
                                                                 DeviceConfig(kind="debugcon")])
    hooks: list[HookConfig] = Field(default_factory=list)
    cpuid: CpuidConfig = Field(default_factory=CpuidConfig)
    image: ImageConfig | None = Field(default=None, description="the guest; None: supplied by the caller")
    entry: EntryConfig = Field(default_factory=EntryConfig)
    schema_: str | None = Field(default=None, alias="$schema", description="optional: the schema's path")

    @model_validator(mode="after")
    def _consistent(self) -> VMConfig:
        names = [d.instance for d in self.devices]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"devices: device names must be unique: {', '.join(dup)}")
        for k, m in enumerate(self.mmio):
            if m.device not in names:
                raise ValueError(f"mmio[{k}].device: no device named {m.device!r}")
        return self


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif str(p).startswith(("function-", "tagged-union")):
            continue
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def validation_message(e: ValidationError) -> str:
    """The first error of ``e`` as ``field: message`` (one line)."""
    first = e.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    loc = tuple(first["loc"])
    if not loc and first["type"] == "value_error":
        return msg  # a cross-field check: the message starts with the field it is about
    return f"{_loc(loc)}: {msg}"


def parse_config(data: Any, source: str = "<config>") -> VMConfig:
    """Validate an already-parsed document; ConfigError names the field."""
    try:
        return VMConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid VM config: {validation_message(e)}") from None


def load_config(path: str | Path) -> VMConfig:
    """Read a ``.json`` or ``.toml`` VM configuration; image paths are resolved against its directory."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text.decode())
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: invalid VM config: (top level): expected an object")
    cfg = parse_config(data, str(path))
    if cfg.image is not None and not Path(cfg.image.path).is_absolute():
        image = cfg.image.model_copy(update={"path": str(path.parent / cfg.image.path)})
        cfg = cfg.model_copy(update={"image": image})
    return cfg


def looks_like_vm_config(data: Any) -> bool:
    """Does a parsed JSON document look like a VM config (rather than a snapshot or a case)?"""
    return isinstance(data, dict) and ("image" in data or "paging" in data or "memory" in data) \
        and "regs" not in data and "snapshot" not in data


def json_schema() -> dict[str, Any]:
    return VMConfig.model_json_schema(mode="validation")


__all__ = ["ConfigError", "CpuidConfig", "DeviceConfig", "EntryConfig", "FlatImage", "MemoryConfig", "MmioConfig",
           "SnapshotImage", "VMConfig", "json_schema", "load_config", "looks_like_vm_config", "parse_config",
           "parse_number"]
