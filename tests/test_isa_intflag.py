"""CLI, STI (IOPL sensitivity, PVI/VME virtual interrupts, the STI shadow) and HLT's privilege check.

References: SDM Vol. 2A CLI, Vol. 2B STI ("Operation" and their decision
tables), Vol. 2A HLT; SDM Vol. 3A 20.3 (VME), 20.4 (PVI); APM Vol. 3 CLI, STI,
HLT.  The matrix tests compare every combination of mode, CPL, IOPL, CR4.PVI /
CR4.VME and VIP with a plain model of the manuals' decision tables written
here.  Encodings (FA CLI, FB STI, F4 HLT) are checked with iced-x86.
"""

from __future__ import annotations

import itertools

import pytest
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.faults import Vector
from spec.machine import BITS, CODE, MODES, USER_CS, USER_DS, flat_machine
from spec.state import MachineState, Segment

M32 = 0xFFFF_FFFF
IF, VIF, VIP, VM = 1 << F.IF, 1 << F.VIF, 1 << F.VIP, 1 << F.VM
CR4_VME, CR4_PVI = 1, 2
PROT_MODES = ("prot16", "prot32", "long64")


def test_encodings() -> None:
    fmt = Formatter(FormatterSyntax.INTEL)
    for mode in MODES:
        for code, text in ((b"\xfa", "cli"), (b"\xfb", "sti"), (b"\xf4", "hlt")):
            assert fmt.format(Decoder(BITS[mode], code).decode()) == text


def machine(mode: str, code: bytes, *, cpl: int = 0, iopl: int = 0, rflags: int = 0, cr4: int = 0,
            vm: bool = False) -> MachineState:
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    bits = BITS[mode]
    if cpl and mode != "real":
        def seg(code_seg: bool) -> Segment:
            sel = ((USER_CS if code_seg else USER_DS) & ~3) | cpl
            return Segment(selector=sel, base=0, limit=M32, type=0xB if code_seg else 0x3, s=1, dpl=cpl, p=1,
                           l=int(code_seg and bits == 64), db=int(bits == 32 or (bits == 64 and not code_seg)), g=1)
        s.seg = [seg(k == 1) for k in range(6)]
    if vm:
        s.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0xB if k == 1 else 3, dpl=3) for k in range(6)]
        rflags |= VM
    s.rflags_sys |= rflags | iopl << F.IOPL_SHIFT
    s.cr4 |= cr4
    return s


def step(s: MachineState) -> StopEvent | None:
    return SpecCPU(s).step()


def gp0(ev: StopEvent | None) -> bool:
    return ev is not None and ev.kind == "fault" and ev.vector == Vector.GP and ev.error_code == 0


def expected(*, pe: bool, vm: bool, cpl: int, iopl: int, cr4: int, vip: bool, sti: bool) -> int | None:
    """The decision tables of SDM Vol. 2A CLI / Vol. 2B STI: the bit changed, or None for #GP(0)."""
    if not pe:
        return IF
    if vm:
        if iopl == 3:
            return IF
        ok = cr4 & CR4_VME and not (sti and vip)
        return VIF if ok else None
    if iopl >= cpl:
        return IF
    ok = cpl == 3 and cr4 & CR4_PVI and not (sti and vip)
    return VIF if ok else None


@pytest.mark.parametrize("mode", PROT_MODES)
@pytest.mark.parametrize("sti", [False, True])
def test_protected_mode_matrix(mode: str, sti: bool) -> None:
    """Every CPL x IOPL x PVI x VIP combination in protected, compatibility-free 16/32-bit and 64-bit mode."""
    for cpl, iopl, pvi, vip in itertools.product(range(4), range(4), (0, CR4_PVI), (False, True)):
        start = (0 if sti else IF | VIF) | (VIP if vip else 0)
        s = machine(mode, b"\xfb" if sti else b"\xfa", cpl=cpl, iopl=iopl, rflags=start, cr4=pvi)
        ev = step(s)
        bit = expected(pe=True, vm=False, cpl=cpl, iopl=iopl, cr4=pvi, vip=vip, sti=sti)
        case = (cpl, iopl, pvi, vip)
        if bit is None:
            assert gp0(ev) and s.rip == CODE, case
            assert s.rflags_sys & (IF | VIF) == start & (IF | VIF), case
        else:
            assert ev is None and s.rip == CODE + 1, case
            other = (IF | VIF) ^ bit
            assert bool(s.rflags_sys & bit) == sti, case  # the chosen bit changes ...
            assert s.rflags_sys & other == start & other, case  # ... and only it


@pytest.mark.parametrize("sti", [False, True])
def test_virtual_8086_matrix(sti: bool) -> None:
    """Virtual-8086 mode: IOPL 3 -> IF; else VME -> VIF (STI: not with VIP set); else #GP(0) (SDM Vol. 3A 20.3)."""
    for iopl, vme, vip in itertools.product(range(4), (0, CR4_VME), (False, True)):
        start = (0 if sti else IF | VIF) | (VIP if vip else 0)
        s = machine("prot32", b"\xfb" if sti else b"\xfa", iopl=iopl, rflags=start, cr4=vme, vm=True)
        ev = step(s)
        bit = expected(pe=True, vm=True, cpl=3, iopl=iopl, cr4=vme, vip=vip, sti=sti)
        case = (iopl, vme, vip)
        if bit is None:
            assert gp0(ev), case
        else:
            assert ev is None, case
            assert bool(s.rflags_sys & bit) == sti and s.rflags_sys & VM, case


def test_pvi_does_not_apply_below_cpl3() -> None:
    """PVI only virtualizes CPL 3: at CPL 1 or 2 with CPL > IOPL it is #GP(0) (SDM Vol. 3A 20.4)."""
    for cpl in (1, 2):
        assert gp0(step(machine("prot32", b"\xfa", cpl=cpl, iopl=0, cr4=CR4_PVI)))


def test_real_mode_always_changes_if() -> None:
    """Real-address mode: no privilege check; IOPL, PVI and VME do not matter."""
    for iopl in range(4):
        s = machine("real", b"\xfa\xfb\xfa", iopl=iopl, rflags=IF, cr4=CR4_PVI | CR4_VME)
        cpu = SpecCPU(s)
        assert cpu.step() is None and not s.rflags_sys & IF
        assert cpu.step() is None and s.rflags_sys & IF
        assert cpu.step() is None and not s.rflags_sys & IF


@pytest.mark.parametrize("mode", MODES)
def test_sti_shadow_only_from_if_clear(mode: str) -> None:
    """STI sets the interrupt shadow only when IF was 0 (SDM Vol. 2B STI); it lasts one instruction."""
    s = machine(mode, b"\xfb\x90")
    s.rflags_sys &= ~IF
    cpu = SpecCPU(s)
    assert cpu.step() is None and s.rflags_sys & IF and s.interrupt_shadow
    assert cpu.step() is None and not s.interrupt_shadow  # the NOP after STI ends it
    s = machine(mode, b"\xfb", rflags=IF)
    assert step(s) is None and not s.interrupt_shadow


def test_sti_setting_vif_has_no_shadow() -> None:
    s = machine("prot32", b"\xfb", cpl=3, cr4=CR4_PVI)
    assert step(s) is None and s.rflags_sys & VIF and not s.rflags_sys & IF and not s.interrupt_shadow


def test_no_status_flag_changes() -> None:
    s = machine("long64", b"\xfa\xfb")
    s.write_rflags(0xCD5)  # every status flag and DF set, IF clear
    before = [s.get_flag(f) for f in F.STATUS]
    cpu = SpecCPU(s)
    assert cpu.step() is None and cpu.step() is None
    assert [s.get_flag(f) for f in F.STATUS] == before


# -- HLT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_hlt_at_cpl0_halts(mode: str) -> None:
    s = machine(mode, b"")
    ev = step(s)
    assert ev is not None and ev.kind == "halted" and s.halted and s.rip == CODE + 1


@pytest.mark.parametrize("mode", PROT_MODES)
@pytest.mark.parametrize("cpl", [1, 2, 3])
def test_hlt_above_cpl0_faults(mode: str, cpl: int) -> None:
    """HLT is privileged: #GP(0) at CPL > 0, whatever IOPL (SDM Vol. 2A HLT)."""
    s = machine(mode, b"", cpl=cpl, iopl=3)
    ev = step(s)
    assert gp0(ev) and ev.rip == CODE and not s.halted  # type: ignore[union-attr]


def test_hlt_in_virtual_8086_faults() -> None:
    s = machine("prot32", b"", vm=True, iopl=3)
    assert gp0(step(s)) and not s.halted
