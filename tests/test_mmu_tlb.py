"""The hardware TLB in SVM guest mode (spec/mmu.py GuestMMU, spec/tlb.py; AMD APM Vol. 2 15.16, 15.25).

In guest mode translations go through :class:`spec.tlb.ModelTLB` under the
guest's ASID, so a translation is cached exactly as spec/tlb.py allows and is
used, stale, until something invalidates it:

* the guest itself (MOV CR3, INVLPG, CR0/CR4/EFER changes that execute in
  hardware reach the TLB through ``state.tlb_events``);
* the VMM, at VMRUN (TLB_CONTROL) or with INVLPGA -- and a VMM that forgets to
  sees the stale translation: that is what makes a missing flush a visible bug.

Entries of another ASID are never used.  Guest-mode translations stay equal to
the bare machine's for a TLB-correct guest (tests/test_nested_paging.py); a plain
SpecCPU has no TLB at all.
"""

from __future__ import annotations

from typing import Any

import pytest

from spec.cpu import SpecCPU
from spec.domain.concrete import CONCRETE
from spec.machine import flat_machine
from spec.memory import PAGE, PhysicalMemory
from spec.mmu import MMU
from spec.state import CR0_PE, CR0_PG, CR0_WP, EFER_LMA, EFER_LME, MachineState
from spec.svm.nested import attach_guest_memory, detach_guest_memory
from spec.tlb import ModelTLB
from tests.test_nested_paging import (
    ASID,
    CR4_PAE,
    CR4_PGE,
    DATA_GPA,
    DATA_LIN,
    GUEST_BASE,
    HOST_CTL,
    RW,
    TABLE_GPA,
    US,
    G,
    GuestSetup,
    P,
    long64_guest,
    simple_guest,
)

OTHER_GPA = 0xA000  # guest frame the PTE is moved to (page contents: byte 0x0A)
PTE = TABLE_GPA[1] + 8 * ((DATA_LIN >> 12) & 0x1FF)


def guest_pte_write(s: GuestSetup, value: int) -> None:
    """Change the guest's PTE for DATA_LIN in guest memory, with no invalidation (as another agent would)."""
    s.host.write((GUEST_BASE if s.nested else 0) + PTE, 8, value)


def read(s: GuestSetup) -> int:
    return s.guest.mem.read(DATA_LIN, 1)


# ---------------------------------------------------------------------------
# A cached translation survives a PTE change until it is invalidated
# ---------------------------------------------------------------------------

EVENTS: dict[str, tuple[Any, bool]] = {
    # name: (what happens, whether the stale entry must be gone afterwards)
    "nothing": (lambda s: None, False),
    "guest-invlpg": (lambda s: s.guest.tlb_events.append(("invlpg", DATA_LIN + 0x123)), True),
    "guest-invlpg-other-page": (lambda s: s.guest.tlb_events.append(("invlpg", DATA_LIN + PAGE)), False),
    "guest-mov-cr3": (lambda s: s.guest.tlb_events.append(("cr3", s.guest.cr3)), True),
    "guest-mov-cr3-keep": (lambda s: s.guest.tlb_events.append(("cr3_keep", s.guest.cr3)), False),
    "guest-cr4-pge": (lambda s: s.guest.tlb_events.append(("cr4", CR4_PAE, CR4_PAE | CR4_PGE)), True),
    "guest-cr0-wp": (lambda s: s.guest.tlb_events.append(("cr0", s.guest.cr0, s.guest.cr0 ^ CR0_WP)), True),
    "guest-cr0-ts": (lambda s: s.guest.tlb_events.append(("cr0", s.guest.cr0, s.guest.cr0 ^ 8)), False),
    "guest-efer-nxe": (lambda s: s.guest.tlb_events.append(("efer", s.guest.efer, s.guest.efer ^ (1 << 11))), True),
    "tlb-control-all": (lambda s: s.tlb.tlb_control(1, ASID + 5), True),
    "tlb-control-asid": (lambda s: s.tlb.tlb_control(3, ASID), True),
    "tlb-control-nonglobal": (lambda s: s.tlb.tlb_control(7, ASID), True),
    "tlb-control-other-asid": (lambda s: s.tlb.tlb_control(3, ASID + 1), False),
    "invlpga": (lambda s: s.tlb.invlpga(DATA_LIN, ASID), True),
    "invlpga-other-asid": (lambda s: s.tlb.invlpga(DATA_LIN, ASID + 1), False),
    "invlpga-other-page": (lambda s: s.tlb.invlpga(DATA_LIN + PAGE, ASID), False),
}


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "host"])
@pytest.mark.parametrize("event", list(EVENTS))
def test_cached_translation_until_invalidated(event: str, nested: bool) -> None:
    s = simple_guest() if nested else _host_guest()
    assert read(s) == DATA_GPA >> 12  # cached now
    guest_pte_write(s, OTHER_GPA | P | RW | US)
    assert read(s) == DATA_GPA >> 12  # stale: the TLB still holds the old translation
    action, invalidates = EVENTS[event]
    action(s)
    assert read(s) == (OTHER_GPA if invalidates else DATA_GPA) >> 12


def _host_guest() -> GuestSetup:
    """simple_guest's tables, but without nested paging (the guest's CR3 is a host table, as with shadow paging)."""
    from tests.test_nested_paging import PathSpec, build_guest, make_setup

    indices = ((DATA_LIN >> 39) & 0x1FF, (DATA_LIN >> 30) & 0x1FF, (DATA_LIN >> 21) & 0x1FF, (DATA_LIN >> 12) & 0x1FF)
    mem, cr3 = build_guest("4l", [PathSpec(indices, (P | RW | US,) * 4, 1, DATA_GPA)])
    return make_setup(mem, cr0=CR0_PG | CR0_PE | CR0_WP, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
                      nested=False)


def test_global_entry_survives_cr3_but_not_tlb_control_asid() -> None:
    s = simple_guest(leaf=P | RW | US | G)
    s.guest.cr4 |= CR4_PGE
    assert read(s) == DATA_GPA >> 12
    guest_pte_write(s, OTHER_GPA | P | RW | US | G)
    s.guest.tlb_events.append(("cr3", s.guest.cr3))  # type: ignore[union-attr]
    assert read(s) == DATA_GPA >> 12  # global: MOV CR3 keeps it (SDM 4.10.4.1)
    s.tlb.tlb_control(7, ASID)  # type: ignore[union-attr]
    assert read(s) == DATA_GPA >> 12  # TLB_CONTROL 7 keeps global entries (APM 15.16.1)
    s.tlb.tlb_control(3, ASID)  # type: ignore[union-attr]
    assert read(s) == OTHER_GPA >> 12


# ---------------------------------------------------------------------------
# The guest's own instructions reach the TLB (tlb_events wired to it)
# ---------------------------------------------------------------------------

def _remappable(phys: PhysicalMemory) -> None:
    """PD[0] -> a 4 KiB page table at 0x11000 (identity 0 .. 2 MiB); markers in pages 0x10000 and 0x12000."""
    for k in range(512):
        phys.write(0x11000 + 8 * k, 8, k << 12 | 7)
    phys.write(0x72000, 8, 0x11007)
    phys.write(0x10000, 4, 0x1111)
    phys.write(0x12000, 4, 0x2222)


# mov rdx, [0x10000]; mov [0x11080], 0x12007 (remap page 0x10000 -> 0x12000); mov rbx, [0x10000];
# <invalidate>; mov rcx, [0x10000]; hlt
PREFIX = "488b142500000100b8072001004889042580100100488b1c2500000100"
PROGRAMS = {
    "invlpg": PREFIX + "0f013c2500000100" + "488b0c2500000100f4",  # invlpg [0x10000]
    "mov-cr3": PREFIX + "0f20d80f22d8" + "488b0c2500000100f4",  # mov rax, cr3; mov cr3, rax
    "cr4-pge": PREFIX + "0f20e04835800000000f22e0" + "488b0c2500000100f4",  # toggle CR4.PGE
}


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "host"])
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_guest_that_forgets_to_invalidate_sees_stale_translation(program: str, nested: bool) -> None:
    """Between the remap and the invalidation the guest (hardware TLB) reads the old page, the bare spec
    (no TLB) the new one; after the guest's own INVLPG / MOV CR3 / CR4 write both read the new page."""
    s = long64_guest(bytes.fromhex(PROGRAMS[program]), prepare=_remappable, nested=nested)
    regs = []
    for m in (s.bare, s.guest):
        ev = SpecCPU(m, deliver_exceptions=True).run(50)
        assert ev.kind == "halted"
        regs.append([CONCRETE.concrete(m.gpr[k]) for k in (2, 3, 1)])  # rdx, rbx, rcx
    bare, guest = regs
    assert bare == [0x1111, 0x2222, 0x2222]
    assert guest == [0x1111, 0x1111, 0x2222]


def test_recorded_events_still_recorded_in_guest_mode() -> None:
    recorded: list[tuple] = []
    s = long64_guest(bytes.fromhex(PROGRAMS["invlpg"]), prepare=_remappable)
    detach_guest_memory(s.guest)
    s.guest.tlb_events = recorded
    attach_guest_memory(s.guest, s.host, np_enable=True, ncr3=s.tables.root, host_ctl=HOST_CTL,  # type: ignore[union-attr]
                        tlb=s.tlb, asid=ASID)
    assert SpecCPU(s.guest, deliver_exceptions=True).run(50).kind == "halted"
    assert recorded == [("invlpg", 0x10000)]


# ---------------------------------------------------------------------------
# The VMM's flushes: nested tables and shadow tables
# ---------------------------------------------------------------------------

def _moved_host_page(s: GuestSetup) -> int:
    """A second host page holding 0xEE bytes, the new backing of DATA_GPA."""
    hpa = 0x3000_0000
    s.host.map_page(hpa, b"\xee" * PAGE)
    return hpa


def test_vmm_forgetting_tlb_control_after_nested_edit_sees_stale_page() -> None:
    """The VMM moves guest page DATA_GPA to another host page: until TLB_CONTROL the guest uses the old one --
    a guest INVLPG does not help (nested translations are not the guest's), a flush of its ASID does."""
    s = simple_guest()
    assert s.tables is not None and s.tlb is not None
    assert read(s) == DATA_GPA >> 12
    s.tables.set_entry(DATA_GPA, 1, _moved_host_page(s) | P | RW | US)
    assert read(s) == DATA_GPA >> 12  # the VMM forgot the flush: stale host page
    s.guest.tlb_events.append(("invlpg", DATA_LIN))  # type: ignore[union-attr]
    assert read(s) == DATA_GPA >> 12  # the guest cannot flush nested translations
    s.tlb.invlpga(DATA_LIN, ASID)
    assert read(s) == DATA_GPA >> 12  # nor does INVLPGA of the guest-linear page (spec/tlb.py)
    s.tlb.tlb_control(3, ASID)
    assert read(s) == 0xEE


@pytest.mark.parametrize("code", [1, 3, 7])
def test_tlb_control_flushes_nested_translations(code: int) -> None:
    s = simple_guest()
    assert s.tables is not None and s.tlb is not None
    read(s)
    s.tables.set_entry(DATA_GPA, 1, _moved_host_page(s) | P | RW | US)
    s.tlb.tlb_control(code, ASID)
    assert read(s) == 0xEE


def test_guest_control_register_changes_keep_nested_translations() -> None:
    """Guest CR0/CR4/EFER/CR3 events drop guest translations, never the nested ones (they are the VMM's)."""
    s = simple_guest()
    assert s.tables is not None and s.tlb is not None
    read(s)
    s.tables.set_entry(DATA_GPA, 1, _moved_host_page(s) | P | RW | US)
    for ev in (("cr3", s.guest.cr3), ("cr4", CR4_PAE, CR4_PAE | CR4_PGE), ("cr0", s.guest.cr0, s.guest.cr0 ^ CR0_WP),
               ("efer", s.guest.efer, s.guest.efer ^ (1 << 11))):
        s.guest.tlb_events.append(ev)  # type: ignore[union-attr]
    assert not s.tlb.entries and s.tlb.nested.entries
    assert read(s) == DATA_GPA >> 12


def test_vmm_forgetting_invlpga_after_shadow_edit_sees_stale_page() -> None:
    """Shadow-paging setting (no nested paging): the VMM retargets a shadow PTE; stale until INVLPGA."""
    s = _host_guest()
    assert s.tlb is not None
    assert read(s) == DATA_GPA >> 12
    guest_pte_write(s, OTHER_GPA | P | RW | US)  # here the "guest" tables are the VMM's shadow tables
    assert read(s) == DATA_GPA >> 12
    s.tlb.invlpga(DATA_LIN, ASID)
    assert read(s) == OTHER_GPA >> 12


# ---------------------------------------------------------------------------
# ASIDs: another guest's entries are never used, its own survive
# ---------------------------------------------------------------------------

def test_entries_of_another_asid_never_used() -> None:
    """Two guests on one TLB, the same linear page mapped to different frames: each sees only its own."""
    tlb = ModelTLB()
    host = PhysicalMemory()
    guests = []
    for asid, frame in ((1, 0x9000), (2, 0xA000)):
        phys = PhysicalMemory()
        for gpn in range(16):
            phys.map_page(gpn << 12, bytes([gpn]) * 16)
        base = asid * 0x10_0000  # each guest's tables at its own host pages
        t = {lv: base + lv * PAGE for lv in (1, 2, 3, 4)}
        for lv, a in t.items():
            phys.map_page(a)
            idx = (DATA_LIN >> (12 + 9 * (lv - 1))) & 0x1FF
            phys.write(a + 8 * idx, 8, (t[lv - 1] if lv > 1 else frame) | P | RW | US)
        for gpn, page in phys.pages.items():
            host.pages[gpn] = page
        st = MachineState.concrete(PhysicalMemory())
        st.cr0, st.cr3, st.cr4, st.efer = CR0_PG | CR0_PE, t[4], CR4_PAE, EFER_LME | EFER_LMA
        guests.append((asid, st))
    seen = []
    for asid, st in (*guests, *guests):
        attach_guest_memory(st, host, np_enable=False, ncr3=0, host_ctl=HOST_CTL, tlb=tlb, asid=asid)
        seen.append(st.mem.read(DATA_LIN, 1))
        detach_guest_memory(st)
        if len(seen) == 2:
            # Retarget both guests' PTEs without any flush: each guest's own cached entry must survive the
            # other guest's run, and must never be used by the other guest.
            host.write(1 * 0x10_0000 + PAGE + 8 * ((DATA_LIN >> 12) & 0x1FF), 8, 0xB000 | P | RW | US)
            host.write(2 * 0x10_0000 + PAGE + 8 * ((DATA_LIN >> 12) & 0x1FF), 8, 0xC000 | P | RW | US)
    assert seen == [0x9, 0xA, 0x9, 0xA]
    assert {e.asid for e in tlb.entries.values()} == {1, 2}
    tlb.tlb_control(3, 1)
    assert {e.asid for e in tlb.entries.values()} == {2}


def test_nested_tlb_tagged_by_asid() -> None:
    """The same nested tables under two ASIDs: a VMM flushing one ASID leaves the other's nested entries."""
    s = simple_guest()
    assert s.tables is not None and s.tlb is not None
    read(s)
    detach_guest_memory(s.guest)
    attach_guest_memory(s.guest, s.host, np_enable=True, ncr3=s.tables.root, host_ctl=HOST_CTL, tlb=s.tlb,
                        asid=ASID + 1)
    read(s)
    s.tables.set_entry(DATA_GPA, 1, _moved_host_page(s) | P | RW | US)
    s.tlb.tlb_control(3, ASID + 1)
    assert read(s) == 0xEE  # ASID+1 flushed
    detach_guest_memory(s.guest)
    attach_guest_memory(s.guest, s.host, np_enable=True, ncr3=s.tables.root, host_ctl=HOST_CTL, tlb=s.tlb,
                        asid=ASID)
    assert read(s) == DATA_GPA >> 12  # ASID's nested entry (and guest entry) untouched


# ---------------------------------------------------------------------------
# Without a TLB nothing changes
# ---------------------------------------------------------------------------

def test_plain_machine_has_no_tlb() -> None:
    st = flat_machine("long64")
    assert type(st.mem) is MMU and st.mem.tlb is None and st.tlb_events is None
    guest_mmu = simple_guest().guest.mem
    assert type(guest_mmu).translate is not MMU.translate and guest_mmu.tlb is not None
