"""Ready-made flat machines in each operating mode (for tests, the CLI and generators).

``flat_machine(mode, code)`` returns a concrete :class:`MachineState` with

* ``real``   -- real mode, CS = DS = ES = SS = 0 (base 0, 64 KiB limits);
* ``prot16`` -- protected mode, 16-bit flat code/stack segments (base 0, 4 GiB);
* ``prot32`` -- protected mode, 32-bit flat segments (base 0, 4 GiB), paging off;
* ``long64`` -- 64-bit mode with 4-level identity paging of the low 1 GiB
  (2 MiB pages) -- the page tables are real, so the machine stays valid when
  paging is enforced.

Code is placed at :data:`CODE` (0x1000), the stack top is :data:`STACK_TOP`
(0x8000, one page below it mapped), and :data:`DATA` (0x10000) is a mapped
data page.  In the protected modes a GDT at :data:`GDT` holds the flat
descriptors the segment caches were loaded from (SDM Vol. 3A 3.4.5), so a
later segment load finds consistent descriptors:

====  =================================
0x08  kernel code (DPL 0, the mode's size)
0x10  kernel data (DPL 0)
0x18  user code (DPL 3, the mode's size)
0x20  user data (DPL 3)
====  =================================
"""

from __future__ import annotations

from typing import Literal

from spec.memory import PAGE, PhysicalMemory
from spec.state import CR0_ET, CR0_PE, CR0_PG, EFER_LMA, EFER_LME, MachineState, Segment

Mode = Literal["real", "prot16", "prot32", "long64"]
MODES: tuple[Mode, ...] = ("real", "prot16", "prot32", "long64")
BITS: dict[str, int] = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}

CODE = 0x1000
STACK_TOP = 0x8000
DATA = 0x10000
PAGING_BASE = 0x70000  # PML4, PDPT, PD
GDT = 0x0800
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS = 0x08, 0x10, 0x18 | 3, 0x20 | 3
CR4_PAE = 1 << 5


def encode_descriptor(seg: Segment) -> int:
    """The 8-byte code/data descriptor whose load yields ``seg``'s cache (SDM Vol. 3A Figure 3-8)."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    access = seg.type | seg.s << 4 | seg.dpl << 5 | seg.p << 7
    flags = seg.avl | seg.l << 1 | seg.db << 2 | seg.g << 3
    return ((limit & 0xFFFF) | (seg.base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((seg.base >> 24) & 0xFF) << 56)


def _flat(code_seg: bool, bits: int, dpl: int = 0) -> Segment:
    sel = (0x08 if code_seg else 0x10) + (0x10 if dpl == 3 else 0) | dpl
    return Segment(selector=sel, base=0, limit=0xFFFF_FFFF, type=0xB if code_seg else 0x3, s=1, dpl=dpl, p=1,
                   l=1 if (code_seg and bits == 64) else 0, db=1 if bits == 32 else 0, g=1)


def flat_machine(mode: Mode, code: bytes = b"", *, data_pages: int = 1, idt: bool = False) -> MachineState:
    """A flat machine in ``mode``; ``idt=True`` also installs :func:`install_idt`'s tables."""
    if mode not in BITS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    phys = PhysicalMemory()
    for addr in range(0, 0x8000, PAGE):
        phys.map_page(addr)
    for k in range(data_pages):
        phys.map_page(DATA + k * PAGE)
    phys.write_bytes(CODE, code)
    st = MachineState.concrete(phys)
    st.rip = CODE
    st.gpr[4] = STACK_TOP
    if mode == "real":
        # After reset every segment cache, CS included, holds a present read/write data
        # segment (access rights 93H, SDM Vol. 3A 9.1.1 Table 9-1).
        st.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0x3) for _ in range(6)]
        return install_idt(st, mode) if idt else st
    st.cr0 = CR0_PE | CR0_ET
    bits = BITS[mode]
    seg_bits = 32 if bits == 64 else bits
    st.seg = [_flat(i == 1, bits if i == 1 else seg_bits) for i in range(6)]
    gdt = [0, encode_descriptor(st.seg[1]), encode_descriptor(st.seg[2]),
           encode_descriptor(_flat(True, bits, 3)), encode_descriptor(_flat(False, seg_bits, 3))]
    for k, raw in enumerate(gdt):
        phys.write(GDT + 8 * k, 8, raw)
    st.gdtr.base, st.gdtr.limit = GDT, 8 * len(gdt) - 1
    if mode == "long64":
        # 4-level paging: PML4[0] -> PDPT[0] -> PD with 512 2-MiB identity mappings (SDM Vol. 3A 4.5).
        pml4, pdpt, pd = PAGING_BASE, PAGING_BASE + PAGE, PAGING_BASE + 2 * PAGE
        for a in (pml4, pdpt, pd):
            phys.map_page(a)
        phys.write(pml4, 8, pdpt | 0x7)  # P, R/W, U/S
        phys.write(pdpt, 8, pd | 0x7)
        for k in range(512):
            phys.write(pd + 8 * k, 8, (k << 21) | 0x87)  # P, R/W, U/S, PS
        st.cr3 = pml4
        st.cr4 = CR4_PAE
        st.efer = EFER_LME | EFER_LMA
        st.cr0 |= CR0_PG
    return install_idt(st, mode) if idt else st


# -- interrupt tables (optional: flat_machine(mode, idt=True)) -----------------------------

IDT = 0x3000  # the IDT (protected modes); the real-mode IVT stays at 0
HANDLERS = 0x4000  # one 16-byte handler stub per vector: HLT
HANDLER_STRIDE = 16
TSS = 0x0A00  # 32-bit or 64-bit TSS (0x68 bytes)
TSS_SEL = 0x28  # its descriptor in the GDT (16 bytes in long mode)
KERNEL_STACK = 0x6000  # ESP0/RSP0 (SS0 = KERNEL_DS)
IST1_STACK = 0x7000  # IST1 (long mode)
GATE_INT16, GATE_TRAP16, GATE_INT32, GATE_TRAP32, GATE_TASK = 0x6, 0x7, 0xE, 0xF, 0x5
USER_VECTORS = (3, 4, 0x80)  # gates with DPL 3 (INT3, INTO, a system-call vector)


def encode_gate(offset: int, selector: int, gtype: int, dpl: int = 0, *, ist: int = 0, present: int = 1,
                long_mode: bool = False) -> bytes:
    """An IDT gate (SDM Vol. 3A Figures 6-2 and 6-8): 8 bytes, or 16 in long mode."""
    raw = ((offset & 0xFFFF) | (selector & 0xFFFF) << 16 | (ist & 7) << 32 | (gtype & 0xF) << 40 | (dpl & 3) << 45
           | (present & 1) << 47 | ((offset >> 16) & 0xFFFF) << 48)
    if not long_mode:
        return raw.to_bytes(8, "little")
    return raw.to_bytes(8, "little") + ((offset >> 32) & 0xFFFF_FFFF).to_bytes(8, "little")


def set_gate(st: MachineState, vector: int, offset: int, selector: int, gtype: int, dpl: int = 0, *,
             ist: int = 0, present: int = 1) -> None:
    """Write gate ``vector`` of the IDT at ``st.idtr.base`` (physical = linear in these machines)."""
    size = 16 if st.long_mode else 8
    st.mem.phys.write_bytes(st.idtr.base + vector * size,
                            encode_gate(offset, selector, gtype, dpl, ist=ist, present=present,
                                        long_mode=st.long_mode))


def install_idt(st: MachineState, mode: Mode, *, gate_bits: int | None = None) -> MachineState:
    """Interrupt tables for a flat machine: every vector's handler is ``HLT`` at ``HANDLERS + 16 * vector``.

    * real mode: the IVT at 0 (limit 0x3FF) points vector v to 0000:(HANDLERS + 16v);
    * protected modes: an IDT at :data:`IDT` with interrupt gates to
      KERNEL_CS (16-bit gates in ``prot16``, 32-bit in ``prot32``, 64-bit in
      ``long64``; ``gate_bits`` overrides the legacy size), DPL 0 except
      :data:`USER_VECTORS` (DPL 3); a TSS at :data:`TSS` (selector
      :data:`TSS_SEL`, loaded in TR) with SS0:ESP0 = KERNEL_DS:KERNEL_STACK,
      or RSP0 = KERNEL_STACK and IST1 = IST1_STACK in long mode.

    A handler that halts leaves the frame on its stack for inspection.
    """
    phys = st.mem.phys
    for v in range(256):
        phys.write_bytes(HANDLERS + HANDLER_STRIDE * v, b"\xf4")
    if mode == "real":
        for v in range(256):
            phys.write(4 * v, 4, HANDLERS + HANDLER_STRIDE * v)
        st.idtr.base, st.idtr.limit = 0, 0x3FF
        return st
    long_mode = mode == "long64"
    bits = gate_bits or BITS[mode]
    gtype = GATE_INT16 if bits == 16 else GATE_INT32
    size = 16 if long_mode else 8
    for v in range(256):
        phys.write_bytes(IDT + v * size, encode_gate(HANDLERS + HANDLER_STRIDE * v, KERNEL_CS, gtype,
                                                     3 if v in USER_VECTORS else 0, long_mode=long_mode))
    st.idtr.base, st.idtr.limit = IDT, 256 * size - 1
    phys.write_bytes(TSS, bytes(0x68))
    if long_mode:
        phys.write(TSS + 4, 8, KERNEL_STACK)  # RSP0
        phys.write(TSS + 0x24, 8, IST1_STACK)  # IST1
    else:
        phys.write(TSS + 4, 4, KERNEL_STACK)  # ESP0
        phys.write(TSS + 8, 2, KERNEL_DS)  # SS0
    tss = Segment(selector=TSS_SEL, base=TSS, limit=0x67, type=0xB, s=0, dpl=0, p=1)  # busy 32/64-bit TSS
    phys.write(GDT + TSS_SEL, 8, encode_descriptor(tss))
    if long_mode:
        phys.write(GDT + TSS_SEL + 8, 8, TSS >> 32)
    st.gdtr.limit = max(st.gdtr.limit, TSS_SEL + (16 if long_mode else 8) - 1)
    st.tr = tss
    return st


def enter_user_mode(st: MachineState) -> MachineState:
    """Put a protected-mode flat machine at CPL 3: CS = USER_CS, SS/DS/ES/FS/GS = USER_DS (caches as loaded)."""
    bits = 64 if st.long_mode else (32 if st.seg[1].db else 16)
    seg_bits = 32 if bits == 64 else bits
    st.seg = [_flat(i == 1, bits if i == 1 else seg_bits, 3) for i in range(6)]
    return st
