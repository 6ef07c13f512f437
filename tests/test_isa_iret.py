"""IRET / IRETD / IRETQ (spec/isa/far.py).

Rules pinned (SDM Vol. 2A IRET/IRETD/IRETQ "Operation" and exception lists; Vol. 3A 6.14.3, 20.1,
20.4; APM Vol. 3 IRET): the frame each mode pops and the exact stack consumption, the RFLAGS bits
each path may write (an independent plain-int reference, :func:`iret_flags_ref`), the return-CS
and return-SS checks with their error codes, the null-SS rules of IA-32e mode, the return to
virtual-8086 mode, data-segment nulling on an outer return, RF, NMI unblocking, and the round trip
with exception delivery (spec/interrupts.py) pushing the frame.  A symbolic twin proves that the
six status flags after IRET are the image's bits for every image.  GDT and helpers come from
tests/test_isa_far.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE
from spec.state import MachineState, Segment
from spec.symexec import symbolic_state
from tests.conftest import check
from tests.test_isa_far import (
    CS,
    DS,
    ENTRIES,
    ES,
    FS,
    GP,
    GS,
    NP,
    SS,
    SSF,
    assert_fault,
    cache,
    machine,
    push_frame,
    put,
    rflags,
    rsp,
    step,
    v86_machine,
)

CF, TF, IF, DF, NT, RF, VM, AC, VIF, VIP, ID = (1 << f for f in (F.CF, F.TF, F.IF, F.DF, F.NT, F.RF, F.VM, F.AC,
                                                                  F.VIF, F.VIP, F.ID))
IOPL = 3 << 12
STATUS = 0x8D5
DEFINED = 0x3F7FD5  # every defined RFLAGS bit except bit 1 (SDM Vol. 1 Figure 3-8)


def iret_flags_ref(old: int, img: int, size: int, cpl: int) -> int:
    """RFLAGS after a protected/IA-32e-mode IRET (SDM Vol. 2A IRET "RETURN-TO-SAME/OUTER-PRIVILEGE-LEVEL"),
    by the CPL and IOPL before it."""
    m = STATUS | TF | DF | NT
    if size != 16:
        m |= RF | AC | ID
    if cpl <= (old >> 12) & 3:
        m |= IF
    if cpl == 0:
        m |= IOPL
        if size != 16:
            m |= VIF | VIP
    return (old & ~m) | (img & m) | 2


def set_flags(s: MachineState, value: int) -> None:
    s.write_rflags(value | 2)


# -- encodings -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "code", "text", "size"), [
    ("real", "cf", "iret", 16), ("real", "66cf", "iretd", 32), ("prot32", "cf", "iretd", 32),
    ("prot32", "66cf", "iret", 16), ("long64", "cf", "iretd", 32), ("long64", "48cf", "iretq", 64),
    ("long64", "66cf", "iret", 16)])
def test_encodings(mode: str, code: str, text: str, size: int) -> None:
    check(mode, code, text)
    insn = decode(bytes.fromhex(code), BITS[mode])
    assert (insn.mnemonic, insn.opsize, insn.name) == ("IRET", size, text.upper())


# -- real-address mode --------------------------------------------------------------------------------

_OLD = st.integers(0, 0xFFFF_FFFF).map(lambda v: v & DEFINED & ~(TF | VM | NT))


@given(img=st.integers(0, 0xFFFF_FFFF), old=_OLD, wide=st.booleans(), sel=st.integers(0, 0x6FF))
@settings(max_examples=80)
def test_real_iret(img: int, old: int, wide: bool, sel: int) -> None:
    """IRET pops IP, CS, FLAGS[15:0]; IRETD pops EIP, CS, EFLAGS with ``(tempEFLAGS AND 257FD5H) OR (EFLAGS AND
    1A0000H)`` (SDM Vol. 2A IRET "REAL-ADDRESS-MODE")."""
    n = 4 if wide else 2
    s = machine("real", ("66" if wide else "") + "cf")
    set_flags(s, old)
    push_frame(s, [0x0123, 0xFFFF_0000 | sel, img], n)
    assert step(s) is None
    assert (s.rip, s.seg[CS].selector, s.seg[CS].base, rsp(s)) == (0x0123, sel, sel << 4, 0x8000)
    if wide:
        expect = (img & 0x257FD5) | (old & 0x1A0000) | 2
    else:
        expect = (old & 0xFFFF_0000) | (img & 0x7FD5) | 2
    assert rflags(s) == expect


def test_real_iret_ip_beyond_limit() -> None:
    """IRETD popping an EIP beyond CS.limit: #GP(0) (SDM Vol. 2A IRET "Real-Address Mode Exceptions")."""
    s = machine("real", "66cf")
    push_frame(s, [0x1_0000, 0, 0x2], 4)
    assert_fault(s, GP, 0)


# -- virtual-8086 mode --------------------------------------------------------------------------------

@given(img=st.integers(0, 0xFFFF_FFFF), wide=st.booleans(), vif=st.booleans())
@settings(max_examples=40)
def test_v86_iret_iopl3(img: int, wide: bool, vif: bool) -> None:
    """IOPL = 3: as in real mode, but IOPL (and VM, VIF, VIP) are not modified (SDM Vol. 2A IRET
    "RETURN-FROM-VIRTUAL-8086-MODE")."""
    n = 4 if wide else 2
    s = v86_machine(("66" if wide else "") + "cf", iopl=3)
    s.rflags_sys |= VIF if vif else 0
    old = rflags(s)
    push_frame(s, [0x0010, 0x0200, img], n)
    assert step(s) is None
    assert (s.rip, s.seg[CS].selector, s.seg[CS].base) == (0x10, 0x200, 0x2000)
    mask = (0x257FD5 if wide else 0x7FD5) & ~IOPL
    assert rflags(s) == (old & ~mask) | (img & mask) | 2
    assert s.cpl == 3


@pytest.mark.parametrize(("vme", "wide", "img", "vip", "outcome"), [
    (False, False, 0x0002, False, (GP, 0)),       # IOPL < 3 without VME: trap to the monitor
    (True, True, 0x0002, False, (GP, 0)),         # IRETD with VME: still #GP(0)
    (True, False, TF | 2, False, (GP, 0)),        # VME: setting TF faults
    (True, False, IF | 2, True, (GP, 0)),         # VME: IF = 1 with VIP = 1 faults
    (True, False, IF | CF | 2, False, None),      # VME: VIF <- IF, IF unchanged
    (True, False, CF | IOPL | 2, True, None),     # VME: VIF <- 0, IOPL unchanged
])
def test_v86_iret_iopl_below_3(vme: bool, wide: bool, img: int, vip: bool, outcome: tuple[int, int] | None) -> None:
    """IOPL < 3 (SDM Vol. 2A IRET; Vol. 3A 20.4 virtual-8086 mode extensions, as POPF)."""
    s = v86_machine(("66" if wide else "") + "cf", iopl=1)
    s.cr4 |= 1 if vme else 0
    s.rflags_sys |= (VIP if vip else 0) | VIF
    push_frame(s, [0x0010, 0x0200, img], 4 if wide else 2)
    if outcome is not None:
        assert_fault(s, *outcome)
        return
    old = rflags(s)
    assert step(s) is None
    base = STATUS | TF | DF | NT
    new = (old & ~base & ~VIF) | (img & base) | (VIF if img & IF else 0)
    assert rflags(s) == new
    assert s.seg[CS].base == 0x2000


# -- protected mode -------------------------------------------------------------------------------------

_IMG32 = st.integers(0, 0xFFFF_FFFF).map(lambda v: v & ~VM)
_OLD_PROT = st.integers(0, 0xFFFF_FFFF).map(lambda v: v & DEFINED & ~(TF | VM | NT))


@given(img=_IMG32, old=_OLD_PROT, wide=st.booleans())
@settings(max_examples=60)
def test_prot32_iret_same_privilege_cpl0(img: int, old: int, wide: bool) -> None:
    """CPL 0, RPL 0: EIP, CS, EFLAGS popped (12 or 6 bytes), no stack switch; RFLAGS per the CPL/IOPL rules."""
    n = 4 if wide else 2
    s = machine("prot32", "cf" if wide else "66cf")
    set_flags(s, old)
    push_frame(s, [0x2000, 0x08, img], n)
    assert step(s) is None
    assert (s.rip, s.seg[CS].selector, rsp(s), s.cpl) == (0x2000, 0x08, 0x8000, 0)
    assert rflags(s) == iret_flags_ref(old, img & ((1 << (8 * n)) - 1), 8 * n, 0)


@given(img=_IMG32, old=_OLD_PROT, cpl=st.sampled_from([1, 2, 3]))
@settings(max_examples=60)
def test_prot32_iret_same_privilege_outer_cpl(img: int, old: int, cpl: int) -> None:
    """At CPL > 0: IOPL, VIF, VIP never change; IF only if CPL <= IOPL (SDM Vol. 2A IRET)."""
    code_sel = {1: 0xB9, 2: 0x112, 3: 0x1B}[cpl]
    data_sel = {1: 0xA9, 2: 0x10A, 3: 0x23}[cpl]
    s = machine("prot32", "cf")
    s.seg[CS], s.seg[SS] = cache(code_sel), cache(data_sel)
    set_flags(s, old)
    push_frame(s, [0x2000, code_sel, img], 4)
    assert step(s) is None
    assert (s.rip, s.cpl, rsp(s)) == (0x2000, cpl, 0x8000)
    assert rflags(s) == iret_flags_ref(old, img, 32, cpl)


def test_prot16_iret() -> None:
    """16-bit code: IRET pops word slots; IRETD (66 CF) doubleword slots."""
    s = machine("prot16", "cf")
    push_frame(s, [0x2000, 0x28, 0xFFFF], 2)
    assert step(s) is None and rsp(s) == 0x8000 and rflags(s) == 0x7FD7
    s = machine("prot16", "66cf")
    push_frame(s, [0x2000, 0x08, AC | CF | 2], 4)
    assert step(s) is None and rsp(s) == 0x8000 and s.code_bits == 32 and rflags(s) == AC | CF | 2


def _outer_prot32(code: str = "cf") -> MachineState:
    s = machine("prot32", code)
    s.seg[DS], s.seg[ES], s.seg[FS], s.seg[GS] = cache(0x10), cache(0x23), cache(0x30), cache(0x08)
    return s


@pytest.mark.parametrize("wide", [True, False])
def test_prot32_iret_to_cpl3(wide: bool) -> None:
    """CPL 0 -> 3: EIP, CS, EFLAGS, ESP, SS popped (20 or 10 bytes); SS:ESP switched; DS/GS (DPL 0 data,
    non-conforming code) nulled, ES (DPL 3) and FS (conforming) kept (SDM Vol. 2A IRET
    "RETURN-TO-OUTER-PRIVILEGE-LEVEL")."""
    n = 4 if wide else 2
    s = _outer_prot32("cf" if wide else "66cf")
    img = IF | IOPL | CF | 2 | (VIF | AC if wide else 0)
    push_frame(s, [0x2000, 0x1B, img, 0x6000, 0x23], n)
    assert step(s) is None
    assert (s.rip, s.cpl, s.seg[CS].selector, s.seg[SS].selector, rsp(s)) == (0x2000, 3, 0x1B, 0x23, 0x6000)
    assert rflags(s) == img
    assert (s.seg[DS].unusable, s.seg[GS].unusable, s.seg[ES].unusable, s.seg[FS].unusable) == (
        True, True, False, False)
    assert s.seg[DS].selector == 0 and s.seg[GS].selector == 0


@pytest.mark.parametrize(("slots", "outcome"), [
    ([0x2000, 0x00, 2, 0x6000, 0x23], (GP, 0)),         # null CS
    ([0x2000, 0x20, 2, 0x6000, 0x23], (GP, 0x20)),      # CS is data
    ([0x2000, 0x4B, 2, 0x6000, 0x23], (GP, 0x48)),      # non-conforming DPL 0 != RPL 3
    ([0x2000, 0x48, 2, 0x6000, 0x23], (NP, 0x48)),      # not present
    ([0x2000, 0x1B, 2, 0x6000, 0x00], (GP, 0)),         # null SS
    ([0x2000, 0x1B, 2, 0x6000, 0x20], (GP, 0x20)),      # SS RPL != CS RPL
    ([0x2000, 0x1B, 2, 0x6000, 0xAB], (GP, 0xA8)),      # SS DPL 1 != 3
    ([0x2000, 0x1B, 2, 0x6000, 0x5B], (GP, 0x58)),      # read-only SS
    ([0x2000, 0x1B, 2, 0x6000, 0xC3], (SSF, 0xC0)),     # SS not present: #SS(selector)
    ([0x1_0000, 0xA3, 2, 0x6000, 0x23], (GP, 0)),       # EIP beyond the 16-bit code limit
])
def test_prot32_iret_faults(slots: list[int], outcome: tuple[int, int]) -> None:
    """Return-CS and return-SS checks (SDM Vol. 2A IRET "Protected Mode Exceptions"); no trace on a fault."""
    s = _outer_prot32()
    push_frame(s, slots, 4)
    assert_fault(s, *outcome)


def test_prot32_iret_rpl_below_cpl() -> None:
    s = machine("prot32", "cf", cpl=3)
    push_frame(s, [0x2000, 0x08, 2], 4)
    assert_fault(s, GP, 0x08)


def test_prot_iret_nt_is_task_return() -> None:
    """NT = 1 in protected mode: a task return (not modelled); in IA-32e mode #GP(0) (SDM Vol. 2A IRET)."""
    s = machine("prot32", "cf")
    s.rflags_sys |= NT
    push_frame(s, [0x2000, 0x08, 2], 4)
    ev = step(s)
    assert ev is not None and ev.kind == "unimplemented" and "task return" in ev.detail
    s = machine("long64", "48cf")
    s.rflags_sys |= NT
    push_frame(s, [0x2000, 0x60, 2, 0x8000, 0x10], 8)
    assert_fault(s, GP, 0)


# -- return to virtual-8086 mode ---------------------------------------------------------------------------

def test_iret_to_v86() -> None:
    """CPL 0, IRETD with VM = 1 in the image: ESP, SS, ES, DS, FS, GS follow in 32-bit slots; every segment
    register becomes a virtual-8086 segment (SDM Vol. 2A IRET "RETURN-TO-VIRTUAL-8086-MODE"; Vol. 3A 20.2.1)."""
    s = machine("prot32", "cf")
    img = VM | IOPL | IF | VIP | CF | 2
    push_frame(s, [0x0100, 0x0100, img, 0x0FF0, 0x0700, 0x0123, 0x0234, 0xFFFF_0345, 0x0456], 4)
    assert step(s) is None
    assert (s.rip, s.cpl, rflags(s), rsp(s)) == (0x0100, 3, img, 0x0FF0)
    for r, sel in ((CS, 0x100), (SS, 0x700), (ES, 0x123), (DS, 0x234), (FS, 0x345), (GS, 0x456)):
        g = s.seg[r]
        assert (g.selector, g.base, g.limit, g.dpl, g.p, g.unusable) == (sel, sel << 4, 0xFFFF, 3, 1, False)
    assert s.code_bits == 16 and s.stack_bits == 16


def test_iret_to_v86_ip_beyond_64k() -> None:
    s = machine("prot32", "cf")
    push_frame(s, [0x1_0000, 0x0100, VM | 2, 0x0FF0, 0x0700, 0, 0, 0, 0], 4)
    assert_fault(s, GP, 0)


def test_iret_vm_ignored_at_cpl3_and_in_long_mode() -> None:
    """VM in the image only matters at CPL 0 outside IA-32e mode; otherwise VM is never written."""
    s = machine("prot32", "cf", cpl=3)
    push_frame(s, [0x2000, 0x1B, VM | CF | 2], 4)
    assert step(s) is None and not s.rflags_sys & VM and rsp(s) == 0x8000
    s = machine("long64", "48cf")
    push_frame(s, [0x2000, 0x60, VM | CF | 2, 0x7000, 0x10], 8)
    assert step(s) is None and not s.rflags_sys & VM and s.code_bits == 64


# -- IA-32e mode ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "n"), [("48cf", 8), ("cf", 4), ("66cf", 2)])
@pytest.mark.parametrize("ss", [0x10, 0x00])
def test_long64_iret_same_privilege_pops_ss_rsp(code: str, n: int, ss: int) -> None:
    """From 64-bit mode every IRET pops SS:RSP, even at the same privilege (SDM Vol. 2A IRET "IA-32e-MODE";
    Vol. 3A 6.14.3); a null SS with RPL = CPL = 0 is accepted (Vol. 3A 3.4.4)."""
    s = machine("long64", code)
    push_frame(s, [0x2000, 0x60, CF | 2, 0x7000, ss], n)
    assert step(s) is None
    assert (s.rip, s.cpl, rsp(s), s.seg[SS].selector, s.seg[SS].unusable) == (0x2000, 0, 0x7000, ss, ss == 0)
    assert rflags(s) == CF | 2


@given(img=st.integers(0, (1 << 64) - 1).map(lambda v: v & ~VM), old=_OLD_PROT,
       to=st.sampled_from([(0x6B, 0x23, 64), (0x1B, 0x23, 32), (0xA3, 0xB3, 16)]))
@settings(max_examples=40)
def test_long64_iretq_to_cpl3(img: int, old: int, to: tuple[int, int, int]) -> None:
    """IRETQ from CPL 0 to CPL 3 64-bit, compatibility or 16-bit code: 40 bytes popped, RSP from the frame at the
    new stack width (a 16-bit SS sets SP only), RFLAGS per the CPL-0 rules (SDM Vol. 2A IRET)."""
    cs, ss, bits = to
    s = machine("long64", "48cf")
    s.seg[DS] = cache(0x10)
    set_flags(s, old)
    s.gpr[4] = 0x1_7F00
    s.mem.phys.map_page(0x1_7000)
    push_frame(s, [0x2000, cs, img, 0x1234_5678_6000, ss], 8)
    assert step(s) is None
    assert (s.rip, s.cpl, s.code_bits, s.seg[SS].selector) == (0x2000, 3, bits, ss)
    expect_sp = {64: 0x1234_5678_6000, 32: 0x5678_6000, 16: 0x1_6000}[bits]
    assert rsp(s) == expect_sp
    assert rflags(s) == iret_flags_ref(old, img, 64, 0)
    assert s.seg[DS].unusable


@pytest.mark.parametrize(("code", "n", "slots", "outcome"), [
    ("48cf", 8, [0x0000_8000_0000_0000, 0x60, 2, 0x7000, 0x10], (GP, 0)),    # non-canonical RIP
    ("48cf", 8, [0x2000, 0x6B, 2, 0x7000, 0x03], (GP, 0)),                   # null SS to CPL 3
    ("48cf", 8, [0x2000, 0x08, 2, 0x7000, 0x00], (GP, 0)),                   # null SS to compatibility mode
    ("48cf", 8, [0x2000, 0xE9, 2, 0x7000, 0x00], (GP, 0)),                   # null SS RPL 0 != new CPL 1
    ("48cf", 8, [0x2000, 0x70, 2, 0x7000, 0x10], (GP, 0x70)),                # L = D = 1
    ("48cf", 8, [0x2000, 0x60, 2, 0x7000, 0x13], (GP, 0x10)),                # SS RPL 3 != CPL 0
    ("48cf", 8, [0x2000, 0x60, 2, 0x7000, 0x50], (SSF, 0x50)),               # SS not present
    ("cf", 4, [0x2000, 0x40, 2, 0x7000, 0x10], (GP, 0)),                     # EIP beyond a compatibility limit
    ("cf", 4, [0x1FF0, 0x40, 2, 0x7000, 0x10], None),                        # ... and within it
])
def test_long64_iret_faults(code: str, n: int, slots: list[int], outcome: tuple[int, int] | None) -> None:
    """SDM Vol. 2A IRET "64-Bit Mode Exceptions": #GP(0) for a non-canonical RIP and the null-SS cases."""
    s = machine("long64", code)
    push_frame(s, slots, n)
    if outcome is None:
        assert step(s) is None and s.code_bits == 32
    else:
        assert_fault(s, *outcome)


def test_long64_iret_null_ss_to_cpl1() -> None:
    """A null SS with RPL = new CPL < 3 returning to 64-bit code is loaded (SDM Vol. 3A 3.4.4): SS.DPL = CPL."""
    s = machine("long64", "48cf")
    push_frame(s, [0x2000, 0xE9, 2, 0x7000, 0x01], 8)
    assert step(s) is None
    assert (s.cpl, s.seg[SS].selector, s.seg[SS].unusable, s.seg[CS].selector) == (1, 0x01, True, 0xE9)


@pytest.mark.parametrize(("cpl_to", "n_popped"), [(0, 12), (3, 20)])
def test_compat_mode_iret(cpl_to: int, n_popped: int) -> None:
    """Compatibility mode: SS:ESP is popped only on a return to an outer level (SDM Vol. 2A IRET "IA-32e-MODE":
    "IF instruction began in 64-Bit Mode" governs the same-level pop)."""
    s = machine("compat", "cf")
    cs = 0x08 if cpl_to == 0 else 0x1B
    push_frame(s, [0x2000, cs, 2, 0x6000, 0x23], 4)
    sp0 = rsp(s)
    assert step(s) is None
    assert s.cpl == cpl_to and s.code_bits == 32
    assert rsp(s) == (sp0 + n_popped if cpl_to == 0 else 0x6000)


def test_iret_compat_to_64bit() -> None:
    """From compatibility mode to a 64-bit code segment at the same level (no SS pop)."""
    s = machine("compat", "cf")
    push_frame(s, [0x2000, 0x60, 2], 4)
    assert step(s) is None and s.code_bits == 64 and rsp(s) == 0x8000


# -- RF, NMI blocking ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "code", "n", "slots"), [
    ("prot32", "cf", 4, [0x2000, 0x08, RF | 2]), ("long64", "48cf", 8, [0x2000, 0x60, RF | 2, 0x7000, 0x10]),
    ("real", "66cf", 4, [0x2000, 0, RF | 2])])
def test_iret_loads_rf(mode: str, code: str, n: int, slots: list[int]) -> None:
    """IRETD/IRETQ load RF from the image and the CPU does not clear it as the IRET retires (SDM Vol. 3A
    17.3.1.1); a 16-bit IRET leaves RF alone."""
    s = machine(mode, code)
    push_frame(s, slots, n)
    assert step(s) is None and s.rflags_sys & RF
    s = machine("prot32", "66cf")
    push_frame(s, [0x2000, 0x08, 2], 2)
    s.rflags_sys |= RF
    assert step(s) is None and s.rflags_sys & RF


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_iret_unblocks_nmi(mode: str) -> None:
    """An IRET that completes ends NMI blocking (SDM Vol. 3A 6.7.1); one that faults does not."""
    s = machine(mode, "48cf" if mode == "long64" else "cf")
    frame = {"real": [0x2000, 0, 2], "prot32": [0x2000, 0x08, 2], "long64": [0x2000, 0x60, 2, 0x7000, 0x10]}
    push_frame(s, frame[mode], {"real": 2, "prot32": 4, "long64": 8}[mode])
    s.nmi_blocked = True
    assert step(s) is None and not s.nmi_blocked
    s = machine("prot32", "cf")
    push_frame(s, [0x2000, 0x00, 2], 4)
    s.nmi_blocked = True
    assert step(s) is not None and s.nmi_blocked


# -- round trips with exception delivery (spec/interrupts.py pushes the frame IRET pops) ---------------------------

IDT, TSS = 0x21000, 0x23000


def _gate32(off: int, sel: int, dpl: int) -> int:
    """32-bit interrupt gate (SDM Vol. 3A Figure 6-2)."""
    return (off & 0xFFFF) | (sel << 16) | ((0xE | dpl << 5 | 0x80) << 40) | ((off >> 16) << 48)


def _gate64(off: int, sel: int, dpl: int) -> int:
    """64-bit interrupt gate, 16 bytes (SDM Vol. 3A Figure 6-8)."""
    return _gate32(off, sel, dpl) | ((off >> 32) << 64)


def _delivery_machine(mode: str, user_code: str) -> MachineState:
    s = machine(mode, user_code, cpl=3)
    s.mem.phys.map_page(IDT)
    s.mem.phys.map_page(TSS)
    if mode == "long64":
        s.mem.phys.write(IDT + 16 * 0x80, 16, _gate64(0x2000, 0x60, 3))
        s.idtr.base, s.idtr.limit = IDT, 16 * 0x81 - 1
        s.mem.phys.write(TSS + 4, 8, 0x7000)  # RSP0
        s.tr = Segment(selector=0x80, base=TSS, limit=0x67, type=0xB, s=0)
        put(s, 0x2000, "48cf")
    else:
        s.mem.phys.write(IDT + 8 * 0x80, 8, _gate32(0x2000, 0x08, 3))
        s.idtr.base, s.idtr.limit = IDT, 8 * 0x81 - 1
        s.mem.phys.write(TSS + 4, 4, 0x7000)  # ESP0
        s.mem.phys.write(TSS + 8, 2, 0x10)  # SS0
        s.tr = Segment(selector=0x80, base=TSS, limit=0x67, type=0xB, s=0)
        put(s, 0x2000, "cf")
    return s


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_int_then_iret_round_trip_cpl3(mode: str) -> None:
    """INT 80H from CPL 3 through a DPL-3 interrupt gate to a CPL-0 handler that only IRETs: the user state comes
    back exactly (the frame layout of delivery and of IRET agree, SDM Vol. 3A 6.12.1, 6.14.2)."""
    s = _delivery_machine(mode, "cd80 90")
    set_flags(s, IF | CF | AC)
    cpu = SpecCPU(s, deliver_exceptions=True)
    before = (rflags(s), rsp(s), [g.copy() for g in s.seg])
    assert cpu.step() is None
    assert s.cpl == 0 and s.rip == 0x2000 and not s.rflags_sys & IF
    assert rsp(s) == 0x7000 - (40 if mode == "long64" else 20)
    assert cpu.step() is None
    assert s.rip == 0x1002 and s.cpl == 3
    assert (rflags(s), rsp(s)) == before[:2]
    for r in (CS, SS, DS, ES):
        assert s.seg[r].selector == before[2][r].selector and s.seg[r].dpl == before[2][r].dpl


def test_int_then_iret_round_trip_real() -> None:
    """Real mode: INT pushes FLAGS, CS, IP through the IVT; IRET restores them (SDM Vol. 3A 20.1.4)."""
    s = machine("real", "cd80 90")
    s.mem.phys.write(0x80 * 4, 4, (0x0100 << 16) | 0x1000)  # handler 0100:1000 = linear 2000H
    put(s, 0x2000, "cf")
    set_flags(s, IF | CF)
    cpu = SpecCPU(s, deliver_exceptions=True)
    assert cpu.step() is None and s.seg[CS].selector == 0x100 and rsp(s) == 0x8000 - 6
    assert cpu.step() is None
    assert (s.rip, s.seg[CS].selector, rsp(s), rflags(s)) == (0x1002, 0, 0x8000, IF | CF | 2)


# -- symbolic twin: status flags come from the image, for every image ------------------------------------------

def _sym_iret(D: SymbolicDomain, mode: str, code: str, n: int, frame: list[int]) -> tuple[MachineState, Any]:
    """IRET on a symbolic state whose stack holds ``frame`` with the FLAGS slot's status bits symbolic."""
    s, _ = symbolic_state(D, mode)  # type: ignore[arg-type]
    s.gpr[4] = D.const(64, 0x7000)
    s.gdtr.base, s.gdtr.limit = 0, 0xFFFF
    for sel in (0x08, 0x10, 0x60):
        s.mem.write(sel, 8, D.const(64, ENTRIES[sel]), False)
    img = D.var(8 * n, "img")
    w = 8 * n
    for k, v in enumerate(frame):
        value = D.const(w, v)
        if k == 2:
            value = D.or_(w, D.and_(w, img, D.const(w, STATUS)), value)
        s.mem.write(0x7000 + n * k, n, value, False)
    insn = decode(bytes.fromhex(code), BITS[mode])
    x = Exec(s)
    x.i = insn
    x.next_rip = CODE + insn.length
    SEMANTICS["IRET"].fn(x, insn)
    return s, img


@pytest.mark.parametrize(("mode", "code", "n", "frame"), [
    ("real", "cf", 2, [0x2000, 0, 2]), ("real", "66cf", 4, [0x2000, 0, 2]),
    ("prot32", "cf", 4, [0x2000, 0x08, 2]), ("long64", "48cf", 8, [0x2000, 0x60, 2, 0x7000, 0x10])])
def test_symbolic_iret_status_flags(mode: str, code: str, n: int, frame: list[int]) -> None:
    """For all images: CF PF AF ZF SF OF after IRET equal the popped bits, and none is left undefined."""
    paths = explore(lambda D: _sym_iret(D, mode, code, n, frame))
    assert len(paths) == 1
    s, img = paths[0].result
    assert s.undefined == 0
    for f in F.STATUS:
        assert prove(s.get_flag(f) == (z3.Extract(f, f, img) == 1)) is None
