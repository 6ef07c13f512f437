"""Machine snapshots: the JSON file format of a whole machine state (pydantic v2).

A snapshot holds every architectural register (GPRs, RIP, RFLAGS, segment
registers with their hidden descriptor parts, control registers, EFER and the
other architectural MSRs, debug registers, GDTR/IDTR/LDTR/TR) and physical
memory as a list of 4 KiB pages.  Integers are written as hex strings and read
from hex strings or JSON numbers.  Page data is hex with trailing zero bytes
omitted (a page's remaining bytes are zero).

Validation puts a snapshot in canonical form, so that equal machine states
have equal snapshots and files: page data lower-case without trailing zero
bytes, pages sorted by address (each address once, 4 KiB aligned), MSR
indices as ``0x``-prefixed lower-case hex in ascending order, undefined flags
in RFLAGS bit order without repeats.

``to_state`` / ``from_state`` convert to and from the concrete
:class:`spec.state.MachineState`; the round trip is exact (property-tested).
The status flags currently undefined are part of the snapshot, so a
comparison can mask them.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema, field_validator

from spec import flags as F
from spec.memory import PAGE, PhysicalMemory
from spec.state import MachineState, Segment, TableRegister

M64 = (1 << 64) - 1
RFLAGS_RESERVED = (1 << 3) | (1 << 5) | (1 << 15) | (M64 ^ ((1 << 22) - 1))


def _parse_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            raise ValueError(f"not an integer: {v!r}") from None
    raise ValueError(f"expected an integer or a hex string, got {type(v).__name__}")


def _hex_int(bits: int) -> Any:
    def check(v: Any) -> int:
        n = _parse_int(v)
        if not 0 <= n < (1 << bits):
            raise ValueError(f"{v!r} does not fit in {bits} unsigned bits")
        return n

    return Annotated[
        int,
        BeforeValidator(check),
        PlainSerializer(lambda n: hex(n), return_type=str, when_used="json"),
        WithJsonSchema({"anyOf": [{"type": "string", "pattern": "^0[xX][0-9a-fA-F]+$|^[0-9]+$"},
                                  {"type": "integer", "minimum": 0}],
                        "description": f"unsigned {bits}-bit integer (hex string or number)"}),
    ]


U64 = _hex_int(64)
U32 = _hex_int(32)
U16 = _hex_int(16)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SegmentModel(Model):
    """A segment register: selector and the hidden descriptor cache (SDM Vol. 3A 3.4.3)."""

    selector: U16 = 0
    base: U64 = 0
    limit: U32 = 0xFFFF
    type: int = Field(default=3, ge=0, le=15)
    s: int = Field(default=1, ge=0, le=1)
    dpl: int = Field(default=0, ge=0, le=3)
    p: int = Field(default=1, ge=0, le=1)
    avl: int = Field(default=0, ge=0, le=1)
    l: int = Field(default=0, ge=0, le=1)
    db: int = Field(default=0, ge=0, le=1)
    g: int = Field(default=0, ge=0, le=1)
    unusable: bool = False


class TableRegisterModel(Model):
    base: U64 = 0
    limit: U16 = 0xFFFF


class PageModel(Model):
    """One 4 KiB page of physical memory."""

    address: U64 = Field(description="page-aligned physical address")
    data: str = Field(default="", description="hex bytes from the page start; missing bytes are zero",
                      pattern="^([0-9a-fA-F]{2})*$", max_length=2 * PAGE)

    @field_validator("address")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if v % PAGE:
            raise ValueError(f"page address {v:#x} is not 4 KiB aligned")
        return v

    @field_validator("data")
    @classmethod
    def _canonical_data(cls, v: str) -> str:
        return bytes.fromhex(v).rstrip(b"\0").hex()

    def to_bytes(self) -> bytes:
        return bytes.fromhex(self.data).ljust(PAGE, b"\0")


GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEG_FIELDS = ("es", "cs", "ss", "ds", "fs", "gs")


class Registers(Model):
    rax: U64 = 0
    rcx: U64 = 0
    rdx: U64 = 0
    rbx: U64 = 0
    rsp: U64 = 0
    rbp: U64 = 0
    rsi: U64 = 0
    rdi: U64 = 0
    r8: U64 = 0
    r9: U64 = 0
    r10: U64 = 0
    r11: U64 = 0
    r12: U64 = 0
    r13: U64 = 0
    r14: U64 = 0
    r15: U64 = 0
    rip: U64 = 0
    rflags: U64 = 0x2

    @field_validator("rflags")
    @classmethod
    def _rflags_bits(cls, v: int) -> int:
        # SDM Vol. 1 3.4.3: bit 1 reads as 1; bits 3, 5, 15 and 22-63 are reserved (0).
        if not v & 2:
            raise ValueError("RFLAGS bit 1 must be 1")
        if v & RFLAGS_RESERVED:
            raise ValueError(f"RFLAGS reserved bits set: {v & RFLAGS_RESERVED:#x}")
        return v


class Segments(Model):
    es: SegmentModel = Field(default_factory=SegmentModel)
    cs: SegmentModel = Field(default_factory=lambda: SegmentModel(type=0xB))
    ss: SegmentModel = Field(default_factory=SegmentModel)
    ds: SegmentModel = Field(default_factory=SegmentModel)
    fs: SegmentModel = Field(default_factory=SegmentModel)
    gs: SegmentModel = Field(default_factory=SegmentModel)
    ldtr: SegmentModel = Field(default_factory=lambda: SegmentModel(type=2, s=0))
    tr: SegmentModel = Field(default_factory=lambda: SegmentModel(type=0xB, s=0))


class ControlRegisters(Model):
    cr0: U64 = 0x10
    cr2: U64 = 0
    cr3: U64 = 0
    cr4: U64 = 0
    cr8: U64 = 0


class Snapshot(Model):
    """A whole machine state."""

    regs: Registers = Field(default_factory=Registers)
    segments: Segments = Field(default_factory=Segments)
    control: ControlRegisters = Field(default_factory=ControlRegisters)
    efer: U64 = 0
    msrs: dict[str, U64] = Field(default_factory=dict,
                                 description="other architectural MSRs by hex index (FS/GS base live in the segments)")
    dr: list[U64] = Field(default_factory=lambda: [0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400],
                          min_length=8, max_length=8)
    gdtr: TableRegisterModel = Field(default_factory=TableRegisterModel)
    idtr: TableRegisterModel = Field(default_factory=TableRegisterModel)
    pdptes: list[U64] = Field(default_factory=lambda: [0, 0, 0, 0], min_length=4, max_length=4,
                              description="PAE PDPTE registers (loaded from CR3 when PAE paging is entered)")
    pkru: U32 = 0
    a20: bool = Field(default=True, description="A20 gate enabled (False: physical bit 20 forced to 0)")
    interrupt_shadow: bool = Field(default=False, description="interrupts inhibited for one instruction (STI, MOV SS)")
    nmi_blocked: bool = Field(default=False, description="NMIs blocked until the next IRET (SDM Vol. 3A 6.7.1)")
    undefined_flags: list[Literal["CF", "PF", "AF", "ZF", "SF", "OF"]] = Field(default_factory=list,
                                       description="status flags whose value is architecturally undefined")
    halted: bool = False
    pages: list[PageModel] = Field(default_factory=list)

    # -- canonical form (see the module docstring) -------------------------------------
    @field_validator("msrs")
    @classmethod
    def _canonical_msrs(cls, v: dict[str, int]) -> dict[str, int]:
        by_index: dict[int, int] = {}
        for key, value in v.items():
            try:
                index = int(key, 16)
            except ValueError:
                raise ValueError(f"MSR index {key!r} is not a hex number") from None
            if not 0 <= index < 1 << 32:
                raise ValueError(f"MSR index {key!r} does not fit in 32 bits")
            if index in by_index:
                raise ValueError(f"MSR {index:#x} is given twice")
            by_index[index] = value
        return {f"{i:#x}": by_index[i] for i in sorted(by_index)}

    @field_validator("undefined_flags")
    @classmethod
    def _canonical_flags(cls, v: list[str]) -> list[str]:
        return [F.NAMES[f] for f in F.STATUS if F.NAMES[f] in v]

    @field_validator("pages")
    @classmethod
    def _canonical_pages(cls, v: list[PageModel]) -> list[PageModel]:
        pages = sorted(v, key=lambda p: p.address)
        for p, q in pairwise(pages):
            if p.address == q.address:
                raise ValueError(f"page {p.address:#x} is given twice")
        return pages

    # -- conversion ------------------------------------------------------------------
    def to_state(self) -> MachineState:
        phys = PhysicalMemory()
        for p in self.pages:
            if p.address % PAGE:
                raise ValueError(f"page address {p.address:#x} is not 4 KiB aligned")
            phys.map_page(p.address, bytes.fromhex(p.data))
        st = MachineState.concrete(phys)
        for i, name in enumerate(GPR_NAMES):
            st.gpr[i] = getattr(self.regs, name)
        st.rip = self.regs.rip
        st.write_rflags(self.regs.rflags)
        st.undefined = 0
        for name in self.undefined_flags:
            st.undefined |= 1 << F.BY_NAME[name]
        for i, name in enumerate(SEG_FIELDS):
            st.seg[i] = Segment(**getattr(self.segments, name).model_dump())
        st.ldtr = Segment(**self.segments.ldtr.model_dump())
        st.tr = Segment(**self.segments.tr.model_dump())
        c = self.control
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8 = c.cr0, c.cr2, c.cr3, c.cr4, c.cr8
        st.efer = self.efer
        st.msrs = {int(k, 16): v for k, v in self.msrs.items()}
        st.dr = list(self.dr)
        st.gdtr = TableRegister(self.gdtr.base, self.gdtr.limit)
        st.idtr = TableRegister(self.idtr.base, self.idtr.limit)
        st.halted = self.halted
        st.pdptes = list(self.pdptes)
        st.pkru = self.pkru
        st.a20 = self.a20
        st.interrupt_shadow = self.interrupt_shadow
        st.nmi_blocked = self.nmi_blocked
        return st

    @classmethod
    def from_state(cls, st: MachineState) -> Snapshot:
        D = st.D
        regs = {name: D.concrete(st.gpr[i]) for i, name in enumerate(GPR_NAMES)}
        regs["rip"] = st.rip
        regs["rflags"] = D.concrete(st.read_rflags())

        def seg(s: Segment) -> SegmentModel:
            return SegmentModel(selector=s.selector, base=s.base, limit=s.limit, type=s.type, s=s.s, dpl=s.dpl,
                                p=s.p, avl=s.avl, l=s.l, db=s.db, g=s.g, unusable=s.unusable)

        segs = {name: seg(st.seg[i]) for i, name in enumerate(SEG_FIELDS)}
        pages = []
        for idx in sorted(st.mem.phys.pages):
            data = bytes(st.mem.phys.pages[idx]).rstrip(b"\0")
            pages.append(PageModel(address=idx * PAGE, data=data.hex()))
        return cls(
            regs=Registers(**regs),
            segments=Segments(**segs, ldtr=seg(st.ldtr), tr=seg(st.tr)),
            control=ControlRegisters(cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4, cr8=st.cr8),
            efer=st.efer,
            msrs={f"{k:#x}": v for k, v in sorted(st.msrs.items())},
            dr=list(st.dr),
            gdtr=TableRegisterModel(base=st.gdtr.base, limit=st.gdtr.limit),
            idtr=TableRegisterModel(base=st.idtr.base, limit=st.idtr.limit),
            undefined_flags=[F.NAMES[f] for f in F.STATUS if st.undefined >> f & 1],
            halted=st.halted,
            pdptes=list(st.pdptes),
            pkru=st.pkru,
            a20=st.a20,
            interrupt_shadow=st.interrupt_shadow,
            nmi_blocked=st.nmi_blocked,
            pages=pages,
        )

    # -- files -----------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        return cls.model_validate_json(Path(path).read_text())


def json_schema() -> str:
    return json.dumps(Snapshot.model_json_schema(mode="validation"), indent=1)
