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

from collections.abc import Callable
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


def repeat(x: Exec, i: Insn, element: Callable[[Exec, Insn], Any]) -> None:
    """Run ``element`` (one iteration of a string instruction) under the instruction's repeat prefix.

    Without a prefix the element runs once.  With one (SDM Vol. 2B REP
    "Operation"): a zero counter (CX/ECX/RCX by address size) does nothing;
    otherwise one element runs, the counter is decremented, and while more
    iterations are due ``x.next_rip`` stays on this instruction.  The element
    returns its ZF equality (CMPS/SCAS) for REPE/REPNE, or ``None``.
    """
    if i.rep is None:
        element(x, i)
        return
    D = x.D
    aw = i.addrsize
    cnt = x.s.read_gpr(_RCX, aw)
    if x.decide(D.is_zero(aw, cnt)):
        return
    equal = element(x, i)
    cnt = D.sub(aw, cnt, D.const(aw, 1))
    x.s.write_gpr(_RCX, aw, cnt)
    more = D.bnot(D.is_zero(aw, cnt))
    if equal is not None:
        # REPE continues while ZF = 1 (operands equal), REPNE while ZF = 0 (the decoder reports
        # F3 on CMPS/SCAS as "repe" and F2 as "repne").
        more = D.band(more, equal if i.rep == "repe" else D.bnot(equal))
    if x.decide(more):
        x.next_rip = x.s.rip


def _movs(x: Exec, i: Insn) -> None:
    s, D = x.s, x.D
    aw = i.addrsize
    dst, src = i.operands
    n = dst.size >> 3
    si, di = s.read_gpr(_RSI, aw), s.read_gpr(_RDI, aw)
    v = x.mem_read(src.seg, si, n)
    x.mem_write(dst.seg, di, n, v)
    d = _delta(x, n, aw)
    s.write_gpr(_RSI, aw, D.add(aw, si, d))
    s.write_gpr(_RDI, aw, D.add(aw, di, d))


@instruction("MOVS", ref="SDM Vol. 2B MOVS/MOVSB/MOVSW/MOVSD/MOVSQ; REP")
def movs(x: Exec, i: Insn) -> None:
    """ES:[rDI] <- seg:[rSI]; both index registers step."""
    repeat(x, i, _movs)


def _stos(x: Exec, i: Insn) -> None:
    s = x.s
    aw = i.addrsize
    dst = i.operands[0]
    w = dst.size
    di = s.read_gpr(_RDI, aw)
    x.mem_write(dst.seg, di, w >> 3, s.read_gpr(_RAX, w))
    s.write_gpr(_RDI, aw, x.D.add(aw, di, _delta(x, w >> 3, aw)))


@instruction("STOS", ref="SDM Vol. 2B STOS/STOSB/STOSW/STOSD/STOSQ; REP")
def stos(x: Exec, i: Insn) -> None:
    """ES:[rDI] <- AL/AX/EAX/RAX; rDI steps."""
    repeat(x, i, _stos)


def _lods(x: Exec, i: Insn) -> None:
    s = x.s
    aw = i.addrsize
    src = i.operands[1]
    w = src.size
    si = s.read_gpr(_RSI, aw)
    s.write_gpr(_RAX, w, x.mem_read(src.seg, si, w >> 3))
    s.write_gpr(_RSI, aw, x.D.add(aw, si, _delta(x, w >> 3, aw)))


@instruction("LODS", ref="SDM Vol. 2A LODS/LODSB/LODSW/LODSD/LODSQ; REP")
def lods(x: Exec, i: Insn) -> None:
    """AL/AX/EAX/RAX <- seg:[rSI]; rSI steps.  EAX is zero-extended into RAX (SDM Vol. 1 3.4.1.1)."""
    repeat(x, i, _lods)


def _cmps(x: Exec, i: Insn) -> Any:
    s, D = x.s, x.D
    aw = i.addrsize
    src, dst = i.operands
    w = src.size
    n = w >> 3
    si, di = s.read_gpr(_RSI, aw), s.read_gpr(_RDI, aw)
    # ES:[rDI] is read before seg:[rSI]: when both accesses fault, the fault (and CR2) is the rDI
    # one.  The manuals leave the order open; this is what the AMD hardware of ORACLES.md does
    # (corpus/regressions/cmps-reads-destination-first.json), and QEMU agrees.
    b = x.mem_read(dst.seg, di, n)
    a = x.mem_read(src.seg, si, n)
    x.set_flags(F.SUB, w, a, b, D.sub(w, a, b))
    d = _delta(x, n, aw)
    s.write_gpr(_RSI, aw, D.add(aw, si, d))
    s.write_gpr(_RDI, aw, D.add(aw, di, d))
    return D.eq(w, a, b)


@instruction("CMPS", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2A CMPS/CMPSB/CMPSW/CMPSD/CMPSQ; REPE/REPNE")
def cmps(x: Exec, i: Insn) -> None:
    """Flags of seg:[rSI] - ES:[rDI] (the source is the minuend, as in SUB); both index registers step."""
    repeat(x, i, _cmps)


def _scas(x: Exec, i: Insn) -> Any:
    s, D = x.s, x.D
    aw = i.addrsize
    dst = i.operands[1]
    w = dst.size
    di = s.read_gpr(_RDI, aw)
    a = s.read_gpr(_RAX, w)
    b = x.mem_read(dst.seg, di, w >> 3)
    x.set_flags(F.SUB, w, a, b, D.sub(w, a, b))
    s.write_gpr(_RDI, aw, D.add(aw, di, _delta(x, w >> 3, aw)))
    return D.eq(w, a, b)


@instruction("SCAS", defines="CF PF AF ZF SF OF", ref="SDM Vol. 2B SCAS/SCASB/SCASW/SCASD/SCASQ; REPE/REPNE")
def scas(x: Exec, i: Insn) -> None:
    """Flags of AL/AX/EAX/RAX - ES:[rDI] (as in SUB); rDI steps."""
    repeat(x, i, _scas)


# Shared with the I/O string instructions INS/OUTS (spec/isa/io.py).
index_delta = _delta
