"""Far-pointer loads: LDS, LES, LSS, LFS, LGS (SDM Vol. 2A LDS/LES/LFS/LGS/LSS; APM Vol. 3 LDS, LES, LFS, LGS, LSS).

``Lxx r, m16:n`` reads a far pointer from memory -- an ``n``-bit offset (the
operand size) at the lower address followed by a 16-bit selector -- loads the
selector into the segment register and the offset into ``r`` (SDM Vol. 2A
LDS "Operation": ``SegmentRegister <- SegmentSelector(SRC); DEST <- Offset(SRC)``).

* The pointer is read as *one* ``2 + n/8``-byte operand, so a segment-limit
  or page fault on any part of it faults the instruction before anything is
  written (a pointer at offset FFFEH of a 64-KiB segment crosses the limit:
  #GP in real mode too, SDM Vol. 3A 22.33.1 "Segment Wraparound").
* The segment register is loaded through
  :func:`spec.isa.segments.load_segment` -- real-mode and virtual-8086 base =
  selector * 16, all protected/IA-32e-mode descriptor checks -- *before* the
  offset register is written, so a faulting load leaves the register unchanged
  (the CPU also rolls back every write of a faulting instruction, SDM Vol. 3A 6.5).
* Operand sizes: 16 -> m16:16, 32 -> m16:32 (the 32-bit register write
  zero-extends to 64 bits, SDM Vol. 1 3.4.1.1); in 64-bit mode with REX.W,
  m16:64 on Intel, while AMD ignores REX.W and reads m16:32 (APM Vol. 3
  LFS/LGS/LSS) -- the decoder's ``amd32`` rule hands the semantics the vendor's
  operand size, so this module needs no vendor test.
* LES and LDS are invalid in 64-bit mode (C4/C5 are the VEX escapes there)
  and a register source is #UD; both are decode-time conditions (the ``i64``,
  ``vex`` and ``M`` rules of the opcode map).
* LSS and the interrupt shadow: the SDM inhibits interrupts after MOV SS and
  POP SS only, and names LSS as the way to load SS:rSP *without* needing that
  window (SDM Vol. 3A 6.8.3 "Masking Exceptions and Interrupts When Switching
  Stacks": "If the LSS instruction is used to modify the contents of the SS
  register ... this problem does not occur").  LSS therefore does not set
  ``state.interrupt_shadow``.

No flags are affected.
"""

from __future__ import annotations

from spec.decode.insn import DS, ES, FS, GS, SS, Insn
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.segments import load_segment

_SREG = {"LES": ES, "LDS": DS, "LSS": SS, "LFS": FS, "LGS": GS}


@instruction("LES", "LDS", "LSS", "LFS", "LGS", ref="SDM Vol. 2A LDS/LES/LFS/LGS/LSS; APM Vol. 3 LDS/LES/LFS/LGS/LSS")
def load_far_pointer(x: Exec, i: Insn) -> None:
    """Load a far pointer ``offset:selector`` into ``Sreg:r`` (operands -> segment load -> offset write-back)."""
    dst, src = i.operands
    w = dst.size  # the operand size: the offset's width
    D = x.D
    pointer = x.read(src)  # offset (w bits) then selector (16 bits), one access
    selector = D.concrete(D.extract(pointer, w + 15, w))
    load_segment(x, _SREG[i.row.mnemonic], selector)
    x.write(dst, D.extract(pointer, w - 1, 0))
