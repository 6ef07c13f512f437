"""The paging-permission matrix: every combination of rights bits, access, privilege and control bits.

Rows: (U/S, R/W, XD of the leaf) x (U/S, R/W, XD of one upper-level entry, the
"path") x access (read, write, fetch) x privilege (CPL 0 explicit, CPL 3,
implicit supervisor at CPL 3) x CR0.WP x EFER.NXE x CR4.SMEP x CR4.SMAP x
RFLAGS.AC, for several page shapes in 4-level paging; protection keys
(CR4.PKE with several PKRU values) crossed with WP/SMAP/AC; and the
corresponding subsets in 32-bit paging (no XD) and PAE paging (no rights in
the PDPTE registers).  Implicit supervisor accesses are data accesses only
(descriptor tables, IDT, TSS -- SDM 4.6), so "implicit fetch" rows do not
exist.

The expected outcome of each row (allowed, or #PF with its exact error code)
comes from :func:`sdm_outcome`, written here from the text of SDM Vol. 3A
4.6.1 (access rights), 4.6.2 (protection keys), 4.7 (error code) and the
reserved-bit lists of 4.4.2/4.5.4 (XD with NXE=0).  It does not import or
follow the structure of ``spec/paging.py``: it is the manual's bullet list,
clause by clause, over plain booleans.  Row counts are asserted per test
(total: see ``TOTAL_ROWS``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from spec.domain.concrete import CONCRETE
from spec.memory import AccessKind, PhysicalMemory
from spec.paging import BITS32, LEVEL4, PAE, Access, PagingControl, PagingMode, walk

READ, WRITE, FETCH = "read", "write", "fetch"
KINDS = {READ: AccessKind.READ, WRITE: AccessKind.WRITE, FETCH: AccessKind.FETCH}
SUP, USER, IMPLICIT = "cpl0", "cpl3", "implicit"
PRIV_CPL = {SUP: 0, USER: 3, IMPLICIT: 3}
ACCESSES = [(k, p) for k in (READ, WRITE, FETCH) for p in (SUP, USER, IMPLICIT) if not (k == FETCH and p == IMPLICIT)]

KEY = 7  # protection key placed in every 4-level leaf


@dataclass(frozen=True)
class Controls:
    wp: bool
    nxe: bool
    smep: bool
    smap: bool
    ac: bool
    pke: bool = False
    pkru: int = 0


# ---------------------------------------------------------------------------
# The oracle: SDM Vol. 3A 4.6 / 4.7, clause by clause
# ---------------------------------------------------------------------------

def sdm_outcome(paging: str, kind: str, priv: str, path: list[tuple[bool, bool, bool]], c: Controls) -> int | None:
    """None if the access is allowed, else the #PF error code.

    ``paging`` is "32-bit", "PAE" or "4-level"; ``path`` lists (U/S, R/W, XD)
    of every paging-structure entry controlling the translation (PAE: the PDE
    and PTE only -- PDPTEs carry no rights, SDM Table 4-8).
    """
    supervisor_access = priv in (SUP, IMPLICIT)  # 4.6.1: implicit accesses are supervisor-mode whatever the CPL
    implicit = priv == IMPLICIT
    # 4.6.1: "If the U/S flag is 0 in at least one of the paging-structure entries, the address is a
    # supervisor-mode address.  Otherwise, the address is a user-mode address."
    user_mode_address = all(us for us, _, _ in path)
    rw_everywhere = all(rw for _, rw, _ in path)
    xd_anywhere = any(xd for _, _, xd in path)
    pae_or_ia32e = paging != "32-bit"  # CR4.PAE = 1

    # Error-code bits that only describe the access (4.7).
    code_wr = 2 if kind == WRITE else 0
    code_us = 4 if priv == USER else 0  # "U/S: 0 supervisor-mode access, 1 user-mode access"
    code_id = 16 if kind == FETCH and (c.smep or (pae_or_ia32e and c.nxe)) else 0

    # 4.4.2 / 4.5.4: "If IA32_EFER.NXE = 0 and the P flag of a paging-structure entry is 1, the XD flag
    # (bit 63) is reserved."  A reserved bit => #PF with P=1, RSVD=1 (4.7).
    if pae_or_ia32e and not c.nxe and xd_anywhere:
        return 1 | 8 | code_wr | code_us | code_id

    # 4.6.2: keys apply with IA-32e paging and CR4.PKE = 1, to user-mode addresses, for data accesses.
    keys_apply = paging == "4-level" and c.pke and user_mode_address
    ad = keys_apply and bool(c.pkru >> (2 * KEY) & 1)
    wd = keys_apply and bool(c.pkru >> (2 * KEY + 1) & 1)
    key_permits_read = not ad
    key_permits_user_write = not ad and not wd
    key_permits_supervisor_write = not ad and not (wd and c.wp)  # WD ignored for supervisor writes when WP = 0

    # "For 32-bit paging or if IA32_EFER.NXE = 0, instructions may be fetched from any ... address";
    # otherwise only through translations with XD = 0 in every entry.
    xd_forbids_fetch = pae_or_ia32e and c.nxe and xd_anywhere

    if supervisor_access:
        if kind == READ:
            # "Data may be read (implicitly or explicitly) from any supervisor-mode address."
            if not user_mode_address:
                allowed = True
            # "If CR4.SMAP = 0, data may be read from any user-mode address with a protection key for which
            # read access is permitted."
            elif not c.smap:
                allowed = key_permits_read
            # "If CR4.SMAP = 1 ... If EFLAGS.AC = 1 and the access is explicit, ..." (as with SMAP = 0)
            elif c.ac and not implicit:
                allowed = key_permits_read
            # "If EFLAGS.AC = 0 or the access is implicit, data may not be read from any user-mode address."
            else:
                allowed = False
        elif kind == WRITE:
            if not user_mode_address:
                # "If CR0.WP = 0, data may be written to any supervisor-mode address.  If CR0.WP = 1, ... only
                # with R/W = 1 in every paging-structure entry controlling the translation."
                allowed = (not c.wp) or rw_everywhere
            elif c.smap and (implicit or not c.ac):
                # "If EFLAGS.AC = 0 or the access is implicit, data may not be written to any user-mode address."
                allowed = False
            elif not c.wp:
                # "If CR0.WP = 0, data may be written to any user-mode address with a protection key for which
                # write access is permitted."
                allowed = key_permits_supervisor_write
            else:
                allowed = rw_everywhere and key_permits_supervisor_write
        else:
            # "If CR4.SMEP = 1, instructions may not be fetched from any user-mode address."
            if user_mode_address and c.smep:
                allowed = False
            else:
                allowed = not xd_forbids_fetch
    else:
        # User-mode accesses: never to supervisor-mode addresses.
        if not user_mode_address:
            allowed = False
        elif kind == READ:
            allowed = key_permits_read
        elif kind == WRITE:
            # "Data may be written to any user-mode address with ... R/W flag is 1 in every paging-structure
            # entry ... and with a protection key for which write access is permitted."
            allowed = rw_everywhere and key_permits_user_write
        else:
            allowed = not xd_forbids_fetch
    if allowed:
        return None
    # 4.7 PK flag: IA-32e, PKE = 1, data access, user-mode address with key i, and ADi = 1, or WDi = 1 for a
    # write with CR0.WP = 1 or a user-mode access.
    pk = keys_apply and kind != FETCH and (ad or (wd and kind == WRITE and (c.wp or priv == USER)))
    return 1 | code_wr | code_us | code_id | (32 if pk else 0)


# ---------------------------------------------------------------------------
# Running the walker on each row
# ---------------------------------------------------------------------------

PG, PAE_BIT, PSE, LME = 1 << 31, 1 << 5, 1 << 4, 1 << 8
WP, NXE, SMEP, SMAP, PKE = 1 << 16, 1 << 11, 1 << 20, 1 << 21, 1 << 22
BASE = {4: 0x10000, 3: 0x11000, 2: 0x12000, 1: 0x13000}
LINEAR = 0x0000_1234_5678_9ABC & 0xFFFF_FFFF  # 32-bit, so one address serves every mode
FRAME = {1: 0x0040_0000, 2: 0x0080_0000, 3: 0x4000_0000}


def entry_bits(us: bool, rw: bool, xd: bool) -> int:
    return 1 | (2 if rw else 0) | (4 if us else 0) | (1 << 63 if xd else 0)


class Shape:
    """Paging structures for LINEAR in ``mode`` with the leaf at ``leaf`` and the path bits at ``path_level``."""

    def __init__(self, mode: PagingMode, leaf: int, path_level: int) -> None:
        self.mode, self.leaf, self.path_level = mode, leaf, path_level
        self.mem = PhysicalMemory()
        self.eb = mode.entry_bytes
        self.top = mode.levels - (1 if mode.top_from_registers else 0)
        self.addr = {}
        for level in range(self.top, leaf - 1, -1):
            self.mem.map_page(BASE[level])
            idx = (LINEAR >> mode.index_shift(level)) & ((1 << mode.index_bits[level - 1]) - 1)
            self.addr[level] = BASE[level] + idx * self.eb
        self.pdptes = (0, 0, 0, 0)
        if mode.top_from_registers:
            regs = [0, 0, 0, 0]
            regs[(LINEAR >> 30) & 3] = BASE[2] | 1
            self.pdptes = tuple(regs)

    def program(self, leaf: tuple[bool, bool, bool], path: tuple[bool, bool, bool]) -> list[tuple[bool, bool, bool]]:
        """Write the entries; return the (U/S, R/W, XD) of every entry controlling the translation."""
        rights = []
        for level in range(self.top, self.leaf - 1, -1):
            bits = leaf if level == self.leaf else path if level == self.path_level else (True, True, False)
            rights.append(bits)
            target = FRAME[level] if level == self.leaf else BASE[level - 1]
            value = target | entry_bits(*bits) | (0x80 if level == self.leaf and level > 1 else 0)
            if level == self.leaf and self.mode is LEVEL4:
                value |= KEY << 59
            self.mem.write(self.addr[level], self.eb, value & ((1 << (8 * self.eb)) - 1))
        return rights

    def control(self, c: Controls) -> PagingControl:
        cr4 = (PSE if self.mode is BITS32 else PAE_BIT) | (SMEP if c.smep else 0) | (SMAP if c.smap else 0) | \
            (PKE if c.pke else 0)
        efer = (NXE if c.nxe else 0) | (LME if self.mode is LEVEL4 else 0)
        cr3 = BASE[self.top] if not self.mode.top_from_registers else 0
        return PagingControl(cr0=PG | (WP if c.wp else 0), cr3=cr3, cr4=cr4, efer=efer, pdptes=self.pdptes,
                             pkru=c.pkru, ac=c.ac)


B = (False, True)
PAGING_NAME = {BITS32: "32-bit", PAE: "PAE", LEVEL4: "4-level"}


def run_matrix(shape: Shape, controls: list[Controls], with_xd: bool) -> tuple[int, list[str]]:
    rows, bad = 0, []
    xd_values = B if with_xd else (False,)
    name = PAGING_NAME[shape.mode]
    accesses = [(k, p, Access(KINDS[k], PRIV_CPL[p], p == IMPLICIT)) for k, p in ACCESSES]
    for lus, lrw, lxd, pus, prw, pxd in itertools.product(B, B, xd_values, B, B, xd_values):
        path_rights = shape.program((lus, lrw, lxd), (pus, prw, pxd))
        for c in controls:
            ctl = shape.control(c)
            for kind, priv, acc in accesses:
                rows += 1
                w = walk(CONCRETE, shape.mem, shape.mode, ctl, LINEAR, acc)
                expected = sdm_outcome(name, kind, priv, path_rights, c)
                if w.fault != expected:
                    bad.append(f"{name} leaf={shape.leaf} path@{shape.path_level} leaf(us,rw,xd)={lus, lrw, lxd} "
                               f"path={pus, prw, pxd} {kind}/{priv} {c}: walker {w.fault} oracle {expected}")
                elif expected is None:
                    assert w.phys == FRAME[shape.leaf] | (LINEAR & ((1 << w.page_shift) - 1))
    return rows, bad


MAIN_CONTROLS = [Controls(*bits) for bits in itertools.product(B, repeat=5)]  # WP, NXE, SMEP, SMAP, AC
PKRU_VALUES = (0, 1 << (2 * KEY), 2 << (2 * KEY), 3 << (2 * KEY), 0xFFFF_FFFF ^ (3 << (2 * KEY)))
PK_CONTROLS = [Controls(wp, True, smep, smap, ac, True, pkru)
               for wp, smep, smap, ac in itertools.product(B, repeat=4) for pkru in PKRU_VALUES]
NO_NX_CONTROLS = [Controls(wp, False, smep, smap, ac) for wp, smep, smap, ac in itertools.product(B, repeat=4)]

# (mode, leaf level, level carrying the path bits, controls, XD dimension, expected rows)
CASES = [
    (LEVEL4, 1, 4, MAIN_CONTROLS, True),
    (LEVEL4, 1, 3, MAIN_CONTROLS, True),
    (LEVEL4, 1, 2, MAIN_CONTROLS, True),
    (LEVEL4, 2, 4, MAIN_CONTROLS, True),
    (LEVEL4, 3, 4, MAIN_CONTROLS, True),
    (LEVEL4, 1, 3, PK_CONTROLS, True),
    (BITS32, 1, 2, NO_NX_CONTROLS, False),
    (BITS32, 2, 2, NO_NX_CONTROLS, False),  # 4 MiB page: leaf and path are the same entry
    (PAE, 1, 2, MAIN_CONTROLS, True),
    (PAE, 2, 2, MAIN_CONTROLS, True),
]


def expected_rows(controls: list[Controls], with_xd: bool) -> int:
    return (2 ** (6 if with_xd else 4)) * len(controls) * len(ACCESSES)


TOTAL_ROWS = sum(expected_rows(c, x) for _, _, _, c, x in CASES)


@pytest.mark.parametrize(("mode", "leaf", "path_level", "controls", "with_xd"), CASES,
                         ids=[f"{m.name}-leaf{lf}-path{p}-{'pk' if c is PK_CONTROLS else 'main'}"
                              for m, lf, p, c, _ in CASES])
def test_permission_matrix(mode: PagingMode, leaf: int, path_level: int, controls: list[Controls],
                           with_xd: bool) -> None:
    rows, bad = run_matrix(Shape(mode, leaf, path_level), controls, with_xd)
    assert rows == expected_rows(controls, with_xd)
    assert not bad, f"{len(bad)} of {rows} rows disagree; first: " + "\n".join(bad[:10])


def test_total_row_count() -> None:
    """The matrix size reported in the docs (sum over CASES)."""
    assert TOTAL_ROWS == 5 * 64 * 32 * 8 + 64 * 80 * 8 + 2 * 16 * 16 * 8 + 2 * 64 * 32 * 8


def test_oracle_named_cases() -> None:
    """The oracle itself on cases whose answer the SDM states outright (guards against a wrong oracle)."""
    ok = [(True, True, False)] * 4
    ro = [(True, False, False)] * 4
    sup = [(False, True, False)] * 4
    off = Controls(False, False, False, False, False)
    assert sdm_outcome("4-level", WRITE, SUP, ro, off) is None  # WP=0
    assert sdm_outcome("4-level", WRITE, SUP, ro, Controls(True, False, False, False, False)) == 3
    assert sdm_outcome("4-level", READ, USER, sup, off) == 5
    assert sdm_outcome("4-level", READ, SUP, ok, Controls(False, False, False, True, False)) == 1  # SMAP
    assert sdm_outcome("4-level", READ, SUP, ok, Controls(False, False, False, True, True)) is None  # AC=1
    assert sdm_outcome("4-level", READ, IMPLICIT, ok, Controls(False, False, False, True, True)) == 1
    assert sdm_outcome("4-level", FETCH, SUP, ok, Controls(False, False, True, False, False)) == 17  # SMEP
    assert sdm_outcome("32-bit", FETCH, SUP, ok, Controls(False, True, True, False, False)) == 17
    assert sdm_outcome("32-bit", FETCH, SUP, ok, Controls(False, True, False, False, False)) is None
    xd = [(True, True, True)] * 4
    assert sdm_outcome("4-level", READ, USER, xd, off) == 1 | 8 | 4  # XD reserved with NXE=0
    assert sdm_outcome("4-level", FETCH, USER, xd, Controls(False, True, False, False, False)) == 1 | 4 | 16
    pk_ad = Controls(False, True, False, False, False, True, 1 << (2 * KEY))
    assert sdm_outcome("4-level", READ, USER, ok, pk_ad) == 1 | 4 | 32
    assert sdm_outcome("4-level", FETCH, USER, ok, pk_ad) is None
    pk_wd = Controls(False, True, False, False, False, True, 2 << (2 * KEY))
    assert sdm_outcome("4-level", WRITE, SUP, ok, pk_wd) is None  # WP=0: WD ignored for supervisor writes
    assert sdm_outcome("4-level", WRITE, USER, ok, pk_wd) == 1 | 2 | 4 | 32
