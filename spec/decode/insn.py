"""Decoded instructions and their operands (plain data; produced by the decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spec.decode.opcodes import Row

# Operand kinds.
REG = 0  # general-purpose register
MEM = 1  # memory: segment + base + index*scale + disp (or RIP-relative)
IMM = 2  # immediate, already extended to the operand size
REL = 3  # relative branch displacement (a signed Python int)
SEG = 4  # segment register (ES=0 CS=1 SS=2 DS=3 FS=4 GS=5)
CR = 5  # control register
DR = 6  # debug register
FAR = 7  # direct far pointer (selector:offset immediate)

KIND_NAMES = {REG: "reg", MEM: "mem", IMM: "imm", REL: "rel", SEG: "seg", CR: "cr", DR: "dr", FAR: "far"}

# Segment register numbers, in the encoding order of the ModRM reg field (SDM Vol. 2A 3.1.1.3).
ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("ES", "CS", "SS", "DS", "FS", "GS")

GPR64 = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
         "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


def reg_name(reg: int, size: int, high8: bool = False) -> str:
    """Assembler name of a general-purpose register part (e.g. 2, 8 -> ``DL``)."""
    if high8:
        return ("AH", "CH", "DH", "BH")[reg]
    base = GPR64[reg]
    if size == 64:
        return base
    if reg >= 8:
        return base + {32: "D", 16: "W", 8: "B"}[size]
    if size == 32:
        return "E" + base[1:]
    if size == 16:
        return base[1:]
    return ("AL", "CL", "DL", "BL", "SPL", "BPL", "SIL", "DIL")[reg]


@dataclass(frozen=True, slots=True)
class Operand:
    """One explicit operand.

    ``size`` is in bits.  For ``REG`` with ``high8`` the register is AH/CH/DH/BH
    of ``reg`` 0-3.  For ``MEM`` the effective address is
    ``base + (index << scale) + disp`` in the instruction's address size, or
    ``next RIP + disp`` when ``rip_rel`` (EIP-relative when the address size
    is 32); ``disp`` is the signed ModRM displacement, or the unsigned offset
    of a moffs operand; ``seg`` is the segment after overrides (in 64-bit mode
    an ES/CS/SS/DS override never displaces FS/GS, and the semantics ignore
    all but FS/GS bases); ``size`` 0 is an address-only operand (LEA,
    INVLPG).  ``IMM`` values are unsigned, already extended to ``size``;
    ``REL`` values are signed; ``FAR`` keeps the selector in ``reg`` and the
    offset in ``value``.
    """

    kind: int
    size: int
    reg: int = 0
    high8: bool = False
    seg: int = DS
    base: int | None = None
    index: int | None = None
    scale: int = 0
    disp: int = 0
    rip_rel: bool = False
    value: int = 0

    def __str__(self) -> str:
        if self.kind == REG:
            return reg_name(self.reg, self.size, self.high8).lower()
        if self.kind == IMM:
            return hex(self.value)
        if self.kind == REL:
            return f"rel{self.value:+#x}"
        if self.kind == SEG:
            return SEG_NAMES[self.reg].lower()
        if self.kind == CR:
            return f"cr{self.reg}"
        if self.kind == DR:
            return f"dr{self.reg}"
        if self.kind == FAR:
            return f"{self.reg:#x}:{self.value:#x}"
        parts = []
        if self.rip_rel:
            parts.append("rip")
        if self.base is not None:
            parts.append(GPR64[self.base].lower())
        if self.index is not None:
            parts.append(f"{GPR64[self.index].lower()}*{1 << self.scale}")
        if self.disp or not parts:
            parts.append(hex(self.disp))
        return f"m{self.size} {SEG_NAMES[self.seg].lower()}:[{'+'.join(parts)}]"


@dataclass(slots=True)
class Insn:
    """A decoded instruction: its opcode-map row and everything the decode resolved."""

    row: Row
    length: int
    opsize: int
    addrsize: int
    operands: tuple[Operand, ...]
    raw: bytes
    lock: bool = False
    rep: str | None = None  # "rep"/"repe" (F3) or "repne" (F2) on string rows
    seg_override: int | None = None
    rex: int = 0
    modrm: int | None = None
    extra: dict[str, int] = field(default_factory=dict)
    fsgs_base: int | None = None  # AMD, 64-bit: FS/GS overridden by a later ES/CS/SS/DS (decoder docstring)

    @property
    def mnemonic(self) -> str:
        return self.row.mnemonic

    @property
    def name(self) -> str:
        """The assembler name of this form (e.g. ``CWDE`` for CBW at operand size 32)."""
        return self.row.name_for(self.opsize, self.addrsize)

    def __str__(self) -> str:
        ops = ", ".join(str(o) for o in self.operands)
        pfx = (self.rep + " ") if self.rep else ""
        pfx = ("lock " if self.lock else "") + pfx
        return f"{pfx}{self.name.lower()} {ops}".rstrip()
