"""Shadow-paging soundness, proved with Z3 over every guest entry's rights and dirty/key bits.

A shadow leaf is filled from a successful guest walk for one access (the *fill
access*); afterwards the hardware alone decides every later access through it,
with the real control registers of :func:`refvmm.paging.shadow.real_control`.
For every guest configuration (paging mode, CR0.WP, CR4.SMEP/SMAP/PKE, EFER.NXE,
RFLAGS.AC, PKRU) and every pair (fill access, later access) -- CPL 0/3 read,
write, fetch and implicit supervisor read/write -- with the guest path's U/S,
R/W, XD and the leaf's D flag and protection key all free:

* **soundness** -- if the hardware lets the later access through the shadow leaf,
  the guest's own rules (SDM 4.6, :func:`spec.paging._denied` with the guest's
  registers) allow it too, and a write finds the guest leaf already dirty (the
  fill's walk set D, or it was set): the guest never misses a #PF it would get on
  the bare machine, and never writes a page whose D flag is clear (SDM 4.8);
* **progress** -- the hardware allows the fill access itself through the leaf it
  caused, except for a supervisor write the guest allows only because CR0.WP = 0
  (or a protection key's WD does not bind the supervisor with WP = 0): those and
  only those are emulated (:func:`refvmm.paging.shadow.decide` says ``Emulate``),
  so a fill never loops.

Each property has a twin that breaks the pager (rights without the dirty flag,
without XD, a real CR0 without WP) and asserts that Z3 finds a counterexample.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import z3

from refvmm.paging import shadow
from refvmm.paging.shadow import GuestPaging, ShadowRights, real_control, shadow_rights
from spec.domain.symbolic import SymbolicDomain, prove
from spec.memory import AccessKind
from spec.paging import BITS32, LEVEL4, PAE, Access, PagingMode, Walk, _denied

R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
PG, WP = 1 << 31, 1 << 16
PSE, PAE_BIT, SMEP, SMAP, PKE = 1 << 4, 1 << 5, 1 << 20, 1 << 21, 1 << 22
NXE, LME, LMA = 1 << 11, 1 << 8, 1 << 10
PE = 1

ACCESSES = (Access(R, 0), Access(W, 0), Access(X, 0), Access(R, 3), Access(W, 3), Access(X, 3),
            Access(R, 3, implicit=True), Access(W, 3, implicit=True))
PKRUS = (0, 0b0110_1100)  # PKRU: key 1 access- and write-disabled, key 2 write-disabled, key 3 access-disabled


def guests() -> Iterator[tuple[GuestPaging, bool, int]]:
    """Every guest configuration: (guest-visible registers, RFLAGS.AC, PKRU)."""
    for mode in (BITS32, PAE, LEVEL4):
        for wp, smep, smap, nxe, pke, ac in itertools.product((0, 1), repeat=6):
            if mode is BITS32 and (nxe or pke):
                continue
            if mode is PAE and pke:
                continue
            cr4 = {BITS32: PSE, PAE: PAE_BIT, LEVEL4: PAE_BIT}[mode]
            cr4 |= (SMEP if smep else 0) | (SMAP if smap else 0) | (PKE if pke else 0)
            efer = (NXE if nxe else 0) | (LME | LMA if mode is LEVEL4 else 0)
            g = GuestPaging(cr0=PE | PG | (WP if wp else 0), cr3=0x1000, cr4=cr4, efer=efer, maxphyaddr=40)
            assert g.mode is mode
            for pkru in (PKRUS if pke else (0,)):
                yield g, bool(ac), pkru


def label(g: GuestPaging, ac: bool, pkru: int) -> str:
    mode = g.mode
    assert mode is not None
    bits = [name for name, on in (("WP", g.cr0 & WP), ("SMEP", g.cr4 & SMEP), ("SMAP", g.cr4 & SMAP),
                                   ("NXE", g.efer & NXE), ("PKE", g.cr4 & PKE), ("AC", ac)) if on]
    return f"{mode.name}[{','.join(bits)}] pkru={pkru:#x}"


class Guest:
    """Free guest rights: the path's U/S, R/W, XD and the leaf (D flag, key) as read by the fill's walk."""

    def __init__(self, D: SymbolicDomain, mode: PagingMode) -> None:
        self.user = D.bool_var("user")
        self.writable = D.bool_var("writable")
        self.xd = D.bool_var("xd")
        self.leaf = D.var(64, "leaf")
        self.walk = Walk(mode, user=self.user, writable=self.writable, executable=D.bnot(self.xd), leaf=self.leaf)


def deny(D: SymbolicDomain, mode: PagingMode, ctl: Any, acc: Access, leaf: Any, user: Any, writable: Any,
         xd: Any) -> Any:
    d, pk = _denied(D, mode, ctl, acc, leaf, user, writable, xd)
    return D.bor(d, pk)


RightsFn = Callable[[SymbolicDomain, Walk, Access, Any], ShadowRights]
RealFn = Callable[[GuestPaging], shadow.RealControl]


def claims(g: GuestPaging, ac: bool, pkru: int, rights_fn: RightsFn = shadow_rights,
           real_fn: RealFn = real_control) -> tuple[Any, Any]:
    """(soundness, progress) for one configuration, over every pair of accesses."""
    D = SymbolicDomain()
    mode = g.mode
    assert mode is not None
    gctl = g.control(pkru=pkru, ac=ac)
    real = real_fn(g)
    rctl = real.control(0x2000, pkru=pkru, ac=ac, maxphyaddr=40)
    guest = Guest(D, mode)
    xd = guest.xd if mode.nx_capable and g.efer & NXE else D.false()
    guest.walk = replace(guest.walk, executable=D.bnot(xd))
    sound, progress = [], []
    for a1 in ACCESSES:
        ok1 = D.bnot(deny(D, mode, gctl, a1, guest.leaf, guest.user, guest.writable, xd))
        r = rights_fn(D, guest.walk, a1, gctl)
        s_leaf = z3.ZeroExt(60, r.pkey) << 59 if not isinstance(r.pkey, int) else D.const(64, r.pkey << 59)
        dirty = z3.Or(D.bit(64, guest.leaf, 6), z3.BoolVal(a1.write))
        s_user, s_writable, s_xd = (z3.BoolVal(v) if isinstance(v, bool) else v
                                    for v in (r.user, r.writable, D.bnot(r.executable)))
        for a2 in ACCESSES:
            hw_ok = D.bnot(deny(D, real.mode, rctl, a2, s_leaf, s_user, s_writable, s_xd))
            guest_ok = D.bnot(deny(D, mode, gctl, a2, guest.leaf, guest.user, guest.writable, xd))
            sound.append(z3.Implies(z3.And(ok1, hw_ok), z3.And(guest_ok, dirty if a2.write else True)))
        hw_ok1 = D.bnot(deny(D, real.mode, rctl, a1, s_leaf, s_user, s_writable, s_xd))
        emulated = a1.write and not a1.user and not g.cr0 & WP
        if not emulated:
            progress.append(z3.Implies(ok1, hw_ok1))
    return z3.And(sound), z3.And(progress)


CONFIGS = list(guests())


@pytest.mark.parametrize("mode", [BITS32, PAE, LEVEL4], ids=lambda m: m.name)
def test_shadow_leaves_are_sound_and_make_progress(mode: PagingMode) -> None:
    for g, ac, pkru in CONFIGS:
        if g.mode is not mode:
            continue
        sound, progress = claims(g, ac, pkru)
        cex = prove(sound)
        assert cex is None, f"{label(g, ac, pkru)}: the hardware allows what the guest refuses: {cex}"
        cex = prove(progress)
        assert cex is None, f"{label(g, ac, pkru)}: a fill does not let its own access through: {cex}"


def test_emulation_is_needed_only_for_wp0_supervisor_writes() -> None:
    """With CR0.WP = 0 a supervisor write to a read-only page is allowed but no shadow leaf can express it."""
    g = GuestPaging(cr0=PE | PG, cr3=0x1000, cr4=PAE_BIT, efer=NXE | LME | LMA, maxphyaddr=40)
    D = SymbolicDomain()
    guest = Guest(D, LEVEL4)
    a = Access(W, 0)
    gctl = g.control()
    real = real_control(g)
    r = shadow_rights(D, guest.walk, a, gctl)
    hw_ok = D.bnot(deny(D, LEVEL4, real.control(0), a, D.const(64, 0), r.user, r.writable, D.bnot(r.executable)))
    guest_ok = D.bnot(deny(D, LEVEL4, gctl, a, guest.leaf, guest.user, guest.writable, guest.xd))
    assert prove(z3.Implies(guest_ok, hw_ok)) is not None  # a counterexample: R/W = 0


# -- the twins: broken pagers are refuted --------------------------------------------------------------------

def _rights_ignoring_dirty(D: SymbolicDomain, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    r = shadow_rights(D, w, acc, ctl)
    return ShadowRights(r.user, w.writable, r.executable, r.pkey)


def _rights_ignoring_nx(D: SymbolicDomain, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    r = shadow_rights(D, w, acc, ctl)
    return ShadowRights(r.user, r.writable, D.true(), r.pkey)


def _rights_ignoring_user(D: SymbolicDomain, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    r = shadow_rights(D, w, acc, ctl)
    return ShadowRights(D.true(), r.writable, r.executable, r.pkey)


def _real_without_wp(g: GuestPaging) -> shadow.RealControl:
    r = real_control(g)
    return replace(r, cr0=r.cr0 & ~WP if not g.cr0 & WP else r.cr0)


def _real_without_smep(g: GuestPaging) -> shadow.RealControl:
    r = real_control(g)
    return replace(r, cr4=r.cr4 & ~SMEP)


MUTANTS: dict[str, tuple[RightsFn, RealFn, Callable[[GuestPaging], bool]]] = {
    "write before the guest's dirty bit": (_rights_ignoring_dirty, real_control, lambda g: True),
    "ignoring NX": (_rights_ignoring_nx, real_control, lambda g: bool(g.efer & NXE)),
    "ignoring U/S": (_rights_ignoring_user, real_control, lambda g: True),
    "guest WP=0 passed to the hardware": (shadow_rights, _real_without_wp, lambda g: not g.cr0 & WP),
    "SMEP not passed to the hardware": (shadow_rights, _real_without_smep, lambda g: bool(g.cr4 & SMEP)),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_pagers_are_refuted(name: str) -> None:
    rights_fn, real_fn, applies = MUTANTS[name]
    for g, ac, pkru in CONFIGS:
        if g.mode is LEVEL4 and applies(g):
            sound, _ = claims(g, ac, pkru, rights_fn, real_fn)
            cex = prove(sound)
            if cex is not None:
                print(f"{name}: {label(g, ac, pkru)}: {cex}")
                return
    pytest.fail(f"mutant {name!r} was not refuted")
