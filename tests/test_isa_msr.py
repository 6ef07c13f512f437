"""MSRs and counters (spec/isa/msr.py): RDMSR, WRMSR, RDTSC, RDTSCP, RDPMC, SWAPGS.

Encodings are checked against iced-x86.  The MSR set and reserved bits come from the CPU model
(spec/cpumodel.py); properties compare value rules (canonical addresses, PAT encodings) with plain-int
references written here.  No symbolic twins: MSR values are concrete system state.
"""

from __future__ import annotations

import pytest
from conftest import check, reg
from hypothesis import given, settings
from hypothesis import strategies as st
from test_isa_system import mk

from spec.cpu import SpecCPU, StopEvent
from spec.cpumodel import (
    CSTAR,
    EFER,
    FS_BASE,
    GS_BASE,
    IA32_APIC_BASE,
    IA32_PAT,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_EIP,
    IA32_SYSENTER_ESP,
    IA32_TSC,
    KERNEL_GS_BASE,
    LSTAR,
    PAT_RESET,
    SFMASK,
    STAR,
    TSC_AUX,
    TscClock,
    make_model,
)
from spec.faults import Vector
from spec.machine import MODES
from spec.state import EFER_LMA, EFER_LME, MachineState

M32, M64 = 0xFFFF_FFFF, (1 << 64) - 1
EFER_SCE, EFER_NXE, EFER_SVME = 1, 1 << 11, 1 << 12
CR4_TSD, CR4_PCE = 1 << 2, 1 << 8
WRMSR, RDMSR, RDTSC, RDTSCP, RDPMC = "0f30", "0f32", "0f31", "0f01f9", "0f33"
BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64, "v86": 16}




def go(s: MachineState, vendor: str = "amd") -> StopEvent:
    return SpecCPU(s, vendor=vendor).run(100)


def halted(ev: StopEvent) -> None:
    assert ev.kind == "halted", ev.describe()


def gp(ev: StopEvent, rip: int = 0x1000) -> None:
    assert ev.kind == "fault" and ev.vector == Vector.GP and ev.error_code == 0 and ev.rip == rip, ev.describe()


def c(mode: str, code: str, text: str) -> str:
    return check({16: "real", 32: "prot32", 64: "long64"}[BITS[mode]], code, text)


def wr_rd(mode: str = "long64", vendor: str = "amd", model: object = None, **regs: int) -> tuple[MachineState,
                                                                                                StopEvent]:
    s = mk(mode, c(mode, WRMSR, "wrmsr") + c(mode, RDMSR, "rdmsr"), model=model, **regs)
    return s, go(s, vendor)


def edx_eax(s: MachineState) -> int:
    return reg(s, "rdx") << 32 | reg(s, "rax")


# -- plain read/write MSRs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index,value", [
    (STAR, 0x0023_0010_DEAD_BEEF), (SFMASK, 0x0000_0000_0004_7700), (KERNEL_GS_BASE, 0xFFFF_8000_0000_1000),
    (LSTAR, 0xFFFF_FFFF_8100_0000), (CSTAR, 0x0000_7FFF_FFFF_F000), (IA32_SYSENTER_CS, 0x10),
    (IA32_PAT, 0x0007_0406_0007_0406 ^ 0x0100_0000_0000_0001), (IA32_APIC_BASE, 0xFEE0_0800),
    (TSC_AUX, 0x1234_5678), (0xC001_0000, 0x0043_0076),
])
def test_write_then_read(mode: str, index: int, value: int) -> None:
    """WRMSR writes EDX:EAX and RDMSR reads it back in every mode at CPL 0 (SDM Vol. 2B RDMSR/WRMSR);
    only EAX/EDX are used, and RDMSR clears RAX/RDX bits 63:32 in 64-bit mode."""
    s, ev = wr_rd(mode, rcx=index | 0xABCD << 32, rax=value & M32 | 0x5555 << 32, rdx=value >> 32)
    halted(ev)
    assert edx_eax(s) == value and reg(s, "rax") >> 32 == 0 and s.msrs[index] == value


@pytest.mark.parametrize("index", [0x0, 0xFE, 0x179, 0x200, 0x3A, 0xC000_0104, 0xC001_0004 + 4, 0x4000_0000])
def test_unknown_msr_gp(index: int) -> None:
    """An MSR the model does not have -> #GP(0) on read and write (SDM Vol. 2B RDMSR/WRMSR)."""
    for code, text in ((RDMSR, "rdmsr"), (WRMSR, "wrmsr")):
        s = mk("long64", c("long64", code, text), rcx=index)
        gp(go(s))
        assert s.msrs == {}


def test_reset_values() -> None:
    """PAT resets to 0007040600070406H (SDM Vol. 3A 13.12.4); APIC_BASE to FEE00000H with BSP and EN."""
    s = mk("long64", c("long64", RDMSR, "rdmsr"), rcx=IA32_PAT)
    halted(go(s))
    assert edx_eax(s) == PAT_RESET
    s = mk("long64", c("long64", RDMSR, "rdmsr"), rcx=IA32_APIC_BASE)
    halted(go(s))
    assert edx_eax(s) == 0xFEE0_0900


def test_apic_base_reserved_bits() -> None:
    """IA32_APIC_BASE: bits 7:0, 9, 10 (no x2APIC) and 63:MAXPHYADDR are reserved (SDM Vol. 3A 11.4.4)."""
    for bad in (1, 1 << 9, 1 << 10, 1 << 48):
        s = mk("long64", c("long64", WRMSR, "wrmsr"), rcx=IA32_APIC_BASE, rax=(0xFEE0_0900 | bad) & M32,
               rdx=(0xFEE0_0900 | bad) >> 32)
        gp(go(s))


def pat_ok(v: int) -> bool:
    return all((v >> (8 * k)) & 0xFF in (0, 1, 4, 5, 6, 7) for k in range(8))


@given(st.one_of(st.integers(0, M64),
                 st.lists(st.sampled_from([0, 1, 4, 5, 6, 7]), min_size=8, max_size=8).map(
                     lambda b: int.from_bytes(bytes(b), "little"))))
@settings(max_examples=60)
def test_pat_entries(v: int) -> None:
    """Each PAT byte must be a memory type 0, 1, 4-7 (2, 3 and 8-FFH reserved): else #GP(0) (SDM Vol. 3A
    13.12.2)."""
    s, ev = wr_rd(rcx=IA32_PAT, rax=v & M32, rdx=v >> 32)
    if pat_ok(v):
        halted(ev)
        assert edx_eax(s) == v
    else:
        gp(ev)


def canonical48(v: int) -> bool:
    top = v >> 47
    return top in (0, (1 << 17) - 1)


@given(index=st.sampled_from([LSTAR, CSTAR, KERNEL_GS_BASE, FS_BASE, GS_BASE]),
       v=st.one_of(st.integers(0, M64), st.integers(0, (1 << 47) - 1),
                   st.integers(0, (1 << 47) - 1).map(lambda x: x | (M64 ^ ((1 << 47) - 1)))))
@settings(max_examples=60)
def test_canonical_msrs(index: int, v: int) -> None:
    """LSTAR, CSTAR, KERNEL_GS_BASE, FS_BASE, GS_BASE hold linear addresses: non-canonical -> #GP(0)
    (SDM Vol. 2B WRMSR; APM Vol. 2 A.2)."""
    s, ev = wr_rd(rcx=index, rax=v & M32, rdx=v >> 32)
    if canonical48(v):
        halted(ev)
        assert edx_eax(s) == v
    else:
        gp(ev)


def test_fs_gs_base_are_the_segment_bases() -> None:
    """FS_BASE/GS_BASE are the hidden bases of FS/GS (SDM Vol. 3A 3.4.4): a WRMSR moves FS-relative
    accesses, and RDMSR reads the base a segment load left."""
    code = c("long64", WRMSR, "wrmsr") + c("long64", "648b042510000000", "mov eax, fs:[0x10]")
    s = mk("long64", code, rcx=FS_BASE, rax=0x6000, rdx=0)
    s.mem.phys.write(0x6010, 4, 0xFEED_F00D)
    halted(go(s))
    assert s.seg[4].base == 0x6000 and reg(s, "rax") == 0xFEED_F00D
    s = mk("long64", c("long64", RDMSR, "rdmsr"), rcx=GS_BASE)
    gs = s.seg[5].copy()
    gs.base = 0xFFFF_8888_0000_0000
    s.seg[5] = gs
    halted(go(s))
    assert edx_eax(s) == 0xFFFF_8888_0000_0000


def test_swapgs() -> None:
    """SWAPGS exchanges GS.base and KERNEL_GS_BASE (SDM Vol. 2B SWAPGS); twice restores both."""
    code = c("long64", "0f01f8", "swapgs")
    s = mk("long64", code)
    s.msrs[KERNEL_GS_BASE] = 0xFFFF_8000_0000_4000
    gs = s.seg[5].copy()
    gs.base = 0x1234
    s.seg[5] = gs
    halted(go(s))
    assert s.seg[5].base == 0xFFFF_8000_0000_4000 and s.msrs[KERNEL_GS_BASE] == 0x1234
    s = mk("long64", code + code)
    s.msrs[KERNEL_GS_BASE] = 7
    halted(go(s))
    assert s.seg[5].base == 0 and s.msrs[KERNEL_GS_BASE] == 7


@pytest.mark.parametrize("mode", ["real", "prot32"])
def test_swapgs_outside_64bit_mode_ud(mode: str) -> None:
    """SWAPGS is valid only in 64-bit mode (SDM Vol. 2B SWAPGS: #UD otherwise; the decoder's o64)."""
    s = mk(mode, c(mode, "0f01f8", "(bad)"))  # iced agrees: not an instruction outside 64-bit mode
    ev = go(s)
    assert ev.kind == "fault" and ev.vector == Vector.UD


# -- vendor-dependent widths ---------------------------------------------------------------------------------

def test_tsc_aux_high_bits_by_vendor() -> None:
    """TSC_AUX bits 63:32: reserved on Intel (#GP(0), SDM Vol. 4 Table 2-2); ignored on AMD (read 0)."""
    s, ev = wr_rd(rcx=TSC_AUX, rax=0x55, rdx=1)
    halted(ev)
    assert edx_eax(s) == 0x55
    s, ev = wr_rd(vendor="intel", rcx=TSC_AUX, rax=0x55, rdx=1)
    gp(ev)


@pytest.mark.parametrize("index", [IA32_SYSENTER_ESP, IA32_SYSENTER_EIP])
def test_sysenter_esp_eip_by_vendor(index: int) -> None:
    """AMD keeps bits 31:0 of SYSENTER_ESP/EIP (no 64-bit SYSENTER); Intel keeps 64 bits and requires a
    canonical address (SDM Vol. 2B WRMSR; KVM documents the AMD behaviour)."""
    v = 0xFFFF_FFFF_8000_1000
    s, ev = wr_rd(rcx=index, rax=v & M32, rdx=v >> 32)
    halted(ev)
    assert edx_eax(s) == 0x8000_1000
    s, ev = wr_rd(vendor="intel", rcx=index, rax=v & M32, rdx=v >> 32)
    halted(ev)
    assert edx_eax(s) == v
    s, ev = wr_rd(vendor="intel", rcx=index, rax=0, rdx=0x8000)
    gp(ev)


# -- EFER (SDM Vol. 3A 2.2.1 Table 2-1; APM Vol. 2 3.1.7) ---------------------------------------------------

def test_efer_writable_bits() -> None:
    s, ev = wr_rd("prot32", rcx=EFER, rax=EFER_SCE | EFER_NXE | EFER_LME, rdx=0)
    halted(ev)
    assert s.efer == EFER_SCE | EFER_NXE | EFER_LME and edx_eax(s) == s.efer
    assert s.tlb_events == [("efer", 0, s.efer)]


@pytest.mark.parametrize("bad", [1 << 1, 1 << 9, EFER_SVME, 1 << 13, 1 << 14, 1 << 15, 1 << 32])
def test_efer_reserved_bits_gp(bad: int) -> None:
    """Bits the model does not implement are reserved: SVME without SVM, LMSLE, FFXSR, TCE, ... -> #GP(0)."""
    s, ev = wr_rd("prot32", rcx=EFER, rax=bad & M32, rdx=bad >> 32)
    gp(ev)
    assert s.efer == 0


def test_efer_svme_with_svm_model() -> None:
    s, ev = wr_rd("prot32", model=make_model(add={"svm"}), rcx=EFER, rax=EFER_SVME, rdx=0)
    halted(ev)
    assert s.efer == EFER_SVME


def test_efer_lma_is_read_only() -> None:
    """Writes of LMA are ignored: LMA reflects LME AND CR0.PG (SDM Vol. 3A Table 2-1 "LMA (R)")."""
    s, ev = wr_rd("prot32", rcx=EFER, rax=EFER_LMA, rdx=0)
    halted(ev)
    assert s.efer == 0
    s, ev = wr_rd("long64", rcx=EFER, rax=EFER_LME | EFER_NXE, rdx=0)
    halted(ev)
    assert s.efer == EFER_LME | EFER_LMA | EFER_NXE


def test_efer_lme_change_with_paging_gp() -> None:
    """Changing LME while CR0.PG = 1 -> #GP(0) (SDM Vol. 3A 9.8.5; APM Vol. 2 14.6.1)."""
    s, ev = wr_rd("long64", rcx=EFER, rax=EFER_LMA, rdx=0)
    gp(ev)
    assert s.efer == EFER_LME | EFER_LMA


# -- time-stamp counter (SDM Vol. 2B RDTSC, RDTSCP; Vol. 3B 18.17) -------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_rdtsc_deterministic(mode: str) -> None:
    """The default time source counts retired instructions: TSC = base + rate * icount."""
    code = c(mode, "90", "nop") + c(mode, "90", "nop") + c(mode, RDTSC, "rdtsc")
    s = mk(mode, code, model=make_model(tsc=TscClock(base=(1 << 32) - 2, rate=3)), rax=M64, rdx=M64)
    halted(go(s))
    assert edx_eax(s) == (1 << 32) - 2 + 3 * 2 and reg(s, "rax") >> 32 == 0


def test_wrmsr_tsc_sets_the_counter() -> None:
    """A write of the TSC makes it read back the value written, then it keeps counting."""
    code = c("long64", WRMSR, "wrmsr") + c("long64", RDTSC, "rdtsc")
    s = mk("long64", code, rcx=IA32_TSC, rax=0x1000, rdx=0x7)
    halted(go(s))
    assert edx_eax(s) == 0x7_0000_1000 + 1
    s.halted, s.rip = False, 0x1000 + 2  # RDTSC again, 100 instructions after the write
    s.icount = 100
    halted(go(s))
    assert edx_eax(s) == 0x7_0000_1000 + 100


def test_rdtsc_privilege() -> None:
    """CR4.TSD = 1: RDTSC/RDTSCP at CPL > 0 (virtual-8086 mode too) -> #GP(0); at CPL 0 allowed."""
    for code, text in ((RDTSC, "rdtsc"), (RDTSCP, "rdtscp")):
        s = mk("prot32", c("prot32", code, text), cpl=3)
        s.cr4 |= CR4_TSD
        gp(go(s))
        s = mk("v86", c("v86", code, text))
        s.cr4 |= CR4_TSD
        gp(go(s))
        s = mk("prot32", c("prot32", code, text))
        s.cr4 |= CR4_TSD
        halted(go(s))
        s = mk("long64", c("long64", code, text), cpl=3)  # TSD = 0: allowed at CPL 3 (then HLT is #GP)
        ev = go(s)
        gp(ev, rip=0x1000 + len(code) // 2)


def test_rdtscp_reads_tsc_aux() -> None:
    code = c("long64", RDTSCP, "rdtscp")
    s = mk("long64", code, rcx=M64)
    s.msrs[TSC_AUX] = 0x42
    halted(go(s))
    assert reg(s, "rcx") == 0x42 and edx_eax(s) == 0


def test_tsc_instructions_need_the_feature() -> None:
    """RDTSCP without CPUID.80000001H:EDX.RDTSCP, RDTSC without CPUID.1:EDX.TSC -> #UD."""
    s = mk("long64", c("long64", RDTSCP, "rdtscp"), model=make_model(remove={"rdtscp"}))
    ev = go(s)
    assert ev.kind == "fault" and ev.vector == Vector.UD
    s = mk("long64", c("long64", RDTSC, "rdtsc"), model=make_model(remove={"tsc"}))
    ev = go(s)
    assert ev.kind == "fault" and ev.vector == Vector.UD


# -- performance counters (SDM Vol. 2B RDPMC; APM Vol. 2 13.2) -----------------------------------------------

def test_rdpmc_amd_counters() -> None:
    """AMD: RDPMC 0-3 read PerfCtr0-3 (C001_0004-7), 48 bits wide; other indices -> #GP(0)."""
    code = c("long64", WRMSR, "wrmsr") + c("long64", "b903000000", "mov ecx, 0x3") + c("long64", RDPMC, "rdpmc")
    s = mk("long64", code, rcx=0xC001_0007, rax=0xDEAD_BEEF, rdx=0xFFFF_1234)
    halted(go(s))
    assert edx_eax(s) == 0x1234_DEAD_BEEF
    s = mk("long64", c("long64", RDPMC, "rdpmc"), rcx=4)
    gp(go(s))


def test_rdpmc_privilege_and_intel_model() -> None:
    """CPL > 0 needs CR4.PCE = 1 (SDM Vol. 2B RDPMC); the Intel model has no counters."""
    code = c("prot32", RDPMC, "rdpmc")
    s = mk("prot32", code, cpl=3, rcx=0)
    gp(go(s))
    s = mk("prot32", code, cpl=3, rcx=0)
    s.cr4 |= CR4_PCE
    gp(go(s), rip=0x1002)  # RDPMC completed; the HLT after it is #GP at CPL 3
    s = mk("prot32", code, rcx=0, model=make_model(vendor="intel", family=6, model=0x55))
    gp(go(s, "intel"))


def test_perf_evtsel_reserved_bits() -> None:
    for bad in (1 << 19, 1 << 21, 1 << 36, 1 << 40, 1 << 63):
        s = mk("long64", c("long64", WRMSR, "wrmsr"), rcx=0xC001_0000, rax=bad & M32, rdx=bad >> 32)
        gp(go(s))
