"""Mutation check: deliberately broken shadow pagers, each caught by the equivalence tests.

Each mutant is a small subclass of :class:`refvmm.paging.shadow.ShadowPaging` (or a
patch of one helper of the module) that makes one mistake a VMM author makes:

==============================  ================================================================
mutant                          the mistake
==============================  ================================================================
forgets INVLPG                  the guest's INVLPG leaves the shadow leaf in place
stale across CR3                a guest CR3 write keeps the shadow leaves
write before dirty              a read fill maps a writable clean page writable (no D emulation)
ignores NX                      shadow leaves are always executable
ignores WP                      the pager's check leaves CR0.WP out: supervisor writes to read-only
                                pages are mapped writable
forgets the TLB flush           shadow tables emptied, but no TLB_CONTROL flush at the next VMRUN
forgets INVLPGA                 a dropped leaf stays in the hardware TLB
no A/D emulation                the fill's guest walk runs on a copy: A and D never reach the guest
ignores U/S                     shadow leaves are always user pages
==============================  ================================================================

For each, the equivalence programs (the hand-written ones of :data:`PROGRAMS` and a
fixed batch of generated ones) are run against the bare spec with the mutant as the
pager, and if none diverges the lockstep state machine
(tests/test_shadow_statemachine.py) runs with it; the test asserts that one of them
catches the mutant -- and, as a control, that the real pager passes the same
programs.  Deterministic: the generated batch and the state machine's runs come from
fixed hypothesis seeds (``derandomize``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from test_shadow_guest import CR0_WP, Asm, Program, differences, programs, run_case
from test_shadow_statemachine import machine_for

from difftest.backends.refvmm import RefvmmBackend
from difftest.case import Environment
from difftest.layout import layout
from refvmm.paging import shadow
from refvmm.paging.shadow import Emulate, GuestPaging, ShadowPaging, ShadowRights
from spec.paging import RW, XD, Access, Walk


class ForgetsInvlpg(ShadowPaging):
    def invalidate(self, vm: Any, linear: int) -> None:
        self.counters.invlpg += 1


class StaleAcrossCr3(ShadowPaging):
    def flush(self, vm: Any) -> None:
        self.counters.flushes += 1
        self.flush_hardware_tlb(vm)


class ForgetsTlbFlush(ShadowPaging):
    def flush_hardware_tlb(self, vm: Any) -> None:
        return None


class ForgetsInvlpga(ShadowPaging):
    def drop_hardware_entry(self, vm: Any, page: int) -> None:
        return None


def _rights_patch(fn: Callable[[Any, Walk, Access, Any], ShadowRights]) -> Callable[[], None]:
    """A mutant that replaces :func:`shadow.shadow_rights` (the rights of every fill)."""
    return lambda: setattr(shadow, "shadow_rights", fn)


_real_rights = shadow.shadow_rights


def _write_before_dirty(D: Any, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    r = _real_rights(D, w, acc, ctl)
    return replace(r, writable=bool(w.writable))


def _ignores_nx(D: Any, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    return replace(_real_rights(D, w, acc, ctl), executable=True)


def _ignores_user(D: Any, w: Walk, acc: Access, ctl: Any) -> ShadowRights:
    return replace(_real_rights(D, w, acc, ctl), user=True)


_real_decide = shadow.decide


def _ignores_wp(gphys: Any, guest: GuestPaging, linear: int, acc: Access, **kwargs: Any) -> Any:
    """A pager whose own check leaves CR0.WP out: the supervisor may write any page it may read."""
    d = _real_decide(gphys, replace(guest, cr0=guest.cr0 & ~CR0_WP), linear, acc, **kwargs)
    if isinstance(d, Emulate):
        return replace(d.fill, rights=replace(d.fill.rights, writable=True))
    return d


def _decide_on_a_copy(gphys: Any, *args: Any, **kwargs: Any) -> Any:
    return _real_decide(gphys.copy(), *args, **kwargs)


MUTANTS: dict[str, tuple[type[ShadowPaging], Callable[[pytest.MonkeyPatch], None] | None]] = {
    "forgets INVLPG": (ForgetsInvlpg, None),
    "stale across CR3": (StaleAcrossCr3, None),
    "write before dirty": (ShadowPaging, lambda mp: mp.setattr(shadow, "shadow_rights", _write_before_dirty)),
    "ignores NX": (ShadowPaging, lambda mp: mp.setattr(shadow, "shadow_rights", _ignores_nx)),
    "ignores WP": (ShadowPaging, lambda mp: mp.setattr(shadow, "decide", _ignores_wp)),
    "forgets the TLB flush": (ForgetsTlbFlush, None),
    "forgets INVLPGA": (ForgetsInvlpga, None),
    "no A/D emulation": (ShadowPaging, lambda mp: mp.setattr(shadow, "decide", _decide_on_a_copy)),
    "ignores U/S": (ShadowPaging, lambda mp: mp.setattr(shadow, "shadow_rights", _ignores_user)),
}


def _hand_programs() -> list[Program]:
    """Programs aimed at the mistakes above, in 4-level, PAE and 32-bit paging (CPL 0 and 3)."""
    out = []
    for mode, paging in (("long64", "4-level"), ("prot32", "PAE"), ("prot32", "32-bit")):
        env = Environment(mode=mode, paging=paging)  # type: ignore[arg-type]
        lay = layout(env)
        a = Asm(env.bits)
        d0, d1 = lay.data
        e0, e1 = lay.leaf_entry(d0), lay.leaf_entry(d1)
        v0, v1 = lay.entry_value(e0), lay.entry_value(e1)
        eb = lay.entry_bytes
        out += [
            # write, read-only + INVLPG, write again: #PF (INVLPG, INVLPGA)
            Program(env, [a.store(d0, 1), *a.write_entry(e0, v0 & ~RW, eb), a.invlpg(d0), a.store(d0 + 4, 2)],
                    ["store", "read-only", "invlpg", "store"]),
            # write, unmap + CR3 reload, read: #PF (CR3 flush, TLB_CONTROL)
            Program(env, [a.store(d1, 1), *a.write_entry(e1, 0, eb), a.reload_cr3(), a.load(d1)],
                    ["store", "unmap", "cr3", "load"]),
            # read, then write: D set by the write only (dirty emulation, A/D)
            Program(env, [a.load(d0), a.store(d0 + 8, 3)], ["load", "store"]),
            # read-only page, supervisor write with WP = 1: #PF (WP)
            Program(env, [*a.write_entry(e1, v1 & ~RW, eb), a.invlpg(d1), a.store(d1, 4)],
                    ["read-only", "invlpg", "store"]),
        ]
        if eb == 8:  # XD, then execute: #PF with I/D (NX)
            out.append(Program(env, [*a.write_entry(e0, v0 | XD, eb), a.invlpg(d0), *a.execute(d0)],
                               ["XD", "invlpg", "execute"]))
    user = Environment(mode="long64", paging="4-level", cpl=3)
    lay = layout(user)
    a = Asm(64)
    system_page = 0x3000  # the IDT: a supervisor page at CPL 3 (U/S)
    out.append(Program(user, [a.load(lay.data[0]), a.load(system_page)], ["load", "load a supervisor page"]))
    # CR0.WP = 0 then back to 1 (rebuild) -- a control for the WP mutants' neighbourhood
    env = Environment(mode="long64", paging="4-level")
    a = Asm(64)
    out.append(Program(env, [a.set_cr(0, CR0_WP, False), a.store(layout(env).data[0], 9),
                             a.set_cr(0, CR0_WP, True)], ["WP=0", "store", "WP=1"]))
    return out


def _generated_programs() -> list[Program]:
    """A fixed batch of generated programs (hypothesis with a fixed seed: the same batch every run)."""
    batch: list[Program] = []
    envs = [Environment(mode="long64", paging="4-level"), Environment(mode="prot32", paging="PAE"),
            Environment(mode="prot32", paging="32-bit"),
            Environment(mode="long64", paging="4-level", page_size=1 << 21)]

    @seed(20240521)
    @settings(max_examples=12, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(env=st.sampled_from(envs), data=st.data())
    def collect(env: Environment, data: st.DataObject) -> None:
        batch.append(data.draw(programs(env, max_ops=5)))

    collect()
    return batch


PROGRAMS = _hand_programs()
GENERATED = _generated_programs()


def _divergences(backend: RefvmmBackend, progs: list[Program]) -> list[str]:
    found = []
    for prog in progs:
        case = prog.case()
        ref, out = run_case(case, backend)
        diffs = differences(case, ref, out)
        if diffs:
            found.append(f"{prog.env.label()} [{'; '.join(prog.steps)}]: {diffs[0]}")
    return found


def test_the_real_pager_passes_every_program() -> None:
    assert _divergences(RefvmmBackend("shadow"), PROGRAMS + GENERATED) == []


def _state_machine_catches(strategy: type[ShadowPaging]) -> str | None:
    """Run the lockstep state machine (4-level paging) with ``strategy``: the first disagreement, or None."""
    machine = machine_for(Environment(mode="long64", paging="4-level"), STRATEGY=strategy)
    try:
        run_state_machine_as_test(machine, settings=settings(
            phases=[Phase.generate], max_examples=30, stateful_step_count=15, derandomize=True, database=None,
            deadline=None, report_multiple_bugs=False, suppress_health_check=list(HealthCheck)))
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_mutant_is_caught(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """By the equivalence programs, else by the state machine (both fixed, so the verdict is stable)."""
    cls, patch = MUTANTS[name]
    if patch is not None:
        patch(monkeypatch)
    backend = RefvmmBackend("shadow", strategy=cls, name=f"mutant-{name.replace(' ', '-')}")
    found = _divergences(backend, PROGRAMS + GENERATED)
    if found:
        print(f"{name}: caught by {len(found)} equivalence program(s), e.g. {found[0]}")
        return
    caught = _state_machine_catches(cls)
    assert caught is not None, f"mutant {name!r} was caught neither by the equivalence programs nor the state machine"
    print(f"{name}: caught by the state machine: {caught}")
