"""String instructions: MOVS, STOS, LODS, CMPS, SCAS and their repeat prefixes.

SDM Vol. 1 7.3.9 (string operations); Vol. 2B MOVS/MOVSB/MOVSW/MOVSD/MOVSQ,
STOS, LODS, CMPS, SCAS and REP/REPE/REPZ/REPNE/REPNZ; AMD APM Vol. 3 3.2
(same instructions) and 1.2.6 (repeat prefixes).

Addressing (SDM Vol. 1 7.3.9.1, Vol. 2A 3.1.1.3 "X"/"Y" operands):

* the source is ``seg:rSI`` with ``seg`` = DS unless a segment prefix
  overrides it; the destination is always ``ES:rDI`` (no override);
* the *address size* (not the operand size) selects SI/ESI/RSI, DI/EDI/RDI
  and the repeat counter CX/ECX/RCX; the index registers are updated at that
  size (16-bit updates wrap within 64 KiB and keep bits 63:16, 32-bit updates
  zero-extend into the 64-bit register, SDM Vol. 1 3.4.1.1);
* after each element the index registers move by the element size, up when
  RFLAGS.DF = 0 and down when DF = 1.

Repetition (SDM Vol. 2B REP/REPE/REPZ/REPNE/REPNZ, "Operation"): with a repeat
prefix and a zero count nothing happens -- no memory access, no register or
flag change.  Otherwise the spec executes *one* element per CPU step,
decrements the counter, and leaves ``x.next_rip`` at the instruction itself
while another iteration is due, so that the next step re-executes it.  This
is the architectural view of an interrupted or faulting REP string operation
("a REP string operation can be suspended by an exception or interrupt": the
registers show the progress made and RIP still addresses the instruction).
REPE/REPNE (CMPS and SCAS only) also stop when ZF becomes 0 / 1 after an
iteration.  F2 on MOVS/STOS/LODS repeats exactly like F3 (the decoder reports
``i.rep == "rep"`` for either), as processors do.
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.decode.insn import Insn
from spec.isa.context import Exec
from spec.isa.registry import instruction

_RAX, _RCX, _RSI, _RDI = 0, 1, 6, 7
_DF = 1 << F.DF


def _delta(x: Exec, n: int, aw: int) -> Any:
    """The index-register step: +n when DF = 0, -n when DF = 1 (SDM Vol. 1 7.3.9.1)."""
    return x.D.const(aw, -n if x.s.rflags_sys & _DF else n)


def _count(x: Exec, aw: int) -> Any:
    """The repeat counter (CX/ECX/RCX by address size), or ``None`` to skip: count 0 does nothing."""
    cnt = x.s.read_gpr(_RCX, aw)
    if x.decide(x.D.is_zero(aw, cnt)):
        return None
    return cnt


def _again(x: Exec, aw: int, cnt: Any, go: Any = None) -> None:
    """End of one iteration: decrement the counter; stay on this instruction while more are due.

    ``go`` is the extra REPE/REPNE condition on ZF (``None`` for plain REP).
    """
    D = x.D
    cnt = D.sub(aw, cnt, D.const(aw, 1))
    x.s.write_gpr(_RCX, aw, cnt)
    more = D.bnot(D.is_zero(aw, cnt))
    if go is not None:
        more = D.band(more, go)
    if x.decide(more):
        x.next_rip = x.s.rip


def _zf_go(x: Exec, i: Insn, equal: Any) -> Any:
    """REPE continues while ZF = 1 (operands equal), REPNE while ZF = 0.

    The decoder reports F3 on CMPS/SCAS as ``"repe"`` and F2 as ``"repne"``.
    """
    return equal if i.rep == "repe" else x.D.bnot(equal)


@instruction("MOVS", ref="SDM Vol. 2B MOVS/MOVSB/MOVSW/MOVSD/MOVSQ; REP")
def movs(x: Exec, i: Insn) -> None:
    """ES:[rDI] <- seg:[rSI]; both index registers step."""
    aw = i.addrsize
    if i.rep is not None:
        cnt = _count(x, aw)
        if cnt is None:
            return
    s, D = x.s, x.D
    dst, src = i.operands
    n = dst.size >> 3
    si, di = s.read_gpr(_RSI, aw), s.read_gpr(_RDI, aw)
    v = x.mem_read(src.seg, si, n)
    x.mem_write(dst.seg, di, n, v)
    d = _delta(x, n, aw)
    s.write_gpr(_RSI, aw, D.add(aw, si, d))
    s.write_gpr(_RDI, aw, D.add(aw, di, d))
    if i.rep is not None:
        _again(x, aw, cnt)


@instruction("STOS", ref="SDM Vol. 2B STOS/STOSB/STOSW/STOSD/STOSQ; REP")
def stos(x: Exec, i: Insn) -> None:
    """ES:[rDI] <- AL/AX/EAX/RAX; rDI steps."""
    aw = i.addrsize
    if i.rep is not None:
        cnt = _count(x, aw)
        if cnt is None:
            return
    s = x.s
    dst = i.operands[0]
    w = dst.size
    di = s.read_gpr(_RDI, aw)
    x.mem_write(dst.seg, di, w >> 3, s.read_gpr(_RAX, w))
    s.write_gpr(_RDI, aw, x.D.add(aw, di, _delta(x, w >> 3, aw)))
    if i.rep is not None:
        _again(x, aw, cnt)


@instruction("LODS", ref="SDM Vol. 2A LODS/LODSB/LODSW/LODSD/LODSQ; REP")
def lods(x: Exec, i: Insn) -> None:
    """AL/AX/EAX/RAX <- seg:[rSI]; rSI steps.  EAX is zero-extended into RAX (SDM Vol. 1 3.4.1.1)."""
    aw = i.addrsize
    if i.rep is not None:
        cnt = _count(x, aw)
        if cnt is None:
            return
    s = x.s
    src = i.operands[1]
    w = src.size
    si = s.read_gpr(_RSI, aw)
    v = x.mem_read(src.seg, si, w >> 3)
    s.write_gpr(_RAX, w, v)
    s.write_gpr(_RSI, aw, x.D.add(aw, si, _delta(x, w >> 3, aw)))
    if i.rep is not None:
        _again(x, aw, cnt)


@instruction("CMPS", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A CMPS/CMPSB/CMPSW/CMPSD/CMPSQ; REPE/REPNE")
def cmps(x: Exec, i: Insn) -> None:
    """Flags of seg:[rSI] - ES:[rDI] (the source is the minuend, as in SUB); both index registers step."""
    aw = i.addrsize
    if i.rep is not None:
        cnt = _count(x, aw)
        if cnt is None:
            return
    s, D = x.s, x.D
    src, dst = i.operands
    w = src.size
    n = w >> 3
    si, di = s.read_gpr(_RSI, aw), s.read_gpr(_RDI, aw)
    a = x.mem_read(src.seg, si, n)
    b = x.mem_read(dst.seg, di, n)
    x.set_flags(F.SUB, w, a, b, D.sub(w, a, b))
    d = _delta(x, n, aw)
    s.write_gpr(_RSI, aw, D.add(aw, si, d))
    s.write_gpr(_RDI, aw, D.add(aw, di, d))
    if i.rep is not None:
        _again(x, aw, cnt, _zf_go(x, i, D.eq(w, a, b)))


@instruction("SCAS", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B SCAS/SCASB/SCASW/SCASD/SCASQ; REPE/REPNE")
def scas(x: Exec, i: Insn) -> None:
    """Flags of AL/AX/EAX/RAX - ES:[rDI] (as in SUB); rDI steps."""
    aw = i.addrsize
    if i.rep is not None:
        cnt = _count(x, aw)
        if cnt is None:
            return
    s, D = x.s, x.D
    dst = i.operands[1]
    w = dst.size
    di = s.read_gpr(_RDI, aw)
    a = s.read_gpr(_RAX, w)
    b = x.mem_read(dst.seg, di, w >> 3)
    x.set_flags(F.SUB, w, a, b, D.sub(w, a, b))
    s.write_gpr(_RDI, aw, D.add(aw, di, _delta(x, w >> 3, aw)))
    if i.rep is not None:
        _again(x, aw, cnt, _zf_go(x, i, D.eq(w, a, b)))


# The repeat machinery, shared with the I/O string instructions INS/OUTS (spec/isa/io.py).
rep_count = _count
rep_again = _again
index_delta = _delta
