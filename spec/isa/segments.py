"""Segment-register loads for data and stack segments, and MOV to/from segment registers.

:func:`load_segment` is the one path by which MOV Sreg, POP Sreg (and later
LDS/LES/LFS/LGS/LSS) load DS, ES, FS, GS or SS:

* real-address and virtual-8086 mode (SDM Vol. 3A 20.1.1, 20.2.1): the
  selector is stored and the hidden base becomes ``selector << 4``; limit and
  attributes keep whatever they held (the spec also clears ``unusable``: the
  register holds a real-mode value now);
* protected mode and IA-32e mode: the descriptor is read from the GDT or LDT
  and checked as in SDM Vol. 2B MOV / POP "Operation" and "Protected Mode
  Exceptions", SDM Vol. 3A 5.5-5.7 (privilege checks for data and stack
  segments) and 3.4.5 (descriptor format); the accessed bit is set in the
  descriptor in memory (SDM Vol. 3A 3.4.5.1) and the hidden cache loaded.

Descriptor-table reads and the accessed-bit write are implicit supervisor
accesses (SDM Vol. 3A 4.6.1), whatever the CPL: ``user=False, implicit=True``.

:func:`mov_segment` is MOV Sw,Ew (8E) and MOV Evw,Sw (8C); the MOV family
(:mod:`spec.isa.datamove`) dispatches to it when an operand is a segment
register.  This module registers no mnemonic itself.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import CS, SEG, SS, Insn
from spec.faults import Fault, Vector
from spec.isa.context import Exec
from spec.memory import AccessKind
from spec.state import CR0_PE, MachineState, Segment

_M32 = 0xFFFF_FFFF


def _selector_error(selector: int) -> int:
    """Error code naming a selector: index and TI, EXT = IDT = 0 (SDM Vol. 3A 6.13)."""
    return selector & 0xFFFC


def descriptor_address(s: MachineState, selector: int) -> int:
    """Linear address of the descriptor ``selector`` names; #GP(selector) if outside its table.

    TI = 1 selects the LDT, which must hold a usable (non-null) selector
    (SDM Vol. 3A 3.5.1); the 8 bytes of the descriptor must lie within the
    table limit (SDM Vol. 3A 3.5.1: "index * 8 + 7 <= limit").
    """
    if selector & 4:
        ldtr = s.ldtr
        if ldtr.unusable or (ldtr.selector & 0xFFFC) == 0:
            raise Fault(Vector.GP, _selector_error(selector))
        base, limit = ldtr.base, ldtr.limit
    else:
        base, limit = s.gdtr.base, s.gdtr.limit
    offset = selector & 0xFFF8
    if offset + 7 > limit:
        raise Fault(Vector.GP, _selector_error(selector))
    lin = base + offset
    return lin & 0xFFFF_FFFF_FFFF_FFFF if s.long_mode else lin & _M32


def read_descriptor(s: MachineState, selector: int) -> tuple[int, int]:
    """``(raw 64-bit descriptor, its linear address)``: an implicit supervisor read."""
    lin = descriptor_address(s, selector)
    D = s.D
    return D.concrete(s.mem.read(lin, 8, AccessKind.READ, False, implicit=True)), lin


def descriptor_cache(selector: int, raw: int) -> Segment:
    """The hidden part a code/data descriptor loads (SDM Vol. 3A 3.4.5, Figure 3-8).

    Limit bits 19:0 are scaled by G: ``limit << 12 | 0xFFF`` for 4-KiB granularity.
    """
    hi = raw >> 32
    limit = (raw & 0xFFFF) | (hi & 0xF0000)
    g = (hi >> 23) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    base = ((raw >> 16) & 0xFFFFFF) | (hi & 0xFF00_0000)
    return Segment(selector=selector, base=base, limit=limit, type=(hi >> 8) & 0xF, s=(hi >> 12) & 1,
                   dpl=(hi >> 13) & 3, p=(hi >> 15) & 1, avl=(hi >> 20) & 1, l=(hi >> 21) & 1,
                   db=(hi >> 22) & 1, g=g, unusable=False)


def set_accessed(s: MachineState, lin: int, raw: int) -> None:
    """Set the descriptor's accessed bit (type bit 0, byte 5 bit 0) if clear (SDM Vol. 3A 3.4.5.1)."""
    byte5 = (raw >> 40) & 0xFF
    if not byte5 & 1:
        s.mem.write(lin + 5, 1, s.D.const(8, byte5 | 1), False, implicit=True)


def load_segment(x: Exec, sreg: int, selector: int) -> None:
    """Load data/stack segment register ``sreg`` (ES, SS, DS, FS, GS) with ``selector``.

    Protected/IA-32e mode checks, in the order of SDM Vol. 2B MOV "Operation":

    * SS: null selector -> #GP(0), except in 64-bit mode at CPL < 3 with
      RPL = CPL (SDM Vol. 2B MOV "64-Bit Mode Exceptions"; Vol. 3A 3.4.4);
      outside the table, RPL != CPL, not a writable data segment, or
      DPL != CPL -> #GP(selector); not present -> #SS(selector).
    * DS/ES/FS/GS: a null selector is loaded and the register marked unusable
      (a later access through it faults); otherwise outside the table, not a
      data or readable code segment, or (data or non-conforming code and
      DPL < max(CPL, RPL)) -> #GP(selector); not present -> #NP(selector).

    In 64-bit mode the descriptor still supplies the FS/GS base (32 bits,
    upper bits zero; SDM Vol. 3A 3.4.4); the full 64-bit bases come from
    the FS.base/GS.base MSRs or WRFSBASE, not from here.
    """
    s = x.s
    selector &= 0xFFFF
    if not s.cr0 & CR0_PE or (s.rflags_sys >> F.VM) & 1:
        seg = s.seg[sreg].copy()
        seg.selector = selector
        seg.base = selector << 4
        seg.unusable = False
        s.seg[sreg] = seg
        return

    cpl = s.cpl
    rpl = selector & 3
    err = _selector_error(selector)
    if (selector & 0xFFFC) == 0:
        if sreg == SS:
            if not (s.code_bits == 64 and cpl < 3 and rpl == cpl):
                raise Fault(Vector.GP, 0)
            # 64-bit mode null SS (SDM Vol. 3A 3.4.4): usable as a stack; the spec keeps the
            # hidden base/limit and sets DPL = RPL (= CPL), so the CPL convention holds.
            seg = s.seg[SS].copy()
            seg.selector = selector
            seg.dpl = rpl
            seg.unusable = True
            s.seg[SS] = seg
            return
        # Null selector into DS/ES/FS/GS: no descriptor is read and the register becomes
        # unusable (SDM Vol. 3A 3.4.2 "null segment selector").  The spec leaves the hidden base
        # unchanged (AMD behaviour for FS/GS in 64-bit mode; some Intel processors clear it).
        seg = s.seg[sreg].copy()
        seg.selector = selector
        seg.unusable = True
        s.seg[sreg] = seg
        return

    raw, lin = read_descriptor(s, selector)
    hi = raw >> 32
    typ = (hi >> 8) & 0xF
    is_code_data = (hi >> 12) & 1
    dpl = (hi >> 13) & 3
    present = (hi >> 15) & 1
    code = typ & 0x8
    if sreg == SS:
        writable_data = is_code_data and not code and typ & 0x2
        if rpl != cpl or not writable_data or dpl != cpl:
            raise Fault(Vector.GP, err)
        if not present:
            raise Fault(Vector.SS, err)
    else:
        readable = is_code_data and (not code or typ & 0x2)
        conforming_code = code and typ & 0x4
        if not readable or (not conforming_code and dpl < max(cpl, rpl)):
            raise Fault(Vector.GP, err)
        if not present:
            raise Fault(Vector.NP, err)
    set_accessed(s, lin, raw)
    s.seg[sreg] = descriptor_cache(selector, raw | (1 << 40))


def mov_segment(x: Exec, i: Insn) -> None:
    """MOV Sreg,r/m16 (8E /r) and MOV r/m,Sreg (8C /r) (SDM Vol. 2B MOV).

    * To a segment register: CS is #UD (use a far JMP/CALL/RET); loading SS
      inhibits interrupts until after the next instruction (SDM Vol. 2B MOV,
      recorded as ``state.interrupt_shadow``).
    * From a segment register: a memory destination is 16 bits; a 32-bit
      register destination is zero-extended ("for the Pentium 4, Intel Xeon
      and P6 family processors, the two high-order bytes are filled with
      zeros", SDM Vol. 2B MOV), a 64-bit one (REX.W) likewise; a 16-bit
      register keeps its upper bits.
    """
    dst, src = i.operands
    if dst.kind == SEG:
        if dst.reg == CS:
            raise x.fault(Vector.UD)
        selector = x.D.concrete(x.read(src))
        load_segment(x, dst.reg, selector)
        if dst.reg == SS:
            x.s.interrupt_shadow = True
        return
    value = x.read(src)
    x.write(dst, x.D.zext(value, 16, dst.size))


__all__ = ["descriptor_address", "descriptor_cache", "load_segment", "mov_segment", "read_descriptor",
           "set_accessed"]
