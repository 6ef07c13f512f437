"""Paging: one page walker, parameterized by a paging-mode descriptor.

Implements Intel SDM Vol. 3A chapter 4 (4.3 32-bit paging, 4.4 PAE paging,
4.5 4-level and 5-level paging, 4.6 access rights, 4.7 page-fault error
codes, 4.8 accessed and dirty flags) and AMD APM Vol. 2 chapter 5.  The
walker is written over the bit-vector domain, so the same code translates
concretely for the CPU and symbolically for the Z3 proofs.

Paging-structure entry layout (the bits this model reads; SDM Tables 4-4 ..
4-20):

====  ======  ==========================================================
bit   name    meaning
====  ======  ==========================================================
0     P       present
1     R/W     0: writes not allowed through this entry
2     U/S     0: user-mode accesses not allowed through this entry
5     A       accessed (set by the walk in every entry it uses)
6     D       dirty (leaf only; set on a write)
7     PS      page size: this entry maps a page (at levels that allow it)
8     G       global (leaf; see :mod:`spec.tlb`)
62:59 PK      protection key (leaf; 4-/5-level paging with CR4.PKE)
63    XD      execute-disable (with EFER.NXE; reserved otherwise)
====  ======  ==========================================================

Levels are numbered from the leaf: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E,
5 = PML5E.

Accessed/dirty policy (SDM 4.8 permits it): the walk sets A in each
non-leaf entry as it uses it (once the entry is present and free of reserved
bits), and sets A -- and, for a write, D -- in the leaf only when the access
is permitted.  A faulting access never sets a leaf's A or D bit.  Flags are
only ever set, never cleared, and an entry is written only if a flag changes
(concrete domain; see :func:`_set_bits` for the symbolic domain).

Proved properties (tests/test_paging_proofs.py, Z3 over all page-table
contents): rights of every entry on success, monotonicity of WP/SMEP/SMAP,
A/D-only updates, the #PF P/RSVD/W/U/I-D/PK bits, large page = 512 small
pages, PAE = 4-level where the formats coincide, frame + offset, and the entry
addresses.  The permission matrix of SDM 4.6 is tested row by row in
tests/test_paging_matrix.py; what a TLB may cache is :mod:`spec.tlb`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from spec.domain.base import Domain
from spec.memory import AccessKind

# Entry bits.
P, RW, US, PWT, PCD, ACCESSED, DIRTY, PS, G = (1 << k for k in (0, 1, 2, 3, 4, 5, 6, 7, 8))
XD = 1 << 63
PK_SHIFT = 59

# #PF error-code bits (SDM 4.7, Figure 4-12).
PF_P, PF_W, PF_U, PF_RSVD, PF_ID, PF_PK = 1, 2, 4, 8, 16, 32

# Control bits the walk reads.
CR0_WP = 1 << 16
CR4_PSE, CR4_PAE, CR4_PGE, CR4_LA57, CR4_SMEP, CR4_SMAP, CR4_PKE = (
    1 << 4, 1 << 5, 1 << 7, 1 << 12, 1 << 20, 1 << 21, 1 << 22)
EFER_NXE = 1 << 11


@dataclass(frozen=True)
class PagingMode:
    """What distinguishes the paging modes: everything the one walker needs to know."""

    name: str
    levels: int  # levels walked (PAE: 3, the top one from the PDPTE registers)
    entry_bytes: int  # 4 or 8
    index_bits: tuple[int, ...]  # per level, leaf first (e.g. 10, 10 for 32-bit paging)
    large_levels: frozenset[int]  # levels at which PS=1 maps a page
    nx_capable: bool  # bit 63 is XD (with EFER.NXE) -- all 8-byte formats
    pk_capable: bool  # protection keys apply (IA-32e paging only, SDM 4.6.2)
    top_from_registers: bool = False  # PAE: the top level comes from the PDPTE registers

    def index_shift(self, level: int) -> int:
        return 12 + sum(self.index_bits[: level - 1])

    def page_shift(self, level: int) -> int:
        """log2 of the size of a page mapped at ``level``."""
        return self.index_shift(level)


BITS32 = PagingMode("32-bit", 2, 4, (10, 10), frozenset({2}), nx_capable=False, pk_capable=False)
PAE = PagingMode("PAE", 3, 8, (9, 9, 2), frozenset({2}), nx_capable=True, pk_capable=False,
                 top_from_registers=True)
LEVEL4 = PagingMode("4-level", 4, 8, (9, 9, 9, 9), frozenset({2, 3}), nx_capable=True, pk_capable=True)
LEVEL5 = PagingMode("5-level", 5, 8, (9, 9, 9, 9, 9), frozenset({2, 3}), nx_capable=True, pk_capable=True)
MODES = (BITS32, PAE, LEVEL4, LEVEL5)


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode | None:
    """The paging mode selected by CR0.PG, CR4.PAE, EFER.LME and CR4.LA57 (SDM 4.1.1, Table 4-1)."""
    if not cr0 & (1 << 31):
        return None
    if not cr4 & CR4_PAE:
        return BITS32
    if not efer & (1 << 8):
        return PAE
    return LEVEL5 if cr4 & CR4_LA57 else LEVEL4


@dataclass(frozen=True)
class PagingControl:
    """The processor state a translation depends on (besides memory)."""

    cr0: int = 1 << 31
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    maxphyaddr: int = 48
    # PAE PDPTE registers, loaded on MOV CR3 (SDM 4.4.1).  Ints; the proofs may pass 64-bit domain values.
    pdptes: tuple[Any, ...] = (0, 0, 0, 0)
    pkru: int = 0
    ac: bool = False  # RFLAGS.AC (SMAP override for explicit supervisor accesses)

    def flag(self, cr4_bit: int) -> bool:
        return bool(self.cr4 & cr4_bit)


@dataclass(frozen=True)
class Access:
    """One access to translate: its kind and the privilege it is made with.

    ``implicit`` marks implicit supervisor-mode accesses (descriptor tables,
    IDT, TSS), which are supervisor accesses even at CPL 3 (SDM 4.6).
    """

    kind: AccessKind
    cpl: int = 0
    implicit: bool = False

    @property
    def user(self) -> bool:
        return self.cpl == 3 and not self.implicit

    @property
    def write(self) -> bool:
        return self.kind == AccessKind.WRITE

    @property
    def fetch(self) -> bool:
        return self.kind == AccessKind.FETCH


class PhysAccess(Protocol):
    """How the walker reads and updates paging structures (physical memory, or a nested view)."""

    def read(self, addr: Any, n: int) -> Any: ...

    def write(self, addr: Any, n: int, value: Any) -> None: ...


@dataclass
class Walk:
    """The outcome of one walk.

    On success ``fault`` is ``None`` and ``phys`` is the physical address; on
    failure ``fault`` is the #PF error code.  ``entries`` lists
    ``(level, address, value-as-read)`` of every entry the walk read, and
    ``level`` the level it stopped at (the leaf on success).  ``user``,
    ``writable``, ``executable`` are the effective rights of the whole path
    (domain booleans), as a TLB would record them.
    """

    mode: PagingMode
    fault: int | None = None
    phys: Any = None
    level: int = 0
    page_shift: int = 12
    entries: list[tuple[int, Any, Any]] = field(default_factory=list)
    user: Any = None
    writable: Any = None
    executable: Any = None
    global_page: Any = None
    leaf: Any = None

    @property
    def ok(self) -> bool:
        return self.fault is None


def _mask(hi: int, lo: int) -> int:
    """Bits ``hi..lo`` inclusive set (empty when ``hi < lo``)."""
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1) if hi >= lo else 0


def reserved_mask(mode: PagingMode, level: int, large: bool, ctl: PagingControl) -> int:
    """Reserved bits of an entry at ``level`` (SDM Tables 4-5..4-20: 'Reserved (must be 0)')."""
    m = ctl.maxphyaddr
    if mode is BITS32:
        if level == 2 and large:
            # 4-MByte PDE: bits 20:13 hold PA[39:32] (PSE-36); bits 21:(M-19) are reserved, M = min(MAXPHYADDR, 40).
            return _mask(21, min(m, 40) - 19)
        return 0
    rsvd = _mask(51, m) if mode is not PAE else _mask(62, m)
    if not ctl.efer & EFER_NXE:
        rsvd |= XD
    if level >= 4:
        rsvd |= PS  # PML4E (and PML5E): bit 7 reserved -- in 5-level paging too (SDM 4.5.4)
    if large and level == 2:
        rsvd |= _mask(20, 13)
    if large and level == 3:
        rsvd |= _mask(29, 13)
    return rsvd


def pdpte_reserved(ctl: PagingControl) -> int:
    """Reserved bits of a PAE PDPTE register (SDM Table 4-8): checked when the PDPTEs are loaded."""
    return _mask(2, 1) | _mask(8, 5) | _mask(63, ctl.maxphyaddr)


def _table_address(D: Domain, mode: PagingMode, entry: Any, maxphy: int) -> Any:
    """Physical address of the next table referenced by ``entry`` (bits M-1:12)."""
    if mode.entry_bytes == 4:
        return D.and_(64, entry, D.const(64, 0xFFFF_F000))
    return D.and_(64, entry, D.const(64, _mask(maxphy - 1, 12)))


def _page_base(D: Domain, mode: PagingMode, entry: Any, level: int, maxphy: int) -> Any:
    """Physical base of the page an entry maps at ``level``."""
    if mode.entry_bytes == 4:
        e = entry  # already zero-extended to 64 bits by the walk
        if level == 1:
            return D.and_(64, e, D.const(64, 0xFFFF_F000))
        # 4-MByte page: PA[31:22] from bits 31:22, PA[39:32] from bits 20:13 (SDM Table 4-4).
        low = D.and_(64, e, D.const(64, 0xFFC0_0000))
        high = D.shl(64, D.and_(64, e, D.const(64, _mask(min(maxphy, 40) - 20, 13))), D.const(64, 19))
        return D.or_(64, low, high)
    return D.and_(64, entry, D.const(64, _mask(maxphy - 1, mode.page_shift(level))))


def walk(D: Domain, mem: PhysAccess, mode: PagingMode, ctl: PagingControl, linear: Any, acc: Access) -> Walk:
    """Translate ``linear`` for ``acc`` (SDM 4.3-4.8 as numbered steps).

    ``linear`` is a 64-bit domain value (canonical; the canonicality check is
    segmentation's business, SDM 3.3.7.1).  Faults are returned, not raised.
    """
    w = Walk(mode)
    writable, user, xd = D.true(), D.true(), D.false()
    eb = mode.entry_bytes
    table = D.const(64, ctl.cr3 & (0xFFFF_F000 if mode is BITS32 else _mask(ctl.maxphyaddr - 1, 12)))
    level = mode.levels
    entry: Any = None
    large = False
    while True:
        # Step 1: the entry for this level (PAE's top level is a PDPTE register, SDM 4.4.1).
        shift = mode.index_shift(level)
        bits = mode.index_bits[level - 1]
        if mode.top_from_registers and level == mode.levels:
            idx = D.concrete(D.extract(linear, shift + bits - 1, shift)) if D.is_concrete(linear) else None
            if idx is None:
                e = _register(D, ctl.pdptes[0])
                for k in (1, 2, 3):
                    e = D.ite(D.eq(2, D.extract(linear, 31, 30), D.const(2, k)), _register(D, ctl.pdptes[k]), e)
                entry = e
            else:
                entry = _register(D, ctl.pdptes[idx])
            addr = None
        else:
            idx_v = D.zext(D.extract(linear, shift + bits - 1, shift), bits, 64)
            addr = D.add(64, table, D.shl(64, idx_v, D.const(64, 2 if eb == 4 else 3)))
            entry = mem.read(addr, eb)
            if eb == 4:
                entry = D.zext(entry, 32, 64)
        w.entries.append((level, addr, entry))
        w.level = level

        # Step 2: not present -> #PF with P=0 (SDM 4.7).
        if not D.decide(D.bit(64, entry, 0)):
            w.fault = _error_code(D, ctl, acc, present=False)
            return w

        # Step 3: does this entry map a page?  (PS at a level that allows it; 32-bit needs CR4.PSE.)
        large = False
        if level in mode.large_levels and (mode is not BITS32 or ctl.flag(CR4_PSE)):
            large = D.decide(D.bit(64, entry, 7))

        # Step 4: reserved bits -> #PF with P=1, RSVD=1.
        if mode.top_from_registers and level == mode.levels:
            rsvd = pdpte_reserved(ctl)
        else:
            rsvd = reserved_mask(mode, level, large, ctl)
        if rsvd and D.decide(D.ne(64, D.and_(64, entry, D.const(64, rsvd)), D.const(64, 0))):
            w.fault = _error_code(D, ctl, acc, present=True) | PF_RSVD
            return w

        # Step 5: accumulate rights (PAE PDPTEs carry no R/W, U/S or XD: SDM Table 4-8).
        if not (mode.top_from_registers and level == mode.levels):
            writable = D.band(writable, D.bit(64, entry, 1))
            user = D.band(user, D.bit(64, entry, 2))
            if mode.nx_capable and ctl.efer & EFER_NXE:
                xd = D.bor(xd, D.bit(64, entry, 63))

        if large or level == 1:
            break
        # Step 6: a non-leaf entry in use gets its A bit (SDM 4.8); descend.
        if addr is not None:
            _set_bits(D, mem, addr, eb, entry, ACCESSED)
        table = _table_address(D, mode, entry, ctl.maxphyaddr)
        level -= 1

    # Step 7: access rights of the translation (SDM 4.6).
    w.user, w.writable, w.executable = user, writable, D.bnot(xd)
    w.global_page = D.bit(64, entry, 8)
    w.leaf = entry
    deny, pk_deny = _denied(D, mode, ctl, acc, entry, user, writable, xd)
    if D.decide(D.bor(deny, pk_deny)):
        code = _error_code(D, ctl, acc, present=True)
        if D.decide(pk_deny):
            code |= PF_PK
        w.fault = code
        return w

    # Step 8: A (and D on a write) in the leaf; the physical address.
    bits_to_set = ACCESSED | (DIRTY if acc.write else 0)
    addr = w.entries[-1][1]
    if addr is not None:
        _set_bits(D, mem, addr, eb, entry, bits_to_set)
    ps = mode.page_shift(level)
    w.page_shift = ps
    base = _page_base(D, mode, entry, level, ctl.maxphyaddr)
    w.phys = D.or_(64, base, D.and_(64, linear, D.const(64, (1 << ps) - 1)))
    return w


def _register(D: Domain, v: Any) -> Any:
    """A PDPTE register as a 64-bit domain value (a plain int, or already a domain value)."""
    return D.const(64, v) if isinstance(v, int) else v


def _set_bits(D: Domain, mem: PhysAccess, addr: Any, eb: int, entry: Any, bits: int) -> None:
    """Set A/D bits in an entry in memory unless already set (the flags are sticky, SDM 4.8).

    A concrete entry is written only when a bit changes (the processor's
    locked update happens only then -- observable if the tables live in
    device memory).  A symbolic entry is written back unconditionally: for
    the RAM array of the symbolic domain, storing an unchanged value is
    invisible, and it spares the proofs a path fork per level.
    """
    new = D.or_(64, entry, D.const(64, bits))
    if D.is_concrete(entry) and not D.decide(D.ne(64, new, entry)):
        return
    mem.write(addr, eb, D.extract(new, 8 * eb - 1, 0))


def _denied(D: Domain, mode: PagingMode, ctl: PagingControl, acc: Access, leaf: Any,
            user: Any, writable: Any, xd: Any) -> tuple[Any, Any]:
    """(access-rights violation, protection-key violation) as domain booleans (SDM 4.6.1, 4.6.2)."""
    f = D.false()
    wp = bool(ctl.cr0 & CR0_WP)
    if acc.user:
        # User-mode accesses need a user-mode address; writes need R/W everywhere; fetches need !XD.
        deny = D.bnot(user)
        if acc.write:
            deny = D.bor(deny, D.bnot(writable))
        if acc.fetch:
            deny = D.bor(deny, xd)
    else:
        deny = f
        smap_applies = ctl.flag(CR4_SMAP) and (acc.implicit or not ctl.ac)
        if acc.fetch:
            deny = xd
            if ctl.flag(CR4_SMEP):
                deny = D.bor(deny, user)  # SMEP: no supervisor fetch from a user-mode address
        else:
            if smap_applies:
                deny = user  # SMAP: no supervisor data access to a user-mode address
            if acc.write and wp:
                deny = D.bor(deny, D.bnot(writable))
    pk_deny = f
    if mode.pk_capable and ctl.flag(CR4_PKE) and not acc.fetch:
        key = D.zext(D.extract(leaf, 62, 59), 4, 32)
        pkru = D.const(32, ctl.pkru)
        ad = D.bit(32, D.lshr(32, pkru, D.shl(32, key, D.const(32, 1))), 0)
        wd = D.bit(32, D.lshr(32, pkru, D.add(32, D.shl(32, key, D.const(32, 1)), D.const(32, 1))), 0)
        pk = ad
        if acc.write and (acc.user or wp):
            pk = D.bor(pk, wd)
        pk_deny = D.band(user, pk)  # keys apply to user-mode addresses only
    return deny, pk_deny


def _error_code(D: Domain, ctl: PagingControl, acc: Access, present: bool) -> int:
    """The #PF error code bits that describe the access (SDM 4.7)."""
    code = PF_P if present else 0
    if acc.write:
        code |= PF_W
    if acc.user:
        code |= PF_U
    if acc.fetch and (ctl.flag(CR4_SMEP) or (ctl.flag(CR4_PAE) and ctl.efer & EFER_NXE)):
        code |= PF_ID
    return code
