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
data page.  The descriptors match what a GDT load would produce (SDM Vol. 3A
3.4.5), so later segment loads see consistent caches.
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
CR4_PAE = 1 << 5


def _flat(code_seg: bool, bits: int, dpl: int = 0) -> Segment:
    sel = (0x08 if code_seg else 0x10) | dpl
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
