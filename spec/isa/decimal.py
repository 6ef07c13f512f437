"""Decimal (BCD) adjustment: DAA, DAS, AAA, AAS, AAM, AAD (SDM Vol. 1 7.3.2.4; Vol. 2A same entries;
AMD APM Vol. 3 same entries).

All six are invalid in 64-bit mode (SDM "64-Bit Mode Exceptions: #UD"; APM
"invalid in 64-bit mode"); their opcode rows carry ``i64`` and the decoder
raises #UD there, so the semantics never run in 64-bit mode.  Each works on
AL/AH (8-bit values) and the CF/AF inputs, exactly as the SDM "Operation"
pseudo-code, written with selections (``D.ite``) so every domain sees one
straight-line computation.

Values left in architecturally undefined flags.  Neither manual states them;
the spec follows published hardware observations where they exist and
otherwise picks 0.  Every such flag is marked undefined (``x.undefine``), so
comparisons mask it whatever the value.

=========  =================  ==================================================================
insn       undefined          value the spec leaves
=========  =================  ==================================================================
DAA, DAS   OF                 0.  Sources disagree (the test386.asm issue #1 survey: Bochs 0,
                              DOSBox other values); 0 is the simple choice.
AAA, AAS   OF SF ZF PF        SF/ZF/PF from the final AL, as reported for real CPUs by
                              emulators tested against silicon (Unicorn PR #2311, iSH); OF 0.
AAM        OF AF CF           0 (R. Collins, "Undocumented OpCodes: AAM": OF = AF = CF = 0).
AAD        OF AF CF           the flags of the 8-bit ADD of AL and (AH * imm8) mod 256 that forms
                              the result (R. Collins, "Undocumented OpCodes: AAD": the flags are
                              "set consistently" with other integer operations).  QEMU/Unicorn
                              and Bochs clear them instead; the flags are masked either way.
=========  =================  ==================================================================

AAA/AAS adjust AX as one 16-bit value (current SDM: ``AX := AX + 106H``;
``AX := AX - 6; AH := AH - 1``), so a carry/borrow out of AL reaches AH; the
8086 added 6 to AL alone.  AAM/AAD take their base from the immediate byte
(documented since the Pentium; any value 0-FFh); AAM with base 0 raises #DE.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import Insn
from spec.domain.base import Bool, Value
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction

_CF, _PF, _AF, _ZF, _SF, _OF = F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF
_RAX = 0


def _low_nibble_adjust(x: Exec, al: Value) -> Bool:
    """``((AL AND 0FH) > 9) or AF = 1``: the low digit needs adjusting (all six BCD pseudo-codes)."""
    D = x.D
    return D.bor(D.ult(8, D.const(8, 9), D.and_(8, al, D.const(8, 0x0F))), x.flag(_AF))


@instruction("DAA", defines="CF PF AF ZF SF", undefined="OF", ref="SDM Vol. 2A DAA; APM Vol. 3 DAA")
def daa(x: Exec, i: Insn) -> None:
    """Decimal adjust AL after addition (SDM Vol. 2A DAA "Operation").

    The first arm's ``CF := old_CF or carry(AL + 6)`` is overwritten by the
    second IF in both of its arms, so CF = ``old_AL > 99H or old_CF``.
    """
    D = x.D
    old_al = x.s.read_gpr(_RAX, 8)
    old_cf = x.flag(_CF)
    lo = _low_nibble_adjust(x, old_al)
    al = D.ite(lo, D.add(8, old_al, D.const(8, 0x06)), old_al)
    hi = D.bor(D.ult(8, D.const(8, 0x99), old_al), old_cf)
    al = D.ite(hi, D.add(8, al, D.const(8, 0x60)), al)
    # SF/ZF/PF from AL; OF (undefined) left 0 by the RESULT record.
    x.set_flags(F.RESULT, 8, old_al, old_al, al)
    x.set_flag(_AF, lo)
    x.set_flag(_CF, hi)
    x.undefine(_OF)
    x.s.write_gpr(_RAX, 8, al)


@instruction("DAS", defines="CF PF AF ZF SF", undefined="OF", ref="SDM Vol. 2A DAS; APM Vol. 3 DAS")
def das(x: Exec, i: Insn) -> None:
    """Decimal adjust AL after subtraction (SDM Vol. 2A DAS "Operation").

    Unlike DAA the second IF has no ELSE: CF keeps the first arm's
    ``old_CF or borrow(AL - 6)`` (or its initial 0) when no high adjustment
    is made.
    """
    D = x.D
    old_al = x.s.read_gpr(_RAX, 8)
    old_cf = x.flag(_CF)
    lo = _low_nibble_adjust(x, old_al)
    six = D.const(8, 0x06)
    al = D.ite(lo, D.sub(8, old_al, six), old_al)
    cf = D.band(lo, D.bor(old_cf, D.ult(8, old_al, six)))
    hi = D.bor(D.ult(8, D.const(8, 0x99), old_al), old_cf)
    al = D.ite(hi, D.sub(8, al, D.const(8, 0x60)), al)
    x.set_flags(F.RESULT, 8, old_al, old_al, al)
    x.set_flag(_AF, lo)
    x.set_flag(_CF, D.bor(hi, cf))
    x.undefine(_OF)
    x.s.write_gpr(_RAX, 8, al)


@instruction("AAA", defines="CF AF", undefined="PF ZF SF OF", ref="SDM Vol. 2A AAA; APM Vol. 3 AAA")
def aaa(x: Exec, i: Insn) -> None:
    """ASCII adjust after addition: ``AX := AX + 106H`` if the low digit overflowed; AL := AL AND 0FH."""
    D = x.D
    ax = x.s.read_gpr(_RAX, 16)
    adj = _low_nibble_adjust(x, D.extract(ax, 7, 0))
    ax = D.ite(adj, D.add(16, ax, D.const(16, 0x106)), ax)
    ax = D.and_(16, ax, D.const(16, 0xFF0F))
    al = D.extract(ax, 7, 0)
    x.set_flags(F.RESULT, 8, al, al, al)  # undefined SF/ZF/PF from AL, OF 0
    x.set_flag(_AF, adj)
    x.set_flag(_CF, adj)
    x.undefine(_OF, _SF, _ZF, _PF)
    x.s.write_gpr(_RAX, 16, ax)


@instruction("AAS", defines="CF AF", undefined="PF ZF SF OF", ref="SDM Vol. 2A AAS; APM Vol. 3 AAS")
def aas(x: Exec, i: Insn) -> None:
    """ASCII adjust after subtraction: ``AX := AX - 6; AH := AH - 1`` if adjusting; AL := AL AND 0FH.

    Subtracting 6 from AX and then 1 from AH is subtracting 106H from AX.
    """
    D = x.D
    ax = x.s.read_gpr(_RAX, 16)
    adj = _low_nibble_adjust(x, D.extract(ax, 7, 0))
    ax = D.ite(adj, D.sub(16, ax, D.const(16, 0x106)), ax)
    ax = D.and_(16, ax, D.const(16, 0xFF0F))
    al = D.extract(ax, 7, 0)
    x.set_flags(F.RESULT, 8, al, al, al)
    x.set_flag(_AF, adj)
    x.set_flag(_CF, adj)
    x.undefine(_OF, _SF, _ZF, _PF)
    x.s.write_gpr(_RAX, 16, ax)


@instruction("AAM", defines="PF ZF SF", undefined="CF AF OF", ref="SDM Vol. 2A AAM; APM Vol. 3 AAM")
def aam(x: Exec, i: Insn) -> None:
    """ASCII adjust after multiply: AH := AL / imm8; AL := AL MOD imm8; #DE if imm8 = 0.

    SF/ZF/PF from AL; OF, AF, CF undefined (left 0 by the LOGIC record).
    """
    D = x.D
    base = x.read(i.operands[0])
    old_al = x.s.read_gpr(_RAX, 8)
    if x.decide(D.is_zero(8, base)):
        raise x.fault(Vector.DE)
    ah = D.udiv(8, old_al, base)
    al = D.urem(8, old_al, base)
    x.set_flags(F.LOGIC, 8, al, al, al)
    x.undefine(_OF, _AF, _CF)
    x.s.write_gpr(_RAX, 16, D.concat(ah, al, 8))


@instruction("AAD", defines="PF ZF SF", undefined="CF AF OF", ref="SDM Vol. 2A AAD; APM Vol. 3 AAD")
def aad(x: Exec, i: Insn) -> None:
    """ASCII adjust before division: AL := (AL + AH * imm8) AND FFH; AH := 0.

    SF/ZF/PF from AL; OF, AF, CF undefined, left as the 8-bit ADD of AL and
    (AH * imm8) mod 256 defines them (see the module docstring).
    """
    D = x.D
    base = x.read(i.operands[0])
    ax = x.s.read_gpr(_RAX, 16)
    old_al = D.extract(ax, 7, 0)
    prod = D.mul(8, D.extract(ax, 15, 8), base)
    al = D.add(8, old_al, prod)
    x.set_flags(F.ADD, 8, old_al, prod, al)
    x.undefine(_OF, _AF, _CF)
    x.s.write_gpr(_RAX, 16, D.zext(al, 8, 16))
