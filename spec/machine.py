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


def flat_machine(mode: Mode, code: bytes = b"", *, data_pages: int = 1) -> MachineState:
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
        st.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0xB if i == 1 else 0x3) for i in range(6)]
        return st
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
    return st
