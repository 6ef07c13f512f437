"""Test cases: the JSON file format of one differential-testing case (pydantic v2).

A case is self-contained and never needs an assembler to replay: the initial
machine :class:`~spec.snapshot.Snapshot` (registers, segments, control state and
every physical page -- code, data, page tables, GDT/IDT/TSS, handler stubs),
the code bytes with the offsets where its instructions start, a disassembly for
humans (derived from the bytes with iced-x86; never read back), the instruction
budget, tags, and where the case came from (:class:`Provenance`).

The code sits at :attr:`Case.code_physical` in the snapshot's memory and
starts at the snapshot's RIP; by convention it ends with ``HLT`` (not counted in
:attr:`Case.insn_offsets`), so ``insn_offsets`` lists the *generated*
instructions.  :meth:`Case.with_instructions` rebuilds a case from a subset of
them -- what bisection and minimization use.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spec.machine import BITS
from spec.memory import PAGE
from spec.snapshot import U64, PageModel, Snapshot

CASE_VERSION = 1
HLT = b"\xf4"

ModeName = Literal["real", "prot16", "prot32", "long64"]
PagingName = Literal["none", "32-bit", "PAE", "4-level"]


class CaseError(ValueError):
    """A case file that cannot be used (one line, names the problem)."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Environment(Model):
    """The machine a case's code runs in (built by :mod:`difftest.builders`)."""

    mode: ModeName
    paging: PagingName = "none"
    page_size: Literal[4096, 2097152, 1073741824] = Field(
        default=4096, description="page size of the mappings of code, stack and data (paging only)")
    cpl: Literal[0, 3] = 0
    idt: bool = Field(default=True, description="IDT/IVT with handler stubs that record the exception")

    @model_validator(mode="after")
    def _consistent(self) -> Environment:
        if self.mode == "real" and (self.paging != "none" or self.cpl):
            raise ValueError("real mode has no paging and runs at CPL 0")
        if self.mode == "long64" and self.paging != "4-level":
            raise ValueError("64-bit mode needs 4-level paging")
        if self.mode in ("real", "prot16") and self.page_size != PAGE:
            raise ValueError(f"page size {self.page_size:#x} needs paging")
        if self.paging in ("none",) and self.page_size != PAGE:
            raise ValueError(f"page size {self.page_size:#x} needs paging")
        if self.paging == "32-bit" and self.page_size != PAGE:
            raise ValueError("this format has 4 KiB pages only with 32-bit paging")
        if self.page_size == 1 << 30 and self.paging != "4-level":
            raise ValueError("1 GiB pages exist only with 4-level paging")
        return self

    @property
    def bits(self) -> int:
        return BITS[self.mode]

    def label(self) -> str:
        size = {4096: "4K", 1 << 21: "2M", 1 << 30: "1G"}[self.page_size]
        paging = "" if self.paging == "none" else f"/{self.paging}/{size}"
        return f"{self.mode}{paging}/cpl{self.cpl}"


class Provenance(Model):
    generator: str = Field(description="what made the case: a generator name, 'hand', 'minimized', ...")
    seed: int | None = None
    campaign: str | None = None
    index: int | None = Field(default=None, description="case number within the campaign/seed stream")
    parent: str | None = Field(default=None, description="name of the case this one was derived from")


class Case(Model):
    """One differential-testing case."""

    version: Literal[1] = CASE_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    env: Environment
    snapshot: Snapshot
    code_physical: U64 = Field(description="physical address of the code's first byte")
    code: str = Field(pattern="^([0-9a-f]{2})*$", description="hex code bytes, terminating HLT included")
    insn_offsets: list[int] = Field(description="start offset of each generated instruction within code")
    disassembly: list[str] = Field(default_factory=list, description="for humans; derived from code, never read")
    budget: int = Field(default=64, ge=1, le=1_000_000)
    tags: list[str] = Field(default_factory=list)
    provenance: Provenance = Field(default_factory=lambda: Provenance(generator="hand"))
    explanation: str = Field(default="", description="for corpus cases: what this case shows")

    @field_validator("code")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @model_validator(mode="after")
    def _consistent(self) -> Case:
        raw = self.code_bytes
        offs = self.insn_offsets
        if any(b <= a for a, b in pairwise(offs)) or (offs and (offs[0] != 0 or offs[-1] >= len(raw))):
            raise ValueError("insn_offsets must start at 0, increase, and lie inside code")
        stored = _read_phys(self.snapshot.pages, self.code_physical, len(raw))
        if stored is None:
            raise ValueError(f"code at {self.code_physical:#x} is not in the snapshot's pages")
        if stored != raw:
            raise ValueError(f"snapshot memory at {self.code_physical:#x} does not hold the case's code")
        return self

    # -- views -----------------------------------------------------------------
    @property
    def code_bytes(self) -> bytes:
        return bytes.fromhex(self.code)

    def instructions(self) -> list[bytes]:
        """The generated instructions' bytes (the terminating HLT excluded)."""
        raw = self.code_bytes
        if not self.insn_offsets:
            return []
        ends = [*self.insn_offsets[1:], self._body_end()]
        return [raw[a:b] for a, b in zip(self.insn_offsets, ends, strict=True)]

    def _body_end(self) -> int:
        raw = self.code_bytes
        return len(raw) - 1 if raw.endswith(HLT) else len(raw)

    # -- derivations -------------------------------------------------------------
    def with_instructions(self, insns: list[bytes], *, name: str | None = None) -> Case:
        """This case with its code replaced by ``insns`` + HLT.

        The old code bytes beyond are overwritten with HLT too, so a forward jump
        of a kept instruction that now points past the end still lands on a HLT
        rather than on zero bytes (which would run as ADD instructions).
        """
        body = b"".join(insns)
        code = body + HLT
        old_len = len(self.code_bytes)
        fill = code + HLT * max(0, old_len - len(code))
        snap = self.snapshot.model_copy(deep=True)
        snap.pages = _write_phys(snap.pages, self.code_physical, fill)
        offsets, pos = [], 0
        for ins in insns:
            offsets.append(pos)
            pos += len(ins)
        return Case(name=name or self.name, env=self.env, snapshot=snap, code_physical=self.code_physical,
                    code=code.hex(), insn_offsets=offsets, disassembly=disassemble(code, self.env.bits,
                                                                                   self.snapshot.regs.rip),
                    budget=self.budget, tags=list(self.tags), provenance=self.provenance,
                    explanation=self.explanation)

    # -- files -------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> Case:
        """Read a case file; any problem is a one-line :class:`CaseError`."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise CaseError(f"{p}: cannot read: {e.strerror or e}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "case"
            raise CaseError(f"{p}: {where}: {err['msg']}") from None


def make_case(name: str, env: Environment, snapshot: Snapshot, code_physical: int, insns: list[bytes], *,
              budget: int | None = None, tags: list[str] | None = None, provenance: Provenance | None = None,
              explanation: str = "") -> Case:
    """A case whose snapshot already holds ``insns`` + HLT at ``code_physical`` (RIP at its start)."""
    code = b"".join(insns) + HLT
    offsets, pos = [], 0
    for ins in insns:
        offsets.append(pos)
        pos += len(ins)
    return Case(name=name, env=env, snapshot=snapshot, code_physical=code_physical, code=code.hex(),
                insn_offsets=offsets, disassembly=disassemble(code, env.bits, snapshot.regs.rip),
                budget=budget if budget is not None else 4 * len(insns) + 8, tags=tags or [],
                provenance=provenance or Provenance(generator="hand"), explanation=explanation)


def disassemble(code: bytes, bits: int, ip: int) -> list[str]:
    """``address: bytes  mnemonic`` lines (iced-x86, Intel syntax)."""
    from iced_x86 import Decoder, Formatter, FormatterSyntax

    fmt = Formatter(FormatterSyntax.INTEL)
    dec = Decoder(bits, code, ip=ip)
    lines = []
    for ins in dec:
        off = ins.ip - ip
        raw = code[off:off + ins.len].hex()
        lines.append(f"{ins.ip:#x}: {raw:<30} {fmt.format(ins)}")
    return lines


def _read_phys(pages: list[PageModel], addr: int, n: int) -> bytes | None:
    by_addr = {p.address: p for p in pages}
    out = bytearray()
    while n:
        base, off = addr & ~(PAGE - 1), addr & (PAGE - 1)
        page = by_addr.get(base)
        if page is None:
            return None
        take = min(n, PAGE - off)
        out += page.to_bytes()[off:off + take]
        addr, n = addr + take, n - take
    return bytes(out)


def _write_phys(pages: list[PageModel], addr: int, data: bytes) -> list[PageModel]:
    by_addr = {p.address: p for p in pages}
    pos = 0
    while pos < len(data):
        base, off = (addr + pos) & ~(PAGE - 1), (addr + pos) & (PAGE - 1)
        take = min(len(data) - pos, PAGE - off)
        old = bytearray(by_addr[base].to_bytes()) if base in by_addr else bytearray(PAGE)
        old[off:off + take] = data[pos:pos + take]
        by_addr[base] = PageModel.from_bytes(base, old)  # canonical by construction: no re-validation
        pos += take
    return sorted(by_addr.values(), key=lambda p: p.address)


def json_schema() -> str:
    return json.dumps(Case.model_json_schema(mode="validation"), indent=1)
