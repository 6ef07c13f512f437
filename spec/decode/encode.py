"""An encoder: instruction bytes from typed parts, valid by construction for a row of the opcode map.

The parts follow the instruction format of SDM Vol. 2A chapter 2 (APM Vol. 3
chapter 1)::

    legacy prefixes | mandatory prefix | REX | opcode | ModRM | SIB | displacement | immediates

:func:`encode` checks that the parts select the given row of
:data:`spec.decode.opcodes.ROWS` in the given mode (the ModRM reg digit, an
exact ModRM, the REX.W alternatives, mandatory prefixes, NOP/PAUSE/XCHG at 90)
and that every field has the width the row, the operand size and the address
size call for.  With ``strict=True`` (the default) it also rejects parts that
make the instruction #UD (LOCK where it is not allowed, a register where the
row needs memory, a reserved segment/control/debug register, a row invalid in
the mode) or longer than 15 bytes; ``strict=False`` builds those on purpose.

:func:`generate` draws random valid parts for a row through a :class:`Picker`
(a seeded :class:`random.Random` via :class:`RandomPicker`, or hypothesis
draws: see :mod:`spec.decode.strategies`); :func:`sample` gives one simple
deterministic encoding per row and mode.

The operand- and address-size rules are restated here (SDM Vol. 1 3.6, Vol. 2A
Table 2-4) rather than imported from the decoder, so the two can be checked
against each other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from spec.decode.opcodes import ROWS, Row

LOCK, REPNE, REP = 0xF0, 0xF2, 0xF3
OPSIZE, ADDRSIZE = 0x66, 0x67
SEGMENT_OVERRIDES = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)  # ES CS SS DS FS GS
LEGACY_PREFIXES = frozenset({LOCK, REPNE, REP, OPSIZE, ADDRSIZE, *SEGMENT_OVERRIDES})
MAX_LENGTH = 15
VALID_CRS = frozenset({0, 2, 3, 4, 8})


class EncodeError(ValueError):
    """The parts do not encode the requested row in the requested mode."""


# -- the structure of the map, seen from one row ----------------------------------------------

FIXED_OPERANDS = frozenset({"AL", "CL", "DX", "rAX", "eAX", "1", "ES", "CS", "SS", "DS", "FS", "GS"})


def operand_kind(spec: str) -> str:
    """The addressing-method letter of an operand column entry (``E``, ``G``, ``I``, ...), or ``""`` for a
    fixed operand (``AL``, ``CL``, ``DX``, ``rAX``, ``eAX``, ``1``, segment registers)."""
    return "" if spec in FIXED_OPERANDS else spec[0]


@dataclass(frozen=True)
class _Info:
    """What the encoder needs to know about a row's neighbours in the map (computed once per row)."""

    kinds: tuple[str, ...]  # operand_kind of each operand
    group: tuple[Row, ...]  # rows with the same opcode, mandatory prefix and ModRM selector: its alternatives
    taken_mandatory: frozenset[int]  # mandatory prefixes that select other rows of this opcode
    taken_digits: frozenset[int]  # ModRM.reg digits that select other rows (same opcode and mandatory prefix)
    exact: frozenset[int]  # whole-ModRM values that select other rows
    reg_only: bool  # an R operand: the mod field is ignored, no memory form


_INFO: dict[int, _Info] = {}


def _info(row: Row) -> _Info:
    got = _INFO.get(id(row))
    if got is None:
        same = [r for r in ROWS if r.opcode == row.opcode]
        sibs = [r for r in same if r.mandatory == row.mandatory]
        kinds = tuple(operand_kind(o) for o in row.operands)
        got = _INFO[id(row)] = _Info(
            kinds=kinds,
            group=tuple(r for r in sibs if r.digit == row.digit and r.modrm_exact == row.modrm_exact),
            taken_mandatory=frozenset(r.mandatory for r in same if r.mandatory is not None),
            taken_digits=frozenset(r.digit for r in sibs if r.digit is not None and r is not row),
            exact=frozenset(r.modrm_exact for r in sibs if r.modrm_exact is not None and r is not row),
            reg_only="R" in kinds)
    return got


def _kinds(row: Row) -> tuple[str, ...]:
    return _info(row).kinds


def _is_nop90(row: Row) -> bool:
    return row.opcode == (0x90,)


def encodable(row: Row, bits: int) -> bool:
    """Whether some byte sequence selects ``row`` in a ``bits``-bit code segment (it may still be #UD)."""
    a = row.attrs
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    if "rexw" in a and bits != 64:
        return False
    if bits == 64 and len(row.opcode) == 1 and 0x40 <= row.opcode[0] <= 0x4F:
        return False  # these bytes are REX prefixes in 64-bit mode (SDM Vol. 2A 2.2.1)
    if bits == 64 and "vex" in a:
        return False  # C4/C5/62 are the VEX/EVEX escapes in 64-bit mode
    if _is_nop90(row) and row.mnemonic == "XCHG" and bits != 64:
        return False  # 90 is NOP; XCHG rAX, rAX needs REX.B (XCHG r8, rAX)
    group = _info(row).group
    if "o64" in a and bits != 64:
        return all("o64" in r.attrs for r in group)
    if "i64" in a and bits == 64:
        return all("i64" in r.attrs for r in group)
    return True


def mode_valid(row: Row, bits: int) -> bool:
    """Whether ``row`` decodes without #UD in this mode (for some choice of the other parts)."""
    a = row.attrs
    return (encodable(row, bits) and "ud" not in a and not ("i64" in a and bits == 64)
            and not ("o64" in a and bits != 64))


def rows_for(bits: int, rows: Sequence[Row] = ROWS, *, valid_only: bool = True) -> list[Row]:
    """The rows that can be encoded (and, with ``valid_only``, are valid) in a ``bits``-bit mode."""
    return [r for r in rows if (mode_valid(r, bits) if valid_only else encodable(r, bits))]


# -- sizes -----------------------------------------------------------------------------------

def operand_size(row: Row, bits: int, *, p66: bool = False, rex_w: bool = False, vendor: str = "amd") -> int:
    """The operand-size attribute (SDM Vol. 1 3.6.1, Vol. 2A Table 2-4; APM Vol. 3 1.2.5 for ``f64``)."""
    a = row.attrs
    if "nat" in a:
        return 64 if bits == 64 else 32
    if bits == 64:
        if rex_w:  # REX.W beats 66; AMD has no m16:64 far pointers and reads m16:32 instead
            return 32 if (vendor == "amd" and "amd32" in a) else 64
        if "d64" in a:
            return 16 if p66 else 64
        if "f64" in a:
            return 16 if (p66 and vendor == "amd") else 64
        return 16 if p66 else 32
    return (32 if bits == 16 else 16) if p66 else bits


def address_size(bits: int, *, p67: bool = False) -> int:
    """The address-size attribute (SDM Vol. 1 3.6.1)."""
    if bits == 64:
        return 32 if p67 else 64
    return (32 if bits == 16 else 16) if p67 else bits


def _reg_only(row: Row) -> bool:
    return _info(row).reg_only


def has_memory_form(row: Row) -> bool:
    """Whether the ModRM r/m of ``row`` can (E) or must (M) address memory."""
    return row.has_modrm and row.modrm_exact is None and any(k in ("E", "M") for k in _kinds(row))


def needs_sib(addrsize: int, modrm: int) -> bool:
    return addrsize != 16 and (modrm >> 6) != 3 and (modrm & 7) == 4


def disp_size(addrsize: int, modrm: int, sib: int | None = None) -> int:
    """Displacement bytes for a memory ModRM (SDM Vol. 2A Tables 2-1..2-3)."""
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 0
    if mod == 1:
        return 1
    if addrsize == 16:
        return 2 if (mod == 2 or rm == 6) else 0
    if mod == 2:
        return 4
    if rm == 5:
        return 4
    if rm == 4 and sib is not None and (sib & 7) == 5:
        return 4
    return 0


def imm_fields(row: Row, opsize: int, addrsize: int) -> tuple[int, ...]:
    """Byte widths of the immediate fields, in encoding order (a far pointer is offset, then selector)."""
    out: list[int] = []
    for spec in row.operands:
        k, code = operand_kind(spec), spec[1:]
        if k == "I":
            out.append({"b": 1, "bs": 1, "w": 2, "d": 4, "z": 2 if opsize == 16 else 4, "v": opsize // 8}[code])
        elif k == "J":
            out.append(1 if code == "b" else (2 if opsize == 16 else 4))
        elif k == "O":
            out.append(addrsize // 8)
        elif k == "A":
            out.extend((2 if opsize == 16 else 4, 2))
    return tuple(out)


# -- encode ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """An instruction built from typed parts: the parts, the bytes and the sizes they imply."""

    row: Row
    bits: int
    prefixes: tuple[int, ...]  # legacy prefixes in order, without the row's mandatory prefix
    rex: int | None
    modrm: int | None
    sib: int | None
    disp: int
    imm: tuple[int, ...]
    code: bytes
    opsize: int
    addrsize: int
    vendor: str = "amd"

    @property
    def length(self) -> int:
        return len(self.code)

    @property
    def lock(self) -> bool:
        return LOCK in self.prefixes

    def __str__(self) -> str:
        return f"{self.code.hex(' ')}  ({self.row.key}, {self.bits}-bit)"


def _fit(value: int, nbytes: int, what: str) -> int:
    bits = 8 * nbytes
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise EncodeError(f"{what} {value:#x} does not fit in {nbytes} bytes")
    return value & ((1 << bits) - 1)


def _last_rep(prefixes: Sequence[int]) -> int | None:
    reps = [p for p in prefixes if p in (REPNE, REP)]
    return reps[-1] if reps else None


def build(row: Row, bits: int, *, prefixes: Sequence[int] = (), rex: int | None = None, modrm: int | None = None,
          sib: int | None = None, disp: int | None = None, imm: Sequence[int] = (), vendor: str = "amd",
          strict: bool = True) -> Encoding:
    """Like :func:`encode`, returning the :class:`Encoding` (parts, bytes, operand and address size)."""
    a = row.attrs
    if not encodable(row, bits):
        raise EncodeError(f"{row.key} cannot be encoded in {bits}-bit mode")
    if strict and not mode_valid(row, bits):
        raise EncodeError(f"{row.key} is #UD in {bits}-bit mode (strict)")
    prefixes = tuple(prefixes)
    for p in prefixes:
        if p not in LEGACY_PREFIXES:
            raise EncodeError(f"{p:#04x} is not a legacy prefix")
    # -- REX ---------------------------------------------------------------------------------
    if rex is not None:
        if bits != 64:
            raise EncodeError("REX exists only in 64-bit mode")
        if not 0x40 <= rex <= 0x4F:
            raise EncodeError(f"{rex:#04x} is not a REX prefix")
    r = rex or 0
    rex_w, rex_r, rex_b = bool(r & 8), (r >> 2) & 1, r & 1
    if "rexw" in a and not rex_w:
        raise EncodeError(f"{row.key} needs REX.W")
    if "norexw" in a and rex_w:
        raise EncodeError(f"{row.key} excludes REX.W")
    # -- mandatory prefixes and the opcode-90 family ------------------------------------------
    last_rep = _last_rep(prefixes) if row.mandatory is None else row.mandatory
    info = _info(row)
    if row.mandatory is None:
        if last_rep in info.taken_mandatory and not _is_nop90(row):
            raise EncodeError(f"{last_rep:#04x} would select the mandatory-prefix form of {row.key}")
    if _is_nop90(row):
        if row.mnemonic == "XCHG" and not rex_b:
            raise EncodeError("XCHG r8, rAX at 90 needs REX.B")
        if row.mnemonic in ("NOP", "PAUSE") and rex_b:
            raise EncodeError("90 with REX.B is XCHG r8, rAX")
        if row.mnemonic == "NOP" and last_rep == REP:
            raise EncodeError("F3 90 is PAUSE")
    p66 = OPSIZE in prefixes
    p67 = ADDRSIZE in prefixes
    opsize = operand_size(row, bits, p66=p66, rex_w=rex_w, vendor=vendor)
    addrsize = address_size(bits, p67=p67)
    lock = LOCK in prefixes
    # -- ModRM ---------------------------------------------------------------------------------
    mem = False
    if not row.has_modrm:
        if modrm is not None or sib is not None or disp:
            raise EncodeError(f"{row.key} has no ModRM")
    else:
        if modrm is None:
            if row.modrm_exact is None:
                raise EncodeError(f"{row.key} needs a ModRM byte")
            modrm = row.modrm_exact
        if not 0 <= modrm <= 0xFF:
            raise EncodeError(f"ModRM {modrm} out of range")
        mod, reg = modrm >> 6, (modrm >> 3) & 7
        if row.modrm_exact is not None and modrm != row.modrm_exact:
            raise EncodeError(f"{row.key} needs ModRM {row.modrm_exact:02X}")
        if row.digit is not None and reg != row.digit:
            raise EncodeError(f"{row.key} needs ModRM.reg = {row.digit}")
        if row.digit is None and row.modrm_exact is None and reg in info.taken_digits:
            raise EncodeError(f"ModRM.reg {reg} selects another row than {row.key}")
        if row.modrm_exact is None and mod == 3 and modrm in info.exact:
            raise EncodeError(f"ModRM {modrm:02X} selects another row than {row.key}")
        if "vex" in a and mod == 3:
            raise EncodeError(f"{row.key} with ModRM.mod = 11b is a VEX/EVEX escape")
        mem = mod != 3 and row.modrm_exact is None and not info.reg_only  # the ModRM form sets the length
        if mem and needs_sib(addrsize, modrm):
            if sib is None:
                raise EncodeError("this ModRM needs a SIB byte")
            if not 0 <= sib <= 0xFF:
                raise EncodeError(f"SIB {sib} out of range")
        elif sib is not None:
            raise EncodeError("this ModRM takes no SIB byte")
        if strict:
            kinds = info.kinds
            if "M" in kinds and mod == 3:
                raise EncodeError(f"{row.key} needs a memory operand (#UD)")
            if "S" in kinds and reg > 5:
                raise EncodeError("segment register 6/7 is reserved (#UD)")
            if "C" in kinds:
                num = reg | (rex_r << 3) | (8 if (lock and vendor == "amd") else 0)
                if num not in VALID_CRS:
                    raise EncodeError(f"CR{num} does not exist (#UD)")
            if "D" in kinds and rex_r:
                raise EncodeError("DR8-DR15 do not exist (#UD)")
    dsize = disp_size(addrsize, modrm, sib) if mem else 0  # type: ignore[arg-type]
    if dsize == 0 and disp:
        raise EncodeError("this ModRM takes no displacement")
    # -- LOCK ------------------------------------------------------------------------------------
    if strict and lock:
        cr8 = vendor == "amd" and "C" in info.kinds
        first = info.kinds[0] if row.operands else ""
        if not cr8 and not ("lock" in a and (first == "M" or (first == "E" and mem))):
            raise EncodeError(f"LOCK is not allowed here (#UD): {row.key}")
    # -- immediates ------------------------------------------------------------------------------
    fields = imm_fields(row, opsize, addrsize)
    imm = tuple(imm) if imm else (0,) * len(fields)
    if len(imm) != len(fields):
        raise EncodeError(f"{row.key} takes {len(fields)} immediate field(s), got {len(imm)}")
    # -- bytes -----------------------------------------------------------------------------------
    out = bytearray(prefixes)
    if row.mandatory is not None:
        out.append(row.mandatory)
    if rex is not None:
        out.append(rex)
    out += bytes(row.opcode)
    if row.has_modrm:
        out.append(modrm)  # type: ignore[arg-type]
        if sib is not None:
            out.append(sib)
        if dsize:
            out += _fit(disp or 0, dsize, "displacement").to_bytes(dsize, "little")
    for width, value in zip(fields, imm):
        out += _fit(value, width, "immediate").to_bytes(width, "little")
    if strict and len(out) > MAX_LENGTH:
        raise EncodeError(f"{len(out)} bytes: longer than {MAX_LENGTH} (#GP)")
    return Encoding(row=row, bits=bits, prefixes=prefixes, rex=rex, modrm=modrm, sib=sib, disp=disp or 0,
                    imm=imm, code=bytes(out), opsize=opsize, addrsize=addrsize, vendor=vendor)


def encode(row: Row, bits: int, *, prefixes: Sequence[int] = (), rex: int | None = None, modrm: int | None = None,
           sib: int | None = None, disp: int | None = None, imm: Sequence[int] = (), vendor: str = "amd",
           strict: bool = True) -> bytes:
    """The bytes of ``row`` in a ``bits``-bit code segment from its parts.

    ``prefixes`` are legacy prefixes in order (the row's mandatory prefix is
    added after them); ``rex`` a REX byte (64-bit mode); ``modrm`` the ModRM
    byte (defaults to the exact ModRM of ``=XX`` rows; the reg field must be
    the row's ``/digit``); ``sib`` when the ModRM calls for one; ``disp`` a
    signed or unsigned displacement of the width the ModRM/SIB and address
    size call for; ``imm`` the immediate fields in encoding order (``Ap``: the
    offset, then the selector; ``ENTER``: Iw, then Ib), zeros by default.
    Raises :class:`EncodeError` (a ``ValueError``) when the parts do not encode
    ``row``; see the module docstring for ``strict``.
    """
    return build(row, bits, prefixes=prefixes, rex=rex, modrm=modrm, sib=sib, disp=disp, imm=imm,
                 vendor=vendor, strict=strict).code


def sample(row: Row, bits: int) -> bytes:
    """One simple valid encoding of ``row``: register operands (rAX) where the row allows a register,
    ``[rBX]`` (``[BX]`` with 16-bit addressing) where it needs memory, zero immediates, only the
    prefixes the row requires.  Rows invalid in the mode (``i64``, ``ud``) are encoded when their
    bytes exist, so running them shows the #UD; :class:`EncodeError` when they do not."""
    if not encodable(row, bits):
        raise EncodeError(f"{row.key} cannot be encoded in {bits}-bit mode")
    rex = None
    if "rexw" in row.attrs:
        rex = 0x48
    if _is_nop90(row) and row.mnemonic == "XCHG":
        rex = 0x41
    modrm = None
    if row.has_modrm and row.modrm_exact is None:
        reg = row.digit or 0
        kinds = _kinds(row)
        if row.digit is None:
            reg = next(g for g in range(8) if g not in _info(row).taken_digits)
        if "M" in kinds or "vex" in row.attrs:
            modrm = (reg << 3) | (7 if bits == 16 else 3)  # [BX] / [rBX]
        else:
            modrm = 0xC0 | (reg << 3)
    return build(row, bits, rex=rex, modrm=modrm, strict=False).code


# -- random valid parts ----------------------------------------------------------------------

class Picker(Protocol):
    """A source of choices; small results are the simple ones (hypothesis shrinks towards them)."""

    def int(self, lo: int, hi: int) -> int: ...


class RandomPicker:
    """Choices from a seeded :class:`random.Random`."""

    def __init__(self, rng: random.Random | int) -> None:
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def _choice(pick: Picker, seq: Sequence[int]) -> int:
    return seq[pick.int(0, len(seq) - 1)]


def _value(pick: Picker, nbytes: int) -> int:
    """A field value, biased towards the edges (0, 1, all ones, sign boundaries)."""
    bits = 8 * nbytes
    k = pick.int(0, 7)
    if k == 0:
        return 0
    if k == 1:
        return 1
    if k == 2:
        return (1 << bits) - 1
    if k == 3:
        return 1 << (bits - 1)
    if k == 4:
        return (1 << (bits - 1)) - 1
    return pick.int(0, (1 << bits) - 1)


_PLAIN_PREFIXES = (OPSIZE, ADDRSIZE, *SEGMENT_OVERRIDES)


def generate(row: Row, bits: int, pick: Picker, *, vendor: str = "amd", valid: bool = True) -> Encoding:
    """Random parts for ``row`` in a ``bits``-bit mode, chosen through ``pick``.

    With ``valid`` the result decodes without #UD; without it the row may be
    one that is #UD in this mode (``i64``, ``o64``, ``ud``), with otherwise
    valid parts.  Covers random legacy prefixes (66, 67, segment overrides,
    F2/F3 where they do not select another row, LOCK on lockable memory
    forms), REX in 64-bit mode, every ModRM/SIB/displacement shape (RIP- and
    EIP-relative, 16-bit addressing) and edge-biased immediates.
    """
    if not encodable(row, bits) or (valid and not mode_valid(row, bits)):
        raise EncodeError(f"{row.key} is not {'valid' if valid else 'encodable'} in {bits}-bit mode")
    a = row.attrs
    info = _info(row)
    kinds = info.kinds
    # REX (64-bit mode): absent half of the time; forced bits for rexw/norexw and the 90 family.
    rex: int | None = None
    if bits == 64:
        if pick.int(0, 1):
            rex = 0x40 | pick.int(0, 15)
        if "rexw" in a or (_is_nop90(row) and row.mnemonic == "XCHG"):
            rex = rex or 0x40
        if rex is not None:
            if "rexw" in a:
                rex |= 8
            if "norexw" in a:
                rex &= ~8
            if _is_nop90(row):
                rex = (rex | 1) if row.mnemonic == "XCHG" else (rex & ~1)
            if "D" in kinds:
                rex &= ~4  # DR8-DR15 do not exist
    r = rex or 0
    # Legacy prefixes: up to 4 of 66/67/segment overrides, F2/F3 where they do not select another row.
    pool = list(_PLAIN_PREFIXES)
    if row.mandatory is None and not _is_nop90(row):
        pool += [p for p in (REPNE, REP) if p not in info.taken_mandatory]
    elif row.mandatory is not None:
        pool += [REPNE, REP]  # the mandatory prefix is added last, so it still wins
    elif row.mnemonic != "NOP":
        pool += [REPNE, REP]  # PAUSE (mandatory F3 added last), XCHG r8 (REX.B wins)
    else:
        pool += [REPNE]
    prefixes = [_choice(pick, pool) for _ in range(pick.int(0, 4) if pick.int(0, 2) else 0)]
    if pick.int(0, 4) == 0:
        prefixes.insert(pick.int(0, len(prefixes)), ADDRSIZE)  # the other address size, more often
    p67 = ADDRSIZE in prefixes
    addrsize = address_size(bits, p67=p67)
    # ModRM / SIB / displacement.
    modrm = sib = None
    disp = 0
    mem = False
    if row.has_modrm:
        if row.modrm_exact is not None:
            modrm = row.modrm_exact
        else:
            if row.digit is not None:
                reg = row.digit
            else:
                regs = [g for g in range(8) if g not in info.taken_digits]
                if "S" in kinds:
                    regs = [g for g in regs if g <= 5]
                if "C" in kinds:
                    regs = [g for g in regs if g in VALID_CRS]
                reg = _choice(pick, regs)
            if "M" in kinds or "vex" in a:
                mod = pick.int(0, 2)
            elif "R" in kinds:
                mod = 3 if pick.int(0, 3) else pick.int(0, 2)  # mod is ignored: mostly 11b, sometimes not
            else:
                mod = pick.int(0, 3)
            k = pick.int(0, 11)
            rm = k if k < 8 else (4, 5)[k & 1]  # weight the special r/m values (SIB, disp32/RIP-relative)
            modrm = (mod << 6) | (reg << 3) | rm
            if mod == 3:
                while modrm in info.exact:
                    modrm = 0xC0 | (reg << 3) | ((modrm + 1) & 7)
            mem = mod != 3 and not info.reg_only
            if mem:
                if needs_sib(addrsize, modrm):
                    index, base = pick.int(0, 9), pick.int(0, 9)  # weight index 100b (none) and base 101b
                    sib = pick.int(0, 3) << 6 | (4 if index > 7 else index) << 3 | (5 if base > 7 else base)
                n = disp_size(addrsize, modrm, sib)
                if n:
                    disp = _value(pick, n)
            if rex is not None and "C" in kinds and (reg | ((r >> 2) & 1) << 3) not in VALID_CRS:
                rex = r = r & ~4  # CR8-CR15: only CR8 exists
    # LOCK on lockable memory destinations; the AMD LOCK MOV CR0 = CR8 form now and then.
    if mem and "lock" in a and kinds[0] in ("E", "M") and pick.int(0, 2) == 0:
        prefixes.insert(pick.int(0, len(prefixes)), LOCK)
    if (vendor == "amd" and "C" in kinds and modrm is not None and (modrm >> 3) & 7 == 0 and not r & 4
            and pick.int(0, 3) == 0):
        prefixes.insert(pick.int(0, len(prefixes)), LOCK)
    p66 = OPSIZE in prefixes
    opsize = operand_size(row, bits, p66=p66, rex_w=bool(r & 8), vendor=vendor)
    imm = tuple(_value(pick, n) for n in imm_fields(row, opsize, addrsize))
    # Stay within 15 bytes: drop leading prefixes that do not change the decode (never 66/67/F0).
    while True:
        enc = build(row, bits, prefixes=prefixes, rex=rex, modrm=modrm, sib=sib, disp=disp, imm=imm, vendor=vendor,
                    strict=False)
        if enc.length <= MAX_LENGTH:
            break
        droppable = [k for k, p in enumerate(prefixes) if p not in (OPSIZE, ADDRSIZE, LOCK)]
        if not droppable:
            raise EncodeError(f"cannot fit {row.key} in {MAX_LENGTH} bytes")
        del prefixes[droppable[0]]
    if valid:
        build(row, bits, prefixes=prefixes, rex=rex, modrm=modrm, sib=sib, disp=disp, imm=imm, vendor=vendor)
    return enc


def corruptions(enc: Encoding, pick: Picker) -> list[tuple[Encoding, int]]:
    """Variants of a valid encoding with one field made invalid, each with the vector it must raise.

    LOCK where it is not allowed (#UD; SDM Vol. 2A 2.1.1), a register where the
    row needs memory (#UD), a control register that does not exist or LOCK MOV
    CR on Intel (#UD), a debug register with REX.R (#UD), and padding with
    segment overrides past 15 bytes (#GP(0); SDM Vol. 2A 2.3.11).  Variants
    that cannot be built for this row are left out.
    """
    row, bits, vendor = enc.row, enc.bits, enc.vendor
    kinds = _kinds(row)
    parts: dict = {"prefixes": enc.prefixes, "rex": enc.rex, "modrm": enc.modrm, "sib": enc.sib, "disp": enc.disp,
                   "imm": enc.imm}
    out: list[tuple[Encoding, int]] = []

    def add(vector: int, **changes: object) -> None:
        try:
            bad = build(row, bits, **{**parts, **changes}, vendor=vendor, strict=False)
        except EncodeError:
            return
        if bad.length <= MAX_LENGTH or vector == gp:  # past 15 bytes, #GP(0) comes first
            out.append((bad, vector))

    ud, gp = 6, 13  # Vector.UD, Vector.GP (spec.faults)
    mem = enc.modrm is not None and enc.modrm >> 6 != 3 and row.modrm_exact is None and not _info(row).reg_only
    if LOCK not in enc.prefixes and not ("lock" in row.attrs and mem and kinds[0] in ("E", "M")):
        if "C" not in kinds:
            add(ud, prefixes=(*enc.prefixes, LOCK))
        elif vendor != "amd":
            add(ud, prefixes=(*enc.prefixes, LOCK))  # LOCK MOV CR is CR8 on AMD only
    if "M" in kinds and row.opcode != (0x0F, 0x01) and "vex" not in row.attrs and enc.modrm is not None:
        add(ud, modrm=0xC0 | (enc.modrm & 0x38) | pick.int(0, 7), sib=None, disp=0)
    if "C" in kinds and LOCK not in enc.prefixes and enc.modrm is not None:
        bad = _choice(pick, (1, 5, 6, 7))
        add(ud, modrm=(enc.modrm & 0xC7) | bad << 3, rex=None if enc.rex is None else enc.rex & ~4)
    if "D" in kinds and bits == 64:
        add(ud, rex=(enc.rex or 0x40) | 4)
    if enc.length < 16:
        add(gp, prefixes=(0x3E,) * (16 - enc.length) + enc.prefixes)
    return out


def random_encoding(row: Row, bits: int, rng: random.Random | int, *, vendor: str = "amd",
                    valid: bool = True) -> Encoding:
    """:func:`generate` with a seeded :class:`random.Random` (or a seed)."""
    return generate(row, bits, RandomPicker(rng), vendor=vendor, valid=valid)


__all__ = [
    "FIXED_OPERANDS", "LEGACY_PREFIXES", "MAX_LENGTH", "EncodeError", "Encoding", "Picker", "RandomPicker",
    "address_size", "build", "corruptions", "disp_size", "encodable", "encode", "generate", "has_memory_form",
    "imm_fields", "mode_valid", "needs_sib", "operand_kind", "operand_size", "random_encoding", "rows_for", "sample",
]
