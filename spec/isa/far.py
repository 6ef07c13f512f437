"""Far control transfers and interrupt return: JMP/CALL far, RETF, IRET/IRETD/IRETQ.

SDM Vol. 2A JMP, CALL, IRET/IRETD/IRETQ and Vol. 2B RET ("Operation"
sections); SDM Vol. 3A 5.8 (privilege checks on control transfers), 6.14.3
(IRET in IA-32e mode), 20.1 (real mode), 20.2-20.3 (virtual-8086 mode);
AMD APM Vol. 2 4.8-4.9 and 8.7, APM Vol. 3 CALL/JMP/RET (Far), IRET.

**Real-address and virtual-8086 mode.**  CS is loaded as a data segment
register is there: selector stored, base = selector << 4, the hidden limit
and attributes kept (SDM Vol. 3A 20.1.1; :func:`spec.isa.segments.load_segment`
does the same for DS...).  The new IP must lie within CS.limit, else #GP(0)
(SDM Vol. 2A JMP/CALL "Real-Address Mode Exceptions"; with the usual 64-KiB
limit this is the "DEST[31:16] is not zero" test of the CALL pseudo-code).

**Protected and IA-32e mode: code-segment targets** (:func:`far_code_target`).
For JMP/CALL far to ``selector:offset``, in the order of SDM Vol. 2A JMP
"Operation":

====================================================  ===================
condition                                             fault
====================================================  ===================
null selector                                         #GP(0)
outside the GDT/LDT limit                             #GP(selector)
data segment, or a system type not listed below       #GP(selector)
IA-32e mode and L = D = 1                             #GP(selector)
conforming code with DPL > CPL                        #GP(selector)
non-conforming code with RPL > CPL or DPL != CPL      #GP(selector)
not present                                           #NP(selector)
offset beyond the new CS limit (not 64-bit code)      #GP(0)
offset not canonical (64-bit code)                    #GP(0)
====================================================  ===================

CS is loaded with RPL = CPL (the CPL does not change: conforming code runs
at the caller's privilege, SDM Vol. 3A 5.8.1.2); the accessed bit is set in
the descriptor.  In IA-32e mode the target is a 64-bit (L = 1) or a
compatibility-mode (L = 0) code segment; the new CS decides the mode.  Error
codes name the selector with EXT = 0 (``selector & FFFCH``).

*Call gates, task gates and TSS descriptors* are not modelled: after the
checks on the gate/TSS descriptor itself (type valid for the mode -- only the
64-bit call gate in IA-32e mode; DPL >= CPL and DPL >= RPL, a TSS not busy,
else #GP(selector); present, else #NP(selector); SDM Vol. 2A JMP "CALL-GATE",
"TASK-GATE", "TASK-STATE-SEGMENT") the transfer raises
:class:`~spec.faults.Unimplemented` naming the descriptor.

**RETF** (SDM Vol. 2B RET, far forms): EIP then CS are popped; the return
CS is checked (null #GP(0); outside the table #GP(sel); not code, or L = D =
1 in IA-32e mode, or RPL < CPL, conforming with DPL > RPL, non-conforming
with DPL != RPL: #GP(sel); not present #NP(sel)).  RPL = CPL is a
same-privilege return.  RPL > CPL returns to the outer level: ``imm16``
bytes are released on the called procedure's stack, ESP and SS popped, SS
checked for the new CPL (null #GP(0) -- except in IA-32e mode returning to
64-bit code at CPL < 3, where a null SS with RPL = new CPL is loaded (SDM
Vol. 3A 3.4.4); RPL != new CPL, not a writable data segment, DPL != new CPL:
#GP(sel); not present #SS(sel)), the stacks switched, ``imm16`` released
again on the caller's stack, and ES/DS/FS/GS holding data or non-conforming
code with DPL < new CPL made null (SDM "RETURN-TO-OUTER-PRIVILEGE-LEVEL").

**IRET** (SDM Vol. 2A IRET):

* real mode: IP, CS, FLAGS popped at the operand size; IRETD writes
  ``EFLAGS AND 257FD5H`` (VM, VIF, VIP kept), a 16-bit IRET bits 15:0;
* virtual-8086 mode: IOPL = 3 as real mode but IOPL kept (and VM, VIF, VIP);
  IOPL < 3 with CR4.VME and a 16-bit operand: #GP(0) if the image sets TF,
  or sets IF while VIP = 1, otherwise VIF takes the image's IF and IF, IOPL
  stay (SDM Vol. 3A 20.4, as POPF in :mod:`spec.isa.stack`); otherwise #GP(0);
* protected mode with NT = 1 is a task return: :class:`Unimplemented`; in
  IA-32e mode NT = 1 is #GP(0);
* protected mode at CPL 0 with a 32-bit image whose VM = 1 (legacy mode
  only): return to virtual-8086 mode -- ESP, SS, ES, DS, FS, GS popped
  (32 bits each), EFLAGS loaded whole, all six segment registers get
  virtual-8086 caches (base = selector << 4, limit FFFFH, DPL 3, present,
  read/write data), EIP must be <= FFFFH (#GP(0));
* otherwise EIP, CS, EFLAGS popped, CS checked as for RETF; SS:ESP popped
  on a return to an outer level and, in 64-bit mode, always (SDM "IA-32e-MODE";
  IRETQ and also IRETD/IRET from 64-bit mode); SS checked as for RETF.
  RFLAGS bits written (CPL and IOPL *before* the IRET): CF PF AF ZF SF TF DF OF
  NT always; RF AC ID for 32/64-bit operands; IF if CPL <= IOPL; IOPL if CPL = 0;
  VIF VIP if CPL = 0 and the operand is 32/64-bit; VM never.  On an outer
  return ES/DS/FS/GS are nulled as for RETF.

RSP after a stack switch is written at the width of the *new* stack: 64 for
64-bit code, else SS.B -- a 16-bit SS gets SP only and keeps the upper bits
of the old ESP (the behaviour "espfix" kernels work around).

RF: IRET with a 32/64-bit operand loads RF from the image; the CPU must not
clear it when the IRET retires (SDM Vol. 3A 17.3.1.1).  NMI blocking: every
IRET that completes ends the NMI-blocked state (SDM Vol. 3A 6.7.1):
``state.nmi_blocked`` is cleared (the exception-delivery module sets it).  An
IRET that faults leaves it set -- the model's choice: Intel's VMX exit
qualification "NMI unblocking due to IRET" (SDM Vol. 3C 27.2.3) shows that
hardware may already have unblocked NMIs when an IRET faults.

Selectors popped from or pushed to wider slots: the pop discards the upper
bits; CALL far pushes CS zero-extended to the operand size (the SDM: "padded
with 16 high-order bits"; Bochs and QEMU write zeros).

Fault precision: every value is popped and every check made before state
changes; the CPU rolls back registers, RSP, the segment list (segment
registers are *replaced* by new :class:`Segment` objects, never mutated) and
memory writes of a faulting instruction.  CALL far pushes the return address
before the target offset is checked, so a stack fault precedes the #GP(0)
of a bad offset (SDM Vol. 2A CALL: "IF stack not large enough ... #SS(0)"
comes before the limit test).

Not modelled (model limits, each an ``Unimplemented`` or a documented
simplification): call/task gates and TSS targets, task return (IRET with NT),
shadow stacks (CET), the "descriptor in non-canonical space" #GP(selector)
of IA-32e mode (descriptor addresses wrap instead).  A null data-segment
register is left as it is by the outer-return nulling (Intel's IRET
pseudo-code also rewrites its selector to 0).
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.decode.insn import CS, DS, ES, FAR, FS, GS, RSP, SS, Insn
from spec.faults import Fault, Unimplemented, Vector
from spec.isa.context import Exec
from spec.isa.control import is_canonical
from spec.isa.registry import instruction
from spec.isa.segments import descriptor_cache, read_descriptor, set_accessed
from spec.state import CR0_PE, MachineState, Segment
from spec.svm.exitcodes import ExitCode

CR4_VME = 1 << 0
_MASK = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}
_ACCESSED = 1 << 40

_TF, _IF, _NT, _RF, _VM = 1 << F.TF, 1 << F.IF, 1 << F.NT, 1 << F.RF, 1 << F.VM
_IOPL = 3 << F.IOPL_SHIFT
_AC, _VIF, _VIP, _ID = 1 << F.AC, 1 << F.VIF, 1 << F.VIP, 1 << F.ID

_IRET_BASE = F.STATUS_MASK | _TF | (1 << F.DF) | _NT
"""Written by every IRET (SDM Vol. 2A IRET: "EFLAGS (CF, PF, AF, ZF, SF, TF, DF, OF, NT) <- tempEFLAGS")."""
_IRET_WIDE = _RF | _AC | _ID
"""Added by IRETD/IRETQ."""
_IRET_16 = _IRET_BASE | _IF | _IOPL
"""A 16-bit IRET in real mode: FLAGS bits 15:0 (reserved bits 1, 3, 5, 15 excluded) = 7FD5H."""
_IRET_REAL32 = _IRET_16 | _IRET_WIDE
"""IRETD in real mode: ``tempEFLAGS AND 257FD5H`` (VM, VIF, VIP kept)."""
_EFLAGS_ALL = _IRET_REAL32 | _VM | _VIF | _VIP
"""Every defined EFLAGS bit (3F7FD5H): the return to virtual-8086 mode loads them all."""
_NOT_STATUS = _MASK[64] ^ F.STATUS_MASK

_SYSTEM_TYPES_LEGACY = frozenset({0x1, 0x3, 0x4, 0x5, 0x9, 0xB, 0xC})
"""System descriptors a far JMP/CALL may name outside IA-32e mode: TSS (1/9, busy 3/B), call gate (4/C),
task gate (5) (SDM Vol. 2A JMP "Operation")."""
_SYSTEM_NAMES = {0x1: "16-bit TSS", 0x3: "busy 16-bit TSS", 0x4: "16-bit call gate", 0x5: "task gate",
                 0x9: "32-bit TSS", 0xB: "busy 32-bit TSS", 0xC: "call gate"}


# -- helpers ------------------------------------------------------------------------------------

def _real_mode(s: MachineState) -> bool:
    """Real-address or virtual-8086 mode: segment loads are selector << 4."""
    return not s.cr0 & CR0_PE or bool(s.rflags_sys & _VM)


def _real_cs(s: MachineState, selector: int) -> Segment:
    """The CS a real-mode/virtual-8086 load gives: base = selector << 4, the rest kept (SDM Vol. 3A 20.1.1)."""
    cs = s.seg[CS].copy()
    cs.selector = selector
    cs.base = selector << 4
    cs.unusable = False
    return cs


def _v86_segment(selector: int) -> Segment:
    """A segment register in virtual-8086 mode (SDM Vol. 3A 20.2.1): 64-KiB read/write data, DPL 3."""
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF, type=0x3, s=1, dpl=3, p=1)


def _far_pointer(x: Exec, i: Insn) -> tuple[int, int]:
    """``(selector, offset)`` of JMP/CALL far: the Ap immediate, or the m16:16/32/64 memory operand.

    The memory pointer is read as one operand (offset at the lower address,
    the selector after it), as the far-pointer loads in :mod:`spec.isa.segload` do.
    """
    op = i.operands[0]
    if op.kind == FAR:
        return op.reg, op.value
    D = x.D
    ptr = D.concrete(x.read(op))
    n = i.opsize
    return (ptr >> n) & 0xFFFF, ptr & _MASK[n]


def _check_ip(s: MachineState, cs: Segment, ip: int) -> None:
    """#GP(0) unless ``ip`` is valid in the new CS: canonical for 64-bit code, else within the limit."""
    if s.long_mode and cs.l:
        if not is_canonical(s, ip):
            raise Fault(Vector.GP, 0)
    elif ip > cs.limit:
        raise Fault(Vector.GP, 0)


def _release(x: Exec, imm: int) -> None:
    """RET imm16: add ``imm`` to rSP at the current stack address size (SDM Vol. 2B RET)."""
    if imm:
        s = x.s
        D = x.D
        sw = s.stack_bits
        s.write_gpr(RSP, sw, D.add(sw, s.read_gpr(RSP, sw), D.const(sw, imm)))


def _load_flags(x: Exec, image: Any, mask: int) -> None:
    """Write the RFLAGS bits of ``mask`` from the 64-bit ``image`` (status flags stay domain values)."""
    s = x.s
    D = x.D
    sys_mask = mask & _NOT_STATUS
    popped = D.concrete(D.and_(64, image, D.const(64, sys_mask)))
    s.rflags_sys = (s.rflags_sys & ~sys_mask) | popped | F.RESERVED_ONE
    for f in F.STATUS:
        s.set_flag(f, D.bit(64, image, f))


def _null_data_segments(s: MachineState, cpl: int) -> None:
    """After a return to an outer level: ES, DS, FS, GS holding data or non-conforming code with DPL < CPL
    become null (selector 0, unusable) (SDM Vol. 2B RET, Vol. 2A IRET "RETURN-TO-OUTER-PRIVILEGE-LEVEL")."""
    seg = s.seg
    for r in (ES, DS, FS, GS):
        g = seg[r]
        if not g.unusable and g.dpl < cpl and (not g.type & 0x8 or not g.type & 0x4):
            n = g.copy()
            n.selector = 0
            n.unusable = True
            seg[r] = n


def _new_stack_width(s: MachineState, cs: Segment, ss: Segment) -> int:
    """The stack address size after a stack switch: 64 for 64-bit code, else the new SS.B."""
    if s.long_mode and cs.l:
        return 64
    return 32 if ss.db else 16


def _system_target(s: MachineState, selector: int, hi: int, what: str) -> None:
    """A far JMP/CALL naming a system descriptor: check the descriptor itself, then stop (not modelled)."""
    typ = (hi >> 8) & 0xF
    err = selector & 0xFFFC
    valid = typ == 0xC if s.long_mode else typ in _SYSTEM_TYPES_LEGACY
    if not valid:
        raise Fault(Vector.GP, err)
    dpl = (hi >> 13) & 3
    if dpl < s.cpl or dpl < (selector & 3) or typ in (0x3, 0xB):
        raise Fault(Vector.GP, err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.NP, err)
    name = "64-bit call gate" if s.long_mode else _SYSTEM_NAMES[typ]
    raise Unimplemented(f"far {what} to a {name} (selector {selector:#06x}): call gates, task gates and "
                        "task switches are not modelled (SDM Vol. 2A JMP/CALL CALL-GATE, TASK-GATE, "
                        "TASK-STATE-SEGMENT)")


def far_code_target(s: MachineState, selector: int, what: str = "JMP") -> tuple[Segment, int, int]:
    """Descriptor checks of JMP/CALL far to a code segment (SDM Vol. 2A JMP/CALL "CONFORMING-CODE-SEGMENT",
    "NONCONFORMING-CODE-SEGMENT"; Vol. 3A 5.8.1).

    Returns ``(new CS cache with RPL = CPL, descriptor address, raw descriptor)``;
    nothing is written.  The target offset is checked by the caller (:func:`_check_ip`).
    """
    err = selector & 0xFFFC
    if not err:
        raise Fault(Vector.GP, 0)
    raw, lin = read_descriptor(s, selector)
    hi = raw >> 32
    if not (hi >> 12) & 1:
        _system_target(s, selector, hi, what)
    typ = (hi >> 8) & 0xF
    if not typ & 0x8:
        raise Fault(Vector.GP, err)
    if s.long_mode and (hi >> 21) & 1 and (hi >> 22) & 1:
        raise Fault(Vector.GP, err)
    cpl = s.cpl
    dpl = (hi >> 13) & 3
    if typ & 0x4:
        if dpl > cpl:
            raise Fault(Vector.GP, err)
    elif (selector & 3) > cpl or dpl != cpl:
        raise Fault(Vector.GP, err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.NP, err)
    return descriptor_cache(err | cpl, raw | _ACCESSED), lin, raw


def return_code_segment(s: MachineState, selector: int) -> tuple[Segment, int, int]:
    """Checks of the CS popped by RETF/IRET (SDM Vol. 2B RET, Vol. 2A IRET "PROTECTED-MODE-RETURN").

    Returns ``(CS cache, descriptor address, raw descriptor)``; the selector's
    RPL is the privilege level returned to.
    """
    err = selector & 0xFFFC
    if not err:
        raise Fault(Vector.GP, 0)
    raw, lin = read_descriptor(s, selector)
    hi = raw >> 32
    typ = (hi >> 8) & 0xF
    if not (hi >> 12) & 1 or not typ & 0x8:
        raise Fault(Vector.GP, err)
    if s.long_mode and (hi >> 21) & 1 and (hi >> 22) & 1:
        raise Fault(Vector.GP, err)
    rpl = selector & 3
    dpl = (hi >> 13) & 3
    if rpl < s.cpl or (dpl > rpl if typ & 0x4 else dpl != rpl):
        raise Fault(Vector.GP, err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.NP, err)
    return descriptor_cache(selector, raw | _ACCESSED), lin, raw


def return_stack_segment(s: MachineState, selector: int, new_cpl: int, to64: bool) -> tuple[Segment, int, int]:
    """Checks of the SS popped by RETF/IRET for privilege level ``new_cpl``.

    Returns ``(SS cache, descriptor address or -1 for a null SS, raw descriptor)``.
    A null selector is #GP(0), except when returning to 64-bit code at
    ``new_cpl`` < 3 with RPL = ``new_cpl`` (SDM Vol. 2A IRET "64-Bit Mode
    Exceptions", Vol. 2B RET IA-32e outer return; Vol. 3A 3.4.4): SS then
    holds the null selector, marked unusable, with DPL = new CPL (the CPL
    convention of :attr:`MachineState.cpl`) and the old hidden base/limit.
    """
    err = selector & 0xFFFC
    rpl = selector & 3
    if not err:
        if to64 and new_cpl < 3 and rpl == new_cpl:
            ss = s.seg[SS].copy()
            ss.selector = selector
            ss.dpl = new_cpl
            ss.unusable = True
            return ss, -1, 0
        raise Fault(Vector.GP, 0)
    raw, lin = read_descriptor(s, selector)
    hi = raw >> 32
    typ = (hi >> 8) & 0xF
    writable_data = (hi >> 12) & 1 and not typ & 0x8 and typ & 0x2
    if rpl != new_cpl or not writable_data or (hi >> 13) & 3 != new_cpl:
        raise Fault(Vector.GP, err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.SS, err)
    return descriptor_cache(selector, raw | _ACCESSED), lin, raw


def _commit_stack(x: Exec, cs: Segment, ss: Segment, ss_lin: int, ss_raw: int, sp: int, imm: int = 0) -> None:
    """Switch to the popped stack: SS loaded, rSP = ``sp`` + ``imm`` at the new stack width."""
    s = x.s
    if ss_lin >= 0:
        set_accessed(s, ss_lin, ss_raw)
    w = _new_stack_width(s, cs, ss)
    s.seg[SS] = ss
    s.write_gpr(RSP, w, x.D.const(w, (sp + imm) & _MASK[w]))


# -- JMP / CALL far ---------------------------------------------------------------------------

@instruction("JMPF", ref="SDM Vol. 2A JMP (far forms EA, FF /5); Vol. 3A 5.8")
def jmpf(x: Exec, i: Insn) -> None:
    """JMP ptr16:16/32 (EA) and JMP m16:16/32/64 (FF /5): load CS, jump to the offset (no stack use)."""
    s = x.s
    selector, offset = _far_pointer(x, i)
    if _real_mode(s):
        if offset > s.seg[CS].limit:
            raise Fault(Vector.GP, 0)
        s.seg[CS] = _real_cs(s, selector)
        x.next_rip = offset
        return
    cs, lin, raw = far_code_target(s, selector, "JMP")
    _check_ip(s, cs, offset)
    set_accessed(s, lin, raw)
    s.seg[CS] = cs
    x.next_rip = offset


@instruction("CALLF", ref="SDM Vol. 2A CALL (far forms 9A, FF /3); Vol. 3A 5.8")
def callf(x: Exec, i: Insn) -> None:
    """CALL ptr16:16/32 (9A) and CALL m16:16/32/64 (FF /3): push CS then the return IP at the operand size.

    Both slots are the operand size (2, 4 or 8 bytes; CS zero-extended).
    The pointer is read before anything is pushed.
    """
    s = x.s
    D = x.D
    size = i.opsize
    selector, offset = _far_pointer(x, i)
    if _real_mode(s):
        x.push(D.const(size, s.seg[CS].selector), size)
        x.push(D.const(size, x.next_rip & _MASK[size]), size)
        if offset > s.seg[CS].limit:
            raise Fault(Vector.GP, 0)
        s.seg[CS] = _real_cs(s, selector)
        x.next_rip = offset
        return
    cs, lin, raw = far_code_target(s, selector, "CALL")
    x.push(D.const(size, s.seg[CS].selector), size)
    x.push(D.const(size, x.next_rip & _MASK[size]), size)
    _check_ip(s, cs, offset)
    set_accessed(s, lin, raw)
    s.seg[CS] = cs
    x.next_rip = offset


# -- RETF ------------------------------------------------------------------------------------------

@instruction("RETF", ref="SDM Vol. 2B RET (far forms CB, CA iw); Vol. 3A 5.8.6")
def retf(x: Exec, i: Insn) -> None:
    """Far return: pop IP and CS (operand-size slots), then release ``imm16`` bytes.

    Real/virtual-8086 mode: the IP is checked against CS.limit (#GP(0)) and
    SP += imm16.  Protected/IA-32e mode: see the module docstring; the
    release of a same-privilege return uses the stack address size after CS
    is loaded (the pseudo-code order: "CS <- Pop()" precedes the release).
    """
    s = x.s
    D = x.D
    size = i.opsize
    imm = i.operands[0].value & 0xFFFF if i.operands else 0
    ip = D.concrete(x.pop(size))
    selector = D.concrete(x.pop(size)) & 0xFFFF
    if _real_mode(s):
        if ip > s.seg[CS].limit:
            raise Fault(Vector.GP, 0)
        s.seg[CS] = _real_cs(s, selector)
        _release(x, imm)
        x.next_rip = ip
        return
    cs, cs_lin, cs_raw = return_code_segment(s, selector)
    new_cpl = selector & 3
    if new_cpl == s.cpl:
        _check_ip(s, cs, ip)
        set_accessed(s, cs_lin, cs_raw)
        s.seg[CS] = cs
        _release(x, imm)
        x.next_rip = ip
        return
    # RETURN-TO-OUTER-PRIVILEGE-LEVEL: parameters released on the called procedure's stack first.
    _release(x, imm)
    sp = D.concrete(x.pop(size))
    ss_sel = D.concrete(x.pop(size)) & 0xFFFF
    ss, ss_lin, ss_raw = return_stack_segment(s, ss_sel, new_cpl, s.long_mode and bool(cs.l))
    _check_ip(s, cs, ip)
    set_accessed(s, cs_lin, cs_raw)
    s.seg[CS] = cs
    _commit_stack(x, cs, ss, ss_lin, ss_raw, sp, imm)
    _null_data_segments(s, new_cpl)
    x.next_rip = ip


# -- IRET ------------------------------------------------------------------------------------------

@instruction("IRET", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A IRET/IRETD/IRETQ; Vol. 3A 6.14.3, 20.1-20.3")
def iret(x: Exec, i: Insn) -> None:
    """Interrupt return at the operand size (IRET 16, IRETD 32, IRETQ 64); see the module docstring."""
    x.intercept(ExitCode.IRET)  # APM 15.9: before any exception check
    s = x.s
    size = i.opsize
    if not s.cr0 & CR0_PE:
        _iret_real(x, size, _IRET_REAL32 if size == 32 else _IRET_16)
    elif s.rflags_sys & _VM:
        _iret_from_v86(x, size)
    elif s.rflags_sys & _NT:
        if s.long_mode:
            raise Fault(Vector.GP, 0)
        raise Unimplemented("IRET with EFLAGS.NT = 1 is a task return (SDM Vol. 2A IRET TASK-RETURN): "
                            "task switching is not modelled")
    else:
        _iret_protected(x, size)
    s.nmi_blocked = False


def _iret_real(x: Exec, size: int, mask: int) -> None:
    """Pop IP, CS, FLAGS; the IP must lie within CS.limit (SDM Vol. 2A IRET "REAL-ADDRESS-MODE")."""
    s = x.s
    D = x.D
    ip = D.concrete(x.pop(size))
    selector = D.concrete(x.pop(size)) & 0xFFFF
    image = D.zext(x.pop(size), size, 64)
    if ip > s.seg[CS].limit:
        raise Fault(Vector.GP, 0)
    s.seg[CS] = _real_cs(s, selector)
    _load_flags(x, image, mask)
    x.next_rip = ip


def _iret_from_v86(x: Exec, size: int) -> None:
    """IRET in virtual-8086 mode (SDM Vol. 2A IRET "RETURN-FROM-VIRTUAL-8086-MODE"; Vol. 3A 20.4 with VME)."""
    s = x.s
    sysf = s.rflags_sys
    if sysf & _IOPL == _IOPL:
        _iret_real(x, size, (_IRET_REAL32 if size == 32 else _IRET_16) & ~_IOPL)
        return
    if size != 16 or not s.cr4 & CR4_VME:
        raise Fault(Vector.GP, 0)  # trap to the virtual-8086 monitor
    D = x.D
    ip = D.concrete(x.pop(16))
    selector = D.concrete(x.pop(16))
    image = D.zext(x.pop(16), 16, 64)
    img = D.concrete(D.and_(64, image, D.const(64, _TF | _IF)))
    if img & _TF or (img & _IF and sysf & _VIP):
        raise Fault(Vector.GP, 0)
    if ip > s.seg[CS].limit:
        raise Fault(Vector.GP, 0)
    s.seg[CS] = _real_cs(s, selector)
    _load_flags(x, image, _IRET_BASE)
    s.rflags_sys = (s.rflags_sys & ~_VIF) | (_VIF if img & _IF else 0)
    x.next_rip = ip


def _iret_protected(x: Exec, size: int) -> None:
    """IRET in protected/IA-32e mode with NT = 0 (SDM Vol. 2A IRET "PROTECTED-MODE", "IA-32e-MODE")."""
    s = x.s
    D = x.D
    ip = D.concrete(x.pop(size))
    selector = D.concrete(x.pop(size)) & 0xFFFF
    image = D.zext(x.pop(size), size, 64)
    img_sys = D.concrete(D.and_(64, image, D.const(64, _NOT_STATUS)))
    cpl = s.cpl
    if img_sys & _VM and cpl == 0 and not s.long_mode:
        _iret_to_v86(x, ip, selector, image)
        return
    cs, cs_lin, cs_raw = return_code_segment(s, selector)
    new_cpl = selector & 3
    outer = new_cpl != cpl
    to64 = s.long_mode and bool(cs.l)
    switch = outer or s.code_bits == 64
    if switch:
        sp = D.concrete(x.pop(size))
        ss_sel = D.concrete(x.pop(size)) & 0xFFFF
        ss, ss_lin, ss_raw = return_stack_segment(s, ss_sel, new_cpl, to64)
    _check_ip(s, cs, ip)
    # RFLAGS by the old CPL and IOPL.
    mask = _IRET_BASE
    if size != 16:
        mask |= _IRET_WIDE
    if cpl <= (s.rflags_sys >> F.IOPL_SHIFT) & 3:
        mask |= _IF
    if cpl == 0:
        mask |= _IOPL | (_VIF | _VIP if size != 16 else 0)
    set_accessed(s, cs_lin, cs_raw)
    s.seg[CS] = cs
    if switch:
        _commit_stack(x, cs, ss, ss_lin, ss_raw, sp)
    _load_flags(x, image, mask)
    if outer:
        _null_data_segments(s, new_cpl)
    x.next_rip = ip


def _iret_to_v86(x: Exec, ip: int, selector: int, image: Any) -> None:
    """Return from CPL 0 to virtual-8086 mode (SDM Vol. 2A IRET "RETURN-TO-VIRTUAL-8086-MODE").

    Below EIP, CS, EFLAGS the frame holds ESP, SS, ES, DS, FS, GS (32-bit
    slots, selectors in the low 16 bits).
    """
    s = x.s
    D = x.D
    sp = D.concrete(x.pop(32))
    sels = [D.concrete(x.pop(32)) & 0xFFFF for _ in range(5)]  # SS, ES, DS, FS, GS
    if ip > 0xFFFF:
        raise Fault(Vector.GP, 0)  # beyond the 64-KiB limit of the virtual-8086 CS
    seg = s.seg
    seg[CS] = _v86_segment(selector)
    for r, sel in zip((SS, ES, DS, FS, GS), sels):
        seg[r] = _v86_segment(sel)
    s.write_gpr(RSP, 32, D.const(32, sp))
    _load_flags(x, image, _EFLAGS_ALL)
    x.next_rip = ip


__all__ = ["callf", "far_code_target", "iret", "jmpf", "retf", "return_code_segment", "return_stack_segment"]
