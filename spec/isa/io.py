"""Port I/O: IN, OUT, INS, OUTS (SDM Vol. 1 19 "Input/Output"; Vol. 2A IN, INS; Vol. 2B OUT, OUTS;
APM Vol. 2 13.3 "Protected-Mode I/O"; APM Vol. 3 IN, INS, OUT, OUTS).

The port access itself goes to the machine's I/O bus (``state.io``, see
:mod:`spec.io`); this module owns the architectural part: the port number
(imm8 zero-extended, or DX), the access size (byte, or the operand size:
word/doubleword -- there is no 64-bit port access, REX.W gives 32 bits), the
I/O protection check, and for the string forms the memory side.

I/O protection (SDM Vol. 1 19.5; APM Vol. 2 13.3.2):

* real-address mode: no check;
* protected mode (including compatibility and 64-bit mode) with CPL <= IOPL:
  allowed;
* protected mode with CPL > IOPL, and virtual-8086 mode always (IOPL does not
  matter there for I/O, SDM Vol. 1 19.5.2; Vol. 3A 20.2.8.1): the I/O
  permission bitmap of the current TSS decides.  The TSS must be a 32-bit TSS
  (a 64-bit one in IA-32e mode; TR type 9 or 11): a 16-bit TSS has no bitmap,
  so such an access is #GP(0) (SDM Vol. 1 19.5.2 "only in 32-bit TSS"), as is
  a TR that holds no TSS at all.  The 16-bit bitmap offset is at TSS + 66H.
  The processor reads the *two* bitmap bytes starting at the byte of the
  first port ("the processor reads two bytes from the I/O permission bit map
  for every access", SDM Vol. 1 19.5.2); if either byte lies beyond the TSS
  limit, the access is #GP(0) -- which is why the manual asks for an extra
  all-ones byte after the map, within the limit.  Otherwise every bit for the
  ports ``port .. port+size-1`` must be 0.  The TSS reads are implicit
  supervisor accesses to linear memory (a paging fault there is a #PF).

The check happens before the port access, so a denied access reaches no
device.  For a REP string form it runs on every iteration (each iteration is
one CPU step, see :mod:`spec.isa.string`), and also when the count is zero:
the I/O permission is an instruction-level check taken before the repeat
loop, as Bochs and QEMU do it (the SDM's REP pseudocode does not say).

INS ordering: the destination ``ES:[rDI]`` is checked for a write --
segment checks and the page translation -- *before* the port is read, and the
memory write comes after the read.  A faulting INS therefore consumes no
device data (a UART FIFO byte is not lost when INS takes a #PF and is
restarted).  The SDM gives only the order "DEST <- SRC (* read from I/O port
*)" and lists #GP/#PF for the destination; probing first is what processors
do in effect and what Bochs and QEMU implement (QEMU performs a dummy store
first, "to be restartable in case of page fault").  OUTS reads memory first
and writes the port last, so it cannot lose data either.

Port numbers and the data written must be concrete (a device is concrete):
a symbolic run that reaches a port access with a symbolic DX or AL/AX/EAX
stops with the symbolic domain's error; IN yields a concrete value.
"""

from __future__ import annotations

from typing import Any

from spec import flags as F
from spec.decode.insn import IMM, Insn
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction
from spec.isa.string import index_delta, repeat
from spec.memory import PAGE, AccessKind
from spec.state import CR0_PE, MachineState
from spec.svm.exitcodes import ExitCode, ioio_info
from spec.svm.intercepts import VMExit

_RAX, _RDX, _RSI, _RDI = 0, 2, 6, 7
_VM = 1 << F.VM
_M32, _M64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}

TSS_IOMAP_BASE = 0x66
"""Offset of the 16-bit I/O map base address in a 32-bit/64-bit TSS (SDM Vol. 3A Figures 8-2 and 8-11)."""

TSS32_TYPES = (0x9, 0xB)
"""System-descriptor types of an available/busy 32-bit TSS (64-bit TSS in IA-32e mode), SDM Vol. 3A Table 3-2."""


def io_bitmap_allows(s: MachineState, port: int, size: int) -> bool:
    """Whether the current TSS's I/O permission bitmap grants ``size`` bytes at ``port`` (SDM Vol. 1 19.5.2).

    ``False`` when TR does not hold a 32/64-bit TSS, when the map base field or
    either of the two bitmap bytes read lies beyond the TSS limit, or when any
    of the ports' bits is 1.
    """
    tr = s.tr
    if tr.unusable or tr.s or tr.type not in TSS32_TYPES or tr.limit < TSS_IOMAP_BASE + 1:
        return False
    amask = _M64 if s.long_mode else _M32
    D, read = s.D, s.mem.read
    iomap = D.concrete(read((tr.base + TSS_IOMAP_BASE) & amask, 2, AccessKind.READ, False, True))
    off = iomap + (port >> 3)
    if off + 1 > tr.limit:
        return False
    bits = D.concrete(read((tr.base + off) & amask, 2, AccessKind.READ, False, True))
    return not bits & (((1 << size) - 1) << (port & 7))


def check_io(x: Exec, port: int, size: int) -> None:
    """The I/O protection check of every I/O instruction: #GP(0) if the access is not allowed.

    SDM Vol. 2A IN "Operation": IF PE = 1 and (CPL > IOPL or VM = 1) then
    the permission bitmap decides.
    """
    s = x.s
    if not s.cr0 & CR0_PE:
        return
    rf = s.rflags_sys
    if not rf & _VM and s.cpl <= (rf >> F.IOPL_SHIFT) & 3:
        return
    if not io_bitmap_allows(s, port, size):
        raise x.fault(Vector.GP, 0)


def io_intercept(x: Exec, i: Insn, port: int, size: int, is_in: bool, string: bool = False, seg: int = 0) -> None:
    """The SVM IOIO intercept (APM 15.10): after the I/O protection check, before any port or memory access.

    EXITINFO1 (APM 15.10.2): port, size, direction, string, REP, address size
    and the effective segment (OUTS; ES for INS); EXITINFO2 = the next RIP.
    """
    svm = x.s.svm
    if svm is not None and svm.io_intercepted(port, size):
        info1 = ioio_info(port, size, is_in, string=string, rep=i.rep is not None, address_bits=i.addrsize,
                          segment=seg)
        raise VMExit(ExitCode.IOIO, info1, x.next_rip, nrip=x.next_rip)


def _port(x: Exec, i: Insn, op_index: int) -> int:
    """The port operand: imm8 (zero-extended, already in ``value``) or DX."""
    op = i.operands[op_index]
    if op.kind == IMM:
        return op.value
    return x.D.concrete(x.s.read_gpr(_RDX, 16))


def _probe_write(x: Exec, seg: int, offset: Any, n: int) -> None:
    """Fault now if an ``n``-byte write at seg:offset would fault: segment checks, then each page's translation."""
    D = x.D
    lin = x.linear(seg, offset, None, n, AccessKind.WRITE)
    if not D.is_concrete(lin):
        return  # a symbolic address: the write itself checks (no device is read symbolically anyway)
    lin = D.concrete(lin)
    s = x.s
    user = s.cpl == 3
    s.mem.translate(lin, AccessKind.WRITE, user)
    lo = PAGE - (lin & (PAGE - 1))
    if lo < n:
        s.mem.translate((lin + lo) & _M64, AccessKind.WRITE, user)


@instruction("IN", ref="SDM Vol. 2A IN; Vol. 1 19.5 (I/O protection)")
def in_(x: Exec, i: Insn) -> None:
    """AL/AX/EAX <- port (imm8 or DX).  EAX zero-extends into RAX in 64-bit mode (SDM Vol. 1 3.4.1.1)."""
    dst = i.operands[0]
    w = dst.size
    n = w >> 3
    port = _port(x, i, 1)
    check_io(x, port, n)
    io_intercept(x, i, port, n, True)
    s = x.s
    s.write_gpr(_RAX, w, x.D.const(w, s.io.read(port, n) & _SIZE_MASK[n]))


@instruction("OUT", ref="SDM Vol. 2B OUT; Vol. 1 19.5 (I/O protection)")
def out(x: Exec, i: Insn) -> None:
    """Port (imm8 or DX) <- AL/AX/EAX."""
    src = i.operands[1]
    n = src.size >> 3
    port = _port(x, i, 0)
    check_io(x, port, n)
    io_intercept(x, i, port, n, False)
    s = x.s
    s.io.write(port, n, x.D.concrete(s.read_gpr(_RAX, src.size)))


@instruction("INS", ref="SDM Vol. 2A INS/INSB/INSW/INSD; REP; Vol. 1 19.5")
def ins(x: Exec, i: Insn) -> None:
    """ES:[rDI] <- port DX; rDI steps by the element size (DF).  No segment override (SDM Vol. 2A INS).

    Order: I/O permission, repeat count, destination write check, port read,
    memory write (module docstring).
    """
    dst = i.operands[0]
    n = dst.size >> 3
    port = _port(x, i, 1)
    check_io(x, port, n)
    io_intercept(x, i, port, n, True, string=True, seg=dst.seg)

    def element(x: Exec, i: Insn) -> None:
        s, D = x.s, x.D
        aw = i.addrsize
        di = s.read_gpr(_RDI, aw)
        _probe_write(x, dst.seg, di, n)
        value = D.const(dst.size, s.io.read(port, n) & _SIZE_MASK[n])
        x.mem_write(dst.seg, di, n, value)
        s.write_gpr(_RDI, aw, D.add(aw, di, index_delta(x, n, aw)))

    repeat(x, i, element)


@instruction("OUTS", ref="SDM Vol. 2B OUTS/OUTSB/OUTSW/OUTSD; REP; Vol. 1 19.5")
def outs(x: Exec, i: Insn) -> None:
    """Port DX <- seg:[rSI] (DS unless overridden); rSI steps by the element size (DF)."""
    src = i.operands[1]
    n = src.size >> 3
    port = _port(x, i, 0)
    check_io(x, port, n)
    io_intercept(x, i, port, n, False, string=True, seg=src.seg)

    def element(x: Exec, i: Insn) -> None:
        s, D = x.s, x.D
        aw = i.addrsize
        si = s.read_gpr(_RSI, aw)
        value = x.mem_read(src.seg, si, n)
        s.io.write(port, n, D.concrete(value))
        s.write_gpr(_RSI, aw, D.add(aw, si, index_delta(x, n, aw)))

    repeat(x, i, element)


__all__ = ["TSS32_TYPES", "TSS_IOMAP_BASE", "check_io", "io_bitmap_allows", "io_intercept"]
