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

Fast paths (differential-testing campaigns convert hundreds of snapshots a
second): files and user documents are always validated, but conversions from
data that is canonical by construction skip re-validation --
:meth:`Snapshot.from_state` and :meth:`PageModel.from_bytes` build models with
:func:`trusted` and produce exactly what validation would (property-tested);
``from_state(st, like=snap)`` reuses ``snap``'s page objects for pages whose
bytes did not change; :meth:`PageModel.to_bytes` keeps a bounded cache of
decoded pages, keyed by the page's hex text, so pages shared between snapshots
(templates, unchanged pages) are decoded once.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema, field_validator

from spec import flags as F
from spec.memory import PAGE, PhysicalMemory
from spec.state import MachineState, Segment, TableRegister

M64 = (1 << 64) - 1
_M = TypeVar("_M", bound=BaseModel)
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


_set = object.__setattr__


def trusted(cls: type[_M], values: dict[str, Any]) -> _M:
    """An instance of ``cls`` holding ``values`` -- every field, already canonical -- without validation.

    What ``model_construct`` does, minus its per-field bookkeeping (which costs
    more than validating a small model): the internal fast path of conversions
    whose output is canonical by construction.  Property-tested to equal the
    validated model.
    """
    m = cls.__new__(cls)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", set(values))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


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
        """The page's 4096 bytes (decoded once per distinct page text; see the module docstring)."""
        raw = _PAGE_BYTES.get(self.data)
        if raw is None:
            raw = bytes.fromhex(self.data).ljust(PAGE, b"\0")
            if len(_PAGE_BYTES) >= _PAGE_CACHE_SIZE:
                _PAGE_BYTES.clear()
            _PAGE_BYTES[self.data] = raw
        return raw

    @classmethod
    def from_bytes(cls, address: int, raw: bytes | bytearray) -> PageModel:
        """The page at ``address`` (4 KiB aligned, trusted) holding ``raw``, built without re-validation."""
        return trusted(cls, {"address": address, "data": bytes(raw).rstrip(b"\0").hex()})


_PAGE_CACHE_SIZE = 1024  # decoded pages kept (4 KiB each, plus the key text)
_PAGE_BYTES: dict[str, bytes] = {}


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

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Snapshot:
        """A deep copy (``model_copy(deep=True)``, ``copy.deepcopy``), built directly.

        Every leaf of a snapshot is an immutable int, str or bool, so copying the
        containers -- each sub-model, list and dict -- is a complete deep copy;
        this skips the generic per-object ``deepcopy`` machinery (the fast path
        of bisection and minimization, which copy a snapshot per candidate).
        """
        d = self.__dict__
        values = dict(d)
        values.update(regs=_clone(d["regs"]), control=_clone(d["control"]), gdtr=_clone(d["gdtr"]),
                      idtr=_clone(d["idtr"]), msrs=dict(d["msrs"]), dr=list(d["dr"]), pdptes=list(d["pdptes"]),
                      undefined_flags=list(d["undefined_flags"]), pages=[_clone(p) for p in d["pages"]])
        segs = _clone(d["segments"])
        segs.__dict__.update({k: _clone(v) for k, v in segs.__dict__.items()})
        values["segments"] = segs
        return _clone(self, values)

    # -- conversion ------------------------------------------------------------------
    def to_state(self) -> MachineState:
        phys = PhysicalMemory()
        for p in self.pages:
            if p.address % PAGE:
                raise ValueError(f"page address {p.address:#x} is not 4 KiB aligned")
            phys.pages[p.address // PAGE] = bytearray(p.to_bytes())
        st = MachineState.concrete(phys)
        for i, name in enumerate(GPR_NAMES):
            st.gpr[i] = getattr(self.regs, name)
        st.rip = self.regs.rip
        st.write_rflags(self.regs.rflags)
        st.undefined = 0
        for name in self.undefined_flags:
            st.undefined |= 1 << F.BY_NAME[name]
        segs = self.segments
        st.seg = [_segment(getattr(segs, name)) for name in SEG_FIELDS]
        st.ldtr = _segment(segs.ldtr)
        st.tr = _segment(segs.tr)
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
    def from_state(cls, st: MachineState, *, like: Snapshot | None = None) -> Snapshot:
        """The snapshot of concrete state ``st`` (canonical by construction, so built without re-validation).

        With ``like``, pages whose bytes equal ``like``'s page at the same
        address are taken over as they are (the same :class:`PageModel` objects).
        """
        D = st.D
        concrete = D.concrete
        gpr = st.gpr
        values = {name: concrete(v) for name, v in zip(GPR_NAMES, gpr, strict=True)}
        values["rip"] = st.rip
        values["rflags"] = concrete(st.read_rflags())
        regs = trusted(Registers, values)
        seg = _segment_model
        es, cs, ss, ds, fs, gs = st.seg
        segments = trusted(Segments, {"es": seg(es), "cs": seg(cs), "ss": seg(ss), "ds": seg(ds), "fs": seg(fs),
                                      "gs": seg(gs), "ldtr": seg(st.ldtr), "tr": seg(st.tr)})
        old = {p.address: p for p in like.pages} if like is not None else {}
        pages = []
        phys_pages = st.mem.phys.pages
        for idx in sorted(phys_pages):
            raw = phys_pages[idx]
            address = idx * PAGE
            prev = old.get(address)
            if prev is not None and raw == prev.to_bytes():
                pages.append(prev)
            else:
                pages.append(PageModel.from_bytes(address, raw))
        return trusted(cls, {
            "regs": regs,
            "segments": segments,
            "control": trusted(ControlRegisters, {"cr0": st.cr0, "cr2": st.cr2, "cr3": st.cr3, "cr4": st.cr4,
                                                  "cr8": st.cr8}),
            "efer": st.efer,
            "msrs": {f"{k:#x}": v for k, v in sorted(st.msrs.items())},
            "dr": list(st.dr),
            "gdtr": trusted(TableRegisterModel, {"base": st.gdtr.base, "limit": st.gdtr.limit}),
            "idtr": trusted(TableRegisterModel, {"base": st.idtr.base, "limit": st.idtr.limit}),
            "pdptes": list(st.pdptes),
            "pkru": st.pkru,
            "a20": st.a20,
            "interrupt_shadow": st.interrupt_shadow,
            "nmi_blocked": st.nmi_blocked,
            "undefined_flags": [F.NAMES[f] for f in F.STATUS if st.undefined >> f & 1],
            "halted": st.halted,
            "pages": pages,
        })

    # -- files -----------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        return cls.model_validate_json(Path(path).read_text())


def _clone(m: _M, values: dict[str, Any] | None = None) -> _M:
    """A copy of model ``m`` (its fields set kept) holding ``values`` (default: a copy of its own)."""
    c = type(m).__new__(type(m))
    _set(c, "__dict__", dict(m.__dict__) if values is None else values)
    _set(c, "__pydantic_fields_set__", set(m.__pydantic_fields_set__))
    _set(c, "__pydantic_extra__", None)
    _set(c, "__pydantic_private__", None)
    return c


def _segment(m: SegmentModel) -> Segment:
    return Segment(selector=m.selector, base=m.base, limit=m.limit, type=m.type, s=m.s, dpl=m.dpl, p=m.p, avl=m.avl,
                   l=m.l, db=m.db, g=m.g, unusable=m.unusable)


def _segment_model(s: Segment) -> SegmentModel:
    return trusted(SegmentModel, {"selector": s.selector, "base": s.base, "limit": s.limit, "type": s.type, "s": s.s,
                                  "dpl": s.dpl, "p": s.p, "avl": s.avl, "l": s.l, "db": s.db, "g": s.g,
                                  "unusable": s.unusable})


def json_schema() -> str:
    return json.dumps(Snapshot.model_json_schema(mode="validation"), indent=1)
