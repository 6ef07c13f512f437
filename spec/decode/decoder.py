"""The instruction decoder: bytes -> :class:`Insn`, driven by the opcode map.

Implements Intel SDM Vol. 2A chapter 2 (instruction format) / AMD APM Vol. 3
chapter 1: legacy prefixes and their groups, REX, the opcode maps, ModRM/SIB
and displacements (16-bit and 32/64-bit forms, RIP-relative), immediates, the
operand- and address-size attributes, and the 15-byte limit.

Decoding is concrete: instruction bytes are always known when an instruction
is fetched.  Faults are architectural (#UD, #GP(0) for more than 15 bytes);
an opcode the map does not contain is :class:`Unimplemented` (the model does
not know it), never #UD.  All bytes of an instruction are fetched before a
#UD is raised, so the 15-byte limit and fetch faults come first (SDM Vol. 3A
6.9: instruction-length violations precede invalid opcodes).

Vendor rules (``vendor="amd"``, the default, or ``"intel"``):

* near branches (``f64`` rows) with 66 in 64-bit mode: AMD honours the
  16-bit operand size (APM Vol. 3 1.2.5), Intel ignores 66 (SDM Vol. 1 3.6.1);
* far pointers in memory (``amd32`` rows) with REX.W: Intel reads m16:64,
  AMD ignores REX.W;
* LOCK MOV CR0 is the AMD alternative encoding of CR8 (APM Vol. 3 MOV CRn,
  CPUID Fn8000_0001 ECX.AltMovCr8); on Intel it is #UD;
* segment-override prefixes in 64-bit mode.  Both manuals call the ES/CS/SS/DS
  overrides ineffective there (APM Vol. 3 1.2.4, Vol. 1 4.12.2: "null
  prefixes"; SDM Vol. 1 3.3.7, 3.4.2.1: their bases are treated as 0).
  Intel: they are ignored entirely, so an FS/GS override before or after them
  stays and without one the default segment applies.  AMD (measured on an EPYC
  under KVM, corpus/regressions/amd-last-segment-prefix-wins.json): the last
  segment prefix decides, as in the other modes -- ``65 36`` is SS, and an
  ES/CS/SS/DS prefix after FS/GS takes over.  Such a segment's base is
  ignored, but it decides the fault: a non-canonical SS-relative access is
  #SS(0), any other #GP(0) (SDM Vol. 3A 6.15; APM Vol. 2 8.4).  Measured on
  the same CPU, the earlier FS/GS override is not entirely cancelled: the
  canonical check is on the effective address, and the FS/GS base is added
  when the sum is canonical (otherwise the effective address alone is used).
  The decode records that FS/GS as ``Insn.fsgs_base``; the semantics apply it
  in :meth:`spec.isa.context.Exec.linear` to the overridden operand (not
  modelled, i.e. no FS/GS base, when an ES override meets an ES:[rDI]
  operand or an SS override an instruction with implicit stack accesses).

Where the references disagree the choice is documented here and pinned in
tests/test_decoder_crosscheck.py: ``F3 REX.B 90`` is ``XCHG r8, rAX`` (REX.B
selects the register before F3 can select PAUSE; APM Vol. 3 XCHG), and MOV
to/from a control register that does not exist (CR1, CR5-CR7, CR9-CR15) or a
debug register with REX.R is #UD at decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from spec.decode.insn import CR, CS, DR, DS, ES, FAR, FS, GS, IMM, MEM, REG, REL, SEG, SS, Insn, Operand
from spec.decode.opcodes import ROWS, Row
from spec.faults import Fault, Unimplemented, Vector

MAX_LENGTH = 15  # SDM Vol. 2A 2.3.11: longer instructions raise #GP(0)

SEGMENT_PREFIXES = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}
LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x66, 0x67, *SEGMENT_PREFIXES})

# 16-bit ModRM r/m encodings (SDM Vol. 2A Table 2-1): (base, index) register numbers.
_RM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))

# Instructions with implicit stack accesses (SS), which an SS override's FS/GS base quirk must not reach.
_STACK_MNEMONICS = frozenset({"PUSH", "POP", "PUSHF", "POPF", "CALL", "CALLF", "RET", "RETF", "IRET", "ENTER",
                              "LEAVE", "INT", "INT1", "INT3", "INTO"})

# Control registers that exist (SDM Vol. 3A 2.5; MOV CRn: others are #UD).
VALID_CRS = frozenset({0, 2, 3, 4, 8})

# Fixed operands (Appendix A.2.3 register codes); rAX/eAX depend on the operand size.
_OPSIZE_RAX = Operand(REG, 64, 0)
_Z_RAX = Operand(REG, 32, 0)
_FIXED: dict[str, Operand] = {
    **{name: Operand(SEG, 16, num) for name, num in (("ES", ES), ("CS", CS), ("SS", SS), ("DS", DS), ("FS", FS),
                                                      ("GS", GS))},
    "AL": Operand(REG, 8, 0), "CL": Operand(REG, 8, 1), "DX": Operand(REG, 16, 2), "1": Operand(IMM, 8, value=1),
    "rAX": _OPSIZE_RAX, "eAX": _Z_RAX,
}
_SIZE = {"b": 8, "w": 16, "d": 32, "q": 64, "dq": 128}


@dataclass
class _Entry:
    """Rows that share an opcode: plain, by ModRM reg digit, by exact ModRM, by mandatory prefix."""

    plain: list[Row] = field(default_factory=list)
    by_digit: dict[int, list[Row]] = field(default_factory=dict)
    by_exact: dict[int, list[Row]] = field(default_factory=dict)
    mandatory: dict[int, _Entry] = field(default_factory=dict)

    @cached_property
    def has_modrm(self) -> bool:
        """Whether a ModRM byte follows the opcode (computed once: the map is fixed after :func:`_build`)."""
        return bool(self.by_digit or self.by_exact or any(r.has_modrm for r in self.plain))


def _build(rows: list[Row]) -> dict[tuple[int, ...], _Entry]:
    table: dict[tuple[int, ...], _Entry] = {}
    for row in rows:
        entry = table.setdefault(row.opcode, _Entry())
        if row.mandatory is not None:
            entry = entry.mandatory.setdefault(row.mandatory, _Entry())
        if row.modrm_exact is not None:
            entry.by_exact.setdefault(row.modrm_exact, []).append(row)
        elif row.digit is not None:
            entry.by_digit.setdefault(row.digit, []).append(row)
        else:
            entry.plain.append(row)
    return table


OPCODE_MAP = _build(ROWS)

# Opcode 90: NOP, PAUSE (F3 90) and XCHG r8, rAX (REX.B 90) (SDM Vol. 2B NOP, PAUSE, XCHG).
_NOP90 = next(r for r in OPCODE_MAP[(0x90,)].plain if r.mnemonic == "NOP")
_XCHG90 = next(r for r in OPCODE_MAP[(0x90,)].plain if r.mnemonic == "XCHG")
_PAUSE = OPCODE_MAP[(0x90,)].mandatory[0xF3].plain[0]


def _select(rows: list[Row], bits: int, rex_w: bool) -> Row | None:
    """Pick the row valid in this mode (i64/o64 alternatives, REX.W alternatives).

    A row invalid in this mode (``i64`` in 64-bit mode, ``o64`` outside it) is
    returned only when no valid alternative exists; the caller raises #UD.
    """
    fallback = None
    for r in rows:
        a = r.attrs
        if "rexw" in a and not rex_w:
            continue
        if "norexw" in a and rex_w:
            continue
        if ("o64" in a and bits != 64) or ("i64" in a and bits == 64):
            fallback = fallback or r
            continue
        return r
    return fallback


@dataclass(frozen=True)
class DecodeConfig:
    """What the decode depends on besides the bytes: code size and vendor rules."""

    bits: int  # default code size: 16, 32 or 64
    vendor: str = "amd"  # see the module docstring for the vendor-dependent rules


def _opcode_text(key: tuple[int, ...]) -> str:
    return " ".join(f"{x:02X}" for x in key)


def decode(code: bytes, bits: int, more: Callable[[int], bytes] | None = None, *, vendor: str = "amd",
           real: bool = False) -> Insn:
    """Decode one instruction from ``code`` for a ``bits``-bit code segment.

    ``more(n)`` is asked for at least ``n`` bytes when ``code`` runs out (it
    may raise the fetch's fault); without it, running out is #GP(0) past 15
    bytes or :class:`IndexError` otherwise.
    """
    buf = code

    def byte(i: int) -> int:
        nonlocal buf
        if i >= MAX_LENGTH:
            raise Fault(Vector.GP, 0)
        if i >= len(buf):
            if more is None:
                raise IndexError("instruction bytes exhausted")
            buf = more(i + 1)
        return buf[i]

    def take(n: int) -> int:
        """The next ``n`` bytes as a little-endian unsigned integer."""
        nonlocal pos
        v = 0
        for k in range(n):
            v |= byte(pos + k) << (8 * k)
        pos += n
        return v

    # -- prefixes (SDM Vol. 2A 2.1.1; REX must immediately precede the opcode, 2.2.1) --
    pos = 0
    lock = False
    rep_byte: int | None = None  # the last F2/F3 (it is the one that selects a mandatory-prefix row)
    seg_override: int | None = None
    last_fsgs: int | None = None  # the last FS/GS override (AMD 64-bit base quirk, module docstring)
    opsize_prefix = addrsize_prefix = False
    rex = 0
    while True:
        b = byte(pos)
        if b in LEGACY_PREFIXES:
            rex = 0  # a REX followed by a legacy prefix is ignored (SDM Vol. 2A 2.2.1)
            if b == 0xF0:
                lock = True
            elif b == 0xF2 or b == 0xF3:
                rep_byte = b
            elif b == 0x66:
                opsize_prefix = True
            elif b == 0x67:
                addrsize_prefix = True
            elif bits != 64 or vendor == "amd" or b >= 0x64:
                # The last segment override wins (SDM Vol. 2A 2.1.1); for the 64-bit vendor rule see the
                # module docstring (Intel: ES/CS/SS/DS prefixes are ignored, SDM Vol. 1 3.3.7).
                seg_override = SEGMENT_PREFIXES[b]
                if b >= 0x64:
                    last_fsgs = seg_override
            pos += 1
            continue
        if bits == 64 and 0x40 <= b <= 0x4F:
            rex = b  # of several REX prefixes only the last counts
            pos += 1
            continue
        break
    rex_w, rex_r, rex_x, rex_b = bool(rex & 8), (rex >> 2) & 1, (rex >> 1) & 1, rex & 1

    # -- opcode, mandatory prefix, ModRM, row ------------------------------------------
    b0 = byte(pos)
    pos += 1
    if b0 == 0x0F:
        key: tuple[int, ...] = (0x0F, byte(pos))
        pos += 1
    else:
        key = (b0,)
    entry = OPCODE_MAP.get(key)
    if entry is None:
        raise Unimplemented(f"opcode {_opcode_text(key)} is not in the spec's opcode map")
    mandatory_used = None
    modrm = None
    mod = reg = rm = 0
    if key == (0x90,):
        # REX.B selects XCHG r8, rAX; otherwise F3 selects PAUSE and anything else is NOP
        # (SDM Vol. 2B NOP/PAUSE/XCHG; APM Vol. 3 XCHG: 90 is a NOP only when it would exchange rAX with itself).
        if rex_b:
            row: Row | None = _XCHG90
        elif rep_byte == 0xF3:
            row, mandatory_used = _PAUSE, 0xF3
        else:
            row = _NOP90
    else:
        if rep_byte is not None and rep_byte in entry.mandatory:
            entry = entry.mandatory[rep_byte]
            mandatory_used = rep_byte
        if entry.has_modrm:
            modrm = byte(pos)
            pos += 1
            mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if modrm is not None and mod == 3 and modrm in entry.by_exact:
            candidates = entry.by_exact[modrm]
        elif modrm is not None and reg in entry.by_digit:
            candidates = entry.by_digit[reg]
        else:
            candidates = entry.plain
        row = _select(candidates, bits, rex_w)
        if row is None:
            raise Unimplemented(f"opcode {_opcode_text(key)}" + (f" /{reg}" if modrm is not None else "")
                                + " is not in the spec's opcode map")
        if entry.by_exact and mod == 3 and row.modrm_exact is None and any(o[0] == "M" for o in row.operands):
            # A register form of a system group (0F 01 C0..FF) the map does not list: another instruction.
            raise Unimplemented(f"opcode {_opcode_text(key)} with ModRM {modrm:02X} is not in the spec's opcode map")
    attrs = row.attrs
    # VEX/EVEX are not recognized in real-address and virtual-8086 mode (``real``): there C4/C5/62
    # are LES/LDS/BOUND, #UD with a register operand (SDM Vol. 2A 2.3.2, 2.8 "VEX prefix" rows).
    if "vex" in attrs and not real and (bits == 64 or mod == 3):
        raise Unimplemented(f"{_opcode_text(key)} is a VEX/EVEX escape here: VEX/EVEX instructions are not modelled")

    # -- operand and address size (SDM Vol. 1 3.6, Vol. 2A 2.2.1.2 Table 2-4) ----------
    if "nat" in attrs:
        opsize = 64 if bits == 64 else 32  # MOV CR/DR: 66 and REX.W are ignored
    elif bits == 64:
        if rex_w:  # REX.W beats 66; AMD has no m16:64 far pointers and reads m16:32 instead
            opsize = 32 if (vendor == "amd" and "amd32" in attrs) else 64
        elif "d64" in attrs:
            opsize = 16 if opsize_prefix else 64
        elif "f64" in attrs:
            opsize = 16 if (opsize_prefix and vendor == "amd") else 64
        else:
            opsize = 16 if opsize_prefix else 32
    else:
        opsize = (32 if bits == 16 else 16) if opsize_prefix else bits
    if bits == 64:
        addrsize = 32 if addrsize_prefix else 64
    else:
        addrsize = (32 if bits == 16 else 16) if addrsize_prefix else bits

    # -- ModRM memory operand (SDM Vol. 2A 2.1.5, Tables 2-1..2-3; 2.2.1.6 RIP-relative) --
    mem: tuple | None = None
    if modrm is not None and mod != 3 and row.modrm_exact is None and not any(o[0] == "R" for o in row.operands):
        base: int | None = None
        index: int | None = None
        scale = 0
        disp = 0
        rip_rel = False
        if addrsize == 16:
            if mod == 0 and rm == 6:
                disp = take(2)  # disp16, no base
            else:
                base, index = _RM16[rm]
            if mod == 1:
                disp = take(1)
            elif mod == 2:
                disp = take(2)
            disp = disp - 0x10000 if (mod != 1 and disp & 0x8000) else disp
            disp = disp - 0x100 if (mod == 1 and disp & 0x80) else disp
            default_seg = SS if base == 5 else DS  # [BP+...] defaults to SS (SDM Vol. 1 3.7.4.1)
        else:
            if rm == 4:
                sib = byte(pos)
                pos += 1
                scale = sib >> 6
                idx = ((sib >> 3) & 7) | (rex_x << 3)
                index = None if idx == 4 else idx  # index 100b without REX.X: none (r12 is a valid index)
                if (sib & 7) == 5 and mod == 0:
                    disp = take(4)  # no base, disp32
                else:
                    base = (sib & 7) | (rex_b << 3)
            elif rm == 5 and mod == 0:
                disp = take(4)
                rip_rel = bits == 64  # RIP-relative (EIP-relative with 67) in 64-bit mode, disp32 otherwise
            else:
                base = rm | (rex_b << 3)
            if mod == 1:
                disp = take(1)
                disp = disp - 0x100 if disp & 0x80 else disp
            elif mod == 2:
                disp = take(4)
            if mod != 1 and disp & 0x8000_0000:
                disp -= 1 << 32
            default_seg = SS if base in (4, 5) else DS  # rSP/rBP bases default to SS; r12/r13 do not
        seg = seg_override if seg_override is not None else default_seg
        mem = (seg, base, index, scale, disp, rip_rel)

    # -- operands, immediates in encoding order (SDM Vol. 2A 2.1: immediates come last) --
    ud = False
    operands: list[Operand] = []
    for spec in row.operands:
        fixed = _FIXED.get(spec)
        if fixed is not None:
            if fixed is _OPSIZE_RAX:
                operands.append(Operand(REG, opsize, 0))
            elif fixed is _Z_RAX:
                operands.append(Operand(REG, 16 if opsize == 16 else 32, 0))
            else:
                operands.append(fixed)
            continue
        kind = spec[0]
        code_ = spec[1:]
        if kind in "EMR":
            if kind == "M" and code_ in ("", "p", "a", "s"):
                size = {"": 0, "p": 16 + opsize, "a": 2 * opsize, "s": 80 if bits == 64 else 48}[code_]
            elif code_ == "vw":
                size = opsize if mem is None else 16  # register at the operand size, memory 16 bits
            else:
                size = opsize if code_ == "v" else _size(code_, opsize)
            if mem is None:
                operands.append(_gpr(rm | (rex_b << 3), size, rex))
            else:
                seg, base, index, scale, disp, rip_rel = mem
                operands.append(Operand(MEM, size, seg=seg, base=base, index=index, scale=scale, disp=disp,
                                        rip_rel=rip_rel))
            if kind == "M" and mem is None:
                ud = True  # a register where the row requires memory
        elif kind == "G":
            operands.append(_gpr(reg | (rex_r << 3), opsize if code_ == "v" else _size(code_, opsize), rex))
        elif kind == "Z":
            operands.append(_gpr(row.reg_in_opcode | (rex_b << 3), opsize if code_ == "v" else _size(code_, opsize),
                                 rex))
        elif kind == "I":
            # Iz/Ibs are sign-extended to the operand size; Iv is the full operand size (B8+r with REX.W:
            # imm64); other immediates keep their encoded size (SDM Vol. 2A 2.2.1.5).
            if spec == "Ibs":
                enc, size = 8, opsize
            elif code_ == "z":
                enc, size = (16 if opsize == 16 else 32), opsize
            elif code_ == "v":
                enc = size = opsize
            else:
                enc = size = _SIZE[code_]
            v = take(enc // 8)
            if size > enc and v >> (enc - 1):
                v |= ((1 << size) - 1) ^ ((1 << enc) - 1)
            operands.append(Operand(IMM, size, value=v))
        elif kind == "J":
            enc = 8 if code_ == "b" else (16 if opsize == 16 else 32)
            v = take(enc // 8)
            operands.append(Operand(REL, opsize, value=v - (1 << enc) if v >> (enc - 1) else v))
        elif kind == "O":
            operands.append(Operand(MEM, opsize if code_ == "v" else _SIZE[code_],
                                    seg=seg_override if seg_override is not None else DS, disp=take(addrsize // 8)))
        elif kind == "X":
            operands.append(Operand(MEM, opsize if code_ == "v" else _size(code_, opsize),
                                    seg=seg_override if seg_override is not None else DS, base=6))
        elif kind == "Y":
            operands.append(Operand(MEM, opsize if code_ == "v" else _size(code_, opsize), seg=ES, base=7))
        elif kind == "S":
            if reg > 5:
                ud = True  # segment register encodings 6 and 7 are reserved (SDM Vol. 2B MOV)
            operands.append(Operand(SEG, 16, reg))
        elif kind == "C":
            num = reg | (rex_r << 3)
            if lock and vendor == "amd":
                num |= 8  # LOCK MOV CR0 = MOV CR8 (APM Vol. 3 MOV CRn); the LOCK is consumed
                lock = False
            if num not in VALID_CRS:
                ud = True
            operands.append(Operand(CR, opsize, num))
        elif kind == "D":
            if rex_r:
                ud = True  # DR8-DR15 do not exist (SDM Vol. 2B MOV--Move to/from Debug Registers)
            operands.append(Operand(DR, opsize, reg | (rex_r << 3)))
        elif kind == "A":
            off_bits = 16 if opsize == 16 else 32
            off = take(off_bits // 8)
            operands.append(Operand(FAR, 16 + off_bits, reg=take(2), value=off))
        else:
            raise ValueError(f"unknown operand spec {spec!r} in row {row.text}")
    # Read the last byte so the 15-byte limit and fetch faults apply to the whole instruction.
    byte(pos - 1)

    # -- #UD conditions (SDM Vol. 2A 2.1.1 LOCK; Appendix A.2.5 invalid in 64-bit mode) ----
    if ud or "ud" in attrs:
        raise Fault(Vector.UD)
    if ("i64" in attrs and bits == 64) or ("o64" in attrs and bits != 64):
        raise Fault(Vector.UD)
    if lock and ("lock" not in attrs or not operands or operands[0].kind != MEM):
        raise Fault(Vector.UD)

    rep = None
    if rep_byte is not None and mandatory_used is None:
        if "repe" in attrs:
            rep = "repe" if rep_byte == 0xF3 else "repne"
        elif "rep" in attrs:
            rep = "rep"
    fsgs_base = None
    if bits == 64 and last_fsgs is not None and seg_override is not None and seg_override < FS:
        # AMD: ES/CS/SS/DS after FS/GS; that FS/GS base may still apply (module docstring).  Not where the
        # instruction also makes an implicit ES:[rDI] or stack access in the overriding segment: linear()
        # sees only the segment and could not tell the two apart (the implicit one has no FS/GS base).
        if not ((seg_override == ES and any(spec[0] == "Y" for spec in row.operands))
                or (seg_override == SS and row.mnemonic in _STACK_MNEMONICS)):
            fsgs_base = last_fsgs
    return Insn(row=row, length=pos, opsize=opsize, addrsize=addrsize, operands=tuple(operands),
                raw=bytes(buf[:pos]), lock=lock, rep=rep, seg_override=seg_override, rex=rex, modrm=modrm,
                fsgs_base=fsgs_base)


def _size(code: str, opsize: int) -> int:
    """Operand size in bits of a size code (SDM Vol. 2D A.2.2), given the operand-size attribute."""
    if code == "v" or code == "vw":
        return opsize
    if code == "z":
        return 16 if opsize == 16 else 32
    if code == "y":
        return 64 if opsize == 64 else 32
    return _SIZE[code]


def _gpr(num: int, size: int, rex: int) -> Operand:
    """A general-purpose register operand; byte registers 4-7 are AH..BH without REX, SPL..DIL with
    any REX (SDM Vol. 2A 2.2.1.2, Table 3-1)."""
    if size == 8 and not rex and 4 <= num <= 7:
        return Operand(REG, 8, num - 4, high8=True)
    return Operand(REG, size, num)


__all__ = ["CR", "DR", "FAR", "IMM", "MAX_LENGTH", "OPCODE_MAP", "REL", "DecodeConfig", "decode"]
