"""Data movement (SDM Vol. 1 7.3.1; Vol. 2 MOV..XLAT): MOV, MOVZX/MOVSX/MOVSXD, LEA, XCHG,
XADD, CMPXCHG, CMPXCHG8B/16B, BSWAP, CMOVcc, SETcc, CBW/CWD families, XLAT, LAHF/SAHF.

Every instruction has the usual shape: operands -> operation -> flags ->
write-back.  Writes of a 32-bit register zero-extend it to 64 bits (SDM Vol. 1
3.4.1.1, done by the state); where the manuals say a register is *not*
written (the accumulator or a register destination of CMPXCHG, EDX:EAX of
CMPXCHG8B), the register is left alone, upper half included.  LOCK needs no
semantics of its own in a single-CPU model.
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import MEM, SEG, Insn
from spec.faults import Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.segments import mov_segment
from spec.isa.system import mov_control
from spec.memory import AccessKind

_SYSTEM = SEG  # operand kinds >= SEG (SEG, CR, DR, FAR) are not general data operands
_RAX, _RCX, _RDX, _RBX = 0, 1, 2, 3
_DS = 3


# -- MOV and its extending forms ------------------------------------------------------------

@instruction("MOV", ref="SDM Vol. 2B MOV; APM Vol. 3 MOV")
def mov(x: Exec, i: Insn) -> None:
    """MOV with general registers, immediates, memory and moffs (88-8B, A0-A3, B0-BF, C6/C7).

    The segment-register forms (8C, 8E) share the mnemonic and go to
    :func:`spec.isa.segments.mov_segment`; the control/debug-register forms
    (0F 20-23) go to :func:`spec.isa.system.mov_control`.  No flags.
    """
    dst, src = i.operands
    if dst.kind >= _SYSTEM or src.kind >= _SYSTEM:
        if dst.kind == SEG or src.kind == SEG:
            mov_segment(x, i)
            return
        mov_control(x, i)  # MOV CRn/DRn (0F 20-23)
        return
    x.write(dst, x.read(src))


@instruction("MOVZX", ref="SDM Vol. 2B MOVZX")
def movzx(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    x.write(dst, x.D.zext(x.read(src), src.size, dst.size))


@instruction("MOVSX", ref="SDM Vol. 2B MOVSX/MOVSXD")
def movsx(x: Exec, i: Insn) -> None:
    dst, src = i.operands
    x.write(dst, x.D.sext(x.read(src), src.size, dst.size))


@instruction("MOVSXD", ref="SDM Vol. 2B MOVSX/MOVSXD; APM Vol. 3 MOVSXD")
def movsxd(x: Exec, i: Insn) -> None:
    """63 /r in 64-bit mode.  REX.W: sign-extend r/m32 to 64 bits.

    Without REX.W the SDM lists ``MOVSXD r32, r/m32`` and ``MOVSXD r16, r/m16``:
    a plain move of the operand size (the 32-bit form zero-extends the
    destination as every 32-bit register write does).  The 16-bit form reads
    only 16 bits of a memory source (the SDM's r/m16), which matters only for
    faults at the end of a segment or page.
    """
    dst, src = i.operands
    w = dst.size
    if w == 64:
        x.write(dst, x.D.sext(x.read(src), 32, 64))
    elif w == 32:
        x.write(dst, x.read(src))
    elif src.kind == MEM:
        x.write(dst, x.mem_read(src.seg, x.ea(src), 2))
    else:
        x.write(dst, x.s.read_gpr(src.reg, 16))


@instruction("LEA", ref="SDM Vol. 2A LEA (operand size vs address size table)")
def lea(x: Exec, i: Insn) -> None:
    """The effective address, computed in the address size, then truncated to (or
    zero-extended to) the operand size.  No memory access; the segment is ignored."""
    dst, src = i.operands
    D = x.D
    w, aw = dst.size, i.addrsize
    ea = x.ea(src)
    if w < aw:
        ea = D.extract(ea, w - 1, 0)
    elif w > aw:
        ea = D.zext(ea, aw, w)
    x.write(dst, ea)


# -- exchanges ---------------------------------------------------------------------------------

@instruction("XCHG", ref="SDM Vol. 2B XCHG")
def xchg(x: Exec, i: Insn) -> None:
    """86/87 /r and 90+r (with REX.B: R8..R15; plain 90 is NOP and never reaches here).

    Both registers (or the register and memory) are written, so a 32-bit
    exchange zero-extends both registers in 64-bit mode, ``xchg eax, eax``
    in its ModRM form (87 C0) included.  A memory exchange is always locked
    (nothing to model on one CPU).
    """
    a, b = i.operands
    va, vb = x.read(a), x.read(b)
    x.write(a, vb)
    x.write(b, va)


@instruction("XADD", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B XADD")
def xadd(x: Exec, i: Insn) -> None:
    """TEMP = SRC + DEST; SRC = DEST; DEST = TEMP (so with one register for both, the sum wins)."""
    dst, src = i.operands
    w = dst.size
    a, b = x.read(dst), x.read(src)
    r = x.D.add(w, a, b)
    x.set_flags(F.ADD, w, a, b, r)
    x.write(src, a)
    x.write(dst, r)


@instruction("CMPXCHG", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A CMPXCHG; APM Vol. 3 CMPXCHG")
def cmpxchg(x: Exec, i: Insn) -> None:
    """Compare the accumulator with DEST; flags as ``CMP accumulator, DEST``.

    Equal: DEST = SRC; the accumulator is not written (RAX keeps its upper
    half for a 32-bit operand).  Not equal: accumulator = DEST (a 32-bit write
    zero-extends RAX); a memory DEST is written back with its own value (the
    locked read-modify-write always writes, SDM CMPXCHG; so a read-only page
    faults either way), a register DEST is not written (its upper half stays:
    the behaviour of hardware, documented by the APM's "otherwise, it copies
    the value in the first operand to the accumulator").
    """
    dst, src = i.operands
    w = dst.size
    D = x.D
    temp = x.read(dst)
    new = x.read(src)
    acc = x.s.read_gpr(_RAX, w)
    x.set_flags(F.SUB, w, acc, temp, D.sub(w, acc, temp))
    if x.decide(D.eq(w, acc, temp)):
        x.write(dst, new)
    else:
        if dst.kind == MEM:
            x.write(dst, temp)
        x.s.write_gpr(_RAX, w, temp)


@instruction("CMPXCHG8B", "CMPXCHG16B", defines="ZF", ref="SDM Vol. 2A CMPXCHG8B/CMPXCHG16B")
def cmpxchg_wide(x: Exec, i: Insn) -> None:
    """CMPXCHG8B m64 / CMPXCHG16B m128 (0F C7 /1; REX.W selects 16B).

    Compare EDX:EAX (RDX:RAX) with the memory operand.  Equal: ZF = 1, memory
    = ECX:EBX (RCX:RBX), EDX:EAX not written.  Not equal: ZF = 0, EDX:EAX =
    memory (32-bit writes: RAX/RDX upper halves cleared in 64-bit mode),
    memory written back with its own value.  Only ZF changes.  CMPXCHG16B
    raises #GP(0) when the linear address is not 16-byte aligned (checked
    before the access).
    """
    (m,) = i.operands
    D = x.D
    w = m.size  # 64 (CMPXCHG8B) or 128 (CMPXCHG16B)
    h = w >> 1
    n = w >> 3
    ea = x.ea(m)
    if w == 128 and x.decide(D.ne(4, D.extract(x.linear(m.seg, ea), 3, 0), D.const(4, 0))):
        raise x.fault(Vector.GP, 0)
    temp = x.mem_read(m.seg, ea, n, intent=AccessKind.WRITE)  # locked RMW: write intent (RMW_DEST)
    s = x.s
    eq = D.eq(w, D.concat(s.read_gpr(_RDX, h), s.read_gpr(_RAX, h), h), temp)
    x.set_flag(F.ZF, eq)
    if x.decide(eq):
        x.mem_write(m.seg, ea, n, D.concat(s.read_gpr(_RCX, h), s.read_gpr(_RBX, h), h))
    else:
        x.mem_write(m.seg, ea, n, temp)
        s.write_gpr(_RAX, h, D.extract(temp, h - 1, 0))
        s.write_gpr(_RDX, h, D.extract(temp, w - 1, h))


@instruction("BSWAP", ref="SDM Vol. 2A BSWAP")
def bswap(x: Exec, i: Insn) -> None:
    """Reverse the bytes of a 32- or 64-bit register.

    With a 16-bit operand size (66 prefix) the SDM leaves the result
    undefined; the spec does what processors are reported to do (and what
    Bochs models): the 16-bit register becomes 0, bits 63:16 unchanged.
    """
    (r,) = i.operands
    D = x.D
    if i.opsize == 16:
        x.s.write_gpr(r.reg, 16, D.const(16, 0))
        return
    w = r.size
    v = x.read(r)
    out = D.extract(v, 7, 0)
    for k in range(8, w, 8):
        out = D.concat(out, D.extract(v, k + 7, k), 8)
    x.write(r, out)


# -- conditional moves and sets (conditions: SDM Vol. 1 Appendix B) ----------------------------

@instruction("CMOVCC", ref="SDM Vol. 2A CMOVcc")
def cmovcc(x: Exec, i: Insn) -> None:
    """The source is read (memory: faults included) whatever the condition; the
    destination is written either way, so a 32-bit CMOV zero-extends it in
    64-bit mode even when the condition is false."""
    dst, src = i.operands
    v = x.read(src)
    x.write(dst, x.D.ite(x.cond(i.row.cc), v, x.read(dst)))  # type: ignore[arg-type]


@instruction("SETCC", ref="SDM Vol. 2B SETcc")
def setcc(x: Exec, i: Insn) -> None:
    (dst,) = i.operands
    x.write(dst, x.D.from_bool(x.cond(i.row.cc), 8))  # type: ignore[arg-type]


# -- accumulator conversions ---------------------------------------------------------------------

@instruction("CBW", ref="SDM Vol. 2A CBW/CWDE/CDQE")
def cbw(x: Exec, i: Insn) -> None:
    """AX = sext(AL), EAX = sext(AX), RAX = sext(EAX) by operand size."""
    w = i.opsize
    h = w >> 1
    x.s.write_gpr(_RAX, w, x.D.sext(x.s.read_gpr(_RAX, h), h, w))


@instruction("CWD", ref="SDM Vol. 2A CWD/CDQ/CQO")
def cwd(x: Exec, i: Insn) -> None:
    """DX:AX, EDX:EAX, RDX:RAX = sext(rAX): rDX is filled with the sign bit of rAX."""
    w = i.opsize
    D = x.D
    a = x.s.read_gpr(_RAX, w)
    x.s.write_gpr(_RDX, w, D.ashr(w, a, D.const(w, w - 1)))


@instruction("XLAT", ref="SDM Vol. 2B XLAT/XLATB")
def xlat(x: Exec, i: Insn) -> None:
    """AL = byte at seg:[rBX + zext(AL)], in the address size; DS unless overridden."""
    D = x.D
    aw = i.addrsize
    s = x.s
    off = D.add(aw, s.read_gpr(_RBX, aw), D.zext(s.read_gpr(_RAX, 8), 8, aw))
    seg = i.seg_override if i.seg_override is not None else _DS
    s.write_gpr(_RAX, 8, x.mem_read(seg, off, 1))


# -- flags to and from AH ------------------------------------------------------------------------

@instruction("LAHF", ref="SDM Vol. 2A LAHF")
def lahf(x: Exec, i: Insn) -> None:
    """AH = SF:ZF:0:AF:0:PF:1:CF.  (In 64-bit mode LAHF/SAHF need CPUID
    80000001H:ECX.LAHF-SAHF[0]; the modeled processor has it.)"""
    D = x.D
    low = D.extract(x.s.read_rflags(), 7, 0)
    x.s.write_gpr(_RAX, 8, D.or_(8, D.and_(8, low, D.const(8, 0xD5)), D.const(8, 0x02)), True)


@instruction("SAHF", defines="CF PF AF ZF SF", ref="SDM Vol. 2B SAHF")
def sahf(x: Exec, i: Insn) -> None:
    """SF ZF AF PF CF = AH bits 7 6 4 2 0; OF unchanged."""
    D = x.D
    ah = x.s.read_gpr(_RAX, 8, True)
    for f in (F.CF, F.PF, F.AF, F.ZF, F.SF):
        x.set_flag(f, D.bit(8, ah, f))

