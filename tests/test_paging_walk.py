"""Concrete page walks in every paging mode (SDM Vol. 3A 4.3-4.8), and #PF through the CPU.

Each test builds real paging structures in :class:`PhysicalMemory` and calls
:func:`spec.paging.walk` with the concrete domain; the last group runs code on
the flat ``long64`` machine (4-level paging, identity 2 MiB pages) after
editing its page tables, and checks the #PF stop event (vector, error code,
CR2, RIP of the faulting instruction).
"""

from __future__ import annotations

import pytest

from spec.cpu import SpecCPU
from spec.domain.concrete import CONCRETE as D
from spec.machine import CODE, PAGING_BASE, flat_machine
from spec.memory import PAGE, AccessKind, PhysicalMemory
from spec.paging import (
    BITS32,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    LEVEL4,
    LEVEL5,
    PAE,
    Access,
    PagingControl,
    PagingMode,
    paging_mode,
    pdpte_reserved,
    reserved_mask,
    walk,
)

P, RW, US, A, DIRTY, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
XD = 1 << 63
PG, LME = 1 << 31, 1 << 8
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH

# One 4 KiB table per level, at fixed physical pages.
TABLE = {5: 0x1000, 4: 0x2000, 3: 0x3000, 2: 0x4000, 1: 0x5000}


def control(mode: PagingMode, *, cr0: int = 0, cr4: int = 0, efer: int = 0, **kw: object) -> PagingControl:
    """A PagingControl selecting ``mode`` (SDM Table 4-1) plus extra bits."""
    base4 = {BITS32: 0, PAE: CR4_PAE, LEVEL4: CR4_PAE, LEVEL5: CR4_PAE | CR4_LA57}[mode]
    base_efer = LME if mode in (LEVEL4, LEVEL5) else 0
    ctl = PagingControl(cr0=PG | cr0, cr3=TABLE[mode.levels] if mode is not PAE else 0x1000, cr4=base4 | cr4,
                        efer=base_efer | efer, **kw)  # type: ignore[arg-type]
    assert paging_mode(ctl.cr0, ctl.cr4, ctl.efer) is mode
    return ctl


def index(mode: PagingMode, linear: int, level: int) -> int:
    return (linear >> mode.index_shift(level)) & ((1 << mode.index_bits[level - 1]) - 1)


class Tables:
    """Paging structures for one linear address, one table per level.

    ``flags[level]`` are the low/high flag bits of the entry used at that level
    (default P|RW|US); the entry at ``leaf`` maps ``frame`` (with PS above level 1).
    """

    def __init__(self, mode: PagingMode, linear: int, frame: int, leaf: int = 1,
                 flags: dict[int, int] | None = None) -> None:
        self.mode, self.linear = mode, linear
        self.mem = PhysicalMemory()
        self.addr: dict[int, int] = {}
        self.pdptes = [0, 0, 0, 0]
        flags = flags or {}
        eb = mode.entry_bytes
        for level in range(mode.levels, leaf - 1, -1):
            f = flags.get(level, P | RW | US)
            target = frame if level == leaf else TABLE[level - 1]
            value = target | f | (PS if level == leaf and level > 1 else 0)
            idx = index(mode, linear, level)
            if mode.top_from_registers and level == mode.levels:
                self.pdptes[idx] = target | (f & ~(RW | US))  # PDPTEs have no R/W, U/S (Table 4-8)
                continue
            self.mem.map_page(TABLE[level])
            a = TABLE[level] + idx * eb
            self.addr[level] = a
            self.mem.write(a, eb, value)

    def entry(self, level: int) -> int:
        return self.mem.read(self.addr[level], self.mode.entry_bytes)

    def set(self, level: int, value: int) -> None:
        self.mem.write(self.addr[level], self.mode.entry_bytes, value)

    def walk(self, kind: AccessKind = R, cpl: int = 0, implicit: bool = False, **ctl_kw: object):  # type: ignore[no-untyped-def]
        ctl = control(self.mode, pdptes=tuple(self.pdptes), **ctl_kw)  # type: ignore[arg-type]
        return walk(D, self.mem, self.mode, ctl, self.linear, Access(kind, cpl, implicit))


# ---------------------------------------------------------------------------
# Translations in every mode and page size
# ---------------------------------------------------------------------------

def test_32bit_4k_translation() -> None:
    """32-bit paging: PDE (bits 31:22) -> PTE (bits 21:12) -> 4 KiB frame (SDM 4.3, Tables 4-5, 4-6)."""
    lin = 0x0040_3ABC
    t = Tables(BITS32, lin, 0x0123_4000)
    w = t.walk()
    assert w.ok and w.phys == 0x0123_4ABC and w.page_shift == 12 and w.level == 1
    assert t.addr[2] == TABLE[2] + 4 * 1 and t.addr[1] == TABLE[1] + 4 * 3
    assert [lv for lv, _, _ in w.entries] == [2, 1]


def test_32bit_4m_translation_with_pse36() -> None:
    """CR4.PSE=1, PDE.PS=1: a 4 MiB page; PDE bits 20:13 are PA bits 39:32 (PSE-36, SDM Table 4-4)."""
    lin = 0x1234_5678
    frame = (0x5A << 32) | 0x12C0_0000
    t = Tables(BITS32, lin, 0, leaf=2)
    t.set(2, 0x12C0_0000 | (0x5A << 13) | PS | RW | P)
    w = t.walk(cr4=CR4_PSE)
    assert w.ok and w.page_shift == 22 and w.level == 2
    assert w.phys == frame | (lin & 0x3F_FFFF)
    # MAXPHYADDR 36: PA bits 35:32 come from PDE bits 16:13; bits 21:17 are reserved.
    t.set(2, 0x12C0_0000 | (0x5 << 13) | PS | RW | P)
    w = t.walk(cr4=CR4_PSE, maxphyaddr=36)
    assert w.ok and w.phys == (0x5 << 32) | 0x12C0_0000 | (lin & 0x3F_FFFF)
    for bit in (17, 20, 21):
        t.set(2, 0x12C0_0000 | (1 << bit) | PS | RW | P)
        w = t.walk(cr4=CR4_PSE, maxphyaddr=36)
        assert w.fault == P | 8, bit
    # MAXPHYADDR >= 40: only bit 21 is reserved (bits 20:13 all address bits).
    t.set(2, 0x12C0_0000 | (1 << 21) | PS | RW | P)
    assert t.walk(cr4=CR4_PSE).fault == P | 8
    # PAT (bit 12) is not an address bit and not reserved.
    t.set(2, 0x12C0_0000 | (1 << 12) | PS | RW | P)
    w = t.walk(cr4=CR4_PSE)
    assert w.ok and w.phys == 0x12C0_0000 | (lin & 0x3F_FFFF)


def test_32bit_ps_ignored_without_cr4_pse() -> None:
    """CR4.PSE=0: PDE bit 7 is ignored, the PDE references a page table (SDM 4.3)."""
    lin = 0x0040_3ABC
    t = Tables(BITS32, lin, 0x0123_4000)
    t.set(2, t.entry(2) | PS)
    w = t.walk()
    assert w.ok and w.page_shift == 12 and w.phys == 0x0123_4ABC


def test_32bit_no_reserved_bits_in_4k_entries() -> None:
    """32-bit PDEs referencing page tables and PTEs have no reserved bits (Tables 4-5, 4-6)."""
    lin = 0x0040_3ABC
    t = Tables(BITS32, lin, 0x0123_4000)
    t.set(1, t.entry(1) | 0xE80)  # G, PAT, ignored bits
    assert t.walk(cr4=CR4_PSE).ok


def test_pae_4k_and_2m_translation() -> None:
    """PAE: PDPTE register (bits 31:30) -> PDE -> PTE; 2 MiB pages with PDE.PS (SDM 4.4.2)."""
    lin = 0xC060_1234  # PDPTE 3, PDE 3, PTE 1
    frame = 0x12_3456_7000  # above 4 GiB: PAE reaches 52-bit physical addresses
    t = Tables(PAE, lin, frame)
    assert t.pdptes[3] == TABLE[2] | P
    w = t.walk()
    assert w.ok and w.phys == frame | 0x234 and w.page_shift == 12
    assert [lv for lv, _, _ in w.entries] == [3, 2, 1] and w.entries[0][1] is None  # register, not memory
    t2 = Tables(PAE, lin, 0x7_0000_0000 | (3 << 21), leaf=2)
    w = t2.walk()
    assert w.ok and w.page_shift == 21 and w.phys == 0x7_0000_0000 | (3 << 21) | (lin & 0x1F_FFFF)


def test_4level_4k_2m_1g_translation() -> None:
    """4-level paging: 4 KiB (PTE), 2 MiB (PDE.PS) and 1 GiB (PDPTE.PS) pages (SDM 4.5.4)."""
    lin = 0x0000_7F12_3456_789A
    for leaf, frame, shift in ((1, 0xF_FFFF_F000, 12), (2, 0xA_BCC0_0000, 21), (3, 0x40_C000_0000, 30)):
        t = Tables(LEVEL4, lin, frame, leaf=leaf)
        w = t.walk()
        assert w.ok and w.level == leaf and w.page_shift == shift
        assert w.phys == frame | (lin & ((1 << shift) - 1))
        assert t.addr[4] == TABLE[4] + 8 * ((lin >> 39) & 511)


def test_4level_large_page_pat_bit_not_address() -> None:
    """Bit 12 of a 2 MiB/1 GiB leaf is PAT, not an address bit (Tables 4-15, 4-17)."""
    lin = 0x4020_1234
    t = Tables(LEVEL4, lin, 0x8_0020_0000 | (1 << 12), leaf=2)
    w = t.walk()
    assert w.ok and w.phys == 0x8_0020_0000 | (lin & 0x1F_FFFF)


def test_5level_translation() -> None:
    """5-level paging (CR4.LA57): linear bits 56:48 select the PML5E (SDM 4.5.4)."""
    lin = 0x01AB_CDEF_0123_4567 & ((1 << 57) - 1)
    for leaf, frame, shift in ((1, 0x3_4567_8000, 12), (2, 0x3_4560_0000, 21), (3, 0x3_4000_0000, 30)):
        t = Tables(LEVEL5, lin, frame, leaf=leaf)
        w = t.walk()
        assert w.ok and w.page_shift == shift and w.phys == frame | (lin & ((1 << shift) - 1))
        assert t.addr[5] == TABLE[5] + 8 * ((lin >> 48) & 511)
        assert [lv for lv, _, _ in w.entries] == list(range(5, leaf - 1, -1))


def test_maxphyaddr_masks_table_and_frame_addresses() -> None:
    """Address bits come from entry bits M-1:12; bits 62:52 are ignored in 4-level paging (Table 4-19)."""
    lin = 0x1234_5000
    t = Tables(LEVEL4, lin, 0x0123_4000)
    t.set(1, t.entry(1) | (0x7F << 52))  # ignored bits (PK region included, CR4.PKE=0)
    w = t.walk()
    assert w.ok and w.phys == 0x0123_4000


# ---------------------------------------------------------------------------
# Accessed and dirty flags (SDM 4.8)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "leaf"), [(BITS32, 1), (BITS32, 2), (PAE, 1), (PAE, 2), (LEVEL4, 1), (LEVEL4, 2),
                                            (LEVEL4, 3), (LEVEL5, 1), (LEVEL5, 3)])
def test_accessed_and_dirty(mode: PagingMode, leaf: int) -> None:
    """A in every entry used, D only in the leaf and only on a write; the flags are never cleared."""
    lin = 0x8765_4321 if mode in (BITS32, PAE) else 0x00AB_8765_4321
    frame = 0x0140_0000 if mode is BITS32 else 0x8000_0000
    cr4 = CR4_PSE if mode is BITS32 else 0
    t = Tables(mode, lin, frame, leaf=leaf)
    before = {lv: t.entry(lv) for lv in t.addr}
    assert t.walk(R, cr4=cr4).ok
    for lv in t.addr:
        assert t.entry(lv) == before[lv] | A, lv  # A set, nothing else changed
    assert t.walk(W, cr4=cr4).ok
    for lv in t.addr:
        assert t.entry(lv) == before[lv] | A | (DIRTY if lv == leaf else 0), lv
    # A fetch and another read leave D set (sticky) and set nothing new.
    snap = {lv: t.entry(lv) for lv in t.addr}
    assert t.walk(X, cr4=cr4).ok and t.walk(R, cr4=cr4).ok
    assert {lv: t.entry(lv) for lv in t.addr} == snap
    if mode is PAE:
        assert 3 not in t.addr  # the PDPTE registers have no A flag to set


def test_no_write_when_flags_already_set() -> None:
    """An entry whose A (and D) flags are already set is not written (SDM 4.8: 'if not already set')."""
    lin = 0x1000_0000

    class Recording(PhysicalMemory):
        writes: list[int]

        def write(self, addr: int, n: int, value: int) -> None:
            self.writes.append(addr)
            super().write(addr, n, value)

    t = Tables(LEVEL4, lin, 0x2000_0000, flags={lv: P | RW | US | A for lv in (4, 3, 2)} | {1: P | RW | A | DIRTY})
    rec = Recording()
    rec.pages = t.mem.pages
    rec.writes = []
    ctl = control(LEVEL4)
    assert walk(D, rec, LEVEL4, ctl, lin, Access(W)).ok
    assert rec.writes == []


def test_faulting_leaf_gets_no_accessed_flag() -> None:
    """Walk policy (module docstring): a rights fault leaves the leaf's A and D clear; upper levels get A."""
    lin = 0x1000_0000
    t = Tables(LEVEL4, lin, 0x2000_0000, flags={1: P | US})  # read-only leaf
    w = t.walk(W, cpl=3)
    assert w.fault == P | 2 | 4
    assert t.entry(1) == 0x2000_0000 | P | US
    assert all(t.entry(lv) & A for lv in (4, 3, 2))


# ---------------------------------------------------------------------------
# #PF error codes (SDM 4.7)
# ---------------------------------------------------------------------------

def pf(present: bool, kind: AccessKind, user: bool, fetch_id: bool = False, rsvd: bool = False,
       pk: bool = False) -> int:
    return (present * 1) | ((kind == W) * 2) | (user * 4) | (rsvd * 8) | ((kind == X and fetch_id) * 16) | (pk * 32)


LEVELS = [(BITS32, lv) for lv in (2, 1)] + [(PAE, lv) for lv in (3, 2, 1)] + \
         [(LEVEL4, lv) for lv in (4, 3, 2, 1)] + [(LEVEL5, lv) for lv in (5, 4, 3, 2, 1)]


@pytest.mark.parametrize(("mode", "level"), LEVELS)
@pytest.mark.parametrize("kind", [R, W, X])
@pytest.mark.parametrize("cpl", [0, 3])
def test_not_present_at_each_level(mode: PagingMode, level: int, kind: AccessKind, cpl: int) -> None:
    """P=0 at any level: #PF with P=0, W/R and U/S of the access, I/D for fetches with NXE (SDM 4.7)."""
    lin = 0xC060_1234 if mode in (BITS32, PAE) else 0x0123_C060_1234
    t = Tables(mode, lin, 0x0080_0000)
    if mode.top_from_registers and level == 3:
        t.pdptes[3] = 0xFFFF_FFFF_FFFF_FFFE  # P=0: every other bit is ignored (SDM 4.4.1)
    else:
        t.set(level, t.entry(level) & ~1 | 0xFFFF_0000_0000_0000 if mode is not BITS32 else t.entry(level) & ~1)
    efer = EFER_NXE if mode is not BITS32 else 0
    w = t.walk(kind, cpl, efer=efer)
    assert w.level == level
    assert w.fault == pf(False, kind, cpl == 3, fetch_id=mode is not BITS32), hex(w.fault or 0)
    # Nothing below the failing level was read; the failing entry and below got no A flag.
    assert [lv for lv, _, _ in w.entries][-1] == level
    for lv in t.addr:
        assert bool(t.entry(lv) & A) == (lv > level), lv


def test_id_flag_conditions() -> None:
    """I/D is set for fetches iff CR4.SMEP=1, or CR4.PAE=1 and EFER.NXE=1 (SDM 4.7)."""
    lin = 0x0040_3ABC
    t32 = Tables(BITS32, lin, 0x0123_4000)
    t32.set(1, 0)
    assert t32.walk(X).fault == 0
    assert t32.walk(X, cr4=CR4_SMEP).fault == 16
    assert t32.walk(R, cr4=CR4_SMEP).fault == 0
    t64 = Tables(LEVEL4, lin, 0x0123_4000)
    t64.set(1, 0)
    assert t64.walk(X).fault == 0  # PAE=1 but NXE=0
    assert t64.walk(X, efer=EFER_NXE).fault == 16
    assert t64.walk(X, cr4=CR4_SMEP).fault == 16
    assert t64.walk(X, 3, efer=EFER_NXE).fault == 16 | 4
    tp = Tables(PAE, lin, 0x0123_4000)
    tp.set(1, 0)
    assert tp.walk(X).fault == 0 and tp.walk(X, efer=EFER_NXE).fault == 16


RSVD = P | 8


@pytest.mark.parametrize(("mode", "level"), [(m, lv) for m, lv in LEVELS if m is not BITS32 and
                                             not (m is PAE and lv == 3)])
def test_reserved_bits_at_each_level(mode: PagingMode, level: int) -> None:
    """RSVD faults: bits M..51 (4/5-level) or M..62 (PAE), and XD with NXE=0, at every level (SDM 4.4.2, 4.5.4)."""
    lin = 0xC060_1234 if mode is PAE else 0x0123_C060_1234
    t = Tables(mode, lin, 0x0080_0000)
    good = t.entry(level)
    top_bit = 62 if mode is PAE else 51
    for bit in (40, top_bit, 63):
        t.set(level, good | (1 << bit))
        w = t.walk(W, 3, maxphyaddr=40)
        assert w.fault == RSVD | 2 | 4 and w.level == level, (bit, w.fault)
        # The same entry without P is simply not present: reserved bits are not checked.
        t.set(level, (good | (1 << bit)) & ~P)
        assert t.walk(W, 3, maxphyaddr=40).fault == 2 | 4
    # XD is the execute-disable flag with NXE=1: not reserved then.
    t.set(level, good | XD)
    assert t.walk(R, efer=EFER_NXE, maxphyaddr=40).ok
    t.set(level, good | XD)
    assert t.walk(X, efer=EFER_NXE).fault == P | 16
    if mode is not PAE:
        # 4-/5-level: bits 62:52 are ignored (no PKE), bit M-1 is an address bit.
        t.set(level, good | (0x7FF << 52))
        assert t.walk(R, maxphyaddr=40).ok
    else:
        t.set(level, good | (1 << 52))
        assert t.walk(R).fault == RSVD  # PAE: bits 62:M are reserved even above bit 51


@pytest.mark.parametrize("mode", [LEVEL4, LEVEL5])
def test_ps_reserved_in_pml4e_and_pml5e(mode: PagingMode) -> None:
    """PS is reserved in PML4Es (and PML5Es): RSVD, not a 512 GiB page (SDM 4.5.4)."""
    lin = 0x0123_C060_1234
    for level in (4, 5) if mode is LEVEL5 else (4,):
        t = Tables(mode, lin, 0x0080_0000)
        t.set(level, t.entry(level) | PS)
        w = t.walk()
        assert w.fault == RSVD and w.level == level, (level, w.fault)


def test_large_page_reserved_ranges() -> None:
    """2 MiB leaf: bits 20:13 reserved; 1 GiB leaf: bits 29:13 reserved; bit 12 is PAT (SDM Tables 4-15, 4-17)."""
    lin = 0x4060_1234
    for mode in (PAE, LEVEL4, LEVEL5):
        t = Tables(mode, lin, 0x0080_0000, leaf=2)
        good = t.entry(2)
        for bit in range(13, 21):
            t.set(2, good | (1 << bit))
            assert t.walk().fault == RSVD, (mode.name, bit)
        t.set(2, good | (1 << 12))
        assert t.walk().ok
    for mode in (LEVEL4, LEVEL5):
        t = Tables(mode, lin, 0x4000_0000, leaf=3)
        good = t.entry(3)
        for bit in range(13, 30):
            t.set(3, good | (1 << bit))
            assert t.walk().fault == RSVD, (mode.name, bit)
    # A PDE referencing a page table has no reserved bits 20:13 (they are address bits).
    t = Tables(LEVEL4, lin, 0x0080_0000)
    t.set(2, t.entry(2) | (0xFF << 13))
    t.mem.map_page(t.entry(2) & 0xF_FFFF_F000)
    t.mem.write((t.entry(2) & 0xF_FFFF_F000) + 8 * ((lin >> 12) & 511), 8, 0x0080_0000 | P | RW | US)
    w = t.walk()
    assert w.ok and w.phys == 0x0080_0234


def test_reserved_mask_table() -> None:
    """Spot checks of reserved_mask against the SDM tables (M = 40)."""
    c = PagingControl(maxphyaddr=40)
    cn = PagingControl(maxphyaddr=40, efer=EFER_NXE)
    assert reserved_mask(BITS32, 1, False, c) == 0
    assert reserved_mask(BITS32, 2, True, c) == 1 << 21
    assert reserved_mask(BITS32, 2, True, PagingControl(maxphyaddr=36)) == 0x1F << 17
    assert reserved_mask(PAE, 1, False, cn) == ((1 << 63) - 1) ^ ((1 << 40) - 1)
    assert reserved_mask(PAE, 2, True, c) == (((1 << 64) - 1) ^ ((1 << 40) - 1)) | (0xFF << 13)
    assert reserved_mask(LEVEL4, 1, False, cn) == ((1 << 52) - 1) ^ ((1 << 40) - 1)
    assert reserved_mask(LEVEL4, 4, False, cn) & PS
    assert reserved_mask(LEVEL5, 4, False, cn) & PS and reserved_mask(LEVEL5, 5, False, cn) & PS
    assert not reserved_mask(LEVEL5, 3, False, cn) & PS
    assert reserved_mask(LEVEL4, 3, True, cn) & (((1 << 30) - 1) ^ ((1 << 13) - 1)) == ((1 << 30) - 1) ^ ((1 << 13) - 1)


# ---------------------------------------------------------------------------
# PAE PDPTE registers (SDM 4.4.1, Table 4-8)
# ---------------------------------------------------------------------------

def test_pdpte_registers() -> None:
    lin = 0x4060_1234  # PDPTE 1
    t = Tables(PAE, lin, 0x0080_0000)
    assert t.walk().ok
    # Not present: #PF with P=0 whatever else is in the register.
    t.pdptes[1] = 0
    w = t.walk(W, 3)
    assert w.fault == 2 | 4 and w.level == 3 and len(w.entries) == 1
    # Other PDPTEs are independent.
    t.pdptes[1] = TABLE[2] | P
    t.pdptes[2] = 0
    assert t.walk().ok
    # PDPTEs carry no access rights: R/W and U/S come from the PDE and PTE only.
    assert t.walk(W, 3).ok
    # The reserved bits of a PDPTE register: 2:1, 8:5, 63:M (Table 4-8).
    c = PagingControl(maxphyaddr=40)
    assert pdpte_reserved(c) == 0x6 | 0x1E0 | (((1 << 64) - 1) ^ ((1 << 40) - 1))
    assert not pdpte_reserved(c) & (P | 0x8 | 0x10 | 0xE00 | 0xFF_FFFF_F000)
    for bit in (1, 2, 5, 6, 7, 8, 40, 63):
        t.pdptes[1] = TABLE[2] | P | (1 << bit)
        w = t.walk(maxphyaddr=40)
        assert w.fault == RSVD, bit
    t.pdptes[1] = TABLE[2] | P | 0x18 | 0xE00  # PWT, PCD, ignored bits 11:9
    assert t.walk().ok


# ---------------------------------------------------------------------------
# Rights and protection keys: a few named cases (the full matrix is test_paging_matrix.py)
# ---------------------------------------------------------------------------

def test_rights_named_cases() -> None:
    lin = 0x1000_0000
    ro_user = Tables(LEVEL4, lin, 0x2000_0000, flags={2: P | US})  # R/W=0 at the PDE only
    assert ro_user.walk(W).ok  # CR0.WP=0: supervisor writes ignore R/W
    assert ro_user.walk(W, cr0=CR0_WP).fault == P | 2
    assert ro_user.walk(W, 3).fault == P | 2 | 4
    assert ro_user.walk(W, cpl=3, implicit=True).ok  # implicit supervisor access at CPL 3
    assert ro_user.walk(R, cr4=CR4_SMAP).fault == P  # SMAP, AC=0
    assert ro_user.walk(R, cr4=CR4_SMAP, ac=True).ok  # explicit, AC=1
    assert ro_user.walk(R, 3, True, cr4=CR4_SMAP, ac=True).fault == P  # implicit ignores AC
    assert ro_user.walk(X, cr4=CR4_SMEP).fault == P | 16
    sup = Tables(LEVEL4, lin, 0x2000_0000, flags={3: P | RW})  # U/S=0 at the PDPTE only
    assert sup.walk(R, 3).fault == P | 4
    assert sup.walk(X, cr4=CR4_SMEP | CR4_SMAP).ok


def test_protection_keys() -> None:
    """PKRU.ADi / WDi for user-mode addresses with key i in PTE bits 62:59 (SDM 4.6.2); PK flag (4.7)."""
    lin = 0x1000_0000
    t = Tables(LEVEL4, lin, 0x2000_0000)
    t.set(1, t.entry(1) | (5 << 59))
    ad5, wd5 = 1 << 10, 1 << 11
    assert t.walk(R, 3, cr4=CR4_PKE, pkru=ad5).fault == P | 4 | 32
    assert t.walk(R, 3, cr4=CR4_PKE, pkru=wd5).ok
    assert t.walk(W, 3, cr4=CR4_PKE, pkru=wd5).fault == P | 2 | 4 | 32
    assert t.walk(W, 0, cr4=CR4_PKE, pkru=wd5).ok  # supervisor write, WP=0
    assert t.walk(W, 0, cr4=CR4_PKE, pkru=wd5, cr0=CR0_WP).fault == P | 2 | 32
    assert t.walk(X, 3, cr4=CR4_PKE, pkru=ad5).ok  # keys do not control fetches
    assert t.walk(R, 3, pkru=ad5).ok  # CR4.PKE=0
    assert t.walk(R, 3, cr4=CR4_PKE, pkru=ad5 >> 2).ok  # other key
    # Key bits are ignored for supervisor-mode addresses.
    t.set(2, t.entry(2) & ~US)
    assert t.walk(R, 0, cr4=CR4_PKE, pkru=ad5).ok
    # A rights violation and a key violation together: both reported (PK=1).
    t.set(2, t.entry(2) | US)
    t.set(1, (t.entry(1) & ~RW))
    assert t.walk(W, 3, cr4=CR4_PKE, pkru=ad5).fault == P | 2 | 4 | 32
    # Protection keys need IA-32e paging: PAE entries have no key field (bits 62:M reserved).
    tp = Tables(PAE, lin, 0x2000_0000)
    assert tp.walk(R, 3, cr4=CR4_PKE, pkru=0xFFFF_FFFF).ok


# ---------------------------------------------------------------------------
# #PF through the MMU and the CPU (flat long64 machine: PML4 0x70000, PDPT 0x71000, PD 0x72000)
# ---------------------------------------------------------------------------

PD = PAGING_BASE + 2 * PAGE
LOAD = bytes.fromhex("488b042510002000")  # mov rax, [0x200010]
STORE = bytes.fromhex("4889042510002000")  # mov [0x200010], rax


def machine(code: bytes):  # type: ignore[no-untyped-def]
    st = flat_machine("long64", code + b"\xf4")
    st.mem.phys.map_page(0x200000)
    return st


def test_cpu_load_through_paging_sets_accessed() -> None:
    st = machine(LOAD)
    st.mem.phys.write(0x200010, 8, 0x1122_3344_5566_7788)
    ev = SpecCPU(st).run(10)
    assert ev.kind == "halted" and D.concrete(st.gpr[0]) == 0x1122_3344_5566_7788
    assert st.mem.phys.read(PD + 8, 8) & A and not st.mem.phys.read(PD + 8, 8) & DIRTY


@pytest.mark.parametrize(("pde", "code", "cr0", "efer", "expected"), [
    (0x200000 | PS | RW | US, LOAD, 0, 0, 0),                     # PDE not present, read
    (0x200000 | PS | RW | US, STORE, 0, 0, 2),                    # not present, write
    (0x200000 | PS | US | P, STORE, CR0_WP, 0, P | 2),            # read-only, WP=1
    (0x200000 | PS | RW | US | P | (1 << 63), LOAD, 0, 0, RSVD),  # XD with NXE=0 is reserved
    (0x200000 | PS | RW | US | P | (1 << 15), LOAD, 0, 0, RSVD),  # 2 MiB page: bits 20:13 reserved
    (0x200000 | PS | RW | US | P | (1 << 50), LOAD, 0, 0, RSVD),  # above MAXPHYADDR (48)
])
def test_cpu_data_page_faults(pde: int, code: bytes, cr0: int, efer: int, expected: int) -> None:
    st = machine(code)
    st.mem.phys.write(PD + 8, 8, pde)  # the PDE for 0x200000-0x3FFFFF
    st.cr0 |= cr0
    st.efer |= efer
    st.gpr[0] = 0xABCD
    ev = SpecCPU(st).run(10)
    assert ev.kind == "fault" and ev.vector == 14
    assert ev.error_code == expected and ev.cr2 == 0x200010 and ev.rip == CODE
    assert D.concrete(st.gpr[0]) == 0xABCD  # precise: nothing retired
    assert st.mem.phys.read(0x200010, 8) == 0


def test_cpu_user_mode_fault() -> None:
    """CPL 3 read of a supervisor page: #PF(P|U) -- and the same read works at CPL 0."""
    st = machine(LOAD)
    st.mem.phys.write(PD + 8, 8, 0x200000 | PS | RW | P)  # U/S=0
    for s in (1, 2):  # CS and SS at DPL 3 (CPL = SS.DPL here)
        st.seg[s].dpl = 3
        st.seg[s].selector |= 3
    ev = SpecCPU(st).run(10)
    assert ev.kind == "fault" and ev.vector == 14 and ev.error_code == P | 4 and ev.cr2 == 0x200010


def test_cpu_fetch_faults() -> None:
    """Fetch from a not-present page and from an XD page (NXE=1): I/D set with NXE (SDM 4.7)."""
    jmp = bytes.fromhex("ffe0")  # jmp rax
    st = machine(jmp)
    st.gpr[0] = 0x400000  # PDE 2: make it not present
    st.mem.phys.write(PD + 16, 8, 0x400000 | PS | RW)
    ev = SpecCPU(st).run(10)
    assert ev.kind == "fault" and ev.vector == 14 and ev.error_code == 0 and ev.cr2 == 0x400000
    assert ev.rip == 0x400000
    st = machine(jmp)
    st.efer |= EFER_NXE
    st.gpr[0] = 0x400000
    st.mem.phys.map_page(0x400000, b"\xf4")
    st.mem.phys.write(PD + 16, 8, 0x400000 | PS | RW | P | XD)
    ev = SpecCPU(st).run(10)
    assert ev.kind == "fault" and ev.error_code == P | 16 and ev.cr2 == 0x400000
    st.mem.phys.write(PD + 16, 8, 0x400000 | PS | RW | P)
    st.halted = False
    ev = SpecCPU(st).run(10)
    assert ev.kind == "halted"


def test_cpu_page_crossing_store_faults_on_second_page() -> None:
    """A store crossing into a read-only page faults with CR2 = the first byte of that page; nothing written."""
    code = bytes.fromhex("48890425fcff3f00")  # mov [0x3ffffc], rax
    st = machine(code)
    st.mem.phys.map_page(0x3FF000)
    st.mem.phys.write(PD + 16, 8, 0x400000 | PS | P)  # 0x400000.. read-only
    st.cr0 |= CR0_WP
    st.gpr[0] = 0x1122_3344_5566_7788
    ev = SpecCPU(st).run(10)
    assert ev.kind == "fault" and ev.error_code == P | 2 and ev.cr2 == 0x400000
    assert st.mem.phys.read(0x3FFFFC, 4) == 0
