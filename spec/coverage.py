"""Coverage of the opcode map by the semantics: every form x every mode.

For each row of the opcode map and each mode the status is one of

* ``ok``       -- the form runs: a sample encoding executed one step on a
  flat machine in that mode without an ``unimplemented`` stop;
* ``#UD``      -- the manual makes the form invalid in that mode (``i64``)
  or reserves the encoding (``ud``), and the spec raises #UD for it;
* ``n/a``      -- the form does not exist in that mode (``o64`` outside
  64-bit mode: the same bytes decode as another row);
* ``missing``  -- the spec cannot execute it yet.

A display group whose rows are partly ``missing`` shows ``partial``.

The statuses are measured by running the spec, not read from a list.
Rows are grouped for display by mnemonic (``Jcc``, ``SETcc``, ``CMOVcc``
for the condition-code families).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from spec.cpu import SpecCPU
from spec.decode.opcodes import ROWS, Row
from spec.machine import BITS, MODES, flat_machine

OK, UD, NA, MISSING, PARTIAL = "ok", "#UD", "n/a", "missing", "partial"

ISSUE2_REQUIRED = (
    "MOV MOVZX MOVSX MOVSXD LEA XCHG XADD CMPXCHG CMPXCHG8B CMPXCHG16B BSWAP CMOVcc SETcc "
    "ADD ADC SUB SBB AND OR XOR CMP TEST INC DEC NEG NOT "
    "SHL SAL SHR SAR ROL ROR RCL RCR SHLD SHRD MUL IMUL DIV IDIV "
    "BT BTS BTR BTC BSF BSR POPCNT LZCNT TZCNT "
    "PUSH POP PUSHF POPF PUSHA POPA ENTER LEAVE "
    "JMP Jcc CALL RET LOOP LOOPE LOOPNE JCXZ "
    "MOVS STOS LODS CMPS SCAS CBW CWD CLC STC CMC CLD STD LAHF SAHF XLAT "
    "NOP PAUSE UD2 HLT INT3 INT INTO"
).split()
"""The general-purpose instructions the semantics-core issue requires, by display mnemonic."""


def display_name(row: Row) -> str:
    if row.cc is not None:
        return row.mnemonic[:-2].capitalize() + "cc" if row.mnemonic != "JCC" else "Jcc"
    return row.mnemonic


def _group(row: Row) -> str:
    name = display_name(row)
    kinds = {op[0] for op in row.operands}
    if name == "MOV" and kinds & {"C", "D", "S"}:
        return {"C": "MOV CRn", "D": "MOV DRn", "S": "MOV Sreg"}[(kinds & {"C", "D", "S"}).pop()]
    return {"SETCC": "SETcc", "CMOVCC": "CMOVcc", "Setcc": "SETcc", "Cmovcc": "CMOVcc"}.get(name, name)


@dataclass(frozen=True)
class Probe:
    row: Row
    mode: str
    status: str
    detail: str = ""


def sample_encoding(row: Row, bits: int) -> bytes:
    """One valid encoding of ``row``: register forms where allowed, [rBX]/[BX+SI]-style memory otherwise."""
    from spec.decode.encode import sample  # the typed encoder (also used by generators)

    return sample(row, bits)


def probe(row: Row, mode: str) -> Probe:
    bits = BITS[mode]
    a = row.attrs
    if "o64" in a and bits != 64:
        return Probe(row, mode, NA)
    try:
        code = sample_encoding(row, bits)
    except ValueError as e:  # the encoder cannot express this row in this mode
        return Probe(row, mode, NA, str(e))
    st = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    st.gpr[3] = 0x10000  # rBX -> the data page, so [rBX] operands are mapped
    st.gpr[6] = st.gpr[7] = 0x10000  # rSI, rDI for string forms
    st.gpr[1] = 1  # rCX: one iteration for REP/LOOP forms
    ev = SpecCPU(st).step()
    if ev is not None and ev.kind == "unimplemented":
        return Probe(row, mode, MISSING, ev.detail)
    if ev is not None and ev.kind == "fault" and ev.vector == 6 and ("ud" in a or ("i64" in a and bits == 64)):
        return Probe(row, mode, UD)
    return Probe(row, mode, OK, "" if ev is None else ev.describe())


def probe_all(modes: Iterable[str] = MODES, rows: Iterable[Row] = ROWS) -> list[Probe]:
    return [probe(r, m) for r in rows for m in modes]


def table(probes: list[Probe]) -> dict[str, dict[str, str]]:
    """Display mnemonic -> mode -> combined status of its rows.

    ``ok`` if every applicable row runs (or is #UD as the manual says), ``#UD``
    if every applicable row is #UD, ``missing`` if none runs, ``partial`` if
    some do and some are missing, ``n/a`` if no row applies in that mode.
    """
    cells: dict[str, dict[str, set[str]]] = {}
    for p in probes:
        cells.setdefault(_group(p.row), {}).setdefault(p.mode, set()).add(p.status)
    out: dict[str, dict[str, str]] = {}
    for name, by_mode in cells.items():
        row: dict[str, str] = {}
        for mode, statuses in by_mode.items():
            live = statuses - {NA}
            if not live:
                row[mode] = NA
            elif MISSING in live:
                row[mode] = MISSING if live == {MISSING} else PARTIAL
            elif OK in live:
                row[mode] = OK
            else:
                row[mode] = UD
        out[name] = row
    return out
