"""SYSCALL/SYSRET and SYSENTER/SYSEXIT, for the AMD (default) and Intel rules.

References: APM Vol. 2 6.1.1-6.1.2; APM Vol. 3 SYSCALL, SYSRET, SYSENTER,
SYSEXIT; SDM Vol. 2B SYSCALL, SYSRET, SYSENTER, SYSEXIT; SDM Vol. 3A 5.8.7-5.8.8.
The vendor differences pinned here are listed in the docstring of
:mod:`spec.isa.syscall`.  Encodings are checked with iced-x86.
"""

from __future__ import annotations

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.cpumodel import DEFAULT_FEATURES, CpuModel, build_leaves
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.isa.syscall import (
    IA32_SYSENTER_CS,
    IA32_SYSENTER_EIP,
    IA32_SYSENTER_ESP,
    MSR_CSTAR,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
)
from spec.machine import BITS, CODE, MODES, flat_machine
from spec.state import EFER_SCE, MachineState, Segment
from spec.symexec import symbolic_state
from tests.conftest import GPR, reg

M32, M64 = 0xFFFF_FFFF, (1 << 64) - 1
IF, TF, DF, RF, VM, AC, NT = (1 << f for f in (F.IF, F.TF, F.DF, F.RF, F.VM, F.AC, F.NT))
KERNEL = 0x3000  # kernel entry point (mapped in every flat machine)
SYSCALL, SYSRET, SYSRETQ = "0f05", "0f07", "480f07"
SYSENTER, SYSEXIT, SYSEXITQ = "0f34", "0f35", "480f35"
STAR = (0x20 << 48) | (0x08 << 32) | KERNEL  # SYSRET base 0x20, SYSCALL CS 0x08, legacy EIP = KERNEL
LSTAR, CSTAR = KERNEL, 0x5000  # 64-bit and compatibility-mode SYSCALL targets


def test_encodings() -> None:
    fmt = Formatter(FormatterSyntax.INTEL)
    for bits, code, text in ((64, SYSCALL, "syscall"), (64, SYSRET, "sysret"), (64, SYSRETQ, "sysretq"),
                             (32, SYSENTER, "sysenter"), (32, SYSEXIT, "sysexit"), (64, SYSEXITQ, "sysexitq")):
        assert fmt.format(Decoder(bits, bytes.fromhex(code)).decode()) == text


def user(mode: str, s: MachineState, *, compat: bool = False) -> None:
    """Switch ``s`` to CPL 3 (flat user segments 0x1B/0x23; ``compat``: 32-bit code in long mode)."""
    bits = BITS[mode]
    l64 = bits == 64 and not compat
    s.seg = [Segment(selector=0x23, base=0, limit=M32, type=3, s=1, dpl=3, p=1, db=int(bits != 16), g=1)
             for _ in range(6)]
    s.seg[1] = Segment(selector=0x1B, base=0, limit=M32, type=0xB, s=1, dpl=3, p=1, l=int(l64),
                       db=int(bits == 32 or compat), g=1)


def machine(mode: str, code: str, *, cpl: int = 0, compat: bool = False, sce: bool = True, kernel: str = "",
            rflags: int = 0, **regs: int) -> MachineState:
    """A flat machine with ``code`` at CODE and ``kernel`` at KERNEL, STAR/LSTAR/CSTAR/SYSENTER MSRs set."""
    s = flat_machine(mode, bytes.fromhex(code))  # type: ignore[arg-type]
    s.mem.phys.write_bytes(KERNEL, bytes.fromhex(kernel))
    if cpl == 3:
        user(mode, s, compat=compat)
    elif compat:
        s.seg[1] = Segment(selector=0x08, base=0, limit=M32, type=0xB, s=1, dpl=0, p=1, db=1, g=1)
    if sce:
        s.efer |= EFER_SCE
    s.msrs.update({MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_CSTAR: CSTAR, MSR_SFMASK: 0,
                   IA32_SYSENTER_CS: 0x08, IA32_SYSENTER_ESP: 0x6000, IA32_SYSENTER_EIP: KERNEL})
    s.rflags_sys |= rflags
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & M64
    return s


def fault(ev: StopEvent | None) -> tuple[int, int | None] | None:
    return None if ev is None else (ev.vector, ev.error_code)  # type: ignore[return-value]


def seg_tuple(sg: Segment) -> tuple[int, int, int, int, int, int, int, int, int]:
    return sg.selector, sg.base, sg.limit, sg.type, sg.s, sg.dpl, sg.p, sg.l, sg.db


KCODE64 = (0x08, 0, M32, 0xB, 1, 0, 1, 1, 0)
KCODE32 = (0x08, 0, M32, 0xB, 1, 0, 1, 0, 1)
KSTACK = (0x10, 0, M32, 0x3, 1, 0, 1, 0, 1)


# -- SYSCALL / SYSRET in long mode -----------------------------------------------------------
@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_syscall_sysret_round_trip(vendor: str) -> None:
    """User (CPL 3, 64-bit) -> SYSCALL -> kernel at LSTAR (CPL 0) -> SYSRETQ -> back after the SYSCALL."""
    s = machine("long64", SYSCALL + "90", cpl=3, kernel="b82a000000" + SYSRETQ, rflags=IF | DF | AC)
    s.msrs[MSR_SFMASK] = IF | DF | AC | TF
    cpu = SpecCPU(s, vendor=vendor)
    rflags0 = s.D.concrete(s.read_rflags())
    assert cpu.step() is None
    assert s.rip == KERNEL and s.cpl == 0
    assert seg_tuple(s.seg[1]) == KCODE64 and seg_tuple(s.seg[2]) == KSTACK
    assert reg(s, "rcx") == CODE + 2 and reg(s, "r11") == rflags0
    assert s.D.concrete(s.read_rflags()) == rflags0 & ~(IF | DF | AC)
    assert cpu.step() is None and reg(s, "rax") == 42
    assert cpu.step() is None
    assert s.rip == CODE + 2 and s.cpl == 3
    assert (s.seg[1].selector, s.seg[1].l, s.seg[1].db, s.seg[1].dpl) == (0x33, 1, 0, 3)
    assert (s.seg[2].selector, s.seg[2].dpl) == (0x2B, 3)
    assert s.D.concrete(s.read_rflags()) == rflags0
    assert cpu.step() is None and s.rip == CODE + 3  # the NOP runs in user mode


@settings(max_examples=60)
@given(status=st.integers(0, 0x8D5), sysbits=st.sampled_from([0, IF, DF, AC, NT, IF | AC | NT | (3 << 12)]),
       rf=st.booleans(), sfmask=st.integers(0, M64), vendor=st.sampled_from(["amd", "intel"]))
def test_syscall_rflags(status: int, sysbits: int, rf: bool, sfmask: int, vendor: str) -> None:
    """R11 = RFLAGS with RF clear; RFLAGS &= ~(SFMASK[31:0] | RF) (APM Vol. 3 SYSCALL; SDM Vol. 2B SYSCALL)."""
    s = machine("long64", SYSCALL, cpl=3)
    s.write_rflags((status & 0x8D5) | sysbits | (RF if rf else 0) | 2)
    s.msrs[MSR_SFMASK] = sfmask & ~TF  # TF would single-step the kernel's first instruction
    before = s.D.concrete(s.read_rflags())
    assert SpecCPU(s, vendor=vendor).step() is None
    assert reg(s, "r11") == before & ~RF
    assert s.D.concrete(s.read_rflags()) == (before & ~((sfmask & ~TF & M32) | RF)) | 2


@settings(max_examples=60)
@given(r11=st.integers(0, M64), vendor=st.sampled_from(["amd", "intel"]))
def test_sysret_rflags_from_r11(r11: int, vendor: str) -> None:
    """SYSRET: RFLAGS = (R11 & 3C7FD7H) | 2 -- RF, VM and reserved bits cleared (SDM Vol. 2B SYSRET)."""
    s = machine("long64", SYSRETQ, rcx=0x2000, r11=r11 & ~TF)
    assert SpecCPU(s, vendor=vendor).step() is None
    assert s.D.concrete(s.read_rflags()) == ((r11 & ~TF) & 0x3C7FD7) | 2


def test_syscall_sfmask_defines_masked_undefined_flags() -> None:
    """A status flag cleared through SFMASK is defined (0); an unmasked undefined flag stays undefined."""
    s = machine("long64", SYSCALL, cpl=3)
    s.undefined = (1 << F.CF) | (1 << F.OF)
    s.msrs[MSR_SFMASK] = 1 << F.CF
    assert SpecCPU(s).step() is None
    assert s.undefined == 1 << F.OF and not s.get_flag(F.CF)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code", [SYSCALL, SYSRET])
def test_sce_clear_is_ud(mode: str, code: str) -> None:
    """EFER.SCE = 0: SYSCALL and SYSRET are #UD in every mode (APM Vol. 3; SDM Vol. 2B)."""
    for vendor in ("amd", "intel"):
        s = machine(mode, code, sce=False)
        assert fault(SpecCPU(s, vendor=vendor).step()) == (Vector.UD, None)


@pytest.mark.parametrize("cpl", [1, 2, 3])
def test_sysret_above_cpl0_is_gp(cpl: int) -> None:
    for vendor in ("amd", "intel"):
        s = machine("long64", SYSRETQ, cpl=3, rcx=0x2000)
        if cpl != 3:
            s.seg[2] = Segment(selector=0x10 | cpl, base=0, limit=M32, type=3, s=1, dpl=cpl, p=1, db=1, g=1)
        ev = SpecCPU(s, vendor=vendor).step()
        assert fault(ev) == (Vector.GP, 0) and s.rip == CODE and s.cpl == cpl


def test_sysret_non_canonical_rcx_intel_faults_at_cpl0() -> None:
    """Intel: a 64-bit SYSRET to a non-canonical RCX is #GP(0) in ring 0, before any state changes."""
    s = machine("long64", SYSRETQ, rcx=0x0000_8000_0000_0000)
    ev = SpecCPU(s, vendor="intel").step()
    assert fault(ev) == (Vector.GP, 0) and s.rip == CODE and s.cpl == 0 and s.seg[1].selector == 0x08


def test_sysret_non_canonical_rcx_amd_faults_at_cpl3() -> None:
    """AMD: SYSRET completes; the fetch at the non-canonical RIP then faults #GP(0) at CPL 3."""
    s = machine("long64", SYSRETQ, rcx=0x0000_8000_0000_0000)
    cpu = SpecCPU(s, vendor="amd")
    assert cpu.step() is None and s.cpl == 3 and s.rip == 0x0000_8000_0000_0000
    ev = cpu.step()
    assert fault(ev) == (Vector.GP, 0) and ev.rip == 0x0000_8000_0000_0000 and s.cpl == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_sysret_to_compatibility_mode(vendor: str) -> None:
    """SYSRET without REX.W returns to 32-bit code: CS = STAR[63:48] | 3, EIP = ECX (no canonical check)."""
    s = machine("long64", SYSRET, rcx=0xDEAD_BEEF_0000_2000)
    assert SpecCPU(s, vendor=vendor).step() is None
    assert s.rip == 0x2000 and s.cpl == 3 and s.code_bits == 32
    assert (s.seg[1].selector, s.seg[1].l, s.seg[1].db) == (0x23, 0, 1)
    assert s.seg[2].selector == 0x2B


def test_sysret_ss_attributes_by_vendor() -> None:
    """AMD changes only SS's selector (and DPL = CPL); Intel loads fixed flat DPL-3 attributes."""
    for vendor in ("amd", "intel"):
        s = machine("long64", SYSRETQ, rcx=0x2000)
        s.seg[2] = Segment(selector=0, base=0, limit=0, type=0, s=0, dpl=0, p=0, unusable=True)  # null SS
        assert SpecCPU(s, vendor=vendor).step() is None
        ss = s.seg[2]
        assert ss.selector == 0x2B and ss.dpl == 3
        if vendor == "amd":
            assert ss.unusable and (ss.type, ss.s, ss.p, ss.limit) == (0, 0, 0, 0)
        else:
            assert not ss.unusable and seg_tuple(ss) == (0x2B, 0, M32, 3, 1, 3, 1, 0, 1)


def test_syscall_from_compatibility_mode() -> None:
    """AMD: SYSCALL in compatibility mode enters 64-bit mode at CSTAR; Intel: #UD."""
    s = machine("long64", SYSCALL, cpl=3, compat=True)
    assert SpecCPU(s, vendor="amd").step() is None
    assert s.rip == CSTAR and s.code_bits == 64 and s.cpl == 0 and reg(s, "rcx") == CODE + 2
    s = machine("long64", SYSCALL, cpl=3, compat=True)
    assert fault(SpecCPU(s, vendor="intel").step()) == (Vector.UD, None)
    s = machine("long64", SYSRET, compat=True, rcx=0x2000)
    assert fault(SpecCPU(s, vendor="intel").step()) == (Vector.UD, None)


# -- SYSCALL / SYSRET in legacy mode (AMD) ------------------------------------------------------
@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_legacy_syscall_sysret_round_trip(mode: str) -> None:
    """AMD legacy mode: EIP = STAR[31:0], ECX = next EIP, IF/RF/VM cleared; SYSRET: CS = STAR[63:48] | 3,
    IF set, EIP = ECX (APM Vol. 3 SYSCALL, SYSRET "legacy mode")."""
    s = machine(mode, SYSCALL + "90", cpl=3, kernel="fc" + SYSRET, rflags=IF | DF | AC, r11=0x1234)
    cpu = SpecCPU(s)
    assert cpu.step() is None
    assert s.rip == KERNEL and s.cpl == 0 and s.code_bits == 32
    assert seg_tuple(s.seg[1]) == KCODE32 and seg_tuple(s.seg[2]) == KSTACK
    assert reg(s, "rcx") == CODE + 2 and reg(s, "r11") == 0x1234  # R11 untouched outside long mode
    assert s.rflags_sys & (IF | DF | AC) == DF | AC  # only IF (and VM, RF) cleared; SFMASK unused
    assert cpu.step() is None  # CLD
    assert cpu.step() is None
    assert s.rip == CODE + 2 and s.cpl == 3 and s.code_bits == 32 and s.seg[1].selector == 0x23
    assert s.rflags_sys & (IF | DF | AC) == IF | AC


def test_legacy_syscall_is_ud_on_intel() -> None:
    for mode in ("prot16", "prot32"):
        for code in (SYSCALL, SYSRET):
            s = machine(mode, code)
            assert fault(SpecCPU(s, vendor="intel").step()) == (Vector.UD, None)


def test_syscall_from_virtual_8086_clears_vm() -> None:
    s = machine("prot32", SYSCALL, rflags=VM | IF | (3 << 12))
    s.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0xB if k == 1 else 3, dpl=3) for k in range(6)]
    assert SpecCPU(s).step() is None
    assert not s.rflags_sys & (VM | IF) and s.cpl == 0 and s.rip == KERNEL and reg(s, "rcx") == CODE + 2


def test_sysret_outside_protected_mode_is_gp() -> None:
    """AMD: SYSRET needs protected mode at CPL 0 (real mode #GP(0); virtual-8086 is CPL 3)."""
    assert fault(SpecCPU(machine("real", SYSRET, rcx=0x2000)).step()) == (Vector.GP, 0)
    s = machine("prot32", SYSRET, rflags=VM, rcx=0x2000)
    assert fault(SpecCPU(s).step()) == (Vector.GP, 0)


def test_real_mode_syscall_amd() -> None:
    """The spec's reading of the APM: SYSCALL in real mode (SCE = 1) runs the legacy-mode operation."""
    s = machine("real", SYSCALL, rflags=IF)
    assert SpecCPU(s).step() is None
    assert s.rip == KERNEL and reg(s, "rcx") == CODE + 2 and not s.rflags_sys & IF
    assert seg_tuple(s.seg[1]) == KCODE32 and s.seg[2].selector == 0x10
    assert fault(SpecCPU(machine("real", SYSCALL), vendor="intel").step()) == (Vector.UD, None)


# -- SYSENTER / SYSEXIT ------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", ["amd", "intel"])
@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_sysenter_sysexit_round_trip(vendor: str, mode: str) -> None:
    """User -> SYSENTER -> kernel at SYSENTER_EIP on SYSENTER_ESP (CPL 0, 32-bit) -> SYSEXIT -> user at EDX
    with ESP = ECX, CS = SYSENTER_CS + 16 | 3, SS = + 24 | 3 (SDM Vol. 2B SYSENTER, SYSEXIT)."""
    s = machine(mode, SYSENTER, cpl=3, kernel="b801000000" + SYSEXIT, rflags=IF | RF | DF,
                rdx=0x1800, rcx=0x7F00, rsp=0x7FF0)
    cpu = SpecCPU(s, vendor=vendor)
    assert cpu.step() is None
    assert s.rip == KERNEL and s.cpl == 0 and reg(s, "rsp") == 0x6000 and s.code_bits == 32
    assert seg_tuple(s.seg[1]) == KCODE32 and seg_tuple(s.seg[2]) == KSTACK
    assert not s.rflags_sys & (IF | RF | VM) and s.rflags_sys & DF
    assert cpu.step() is None and reg(s, "rax") == 1
    assert cpu.step() is None
    assert s.rip == 0x1800 and reg(s, "rsp") == 0x7F00 and s.cpl == 3 and s.code_bits == 32
    assert seg_tuple(s.seg[1]) == (0x1B, 0, M32, 0xB, 1, 3, 1, 0, 1)
    assert seg_tuple(s.seg[2]) == (0x23, 0, M32, 0x3, 1, 3, 1, 0, 1)
    assert s.rflags_sys & DF and not s.rflags_sys & IF  # SYSEXIT changes no flag


@pytest.mark.parametrize("code", [SYSENTER, SYSEXIT])
def test_sysenter_sysexit_faults(code: str) -> None:
    """Real mode #GP(0); null SYSENTER_CS (0..3) #GP(0); SYSEXIT at CPL 3 #GP(0)."""
    for vendor in ("amd", "intel"):
        assert fault(SpecCPU(machine("real", code), vendor=vendor).step()) == (Vector.GP, 0)
        for null in (0, 3):
            s = machine("prot32", code)
            s.msrs[IA32_SYSENTER_CS] = null
            assert fault(SpecCPU(s, vendor=vendor).step()) == (Vector.GP, 0)
    if code == SYSEXIT:
        assert fault(SpecCPU(machine("prot32", code, cpl=3)).step()) == (Vector.GP, 0)


@pytest.mark.parametrize("code", [SYSENTER, SYSEXIT])
def test_sysenter_needs_sep(code: str) -> None:
    """A CPU model without SEP (CPUID 01H EDX[11]) has no SYSENTER/SYSEXIT: #UD (SDM Vol. 2B SYSENTER)."""
    s = machine("prot32", code)
    s.model = CpuModel(leaves=build_leaves(features=DEFAULT_FEATURES - {"sep"}))
    assert fault(SpecCPU(s).step()) == (Vector.UD, None)


def test_sysenter_from_virtual_8086() -> None:
    s = machine("prot32", SYSENTER, rflags=VM | IF)
    s.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0xB if k == 1 else 3, dpl=3) for k in range(6)]
    assert SpecCPU(s).step() is None
    assert not s.rflags_sys & VM and s.cpl == 0 and s.code_bits == 32 and s.rip == KERNEL


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("code", [SYSENTER, SYSEXIT])
def test_sysenter_sysexit_in_long_mode_amd_is_ud(compat: bool, code: str) -> None:
    """AMD: SYSENTER/SYSEXIT are legacy-mode only, #UD in long mode (APM Vol. 2 6.1.2)."""
    s = machine("long64", code, compat=compat)
    assert fault(SpecCPU(s, vendor="amd").step()) == (Vector.UD, None)


@pytest.mark.parametrize("compat", [False, True])
def test_sysenter_in_long_mode_intel(compat: bool) -> None:
    """Intel IA-32e mode: SYSENTER enters 64-bit code; RIP/RSP take the full MSR values (SDM Vol. 2B)."""
    s = machine("long64", SYSENTER, cpl=3, compat=compat)
    s.msrs[IA32_SYSENTER_EIP] = 0xFFFF_8000_0000_3000
    s.msrs[IA32_SYSENTER_ESP] = 0xFFFF_8000_0000_6000
    assert SpecCPU(s, vendor="intel").step() is None
    assert s.rip == 0xFFFF_8000_0000_3000 and reg(s, "rsp") == 0xFFFF_8000_0000_6000
    assert seg_tuple(s.seg[1]) == KCODE64 and seg_tuple(s.seg[2]) == KSTACK and s.cpl == 0


def test_sysexit_in_long_mode_intel() -> None:
    """Intel: SYSEXITQ returns to 64-bit code (CS + 32, SS + 40); SYSEXIT to compatibility mode (+16, +24);
    a non-canonical RDX or RCX on the 64-bit return is #GP(0)."""
    s = machine("long64", SYSEXITQ, rdx=0x0000_7FFF_0000_1000, rcx=0x0000_7FFF_0000_8000)
    assert SpecCPU(s, vendor="intel").step() is None
    assert s.rip == 0x0000_7FFF_0000_1000 and reg(s, "rsp") == 0x0000_7FFF_0000_8000 and s.code_bits == 64
    assert (s.seg[1].selector, s.seg[2].selector, s.cpl) == (0x2B, 0x33, 3)
    s = machine("long64", SYSEXIT, rdx=0xAAAA_0000_1000, rcx=0xBBBB_0000_8000)
    assert SpecCPU(s, vendor="intel").step() is None
    assert s.rip == 0x1000 and reg(s, "rsp") == 0x8000 and s.code_bits == 32
    assert (s.seg[1].selector, s.seg[2].selector) == (0x1B, 0x23)
    for rdx, rcx in ((0x0000_8000_0000_0000, 0x8000), (0x1000, 0xFFFF_0000_0000_0000)):
        s = machine("long64", SYSEXITQ, rdx=rdx, rcx=rcx)
        assert fault(SpecCPU(s, vendor="intel").step()) == (Vector.GP, 0) and s.cpl == 0


# -- symbolic twins: the RFLAGS transfers over all status-flag and R11 values ---------------------
def test_symbolic_syscall_sysret_flags() -> None:
    """SYSCALL: R11's status bits are the flags, and SFMASK clears exactly its flags; SYSRET: the status flags
    are R11's bits -- proved for every flag value (the system bits are concrete state, chosen here)."""
    mask = (1 << F.CF) | (1 << F.SF) | (1 << F.OF)

    def run(D: SymbolicDomain, code: str, r11: object = None) -> tuple[MachineState, dict]:
        s, inputs = symbolic_state(D, "long64")
        s.efer |= EFER_SCE
        s.msrs.update({MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_SFMASK: mask})
        if r11 is not None:  # SYSRET: a symbolic R11, a concrete return address (RIP is concrete state)
            s.gpr[11], s.gpr[1] = r11, D.const(64, 0x2000)
        insn = decode(bytes.fromhex(code), 64)
        x = Exec(s)
        x.i, x.next_rip = insn, CODE + insn.length
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
        return s, inputs

    paths = explore(lambda D: run(D, SYSCALL))
    assert len(paths) == 1
    s, inputs = paths[0].result
    r11 = s.gpr[11]
    claims = []
    for f in F.STATUS:
        fin = inputs[F.NAMES[f]]
        claims.append((z3.Extract(f, f, r11) == 1) == fin)
        claims.append(s.get_flag(f) == (z3.BoolVal(False) if mask >> f & 1 else fin))
    assert prove(z3.And(*claims)) is None

    status = z3.BitVec("r11", 64) & F.STATUS_MASK
    paths = explore(lambda D: run(D, SYSRETQ, status | IF | 2))
    assert len(paths) == 1
    s, _ = paths[0].result
    assert prove(z3.And(*[s.get_flag(f) == (z3.Extract(f, f, status) == 1) for f in F.STATUS])) is None
    assert s.rflags_sys == IF | 2 and s.cpl == 3
