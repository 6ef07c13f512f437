"""Legacy 16/32-bit-only instructions: SALC, BOUND, ARPL (SDM Vol. 2A BOUND, ARPL; APM Vol. 3 BOUND,
ARPL, SALC).

All three are invalid in 64-bit mode.  SALC carries ``i64`` in the opcode
map, so the decoder raises #UD there; in 64-bit mode opcode 63 is MOVSXD (a
different row), and 62 is the EVEX escape.  62 with ModRM.mod = 11b is EVEX
in the other modes too (SDM Vol. 2A 2.7.1); the decoder reports those
encodings as not modelled (on a processor without AVX-512 they are #UD:
BOUND's register form, SDM BOUND "#UD If second operand is not a memory
location"), so BOUND's semantics only ever see a memory bounds operand.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import Insn
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction
from spec.state import CR0_PE

_RAX = 0
_VM_BIT = 1 << F.VM


@instruction("SALC", ref="APM Vol. 3 A.2.1 and B.3 (D6 SALC, invalid in 64-bit mode); SDM Vol. 2D Table A-2 (D6 blank)")
def salc(x: Exec, i: Insn) -> None:
    """Set AL from carry: AL := CF ? FFH : 00H; no flag changes.

    Status: undocumented.  The SDM one-byte opcode map (Vol. 2D Table A-2)
    leaves D6 blank, i.e. reserved; AMD names SALC only to say it is invalid
    in 64-bit mode (APM Vol. 3 A.2.1 "One-Byte Opcodes", B.3 "Invalid and
    Reassigned Instructions in 64-Bit Mode").  Intel and AMD processors
    execute it outside 64-bit mode as described here (R. Collins,
    "Undocumented OpCodes: SALC"; SBB AL,AL without the flag changes), and
    the spec implements it as the processors do.
    """
    D = x.D
    x.s.write_gpr(_RAX, 8, D.ite(x.flag(F.CF), D.const(8, 0xFF), D.const(8, 0)))


@instruction("BOUND", ref="SDM Vol. 2A BOUND; APM Vol. 3 BOUND")
def bound(x: Exec, i: Insn) -> None:
    """Check a signed array index against a bounds pair: #BR if index < lower or index > upper.

    The memory operand (``Ma``) holds two operand-size signed integers, the
    lower bound at the lower address and the upper bound after it (SDM Vol.
    2A BOUND "Operation").  #BR (vector 5) is a fault: RIP stays at BOUND.
    No flags are affected.
    """
    idx_op, bounds_op = i.operands
    w = idx_op.size
    D = x.D
    index = x.read(idx_op)
    pair = x.read(bounds_op)
    lower = D.extract(pair, w - 1, 0)
    upper = D.extract(pair, 2 * w - 1, w)
    if x.decide(D.bor(D.slt(w, index, lower), D.slt(w, upper, index))):
        raise x.fault(Vector.BR)


@instruction("ARPL", defines="ZF", ref="SDM Vol. 2A ARPL; APM Vol. 3 ARPL")
def arpl(x: Exec, i: Insn) -> None:
    """Adjust RPL: if DEST.RPL < SRC.RPL then ZF := 1, DEST.RPL := SRC.RPL else ZF := 0.

    #UD in real-address and virtual-8086 mode (SDM Vol. 2A ARPL "Real-Address
    Mode Exceptions", "Virtual-8086 Mode Exceptions").  Only ZF changes.  The
    destination is written only when its RPL changes, as the pseudo-code
    says (so a memory destination that needs no change is not a write
    access).
    """
    s = x.s
    if not s.cr0 & CR0_PE or s.rflags_sys & _VM_BIT:
        raise x.fault(Vector.UD)
    dst, src = i.operands
    D = x.D
    d = x.read(dst)
    sv = x.read(src)
    src_rpl = D.and_(16, sv, D.const(16, 3))
    if x.decide(D.ult(16, D.and_(16, d, D.const(16, 3)), src_rpl)):
        x.set_flag(F.ZF, D.true())
        x.write(dst, D.or_(16, D.and_(16, d, D.const(16, 0xFFFC)), src_rpl))
    else:
        x.set_flag(F.ZF, D.false())
