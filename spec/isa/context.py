"""The execution context: the one interface instruction semantics use.

Semantics receive ``(x, i)``: the context and the decoded instruction.  They
read operands, compute through ``x.D`` (the domain), set flags, write back,
and, for control transfers, set ``x.next_rip``.  They never touch Python
operators on values, the decoder, or the harness.

Every memory access goes through :meth:`Exec.linear` (segment base +
effective address, wrapped to the address size, after the segment-level
checks of :mod:`spec.segmentation`) and then the state's
:class:`spec.memory.LinearMemory` (paging, in :class:`spec.mmu.MMU`).
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.decode.insn import CR, DR, FAR, IMM, MEM, REG, REL, SEG, Insn, Operand
from spec.faults import Fault, Unimplemented, Vector
from spec.memory import AccessKind
from spec.segmentation import (
    CR4_LA57,
    LIMIT_VECTOR,
    canonical_half,
    canonical_symbolic,
    check_canonical_symbolic,
    check_legacy,
    check_legacy_symbolic,
)
from spec.state import EFER_LMA, MachineState
from spec.svm.intercepts import VMExit

_MASK = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}
FS, GS = 4, 5
SS = 2
_READ, _WRITE = AccessKind.READ, AccessKind.WRITE
# Instructions whose first operand is read and then written (read-modify-write).
RMW_DEST = frozenset({"ADD", "OR", "ADC", "SBB", "AND", "SUB", "XOR", "INC", "DEC", "NEG", "NOT", "SHL", "SAL",
                      "SHR", "SAR", "ROL", "ROR", "RCL", "RCR", "SHLD", "SHRD", "XCHG", "XADD", "CMPXCHG"})
_M32, _M64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
_HALF48, _HALF57 = canonical_half(0), canonical_half(CR4_LA57)  # lowest non-canonical address, 4/5-level


class Halt(Exception):
    """HLT executed: the CPU stops with the halted event (RIP already past HLT)."""


class Exec:
    """Per-CPU execution context, re-pointed at each instruction."""

    __slots__ = ("D", "i", "ip_mask", "next_rip", "s", "vendor")

    def __init__(self, state: MachineState) -> None:
        self.s = state
        self.D = state.D
        self.i: Insn | None = None
        self.next_rip = 0
        self.ip_mask = _MASK[64]
        self.vendor = "amd"  # "amd" or "intel": the CPU sets it; semantics consult it where vendors differ

    # -- operands ----------------------------------------------------------------------
    def read(self, op: Operand) -> Any:
        k = op.kind
        if k == REG:
            return self.s.read_gpr(op.reg, op.size, op.high8)
        if k == MEM:
            if op is self.i.operands[0] and self.i.row.mnemonic in RMW_DEST:  # type: ignore[union-attr]
                return self.mem_read(op.seg, self.ea(op), op.size // 8, intent=_WRITE)
            return self.mem_read(op.seg, self.ea(op), op.size // 8)
        if k == IMM:
            return self.D.const(op.size, op.value)
        if k == SEG:
            return self.D.const(16, self.s.seg[op.reg].selector)
        if k == REL:
            return self.D.const(64, op.value & _MASK[64])
        if k in (CR, DR, FAR):
            raise Unimplemented(f"operand kind {k} is read by system semantics, not generically")
        raise Unimplemented(f"operand kind {k}")

    def write(self, op: Operand, value: Any) -> None:
        k = op.kind
        if k == REG:
            self.s.write_gpr(op.reg, op.size, value, op.high8)
        elif k == MEM:
            self.mem_write(op.seg, self.ea(op), op.size // 8, value)
        else:
            raise Unimplemented(f"write to operand kind {k}")

    # -- addresses -------------------------------------------------------------------
    def ea(self, op: Operand) -> Any:
        """Effective address of a memory operand, in the address size (SDM Vol. 1 3.7.5)."""
        D = self.D
        w = self.i.addrsize  # type: ignore[union-attr]
        if op.rip_rel:
            return D.const(w, self.next_rip + op.disp)
        a = D.const(w, op.disp)
        if op.base is not None:
            a = D.add(w, a, self.s.read_gpr(op.base, w))
        if op.index is not None:
            idx = self.s.read_gpr(op.index, w)
            if op.scale:
                idx = D.shl(w, idx, D.const(w, op.scale))
            a = D.add(w, a, idx)
        return a

    def linear(self, seg: int, offset: Any, w: int | None = None, n: int = 0, kind: int = _READ) -> Any:
        """Segment base + offset (SDM Vol. 3A 3.4; in 64-bit mode only FS/GS bases apply, 3.2.4).

        ``offset`` is a ``w``-bit value (default: the address size); the result
        is a 64-bit linear address (32-bit outside long mode).  With ``n`` > 0
        it is the address of an ``n``-byte access of ``kind`` (an
        :class:`~spec.memory.AccessKind`), checked first by
        :mod:`spec.segmentation` (limit, type, null segment; canonical form in
        64-bit mode), which raises #GP(0) or #SS(0), unless
        ``state.seg_checks`` is off; ``n`` = 0 only computes the address.
        """
        s = self.s
        sg = s.seg[seg]
        if s.efer & EFER_LMA and s.seg[1].l:  # 64-bit mode
            i = self.i
            fsgs = i.fsgs_base if i is not None and seg < FS and seg == i.seg_override else None
            if type(offset) is int:
                lin = (offset + sg.base) & _M64 if seg >= FS else offset
                if n and s.seg_checks:
                    half = _HALF57 if s.cr4 & CR4_LA57 else _HALF48
                    if (lin + n > half) if lin < half else (lin <= _M64 - half):
                        raise Fault(LIMIT_VECTOR[seg], 0)  # SDM Vol. 1 3.3.7.1
                if fsgs is not None:  # AMD: base of an FS/GS override a later prefix took over (decoder)
                    half = _HALF57 if s.cr4 & CR4_LA57 else _HALF48
                    total = (lin + s.seg[fsgs].base) & _M64
                    if (total + max(n, 1) <= half) if total < half else (total > _M64 - half):
                        lin = total  # used only when canonical; otherwise the effective address alone
                return lin
            D = self.D
            off = D.zext(offset, w or self.i.addrsize, 64)  # type: ignore[union-attr]
            lin = D.add(64, off, D.const(64, sg.base)) if seg >= FS else off
            if n and s.seg_checks:
                check_canonical_symbolic(D, D.decide, lin, n, s.cr4, seg)
            if fsgs is not None:  # the AMD quirk above, decided on the symbolic address
                total = D.add(64, lin, D.const(64, s.seg[fsgs].base))
                if D.decide(canonical_symbolic(D, total, max(n, 1), s.cr4)):
                    lin = total
            return lin
        if type(offset) is int:
            if n and s.seg_checks:
                check_legacy(s, sg, seg, offset, n, kind)
            return (offset + sg.base) & _M32
        D = self.D
        w = w or self.i.addrsize  # type: ignore[union-attr]
        if n and s.seg_checks:
            check_legacy_symbolic(s, D, D.decide, sg, seg, offset, w, n, kind)
        return D.and_(64, D.add(64, D.zext(offset, w, 64), D.const(64, sg.base)), D.const(64, _M32))

    def _addr(self, lin: Any) -> Any:
        return lin if not self.D.is_concrete(lin) else self.D.concrete(lin)

    def mem_read(self, seg: int, offset: Any, n: int, w: int | None = None, intent: AccessKind = _READ) -> Any:
        """Read ``n`` bytes at seg:offset as an ``8n``-bit value (little-endian), after the segment checks.

        ``intent=WRITE``: the read of a read-modify-write destination, translated
        with write intent -- a page fault on it reports W=1, as the write would
        (SDM Vol. 3A 4.7; the error code hardware gives, corpus/regressions).
        """
        lin = self.linear(seg, offset, w, n, _READ)
        if type(lin) is not int:
            lin = self._addr(lin)
        return self.s.mem.read(lin, n, intent, self.s.cpl == 3)

    def mem_write(self, seg: int, offset: Any, n: int, value: Any, w: int | None = None) -> None:
        """Write ``n`` bytes at seg:offset, after the segment checks (a write right: SDM Vol. 3A 5.4)."""
        lin = self.linear(seg, offset, w, n, _WRITE)
        if type(lin) is not int:
            lin = self._addr(lin)
        self.s.mem.write(lin, n, value, self.s.cpl == 3)

    # -- registers and flags -----------------------------------------------------------
    def reg(self, num: int, size: int) -> Any:
        return self.s.read_gpr(num, size)

    def set_reg(self, num: int, size: int, value: Any) -> None:
        self.s.write_gpr(num, size, value)

    def flag(self, f: int) -> Any:
        return self.s.get_flag(f)

    def set_flag(self, f: int, value: Any) -> None:
        self.s.set_flag(f, value)

    def set_flags(self, kind: F.FlagKind, w: int, a: Any, b: Any, r: Any, c: Any = None,
                  keep: tuple[int, ...] = ()) -> None:
        """Define the status flags (except ``keep``) from an operation record, lazily."""
        if c is None:
            c = self.D.false()
        s = self.s
        s.flags.set_lazy(kind, w, a, b, r, c, keep)  # type: ignore[union-attr]
        mask = F.STATUS_MASK
        for k in keep:
            mask &= ~(1 << k)
        s.undefined &= ~mask

    def undefine(self, *flags: int) -> None:
        """Mark status flags architecturally undefined after this instruction.

        The value left in the state is whatever the caller set last (the spec's
        documented choice); comparisons mask the flag until it is defined again.
        """
        for f in flags:
            self.s.undefined |= 1 << f

    def cond(self, cc: int) -> Any:
        """Evaluate condition code ``cc`` (SDM Vol. 1 Appendix B, Table B-1)."""
        D = self.D
        g = self.s.get_flag
        base = cc >> 1
        if base == 0:
            c = g(F.OF)
        elif base == 1:
            c = g(F.CF)
        elif base == 2:
            c = g(F.ZF)
        elif base == 3:
            c = D.bor(g(F.CF), g(F.ZF))
        elif base == 4:
            c = g(F.SF)
        elif base == 5:
            c = g(F.PF)
        elif base == 6:
            c = D.bxor(g(F.SF), g(F.OF))
        else:
            c = D.bor(g(F.ZF), D.bxor(g(F.SF), g(F.OF)))
        return D.bnot(c) if cc & 1 else c

    # -- stack (SDM Vol. 1 6.2; the stack address size is SS.B or 64) -------------------
    def push(self, value: Any, size: int) -> None:
        s = self.s
        sw = s.stack_bits
        D = self.D
        sp = D.sub(sw, s.read_gpr(4, sw), D.const(sw, size // 8))
        self.mem_write(SS, sp, size // 8, value, sw)
        s.write_gpr(4, sw, sp)

    def pop(self, size: int) -> Any:
        s = self.s
        sw = s.stack_bits
        D = self.D
        sp = s.read_gpr(4, sw)
        v = self.mem_read(SS, sp, size // 8, sw)
        s.write_gpr(4, sw, D.add(sw, sp, D.const(sw, size // 8)))
        return v

    # -- control flow ------------------------------------------------------------------
    def jump(self, target: Any, opsize: int | None = None) -> None:
        """Set the next RIP, truncated to the operand size (SDM Vol. 2A JMP: EIP/IP forms)."""
        size = opsize or self.i.opsize  # type: ignore[union-attr]
        t = self.D.concrete(target) & _MASK[size]
        self.next_rip = t

    def branch_target(self, op: Operand) -> int:
        """Target of a relative branch: next RIP + displacement, at the operand size."""
        return (self.next_rip + op.value) & _MASK[self.i.opsize]  # type: ignore[union-attr]

    def decide(self, c: Any) -> bool:
        return self.D.decide(c)

    def fault(self, vector: int, error_code: int | None = None) -> Fault:
        """Build an architectural fault for the semantics to ``raise``."""
        return Fault(vector, error_code)

    def halt(self) -> None:
        raise Halt()

    # -- SVM intercepts (AMD APM Vol. 2 15.9) ---------------------------------------------
    def intercept(self, code: int, info1: int = 0, info2: int = 0) -> None:
        """#VMEXIT with ``code`` if the running guest intercepts it; a no-op outside guest mode.

        Semantics call it where the APM puts the intercept check (see
        :mod:`spec.svm.intercepts`); the exit's nRIP is the next instruction.
        """
        svm = self.s.svm
        if svm is not None and svm.vector >> code & 1:
            raise VMExit(code, info1, info2, nrip=self.next_rip)


__all__ = ["Exec", "Fault", "Halt", "VMExit", "Vector"]
