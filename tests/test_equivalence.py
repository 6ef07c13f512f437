"""Equivalence (Popek and Goldberg): a guest ends in the same state on refvmm as on the bare machine.

Generated guest programs (:func:`test_shadow_guest.programs`) over every difftest
environment -- real mode, 16- and 32-bit protected mode with paging off, 32-bit, PAE
(4 KiB and 2 MiB pages) and 4-level paging (4 KiB, 2 MiB, 1 GiB), CPL 0 and CPL 3 --
with loads, stores, instruction fetches, page-table edits followed by INVLPG or a CR3
reload, CR0.WP / SMEP / SMAP toggles, paging switched off and on, and the guest's own
page faults delivered through its IDT, run on the bare spec
(``SpecBackend(deliver_exceptions=True)``) and on ``refvmm-shadow`` and
``refvmm-nested``.  They must agree (:func:`difftest.compare.compare`): the stop event,
GPRs, RFLAGS, selectors, CR0/CR2/CR3/CR4, EFER, and every page of guest memory -- the
exception frames the handlers leave on their stacks and the accessed/dirty bits in
the guest's own page tables included.

A few hand-written programs pin the paths the generator reaches only by chance: a
fault while delivering a fault (#DF), CR0.WP = 0 supervisor writes to read-only pages
(emulated), the shadow tables being exercised (fills, flushes, invalidations counted).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_shadow_guest import (
    CR0_WP,
    CR4_SMAP,
    FLAT_ENVS,
    M32,
    PAGING_ENVS,
    Asm,
    Program,
    check_equivalent,
    differences,
    programs,
    run_case,
)

from difftest.backends.refvmm import RefvmmBackend
from difftest.case import Case, Environment
from difftest.generate import generate_case
from difftest.layout import layout
from refvmm.paging.shadow import ShadowPaging
from spec.paging import RW, US

SHADOW = RefvmmBackend("shadow")
NESTED = RefvmmBackend("nested")


@pytest.mark.parametrize("backend", [SHADOW, NESTED], ids=lambda b: b.name)
@pytest.mark.parametrize("env", PAGING_ENVS, ids=lambda e: e.label())
@settings(max_examples=6)
@given(data=st.data())
def test_paging_programs_are_equivalent(backend: RefvmmBackend, env: Environment, data: st.DataObject) -> None:
    check_equivalent(data.draw(programs(env)), backend)


@pytest.mark.parametrize("backend", [SHADOW, NESTED], ids=lambda b: b.name)
@pytest.mark.parametrize("env", FLAT_ENVS, ids=lambda e: e.label())
@settings(max_examples=3)
@given(data=st.data())
def test_paging_off_programs_are_equivalent(backend: RefvmmBackend, env: Environment, data: st.DataObject) -> None:
    check_equivalent(data.draw(programs(env, max_ops=4)), backend)


# -- pinned paths ------------------------------------------------------------------------------------------

def _env(paging: str = "4-level", cpl: int = 0) -> Environment:
    mode = "long64" if paging == "4-level" else "prot32"
    return Environment(mode=mode, paging=paging, cpl=cpl)  # type: ignore[arg-type]


def _counters(backend: RefvmmBackend) -> dict[str, int]:
    vm = backend.last_vm
    assert vm is not None
    pager = vm.paging  # type: ignore[attr-defined]
    assert isinstance(pager, ShadowPaging)
    return pager.counters.as_dict()


@pytest.mark.parametrize("paging", ["32-bit", "PAE", "4-level"])
def test_invlpg_after_a_permission_change_takes_effect(paging: str) -> None:
    """Read a page (filled), make it read-only + INVLPG, write it: the guest's #PF, exactly."""
    env = _env(paging)
    lay = layout(env)
    a = Asm(env.bits)
    d0 = lay.data[0]
    entry = lay.leaf_entry(d0)
    prog = Program(env, [a.load(d0), *a.write_entry(entry, lay.entry_value(entry) & ~RW, lay.entry_bytes),
                         a.invlpg(d0), a.store(d0 + 4, 1)], ["load", "read-only", "invlpg", "store"])
    check_equivalent(prog, SHADOW)
    c = _counters(SHADOW)
    assert c["guest_faults"] == 1 and c["invlpg"] >= 1 and c["dropped"] >= 1 and c["fills"] > 3


@pytest.mark.parametrize("paging", ["PAE", "4-level"])
def test_cr3_reload_after_unmapping_takes_effect(paging: str) -> None:
    env = _env(paging, cpl=0)
    lay = layout(env)
    a = Asm(env.bits)
    d1 = lay.data[1]
    entry = lay.leaf_entry(d1)
    prog = Program(env, [a.store(d1, 7), *a.write_entry(entry, 0, lay.entry_bytes), a.reload_cr3(), a.load(d1)],
                   ["store", "unmap", "cr3", "load"])
    check_equivalent(prog, SHADOW)
    c = _counters(SHADOW)
    assert c["flushes"] >= 2 and c["guest_faults"] == 1


@pytest.mark.parametrize("paging", ["32-bit", "PAE", "4-level"])
def test_wp0_supervisor_writes_to_read_only_pages(paging: str) -> None:
    """CR0.WP = 0: the supervisor writes a read-only page (emulated by the VMM); WP = 1 again: #PF."""
    env = _env(paging)
    lay = layout(env)
    a = Asm(env.bits)
    d0 = lay.data[0]
    entry = lay.leaf_entry(d0)
    prog = Program(env, [*a.write_entry(entry, lay.entry_value(entry) & ~RW, lay.entry_bytes), a.invlpg(d0),
                         a.set_cr(0, CR0_WP, False), a.store(d0, 0x11), a.store(d0 + 8, 0x22),
                         a.set_cr(0, CR0_WP, True), a.store(d0 + 16, 0x33)],
                   ["read-only", "invlpg", "WP=0", "store", "store", "WP=1", "store"])
    check_equivalent(prog, SHADOW)
    c = _counters(SHADOW)
    assert c["emulated"] >= 2 and c["guest_faults"] == 1


@pytest.mark.parametrize("paging", ["PAE", "4-level"])
def test_page_fault_while_delivering_a_page_fault_is_a_double_fault(paging: str) -> None:
    """The #PF handler's stack page is unmapped: the delivery faults, the bare machine raises #DF."""
    env = _env(paging)
    lay = layout(env)
    a = Asm(env.bits)
    stack_page = lay.stack_top - 0x1000
    entry = lay.leaf_entry(stack_page)
    prog = Program(env, [*a.write_entry(entry, 0, lay.entry_bytes), a.invlpg(stack_page), a.load(lay.unmapped)],
                   ["unmap the stack", "invlpg", "load the unmapped page"])
    check_equivalent(prog, SHADOW)
    check_equivalent(prog, NESTED)


@pytest.mark.parametrize("env", [_env("4-level", 3), _env("PAE", 0), Environment(mode="real")],
                         ids=lambda e: e.label())
def test_software_interrupt_whose_delivery_misses_the_shadow(env: Environment) -> None:
    """INT3 / INT 80h / INT1 as the first instruction: the IDT and stack pages miss in the shadow tables during
    delivery; the VMM fills and re-injects the interrupt, returning past the INT (nRIP decoded by the VMM)."""
    for code in (b"\xcc", b"\xcd\x80", b"\xf1"):
        prog = Program(env, [code], [f"int ({code.hex()})"])
        check_equivalent(prog, SHADOW)
        check_equivalent(prog, NESTED)


def _set_ac(bits: int, on: bool) -> bytes:
    """PUSHF; OR/AND [rSP], AC; POPF (RFLAGS.AC, the SMAP override, SDM Vol. 3A 4.6)."""
    rex = b"\x48" if bits == 64 else b""
    op = b"\x81\x0c\x24" + (1 << 18).to_bytes(4, "little") if on else b"\x81\x24\x24" + (~(1 << 18) & M32).to_bytes(4,
                                                                                                         "little")
    return b"\x9c" + rex + op + b"\x9d"


@pytest.mark.parametrize("paging", ["PAE", "4-level"])
def test_smap_with_rflags_ac_explicit_and_implicit(paging: str) -> None:
    """SMAP: AC = 1 lets the supervisor read a user page, AC = 0 does not; an implicit access (the IDT on a
    user page, read by INT 80h's delivery) faults whatever AC says -- three times: #PF, #DF, shutdown."""
    env = _env(paging)
    lay = layout(env)
    a = Asm(env.bits)
    d0 = lay.data[0]
    for page, tail in ((d0, [_set_ac(env.bits, True), a.load(d0), _set_ac(env.bits, False), a.load(d0 + 4)]),
                       (0x3000, [_set_ac(env.bits, True), a.load(0x3000), b"\xcd\x80"])):
        e = lay.leaf_entry(page)
        prog = Program(env, [*a.write_entry(e, lay.entry_value(e) | US, lay.entry_bytes), a.invlpg(page),
                             a.set_cr(4, CR4_SMAP, True), *tail], [f"user page {page:#x}", "SMAP", "AC tricks"])
        check_equivalent(prog, SHADOW)
        check_equivalent(prog, NESTED)


def test_user_page_fault_frames_match_at_cpl3() -> None:
    env = _env("4-level", cpl=3)
    lay = layout(env)
    a = Asm(env.bits)
    prog = Program(env, [a.store(lay.data[0], 5), a.load(lay.unmapped + 0x10)], ["store", "load unmapped"])
    check_equivalent(prog, SHADOW)
    check_equivalent(prog, NESTED)


# -- campaign cases ------------------------------------------------------------------------------------------

SVM_INSTRUCTIONS = ("vmrun", "vmload", "vmsave", "vmmcall", "stgi", "clgi", "skinit", "invlpga")
"""Excluded from the campaign comparison, with reason: on any SVM guest these differ from the bare machine by
design or by the architecture, not by the pager.  VMMCALL is refvmm's hypercall interface; the others need
EFER.SVME = 1 in the guest's real EFER (VMRUN's consistency check, APM Vol. 2 15.5.1), so at CPL > 0 they raise
#GP (the CPL check precedes the intercept, APM Vol. 3) where the bare machine, with SVME = 0, raises #UD."""


def _campaign_cases(count: int) -> list[Case]:
    cases = [generate_case(20240521, i, length=14) for i in range(count)]
    return [c for c in cases if not any(m in line for line in c.disassembly for m in SVM_INSTRUCTIONS)]


CAMPAIGN = _campaign_cases(40)


@pytest.mark.parametrize("backend", [SHADOW, NESTED], ids=lambda b: b.name)
def test_campaign_cases_are_equivalent(backend: RefvmmBackend) -> None:
    """Cases of difftest's campaign generator (random instructions in every environment, paging corruptions
    written by the case's own code and flushed) end as on the bare spec."""
    failures = []
    for case in CAMPAIGN:
        ref, out = run_case(case, backend)
        diffs = differences(case, ref, out)
        if diffs:
            failures.append(f"{case.name} ({case.env.label()}): {diffs[:3]}")
    assert not failures, "\n".join(failures)
