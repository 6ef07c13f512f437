"""Near control transfers: JMP, Jcc, CALL, RET, LOOP/LOOPE/LOOPNE, JCXZ/JECXZ/JRCXZ (SDM Vol. 2).

Every near transfer goes through :func:`near_jump`:

* the target is truncated to the operand size (SDM Vol. 2A JMP/CALL,
  Vol. 2B RET: "EIP <- tempEIP AND 0000FFFFH" for a 16-bit operand);
* in 64-bit mode a non-canonical target is #GP(0) raised by the branch
  itself, RIP still at the branch (SDM Vol. 1 6.3.7; JMP/CALL/RET "64-Bit
  Mode Exceptions");
* otherwise (real, virtual-8086, protected and compatibility mode) a target
  beyond CS.limit is #GP(0) (SDM Vol. 2A JMP "Protected Mode Exceptions",
  "Real-Address Mode Exceptions").

Relative displacements are applied to the address of the next instruction.
The operand size of near branches in 64-bit mode is 64 (66 selects 16 on
AMD; the decoder applies the vendor rule).  No status flag is affected.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import RCX, REL, RSP, Insn
from spec.faults import Fault, Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.state import MachineState

CS = 1
CR4_LA57 = 1 << 12
_MASK = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}


def is_canonical(s: MachineState, addr: int) -> bool:
    """Bits 63 down to the top implemented linear-address bit all equal (SDM Vol. 1 3.3.7.1).

    48-bit linear addresses with 4-level paging, 57-bit with CR4.LA57.
    """
    va = 57 if s.cr4 & CR4_LA57 else 48
    top = addr >> (va - 1)
    return top == 0 or top == (1 << (65 - va)) - 1


def check_near_target(s: MachineState, target: int) -> None:
    """#GP(0) for a non-canonical target (64-bit mode) or one beyond CS.limit (other modes)."""
    if s.code_bits == 64:
        if not is_canonical(s, target):
            raise Fault(Vector.GP, 0)
    elif target > s.seg[CS].limit:
        raise Fault(Vector.GP, 0)


def near_jump(x: Exec, target: int, size: int) -> None:
    """Transfer to ``target`` truncated to ``size`` bits, after the target checks."""
    t = target & _MASK[size]
    check_near_target(x.s, t)
    x.next_rip = t


def _target(x: Exec, i: Insn) -> int:
    """The target of JMP/CALL: next RIP + rel, or the r/m operand (read before anything is pushed)."""
    op = i.operands[0]
    if op.kind == REL:
        return x.next_rip + op.value
    return x.D.concrete(x.read(op))


# -- unconditional and conditional jumps ---------------------------------------------------

@instruction("JMP", ref="SDM Vol. 2A JMP (near forms)")
def jmp(x: Exec, i: Insn) -> None:
    """JMP rel8/rel16/rel32 and JMP r/m (near absolute indirect)."""
    near_jump(x, _target(x, i), i.opsize)


@instruction("JCC", ref="SDM Vol. 2A Jcc")
def jcc(x: Exec, i: Insn) -> None:
    """Jump if condition ``i.row.cc`` holds (SDM Vol. 1 Appendix B); the target is checked only when taken."""
    if x.decide(x.cond(i.row.cc)):  # type: ignore[arg-type]
        near_jump(x, x.next_rip + i.operands[0].value, i.opsize)


# -- calls and returns ----------------------------------------------------------------------

@instruction("CALL", ref="SDM Vol. 2A CALL (near forms)")
def call(x: Exec, i: Insn) -> None:
    """Push the return address (next RIP at the operand size) and jump.

    The target is read and checked before the push (SDM Vol. 2A CALL,
    Operation: "IF tempEIP is not within code segment limit THEN #GP(0)"
    precedes "Push(EIP)"), so CALL [rSP] uses the old rSP.
    """
    size = i.opsize
    t = _target(x, i) & _MASK[size]
    check_near_target(x.s, t)
    x.push(x.D.const(size, x.next_rip), size)
    x.next_rip = t


@instruction("RET", ref="SDM Vol. 2B RET (near forms)")
def ret(x: Exec, i: Insn) -> None:
    """Pop the return address (operand size), check it, then release imm16 bytes (RET imm16).

    The release is added to rSP at the stack address size (SDM Vol. 2B RET:
    "IF StackAddressSize = 32 THEN ESP <- ESP + SRC ...").
    """
    size = i.opsize
    D = x.D
    t = D.concrete(x.pop(size))
    near_jump(x, t, size)
    if i.operands:
        s = x.s
        sw = s.stack_bits
        s.write_gpr(RSP, sw, D.add(sw, s.read_gpr(RSP, sw), D.const(sw, i.operands[0].value & 0xFFFF)))


# -- loops --------------------------------------------------------------------------------------

def _loop(x: Exec, i: Insn, zf_needed: bool | None) -> None:
    """LOOP family: decrement the address-size count register, branch if it is non-zero (and ZF matches).

    SDM Vol. 2A LOOP/LOOPcc: the count register is CX, ECX or RCX by the
    address size (a 32-bit write of ECX zero-extends RCX in 64-bit mode, as
    any 32-bit register write); the flags are not changed.
    """
    D = x.D
    s = x.s
    aw = i.addrsize
    count = D.sub(aw, s.read_gpr(RCX, aw), D.const(aw, 1))
    s.write_gpr(RCX, aw, count)
    cond = D.bnot(D.is_zero(aw, count))
    if zf_needed is not None:
        zf = s.get_flag(F.ZF)
        cond = D.band(cond, zf if zf_needed else D.bnot(zf))
    if x.decide(cond):
        near_jump(x, x.next_rip + i.operands[0].value, i.opsize)


@instruction("LOOP", ref="SDM Vol. 2A LOOP/LOOPcc")
def loop(x: Exec, i: Insn) -> None:
    _loop(x, i, None)


@instruction("LOOPE", ref="SDM Vol. 2A LOOP/LOOPcc (LOOPE/LOOPZ)")
def loope(x: Exec, i: Insn) -> None:
    _loop(x, i, True)


@instruction("LOOPNE", ref="SDM Vol. 2A LOOP/LOOPcc (LOOPNE/LOOPNZ)")
def loopne(x: Exec, i: Insn) -> None:
    _loop(x, i, False)


@instruction("JCXZ", ref="SDM Vol. 2A Jcc (JCXZ/JECXZ/JRCXZ)")
def jcxz(x: Exec, i: Insn) -> None:
    """Jump if CX/ECX/RCX (chosen by the address size) is zero; the register is not changed."""
    aw = i.addrsize
    if x.decide(x.D.is_zero(aw, x.s.read_gpr(RCX, aw))):
        near_jump(x, x.next_rip + i.operands[0].value, i.opsize)
