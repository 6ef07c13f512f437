"""Stack instructions: PUSH, POP, PUSHF/POPF, PUSHA/POPA, ENTER, LEAVE (SDM Vol. 1 6.2; Vol. 2).

The stack address size (SP/ESP/RSP) is SS.B outside 64-bit mode and 64 in it
(:attr:`spec.state.MachineState.stack_bits`); the amount pushed or popped is
the operand size (SDM Vol. 1 6.2.3, 6.2.5).  ``x.push``/``x.pop`` implement
the basic step; everything here is expressed through them or through
``x.mem_read``/``x.mem_write`` on SS.  A faulting instruction leaves no trace
(the CPU rolls back registers and memory), so the semantics read sources
first and may update RSP step by step.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import RSP, SEG, SS, Insn
from spec.faults import Fault, Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.segments import load_segment
from spec.state import CR0_PE
from spec.svm.exitcodes import ExitCode

RBP = 5
CR4_VME = 1 << 0

_IOPL = 3 << F.IOPL_SHIFT
_PUSHF_MASK = 0x00FC_FFFF
"""PUSHF image: RF (16) and VM (17) read as 0 (SDM Vol. 2B PUSHF: "EFLAGS AND 00FCFFFFH")."""

_POPF_ALWAYS = (1 << F.TF) | (1 << F.DF) | (1 << F.NT) | F.STATUS_MASK
"""Flags every POPF that does not fault may write (SDM Vol. 2B POPF, Table "Effect of POPF")."""
_POPF_32 = (1 << F.AC) | (1 << F.ID)
"""Added by a 32/64-bit POPF; VIP, VIF and VM are never written, RF is cleared."""


# -- PUSH / POP ------------------------------------------------------------------------

@instruction("PUSH", ref="SDM Vol. 2B PUSH")
def push(x: Exec, i: Insn) -> None:
    """PUSH r/m, r, imm, Sreg.

    * PUSH rSP pushes the value rSP had before the instruction (SDM Vol. 2B
      PUSH: "the value of the SP register before the instruction").
    * Immediates are already sign-extended to the operand size by the decoder.
    * A segment register with a 32/64-bit operand size: the SDM allows either
      a zero-extended push or a 16-bit move and says "all recent Intel Core
      and Intel Atom processors perform a 16-bit move, leaving the upper
      portion of the stack location unmodified" (SDM Vol. 2B PUSH,
      Description).  The spec does the 16-bit move: rSP drops by the operand
      size, only the low two bytes of the slot are written.
    """
    (src,) = i.operands
    size = i.opsize
    if src.kind != SEG or size == 16:
        x.push(x.read(src), size)
        return
    s = x.s
    D = x.D
    sw = s.stack_bits
    sp = D.sub(sw, s.read_gpr(RSP, sw), D.const(sw, size // 8))
    x.mem_write(SS, sp, 2, D.const(16, s.seg[src.reg].selector), sw)
    s.write_gpr(RSP, sw, sp)


@instruction("POP", ref="SDM Vol. 2B POP")
def pop(x: Exec, i: Insn) -> None:
    """POP r/m, r, Sreg.

    * POP rSP: rSP is incremented, then the popped value written to it, so
      rSP ends with the popped value (SDM Vol. 2B POP).
    * POP m with an rSP-based address: the effective address is computed
      *after* rSP is incremented (SDM Vol. 2B POP) -- ``x.write`` evaluates
      the address after ``x.pop``.
    * POP Sreg: the operand size worth of stack is released and its low 16
      bits loaded as a selector through :func:`load_segment`; POP SS inhibits
      interrupts until after the next instruction (recorded in
      ``state.interrupt_shadow``).
    """
    (dst,) = i.operands
    v = x.pop(i.opsize)
    if dst.kind == SEG:
        D = x.D
        load_segment(x, dst.reg, D.concrete(D.extract(v, 15, 0)))
        if dst.reg == SS:
            x.s.interrupt_shadow = True
        return
    x.write(dst, v)


# -- PUSHF / POPF --------------------------------------------------------------------------

@instruction("PUSHF", ref="SDM Vol. 2B PUSHF/PUSHFD/PUSHFQ")
def pushf(x: Exec, i: Insn) -> None:
    """Push (R/E)FLAGS with RF and VM cleared in the image.

    In virtual-8086 mode with IOPL < 3: with CR4.VME and a 16-bit operand the
    image has IF replaced by VIF and IOPL reading 3; otherwise #GP(0).
    """
    s = x.s
    if s.svm is not None:
        x.intercept(ExitCode.PUSHF)  # APM 15.9: before the virtual-8086 #GP check
    D = x.D
    size = i.opsize
    image = D.and_(64, s.read_rflags(), D.const(64, _PUSHF_MASK))
    sysf = s.rflags_sys
    if s.cr0 & CR0_PE and (sysf >> F.VM) & 1 and (sysf & _IOPL) != _IOPL:
        if not (s.cr4 & CR4_VME and size == 16):
            raise Fault(Vector.GP, 0)
        vif = (sysf >> F.VIF) & 1
        image = D.or_(64, D.and_(64, image, D.const(64, ~(1 << F.IF))), D.const(64, (vif << F.IF) | _IOPL))
    x.push(D.extract(image, size - 1, 0), size)


@instruction("POPF", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B POPF/POPFD/POPFQ")
def popf(x: Exec, i: Insn) -> None:
    """Pop (R/E)FLAGS, writing only the bits this mode and privilege allow.

    SDM Vol. 2B POPF, Operation and the table of flags affected by POPF:

    * always: CF PF AF ZF SF TF DF OF NT (and all six status flags stay domain values);
    * 32/64-bit operand size also AC and ID, and RF is cleared; a 16-bit POPF
      touches bits 15:0 only;
    * IOPL: only in real mode or at CPL 0 outside virtual-8086 mode;
    * IF: only if CR0.PE = 0 or CPL <= IOPL;
    * VIP, VIF, VM: never (VIF only through the CR4.VME path below);
    * bit 1 reads 1, the reserved bits 0.

    Virtual-8086 mode with IOPL < 3: a 32-bit POPF, or any POPF without
    CR4.VME, is #GP(0); with CR4.VME a 16-bit POPF faults if it would set TF
    or set IF while VIP = 1, and otherwise copies bit 9 to VIF and leaves IF
    and IOPL alone.
    """
    s = x.s
    if s.svm is not None:
        x.intercept(ExitCode.POPF)  # APM 15.9: before any exception check
    D = x.D
    size = i.opsize
    sysf = s.rflags_sys
    pe = s.cr0 & CR0_PE
    vm = pe and (sysf >> F.VM) & 1
    iopl = (sysf >> F.IOPL_SHIFT) & 3
    vme_path = False
    if vm and iopl < 3:
        if size != 16 or not s.cr4 & CR4_VME:
            raise Fault(Vector.GP, 0)
        vme_path = True
    v = D.zext(x.pop(size), size, 64)
    mask = _POPF_ALWAYS
    if size != 16:
        mask |= _POPF_32
    if vme_path:
        tf_if = D.concrete(D.and_(64, v, D.const(64, (1 << F.TF) | (1 << F.IF))))
        new_if = (tf_if >> F.IF) & 1
        if (tf_if >> F.TF) & 1 or (new_if and (sysf >> F.VIP) & 1):
            raise Fault(Vector.GP, 0)
        sysf = (sysf & ~(1 << F.VIF)) | (new_if << F.VIF)
    else:
        cpl = s.cpl
        if not pe or (not vm and cpl == 0):
            mask |= _IOPL
        if not pe or cpl <= iopl:
            mask |= 1 << F.IF
    sys_mask = mask & ~F.STATUS_MASK
    popped_sys = D.concrete(D.and_(64, v, D.const(64, sys_mask)))
    sysf = (sysf & ~sys_mask) | popped_sys
    if size != 16:
        sysf &= ~(1 << F.RF)
    s.rflags_sys = sysf | F.RESERVED_ONE
    for f in F.STATUS:
        x.set_flag(f, D.bit(64, v, f))


# -- PUSHA / POPA ------------------------------------------------------------------------------

@instruction("PUSHA", ref="SDM Vol. 2B PUSHA/PUSHAD")
def pusha(x: Exec, i: Insn) -> None:
    """Push AX CX DX BX, the original SP, BP SI DI (at the operand size); invalid in 64-bit mode."""
    size = i.opsize
    s = x.s
    values = [s.read_gpr(r, size) for r in range(8)]  # SP as it was before the first push
    for v in values:
        x.push(v, size)


@instruction("POPA", ref="SDM Vol. 2B POPA/POPAD")
def popa(x: Exec, i: Insn) -> None:
    """Pop DI SI BP, skip the saved SP (its stack slot is released), pop BX DX CX AX."""
    size = i.opsize
    s = x.s
    for r in (7, 6, 5, 4, 3, 2, 1, 0):
        v = x.pop(size)
        if r != RSP:
            s.write_gpr(r, size, v)


# -- ENTER / LEAVE ----------------------------------------------------------------------------

@instruction("ENTER", ref="SDM Vol. 2A ENTER")
def enter(x: Exec, i: Insn) -> None:
    """Make a stack frame: push rBP, copy ``level - 1`` outer frame pointers, push the new frame pointer.

    Following SDM Vol. 2A ENTER, Operation: the nesting level is ``imm8 MOD
    32``; FrameTemp is rSP (at the operand size) after pushing rBP; for level
    > 1 each outer frame pointer is read from SS:[rBP - k*n] (n = operand size
    in bytes, the frame pointer stepped at the stack address size) and
    pushed; at level >= 1 FrameTemp is pushed; finally rBP <- FrameTemp (at
    the operand size) and rSP <- rSP - imm16 (at the stack address size).
    The pseudo-code steps rBP itself in the copy loop and then overwrites it
    with FrameTemp; the spec steps a temporary, which leaves the same rBP for
    32/64-bit operands and keeps the upper bits of EBP for a 16-bit operand
    on a 32-bit stack (as Bochs models it).
    """
    alloc_op, level_op = i.operands
    size = i.opsize
    n = size // 8
    s = x.s
    D = x.D
    sw = s.stack_bits
    level = level_op.value & 0x1F
    x.push(s.read_gpr(RBP, size), size)
    frame_temp = s.read_gpr(RSP, size)
    if level:
        bp = s.read_gpr(RBP, sw)
        step = D.const(sw, n)
        for _ in range(level - 1):
            bp = D.sub(sw, bp, step)
            x.push(x.mem_read(SS, bp, n, sw), size)
        x.push(frame_temp, size)
    s.write_gpr(RBP, size, frame_temp)
    s.write_gpr(RSP, sw, D.sub(sw, s.read_gpr(RSP, sw), D.const(sw, alloc_op.value & 0xFFFF)))


@instruction("LEAVE", ref="SDM Vol. 2A LEAVE")
def leave(x: Exec, i: Insn) -> None:
    """rSP <- rBP (at the stack address size), then pop rBP (at the operand size)."""
    s = x.s
    sw = s.stack_bits
    s.write_gpr(RSP, sw, s.read_gpr(RBP, sw))
    s.write_gpr(RBP, i.opsize, x.pop(i.opsize))
