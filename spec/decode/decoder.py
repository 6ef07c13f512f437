"""The instruction decoder: bytes -> :class:`Insn`, driven by the opcode map.

Implements Intel SDM Vol. 2A chapter 2 (instruction format) / AMD APM Vol. 3
chapter 1: legacy prefixes and their groups, REX, the opcode maps, ModRM/SIB
and displacements (16-bit and 32/64-bit forms, RIP-relative), immediates, the
operand- and address-size attributes, and the 15-byte limit.

Decoding is concrete: instruction bytes are always known when an instruction
is fetched.  Faults are architectural (#UD, #GP(0) for more than 15 bytes);
an opcode the map does not contain is :class:`Unimplemented` (the model does
not know it), never #UD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from spec.decode.insn import CR, CS, DR, DS, ES, FAR, IMM, MEM, REG, REL, SEG, SS, Insn, Operand
from spec.decode.opcodes import ROWS, Row
from spec.faults import Fault, Unimplemented, Vector

MAX_LENGTH = 15  # SDM Vol. 2A 2.3.11: longer instructions raise #GP(0)

SEGMENT_PREFIXES = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: 4, 0x65: 5}
LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x66, 0x67, *SEGMENT_PREFIXES})

# 16-bit ModRM r/m encodings (SDM Vol. 2A Table 2-1): (base, index) register numbers.
_RM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))


@dataclass
class _Entry:
    """Rows that share an opcode: plain, by ModRM reg digit, by exact ModRM, by mandatory prefix."""

    plain: list[Row] = field(default_factory=list)
    by_digit: dict[int, list[Row]] = field(default_factory=dict)
    by_exact: dict[int, list[Row]] = field(default_factory=dict)
    mandatory: dict[int, _Entry] = field(default_factory=dict)

    @property
    def has_modrm(self) -> bool:
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


def _select(rows: list[Row], bits: int, rex_w: bool) -> Row | None:
    """Pick the row valid in this mode (i64/o64 alternatives, REX.W alternatives)."""
    best = None
    for r in rows:
        a = r.attrs
        if "o64" in a and bits != 64:
            continue
        if "rexw" in a and not rex_w:
            continue
        if "norexw" in a and rex_w:
            continue
        if "i64" in a and bits == 64:
            best = best or r  # kept only if nothing valid in 64-bit mode matches
            continue
        return r
    return best


@dataclass(frozen=True)
class DecodeConfig:
    """What the decode depends on besides the bytes: code size and vendor rules."""

    bits: int  # default code size: 16, 32 or 64
    vendor: str = "amd"  # near branches with 66 in 64-bit mode (APM Vol. 3 1.2.5 vs SDM Vol. 1 3.6.1)


def decode(code: bytes, bits: int, more: Callable[[int], bytes] | None = None, *, vendor: str = "amd") -> Insn:
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

    # -- prefixes (SDM Vol. 2A 2.1.1; REX must immediately precede the opcode, 2.2.1) --
    pos = 0
    lock = False
    rep_byte: int | None = None
    seg_override: int | None = None
    opsize_prefix = addrsize_prefix = False
    rex = 0
    while True:
        b = byte(pos)
        if b in LEGACY_PREFIXES:
            rex = 0  # a REX followed by a legacy prefix is ignored
            if b == 0xF0:
                lock = True
            elif b in (0xF2, 0xF3):
                rep_byte = b
            elif b == 0x66:
                opsize_prefix = True
            elif b == 0x67:
                addrsize_prefix = True
            else:
                seg_override = SEGMENT_PREFIXES[b]
            pos += 1
            continue
        if bits == 64 and 0x40 <= b <= 0x4F:
            rex = b
            pos += 1
            continue
        break
    rex_w, rex_r, rex_x, rex_b = bool(rex & 8), (rex >> 2) & 1, (rex >> 1) & 1, rex & 1

    # -- opcode ---------------------------------------------------------------------
    b0 = byte(pos)
    pos += 1
    if b0 == 0x0F:
        b1 = byte(pos)
        pos += 1
        key: tuple[int, ...] = (0x0F, b1)
    else:
        key = (b0,)
    entry = OPCODE_MAP.get(key)
    if entry is None:
        raise Unimplemented(f"opcode {' '.join(f'{x:02X}' for x in key)} is not in the spec's opcode map")
    mandatory_used = None
    if rep_byte is not None and rep_byte in entry.mandatory:
        entry = entry.mandatory[rep_byte]
        mandatory_used = rep_byte

    modrm = None
    if entry.has_modrm:
        modrm = byte(pos)
        pos += 1
    mod = modrm >> 6 if modrm is not None else 0
    reg = (modrm >> 3) & 7 if modrm is not None else 0
    rm = modrm & 7 if modrm is not None else 0

    candidates: list[Row] = []
    if modrm is not None and mod == 3 and modrm in entry.by_exact:
        candidates = entry.by_exact[modrm]
    elif modrm is not None and reg in entry.by_digit:
        candidates = entry.by_digit[reg]
    else:
        candidates = entry.plain
    if key == (0x90,) and rex_b:
        candidates = [r for r in candidates if r.mnemonic == "XCHG"]  # 90 with REX.B is XCHG r8, rAX
    elif key == (0x90,):
        candidates = [r for r in candidates if r.mnemonic != "XCHG"]
    row = _select(candidates, bits, rex_w)
    if row is None:
        if entry.by_exact and modrm is not None and mod == 3:
            raise Unimplemented(f"opcode {' '.join(f'{x:02X}' for x in key)} with ModRM {modrm:02X} is not in the map")
        raise Unimplemented(f"opcode {' '.join(f'{x:02X}' for x in key)}"
                            + (f" /{reg}" if modrm is not None else "") + " is not in the spec's opcode map")
    attrs = row.attrs

    # -- operand and address size (SDM Vol. 1 3.6, Vol. 2A 2.2.1.2 Table 2-4) ----------
    if bits == 64:
        if rex_w:
            opsize = 64
        elif "d64" in attrs:
            opsize = 16 if opsize_prefix else 64
        elif "f64" in attrs:
            opsize = 16 if (opsize_prefix and vendor == "amd") else 64
        else:
            opsize = 16 if opsize_prefix else 32
        addrsize = 32 if addrsize_prefix else 64
    else:
        opsize = (32 if bits == 16 else 16) if opsize_prefix else bits
        addrsize = (32 if bits == 16 else 16) if addrsize_prefix else bits

    # -- ModRM memory operand (SDM Vol. 2A 2.1.5, Tables 2-1..2-3; 2.2.1.6 RIP-relative) --
    mem: dict[str, int | bool | None] | None = None
    if modrm is not None and mod != 3 and row.modrm_exact is None:
        base: int | None = None
        index: int | None = None
        scale = 0
        disp = 0
        rip_rel = False
        default_seg = DS
        if addrsize == 16:
            if mod == 0 and rm == 6:
                disp = byte(pos) | byte(pos + 1) << 8
                pos += 2
            else:
                base, index = _RM16[rm]
                if base == 5:
                    default_seg = SS
            if mod == 1:
                disp = byte(pos)
                disp = disp - 0x100 if disp & 0x80 else disp
                pos += 1
            elif mod == 2:
                disp = byte(pos) | byte(pos + 1) << 8
                pos += 2
        else:
            if rm == 4:
                sib = byte(pos)
                pos += 1
                scale = sib >> 6
                idx = ((sib >> 3) & 7) | (rex_x << 3)
                index = None if idx == 4 else idx
                sb = sib & 7
                if sb == 5 and mod == 0:
                    disp = int.from_bytes(bytes(byte(pos + k) for k in range(4)), "little", signed=True)
                    pos += 4
                else:
                    base = sb | (rex_b << 3)
            elif rm == 5 and mod == 0:
                disp = int.from_bytes(bytes(byte(pos + k) for k in range(4)), "little", signed=True)
                pos += 4
                rip_rel = bits == 64
            else:
                base = rm | (rex_b << 3)
            if base is not None and (base & 7) in (4, 5) and base < 8:
                default_seg = SS
            if mod == 1:
                d = byte(pos)
                disp = d - 0x100 if d & 0x80 else d
                pos += 1
            elif mod == 2:
                disp = int.from_bytes(bytes(byte(pos + k) for k in range(4)), "little", signed=True)
                pos += 4
        mem = {"base": base, "index": index, "scale": scale, "disp": disp, "rip_rel": rip_rel,
               "seg": seg_override if seg_override is not None else default_seg}

    # -- operands ---------------------------------------------------------------------
    operands: list[Operand] = []
    imm_parts: list[tuple[int, Callable[[int], Operand]]] = []
    for spec in row.operands:
        op, imm_len = _operand(spec, opsize, addrsize, bits, rex, rex_r, rex_b, reg, rm, mod, mem,
                               row, seg_override)
        if imm_len:
            imm_parts.append((len(operands), op))  # type: ignore[arg-type]
            operands.append(None)  # type: ignore[arg-type]
        else:
            operands.append(op)  # type: ignore[arg-type]
    for slot, maker in imm_parts:
        operand, size_bytes = maker(pos)  # type: ignore[misc]
        raw = 0
        for k in range(size_bytes):
            raw |= byte(pos + k) << (8 * k)
        pos += size_bytes
        operands[slot] = operand(raw)  # type: ignore[operator]
    # Read the last byte so the 15-byte limit and fetch faults apply to the whole instruction.
    byte(pos - 1)

    # -- #UD conditions (SDM Vol. 2A 2.1.1 LOCK; Appendix A.2.5 invalid in 64-bit mode) ----
    if "ud" in attrs:
        raise Fault(Vector.UD)
    if "i64" in attrs and bits == 64:
        raise Fault(Vector.UD)
    if lock and ("lock" not in attrs or not operands or operands[0].kind != MEM):
        raise Fault(Vector.UD)
    for spec, op in zip(row.operands, operands, strict=True):
        if spec[0] == "M" and op.kind != MEM:
            raise Fault(Vector.UD)

    rep = None
    if rep_byte is not None and mandatory_used is None:
        if "repe" in attrs:
            rep = "repe" if rep_byte == 0xF3 else "repne"
        elif "rep" in attrs:
            rep = "rep"
    return Insn(row=row, length=pos, opsize=opsize, addrsize=addrsize, operands=tuple(operands),
                raw=bytes(buf[:pos]), lock=lock, rep=rep, seg_override=seg_override, rex=rex, modrm=modrm)


def _size(code: str, opsize: int) -> int:
    return {"b": 8, "w": 16, "d": 32, "q": 64, "dq": 128, "v": opsize,
            "z": 16 if opsize == 16 else 32, "y": 64 if opsize == 64 else 32, "vw": opsize}[code]


def _operand(spec: str, opsize: int, addrsize: int, bits: int, rex: int, rex_r: int, rex_b: int,
             reg: int, rm: int, mod: int, mem: dict | None, row: Row, seg_override: int | None):
    """Build one operand; returns ``(operand, 0)`` or ``(maker, 1)`` for immediates (decoded last)."""

    def gpr(num: int, size: int) -> Operand:
        if size == 8 and not rex and 4 <= num <= 7:
            return Operand(REG, 8, num - 4, high8=True)  # AH, CH, DH, BH (SDM Vol. 2A 3.7.2.1)
        return Operand(REG, size, num)

    fixed_seg = {"ES": ES, "CS": CS, "SS": SS, "DS": DS, "FS": 4, "GS": 5}
    if spec in fixed_seg:
        return Operand(SEG, 16, fixed_seg[spec]), 0
    if spec == "AL":
        return Operand(REG, 8, 0), 0
    if spec == "CL":
        return Operand(REG, 8, 1), 0
    if spec == "DX":
        return Operand(REG, 16, 2), 0
    if spec == "rAX":
        return Operand(REG, opsize, 0), 0
    if spec == "eAX":
        return Operand(REG, 16 if opsize == 16 else 32, 0), 0
    if spec == "1":
        return Operand(IMM, 8, value=1), 0
    kind, size_code = spec[0], spec[1:]
    if kind in "EMR":
        if kind == "M" and size_code in ("", "p", "a", "s"):
            size = {"": 0, "p": 16 + opsize, "a": 2 * opsize, "s": 80 if bits == 64 else 48}[size_code]
        else:
            size = _size(size_code, opsize)
        if mod == 3 or kind == "R" or mem is None:
            if size_code == "vw":
                size = opsize
            return gpr(rm | (rex_b << 3), size), 0
        if size_code == "vw":
            size = 16
        return Operand(MEM, size, **mem), 0  # type: ignore[arg-type]
    if kind == "G":
        return gpr(reg | (rex_r << 3), _size(size_code, opsize)), 0
    if kind == "S":
        if reg > 5:
            raise Fault(Vector.UD)  # segment register encodings 6 and 7 are reserved
        return Operand(SEG, 16, reg), 0
    if kind == "C":
        return Operand(CR, 64 if bits == 64 else 32, reg | (rex_r << 3)), 0
    if kind == "D":
        return Operand(DR, 64 if bits == 64 else 32, reg | (rex_r << 3)), 0
    if kind == "Z":
        num = row.reg_in_opcode | (rex_b << 3)  # type: ignore[operator]
        return gpr(num, _size(size_code, opsize)), 0
    if kind == "O":
        seg = seg_override if seg_override is not None else DS
        size = _size(size_code, opsize)

        def moffs(_pos: int):
            n = addrsize // 8
            return (lambda raw: Operand(MEM, size, seg=seg, disp=raw)), n
        return moffs, 1
    if kind in "XY":
        size = _size(size_code, opsize)
        if kind == "X":
            seg = seg_override if seg_override is not None else DS
            return Operand(MEM, size, seg=seg, base=6), 0
        return Operand(MEM, size, seg=ES, base=7), 0  # ES:rDI cannot be overridden
    if kind == "I":
        # Iz/Ibs are sign-extended to the operand size; Iv is the full operand size (B8+r with
        # REX.W: imm64); other immediates keep their encoded size (SDM Vol. 2A 2.2.1.5).
        signed = size_code.endswith("s") or size_code == "z"
        code = size_code.rstrip("s")
        enc = opsize if code == "v" else _size(code, opsize)
        size = opsize if (signed or code == "v") else enc

        def imm(_pos: int):
            def make(raw: int) -> Operand:
                v = raw
                if signed and size > enc and raw >> (enc - 1):
                    v = raw | (((1 << size) - 1) ^ ((1 << enc) - 1))
                return Operand(IMM, size, value=v)
            return make, enc // 8
        return imm, 1
    if kind == "J":
        enc = _size(size_code, opsize)

        def rel(_pos: int):
            def make(raw: int) -> Operand:
                v = raw - (1 << enc) if raw >> (enc - 1) else raw
                return Operand(REL, opsize, value=v)
            return make, enc // 8
        return rel, 1
    if kind == "A":
        off_bytes = 2 if opsize == 16 else 4

        def far(_pos: int):
            def make(raw: int) -> Operand:
                off_bits = off_bytes * 8
                return Operand(FAR, 16 + off_bits, reg=raw >> off_bits, value=raw & ((1 << off_bits) - 1))
            return make, off_bytes + 2
        return far, 1
    raise ValueError(f"unknown operand spec {spec!r} in row {row.text}")


__all__ = ["CR", "DR", "FAR", "IMM", "MAX_LENGTH", "OPCODE_MAP", "REL", "DecodeConfig", "decode"]
