"""Bit test and bit scan (SDM Vol. 1 7.3.7, 7.3.8): BT, BTS, BTR, BTC, BSF, BSR, POPCNT,
LZCNT, TZCNT.

Undefined flags.  Where an instruction leaves status flags undefined, the spec
leaves their values *unchanged* (no oracle fact says otherwise) and marks
them undefined in the state:

* BT/BTS/BTR/BTC: CF = the selected bit; ZF unchanged; OF SF AF PF undefined.
* BSF/BSR: ZF = (source == 0); CF OF SF AF PF undefined.
* LZCNT/TZCNT: CF = (source == 0), ZF = (result == 0); OF SF AF PF undefined.
* POPCNT: ZF = (source == 0); CF OF SF AF PF cleared (all defined).

LZCNT, TZCNT and POPCNT are modeled as present (CPUID ABM/BMI1/POPCNT set, as
on the AMD processors the project compares against); on a processor without
them F3 0F BD/BC would execute as BSR/BSF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spec import flags as F
from spec.decode.insn import IMM, MEM, Insn
from spec.domain.base import Domain
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.memory import AccessKind

_LOG2 = {16: 4, 32: 5, 64: 6}


# -- BT, BTS, BTR, BTC ---------------------------------------------------------------------------

def _bit_address(x: Exec, i: Insn) -> tuple[Any, Any]:
    """Locate the selected bit (SDM Vol. 1 3.1.1.9 and Vol. 2A BT: bit base, bit offset).

    Returns ``(ea, pos)``: ``ea`` is the effective address of the operand-size
    unit holding the bit (``None`` for a register operand) and ``pos`` the
    bit's index in it.

    * An immediate offset, or any offset with a register operand, is taken
      modulo the operand size.
    * A register offset with a memory operand is a *signed* operand-size
      integer addressing a bit string that starts at bit 0 of the byte at the
      effective address: the unit read is at ``ea + (offset SAR log2(w)) *
      (w / 8)`` (in the address size) and the bit is ``offset mod w``.  So
      negative offsets reach below the effective address.
    """
    dst, src = i.operands
    w = dst.size
    D = x.D
    if src.kind == IMM:
        return (x.ea(dst) if dst.kind == MEM else None), D.const(w, src.value & (w - 1))
    off = x.read(src)
    pos = D.and_(w, off, D.const(w, w - 1))
    if dst.kind != MEM:
        return None, pos
    aw = i.addrsize
    ww = w if w > aw else aw
    k = _LOG2[w]
    disp = D.shl(ww, D.ashr(ww, D.sext(off, w, ww), D.const(ww, k)), D.const(ww, k - 3))
    if ww > aw:
        disp = D.extract(disp, aw - 1, 0)
    return D.add(aw, x.ea(dst), disp), pos


def _bit_op(x: Exec, i: Insn, update: Callable[[Domain, int, Any, Any], Any] | None) -> None:
    dst = i.operands[0]
    w = dst.size
    D = x.D
    ea, pos = _bit_address(x, i)
    if ea is None:
        v = x.read(dst)
    else:  # BTS/BTR/BTC read their bit string with write intent (RMW_DEST in spec/isa/context.py)
        v = x.mem_read(dst.seg, ea, w >> 3, intent=AccessKind.READ if update is None else AccessKind.WRITE)
    x.set_flag(F.CF, D.bit(w, D.lshr(w, v, pos), 0))
    x.undefine(F.OF, F.SF, F.AF, F.PF)
    if update is None:
        return
    r = update(D, w, v, D.shl(w, D.const(w, 1), pos))
    if ea is None:
        x.write(dst, r)
    else:
        x.mem_write(dst.seg, ea, w >> 3, r)


def _set(D: Domain, w: int, v: Any, m: Any) -> Any:
    return D.or_(w, v, m)


def _reset(D: Domain, w: int, v: Any, m: Any) -> Any:
    return D.and_(w, v, D.not_(w, m))


def _complement(D: Domain, w: int, v: Any, m: Any) -> Any:
    return D.xor(w, v, m)


@instruction("BT", defines="CF", undefined="PF AF SF OF", ref="SDM Vol. 2A BT")
def bt(x: Exec, i: Insn) -> None:
    _bit_op(x, i, None)


@instruction("BTS", defines="CF", undefined="PF AF SF OF", ref="SDM Vol. 2A BTS")
def bts(x: Exec, i: Insn) -> None:
    _bit_op(x, i, _set)


@instruction("BTR", defines="CF", undefined="PF AF SF OF", ref="SDM Vol. 2A BTR")
def btr(x: Exec, i: Insn) -> None:
    _bit_op(x, i, _reset)


@instruction("BTC", defines="CF", undefined="PF AF SF OF", ref="SDM Vol. 2A BTC")
def btc(x: Exec, i: Insn) -> None:
    _bit_op(x, i, _complement)


# -- bit scans -----------------------------------------------------------------------------------

@instruction("BSF", defines="ZF", undefined="CF PF AF SF OF", ref="SDM Vol. 2A BSF; APM Vol. 3 BSF")
def bsf(x: Exec, i: Insn) -> None:
    """Index of the lowest set bit.  A zero source sets ZF and leaves the destination
    unchanged, upper half included (AMD documents this; Intel calls it undefined)."""
    dst, src = i.operands
    w = dst.size
    D = x.D
    v = x.read(src)
    z = D.is_zero(w, v)
    x.set_flag(F.ZF, z)
    x.undefine(F.CF, F.OF, F.SF, F.AF, F.PF)
    if not x.decide(z):
        x.write(dst, D.ctz(w, v))


@instruction("BSR", defines="ZF", undefined="CF PF AF SF OF", ref="SDM Vol. 2A BSR; APM Vol. 3 BSR")
def bsr(x: Exec, i: Insn) -> None:
    """Index of the highest set bit; zero source as for BSF (destination unchanged)."""
    dst, src = i.operands
    w = dst.size
    D = x.D
    v = x.read(src)
    z = D.is_zero(w, v)
    x.set_flag(F.ZF, z)
    x.undefine(F.CF, F.OF, F.SF, F.AF, F.PF)
    if not x.decide(z):
        x.write(dst, D.sub(w, D.const(w, w - 1), D.clz(w, v)))


class _PopcntFlags(F.FlagKind):
    """POPCNT: ZF = (source == 0) (``a`` of the record); the other five flags cleared."""

    name = "popcnt"

    def flag(self, D: Domain, f: int, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.is_zero(w, a) if f == F.ZF else D.false()


POPCNT_FLAGS = _PopcntFlags()


@instruction("POPCNT", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B POPCNT")
def popcnt(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    w = dst.size
    v = x.read(src)
    r = x.D.popcount(w, v)
    x.set_flags(POPCNT_FLAGS, w, v, v, r)
    x.write(dst, r)


def _count(x: Exec, i: Insn, leading: bool) -> None:
    dst, src = i.operands
    w = dst.size
    D = x.D
    v = x.read(src)
    r = D.clz(w, v) if leading else D.ctz(w, v)
    x.set_flag(F.CF, D.is_zero(w, v))
    x.set_flag(F.ZF, D.is_zero(w, r))
    x.undefine(F.OF, F.SF, F.AF, F.PF)
    x.write(dst, r)


@instruction("LZCNT", defines="CF ZF", undefined="PF AF SF OF", ref="SDM Vol. 2A LZCNT; APM Vol. 3 LZCNT")
def lzcnt(x: Exec, i: Insn) -> None:
    """Count of leading zero bits (the operand size for a zero source, with CF = 1)."""
    _count(x, i, True)


@instruction("TZCNT", defines="CF ZF", undefined="PF AF SF OF", ref="SDM Vol. 2B TZCNT; APM Vol. 3 TZCNT")
def tzcnt(x: Exec, i: Insn) -> None:
    """Count of trailing zero bits (the operand size for a zero source, with CF = 1)."""
    _count(x, i, False)
