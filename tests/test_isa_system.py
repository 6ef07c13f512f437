"""System instructions (spec/isa/system.py): MOV CR/DR, LGDT/LIDT/SGDT/SIDT, LLDT/LTR/SLDT/STR,
LMSW/SMSW/CLTS, INVLPG, INVD/WBINVD/WBNOINVD, LAR/LSL/VERR/VERW, and mode transitions.

Every hand-written encoding is checked against iced-x86 (``check``).  Each test names the manual
section it pins.  CPL 3 is set up by giving CS and SS DPL 3 (the flat GDT's user selectors).
The system instructions compute on concrete system state only (control registers, descriptors in
memory), so there are no symbolic twins here: nothing is computed from data values.
"""

from __future__ import annotations

import pytest
from conftest import GPR, check, flag, reg
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, DecoderOptions

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.cpumodel import make_model
from spec.faults import Vector
from spec.machine import GDT, MODES, USER_CS, USER_DS, encode_descriptor, flat_machine
from spec.paging import BITS32, LEVEL4, PAE, paging_mode
from spec.state import (
    CR0_CD,
    CR0_ET,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    EFER_LMA,
    EFER_LME,
    MachineState,
    Segment,
)

M32, M64 = 0xFFFF_FFFF, (1 << 64) - 1
CR4_DE, CR4_PSE, CR4_PAE, CR4_PGE, CR4_UMIP, CR4_LA57, CR4_PCIDE = (
    1 << 3, 1 << 4, 1 << 5, 1 << 7, 1 << 11, 1 << 12, 1 << 17)
DATA = 0x6000  # mapped in every flat mode
BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64, "v86": 16}


# -- harness ---------------------------------------------------------------------------------------------

def mk(mode: str, code: str = "", *, cpl: int = 0, model: object = None, **regs: int) -> MachineState:
    """A flat machine in ``mode`` ("v86": prot32 state with EFLAGS.VM = 1) running ``code`` + HLT,
    recording TLB events."""
    base = "prot32" if mode == "v86" else mode
    s = flat_machine(base, bytes.fromhex(code.replace(" ", "")) + b"\xf4")  # type: ignore[arg-type]
    if mode == "v86":
        s.rflags_sys |= 1 << F.VM
    if cpl:
        for k, sel in ((1, USER_CS), (2, USER_DS)):
            seg = s.seg[k].copy()
            seg.dpl, seg.selector = 3, sel
            s.seg[k] = seg
    if model is not None:
        s.model = model  # type: ignore[assignment]
    s.tlb_events = []
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & M64
    return s


def go(s: MachineState, vendor: str = "amd", budget: int = 200) -> StopEvent:
    return SpecCPU(s, vendor=vendor).run(budget)


def halted(ev: StopEvent) -> None:
    assert ev.kind == "halted", ev.describe()


def finished(s: MachineState, ev: StopEvent) -> None:
    """The code ran to the appended HLT: halted at CPL 0; at CPL 3 HLT itself is #GP(0) (SDM Vol. 2A HLT)."""
    if s.cpl == 0:
        halted(ev)
    else:
        assert ev.kind == "fault" and ev.vector == Vector.GP and s.mem.phys.read(ev.rip, 1) == 0xF4, ev.describe()


def faulted(ev: StopEvent, vector: int, code: int | None = None, rip: int = 0x1000) -> None:
    assert ev.kind == "fault" and ev.vector == vector, ev.describe()
    assert ev.error_code == code, ev.describe()
    assert ev.rip == rip, ev.describe()


def c(mode: str, code: str, text: str) -> str:
    return check("prot32" if BITS[mode] == 32 else ("long64" if BITS[mode] == 64 else "real"), code, text)


def put(s: MachineState, addr: int, v: int, n: int = 8) -> None:
    s.mem.phys.write(addr, n, v)


def sysdesc(base: int, limit: int, typ: int, dpl: int = 0, p: int = 1, g: int = 0) -> int:
    """A system-segment descriptor (low 8 bytes; SDM Vol. 3A Figure 7-3 / 3-8, S = 0)."""
    access = typ | dpl << 5 | p << 7
    return ((limit & 0xFFFF) | (base & 0xFF_FFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | g << 55 | ((base >> 24) & 0xFF) << 56)


def add_desc(s: MachineState, index: int, low: int, high: int | None = None) -> int:
    """Write a descriptor at GDT index ``index`` (16 bytes with ``high``), extend the limit; the selector."""
    put(s, GDT + 8 * index, low)
    end = 8 * index + 7
    if high is not None:
        put(s, GDT + 8 * index + 8, high)
        end += 8
    s.gdtr.limit = max(s.gdtr.limit, end)
    return 8 * index


# -- MOV from/to control registers (SDM Vol. 2B MOV--Move to/from Control Registers) ----------------------

@pytest.mark.parametrize("mode", MODES)
def test_mov_from_cr0_every_mode(mode: str) -> None:
    """The operand is 32 bits outside 64-bit mode and 64 bits in it, whatever 66/REX.W say."""
    code = c(mode, "0f20c0", "mov rax, cr0" if mode == "long64" else "mov eax, cr0")
    s = mk(mode, code, rax=M64)
    halted(go(s))
    assert reg(s, "rax") == s.cr0


@pytest.mark.parametrize("mode", MODES)
def test_mov_cr2_round_trip(mode: str) -> None:
    """CR2 takes any value of the operand size (SDM Vol. 3A 2.5)."""
    r = "r" if mode == "long64" else "e"
    code = c(mode, "0f22d0", f"mov cr2, {r}ax") + c(mode, "0f20d3", f"mov {r}bx, cr2")
    v = 0xFFFF_8000_DEAD_B000 if mode == "long64" else 0xDEAD_B000
    s = mk(mode, code, rax=v)
    halted(go(s))
    assert s.cr2 == v and reg(s, "rbx") == v


def test_real_mode_sets_pe_with_mov_cr0() -> None:
    """MOV CR0 is valid in real mode (CPL 0): setting PE enters protected mode (SDM Vol. 3A 9.9.1)."""
    code = (c("real", "0f20c0", "mov eax, cr0") + c("real", "6683c801", "or eax, 0x1")
            + c("real", "0f22c0", "mov cr0, eax"))
    s = mk("real", code)
    halted(go(s))
    assert s.cr0 == CR0_PE | CR0_ET and s.protected
    assert s.tlb_events == [("cr0", CR0_ET, CR0_PE | CR0_ET)]


def test_cr0_reserved_low_bits_ignored_et_hardwired() -> None:
    """Reserved CR0[31:0] bits stay clear and ET stays 1 (SDM Vol. 2B MOV CR: "attempts to set them have no
    impact"; "CR0.ET remains set")."""
    s = mk("prot32", c("prot32", "0f22c0", "mov cr0, eax"), rax=CR0_PE | 1 << 6 | 1 << 17 | 1 << 28)
    halted(go(s))
    assert s.cr0 == CR0_PE | CR0_ET


@pytest.mark.parametrize("mode,value", [
    ("long64", CR0_PE | CR0_ET | CR0_PG | 1 << 32),  # bits 63:32 reserved (64-bit mode exceptions)
    ("real", CR0_PG),  # PG without PE
    ("prot32", CR0_PE | CR0_NW),  # NW without CD
    ("long64", CR0_PE | CR0_ET | CR0_NW),  # NW without CD, and clearing PG in 64-bit mode
])
def test_cr0_invalid_combinations_gp(mode: str, value: int) -> None:
    """SDM Vol. 2B MOV CR exceptions: #GP(0); CR0 keeps its value."""
    r = "r" if mode == "long64" else "e"
    s = mk(mode, c(mode, "0f22c0", f"mov cr0, {r}ax"), rax=value)
    old = s.cr0
    faulted(go(s), Vector.GP, 0)
    assert s.cr0 == old and s.tlb_events == []


def test_cr0_clear_pg_in_64bit_mode_gp() -> None:
    """Clearing CR0.PG in 64-bit mode is #GP(0) (SDM Vol. 2B MOV CR "64-Bit Mode Exceptions")."""
    s = mk("long64", c("long64", "0f22c0", "mov cr0, rax"), rax=CR0_PE | CR0_ET)
    faulted(go(s), Vector.GP, 0)
    assert s.cr0 & CR0_PG and s.efer & EFER_LMA


def test_cr0_nw_cd_accepted() -> None:
    s = mk("prot32", c("prot32", "0f22c0", "mov cr0, eax"), rax=CR0_PE | CR0_NW | CR0_CD)
    halted(go(s))
    assert s.cr0 == CR0_PE | CR0_NW | CR0_CD | CR0_ET


# -- paging and long-mode activation through MOV CR0/CR3/CR4 (SDM Vol. 3A 4.1, 4.4.1, 9.8.5) ------------

PD32, PDPT_PAE, PD_PAE, PML4, PDPT4 = 0x3000, 0x4000, 0x5000, 0x9000, 0xA000


def paging_tables(s: MachineState) -> None:
    """32-bit PD (4-MiB pages), PAE PDPT + PD (2-MiB pages), 4-level PML4 + PDPT sharing the PAE PD.
    Linear 0 and 0x400000 both map physical 0 in every mode (identity for the code)."""
    for a in (PML4, PDPT4):
        s.mem.phys.map_page(a)
    put(s, PD32, 0x83, 4)  # PDE[0]: 4 MiB at 0, P R/W PS
    put(s, PD32 + 4, 0x83, 4)  # PDE[1]: 0x400000 -> 0
    put(s, PDPT_PAE, PD_PAE | 1)  # PDPTE[0] (bits 2:1 reserved in PAE)
    put(s, PD_PAE, 0x83)  # 2 MiB at 0
    put(s, PD_PAE + 16, 0x83)  # PDE[2]: 0x400000 -> 0
    put(s, PML4, PDPT4 | 3)
    put(s, PDPT4, PD_PAE | 3)


def test_enable_32bit_paging_with_pse() -> None:
    """CR4.PSE then CR3 then CR0.PG: 32-bit paging with 4-MiB pages (SDM Vol. 3A 4.3, Table 4-1)."""
    code = (c("prot32", "0f22e0", "mov cr4, eax") + c("prot32", "0f22db", "mov cr3, ebx")
            + c("prot32", "0f22c1", "mov cr0, ecx") + c("prot32", "8b1504604000", "mov edx, [0x406004]"))
    s = mk("prot32", code, rax=CR4_PSE, rbx=PD32, rcx=CR0_PE | CR0_ET | CR0_PG)
    paging_tables(s)
    put(s, DATA + 4, 0xCAFE_F00D, 4)
    halted(go(s))
    assert paging_mode(s.cr0, s.cr4, s.efer) is BITS32
    assert reg(s, "rdx") == 0xCAFE_F00D
    assert s.tlb_events == [("cr4", 0, CR4_PSE), ("cr3", PD32), ("cr0", CR0_PE | CR0_ET, s.cr0)]


def test_enable_pae_paging_loads_pdptes() -> None:
    """Setting PG with CR4.PAE = 1 and EFER.LME = 0 loads the four PDPTEs from CR3 (SDM Vol. 3A 4.4.1)."""
    code = c("prot32", "0f22c1", "mov cr0, ecx") + c("prot32", "8b1508604000", "mov edx, [0x406008]")
    s = mk("prot32", code, rcx=CR0_PE | CR0_ET | CR0_PG)
    s.cr4, s.cr3 = CR4_PAE, PDPT_PAE
    paging_tables(s)
    put(s, PDPT_PAE + 8, 0)  # not present: not checked
    put(s, DATA + 8, 0x1234_5678, 4)
    halted(go(s))
    assert paging_mode(s.cr0, s.cr4, s.efer) is PAE
    assert s.pdptes == [PD_PAE | 1, 0, 0, 0]
    assert reg(s, "rdx") == 0x1234_5678


@pytest.mark.parametrize("bad", [1 << 1, 1 << 2, 1 << 5, 1 << 8, 1 << 48, 1 << 63])
def test_pdpte_reserved_bits_gp_on_cr0(bad: int) -> None:
    """A present PDPTE with a reserved bit (2:1, 8:5, 63:MAXPHYADDR; SDM Table 4-8) -> #GP(0) on the load;
    CR0 and the PDPTE registers keep their values."""
    s = mk("prot32", c("prot32", "0f22c1", "mov cr0, ecx"), rcx=CR0_PE | CR0_ET | CR0_PG)
    s.cr4, s.cr3 = CR4_PAE, PDPT_PAE
    paging_tables(s)
    put(s, PDPT_PAE + 24, 0x7000 | 1 | bad)
    faulted(go(s), Vector.GP, 0)
    assert not s.cr0 & CR0_PG and s.pdptes == [0, 0, 0, 0]
    # The same entry without P is not checked.
    put(s, PDPT_PAE + 24, 0x7000 | bad)
    halted(go(s))
    assert s.pdptes[3] == 0x7000 | bad


def test_mov_cr3_in_pae_mode_reloads_pdptes() -> None:
    """MOV to CR3 with PAE paging in use loads the PDPTEs (#GP(0) on reserved bits; SDM Vol. 3A 4.4.1)."""
    code = c("prot32", "0f22d8", "mov cr3, eax")
    s = mk("prot32", code, rax=0x7000)
    paging_tables(s)
    s.cr4, s.cr3, s.cr0 = CR4_PAE, PDPT_PAE, CR0_PE | CR0_ET | CR0_PG
    s.pdptes = [PD_PAE | 1, 0, 0, 0]
    put(s, 0x7000, PD_PAE | 1)
    put(s, 0x7008, 0x5000 | 1 | 1 << 5)  # reserved bit 5
    faulted(go(s), Vector.GP, 0)
    assert s.cr3 == PDPT_PAE and s.tlb_events == []
    put(s, 0x7008, 0)
    put(s, 0x7010, PD_PAE | 1)
    halted(go(s))
    assert s.cr3 == 0x7000 and s.pdptes == [PD_PAE | 1, 0, PD_PAE | 1, 0]
    assert s.tlb_events == [("cr3", 0x7000)]


def test_cr4_pge_toggle_reloads_pdptes_tsd_does_not() -> None:
    """SDM Vol. 3A 4.4.1: MOV to CR4 changing PAE, PGE, PSE or SMEP with PAE paging in use loads the PDPTEs."""
    code = c("prot32", "0f22e0", "mov cr4, eax") + c("prot32", "0f22e3", "mov cr4, ebx")
    s = mk("prot32", code, rax=CR4_PAE | 1 << 2, rbx=CR4_PAE | 1 << 2 | CR4_PGE)
    paging_tables(s)
    s.cr4, s.cr3, s.cr0 = CR4_PAE, PDPT_PAE, CR0_PE | CR0_ET | CR0_PG
    s.pdptes = [PD_PAE | 1, 0, 0, 0x7000 | 1]  # stale entry 3 on purpose
    SpecCPU(s).step()  # TSD: no reload
    assert s.pdptes[3] == 0x7001
    SpecCPU(s).step()  # PGE: reload
    assert s.pdptes == [PD_PAE | 1, 0, 0, 0]
    assert s.tlb_events == [("cr4", CR4_PAE, CR4_PAE | 4), ("cr4", CR4_PAE | 4, CR4_PAE | 4 | CR4_PGE)]


def test_switch_32bit_paging_to_pae_with_mov_cr4() -> None:
    """With PG = 1 outside IA-32e mode, setting CR4.PAE switches 32-bit paging to PAE paging and loads the
    PDPTEs from CR3 (SDM Vol. 3A 4.1.2, 4.4.1)."""
    s = mk("prot32", c("prot32", "0f22e0", "mov cr4, eax"), rax=CR4_PAE | CR4_PSE)
    paging_tables(s)
    # The code page is reached through 32-bit paging at PD32; then PAE with CR3 = PD32 treats PD32 as a PDPT.
    s.cr4, s.cr3, s.cr0 = CR4_PSE, PD32, CR0_PE | CR0_ET | CR0_PG
    ev = go(s)
    # PD32's first 8 bytes, read as a PDPTE, are 0x00000083_00000083: bits 7 and 1 are reserved -> #GP(0).
    faulted(ev, Vector.GP, 0)
    assert s.cr4 == CR4_PSE


def test_long_mode_activation_sets_lma_and_back() -> None:
    """EFER.LME, CR4.PAE, CR3 then CR0.PG: EFER.LMA = 1 (SDM Vol. 3A 9.8.5); clearing PG from compatibility
    mode clears LMA again (9.8.5.4).  Here CS stays a 32-bit segment: compatibility mode."""
    code = c("prot32", "0f22c1", "mov cr0, ecx") + c("prot32", "0f22c2", "mov cr0, edx")
    s = mk("prot32", code, rcx=CR0_PE | CR0_ET | CR0_PG, rdx=CR0_PE | CR0_ET)
    paging_tables(s)
    s.cr4, s.cr3, s.efer = CR4_PAE, PML4, EFER_LME
    cpu = SpecCPU(s)
    assert cpu.step() is None
    assert s.efer == EFER_LME | EFER_LMA and paging_mode(s.cr0, s.cr4, s.efer) is LEVEL4
    assert s.code_bits == 32 and s.pdptes == [0, 0, 0, 0]  # no PDPTE load in IA-32e mode
    assert cpu.step() is None
    assert s.efer == EFER_LME and not s.cr0 & CR0_PG
    kinds = [e[0] for e in s.tlb_events]  # type: ignore[union-attr]
    assert kinds == ["cr0", "efer", "cr0", "efer"]
    assert s.tlb_events[1] == ("efer", EFER_LME, EFER_LME | EFER_LMA)  # type: ignore[index]


def test_long_mode_activation_needs_pae_and_not_cs_l() -> None:
    """Setting PG with EFER.LME = 1 and CR4.PAE = 0 -> #GP(0) (SDM Vol. 3A 9.8.5); with CS.L = 1 -> #GP(0)
    (APM Vol. 2 14.6.1: long mode is entered in compatibility mode; KVM checks the same)."""
    s = mk("prot32", c("prot32", "0f22c1", "mov cr0, ecx"), rcx=CR0_PE | CR0_ET | CR0_PG)
    paging_tables(s)
    s.cr3, s.efer = PML4, EFER_LME
    faulted(go(s), Vector.GP, 0)
    s.cr4 = CR4_PAE
    cs = s.seg[1].copy()
    cs.l = 1
    s.seg[1] = cs
    faulted(go(s), Vector.GP, 0)
    assert s.efer == EFER_LME and not s.cr0 & CR0_PG


# -- CR3, CR4, CR8 ------------------------------------------------------------------------------------------

def test_cr3_reserved_bits_long_mode() -> None:
    """In IA-32e mode CR3 bits 63:MAXPHYADDR are reserved: #GP(0) (SDM Vol. 2B MOV CR; Table 4-12)."""
    code = c("long64", "0f22d8", "mov cr3, rax")
    s = mk("long64", code, rax=1 << 48)
    old = s.cr3
    faulted(go(s), Vector.GP, 0)
    assert s.cr3 == old
    s2 = mk("long64", code, rax=0x70000 | 0x18, model=make_model(maxphyaddr=40))
    halted(go(s2))
    assert s2.cr3 == 0x70018 and s2.tlb_events == [("cr3", 0x70018)]
    s3 = mk("long64", code, rax=1 << 40 | 0x70000, model=make_model(maxphyaddr=40))
    faulted(go(s3), Vector.GP, 0)


def test_cr3_write_same_value_still_flushes() -> None:
    code = c("long64", "0f20d8", "mov rax, cr3") + c("long64", "0f22d8", "mov cr3, rax")
    s = mk("long64", code)
    halted(go(s))
    assert s.tlb_events == [("cr3", s.cr3)]


def test_tlb_events_not_recorded_by_default() -> None:
    s = mk("long64", c("long64", "0f20d8", "mov rax, cr3") + c("long64", "0f22d8", "mov cr3, rax"))
    s.tlb_events = None
    halted(go(s))
    assert s.tlb_events is None


@pytest.mark.parametrize("bit", [1 << 0, 1 << 9, 1 << 10, 1 << 13, 1 << 16, 1 << 17, 1 << 18, 1 << 23, 1 << 32])
def test_cr4_unsupported_bits_gp(bit: int) -> None:
    """Bits the default model does not implement (VME, OSFXSR, OSXMMEXCPT, VMXE, FSGSBASE, PCIDE, OSXSAVE,
    CET, bits 63:32) are reserved: #GP(0) (SDM Vol. 2B MOV CR; cpumodel docstring)."""
    s = mk("long64", c("long64", "0f22e0", "mov cr4, rax"))
    s.gpr[0] = s.cr4 | bit
    faulted(go(s), Vector.GP, 0)


def test_cr4_supported_bits_accepted() -> None:
    # (SMEP is accepted too, but would forbid fetching the next instruction from these user pages.)
    bits = 1 << 2 | CR4_DE | CR4_PSE | CR4_PAE | CR4_PGE | 1 << 8 | CR4_UMIP | 1 << 21 | 1 << 22
    s = mk("long64", c("long64", "0f22e0", "mov cr4, rax"), rax=bits)
    halted(go(s))
    assert s.cr4 == bits and s.tlb_events == [("cr4", CR4_PAE, bits)]


def test_cr4_long_mode_rules() -> None:
    """In IA-32e mode: clearing PAE -> #GP(0); changing LA57 -> #GP(0) (SDM Vol. 3A 4.1.1, MOV CR)."""
    code = c("long64", "0f22e0", "mov cr4, rax")
    faulted(go(mk("long64", code, rax=0)), Vector.GP, 0)
    faulted(go(mk("long64", code, rax=CR4_PAE | CR4_LA57)), Vector.GP, 0)
    # Outside IA-32e mode LA57 may be set (it takes effect when long mode is activated).
    s = mk("prot32", c("prot32", "0f22e0", "mov cr4, eax"), rax=CR4_PAE | CR4_LA57)
    halted(go(s))
    assert s.cr4 == CR4_PAE | CR4_LA57


def test_cr4_umip_needs_model_support() -> None:
    s = mk("prot32", c("prot32", "0f22e0", "mov cr4, eax"), rax=CR4_UMIP, model=make_model(remove={"umip"}))
    faulted(go(s), Vector.GP, 0)


def test_pcid_rules() -> None:
    """CR4.PCIDE (model with PCID): only in IA-32e mode and with CR3[11:0] = 0 (SDM Vol. 3A 2.5, 4.10.1);
    then MOV CR3 bit 63 = do not invalidate, not stored (4.10.4.1); clearing PG -> #GP(0)."""
    pcid = make_model(add={"pcid"})
    set_pcide = c("long64", "0f22e0", "mov cr4, rax")
    s = mk("long64", set_pcide, rax=CR4_PAE | CR4_PCIDE, model=pcid)
    halted(go(s))
    assert s.cr4 & CR4_PCIDE
    s = mk("long64", set_pcide, rax=CR4_PAE | CR4_PCIDE, model=pcid)
    s.cr3 |= 5
    faulted(go(s), Vector.GP, 0)
    s = mk("prot32", c("prot32", "0f22e0", "mov cr4, eax"), rax=CR4_PCIDE, model=pcid)
    faulted(go(s), Vector.GP, 0)
    s = mk("long64", set_pcide, rax=CR4_PAE | CR4_PCIDE)  # default model: no PCID
    faulted(go(s), Vector.GP, 0)
    s = mk("long64", c("long64", "0f22d8", "mov cr3, rax"), rax=1 << 63 | 0x70000 | 7, model=pcid)
    s.cr4 |= CR4_PCIDE
    halted(go(s))
    assert s.cr3 == 0x70007 and s.tlb_events == [("cr3_keep", 0x70007)]


def test_clear_pg_with_pcide_in_compat_mode_gp() -> None:
    s = mk("long64", c("prot32", "0f22c0", "mov cr0, eax"), rax=CR0_PE | CR0_ET, model=make_model(add={"pcid"}))
    cs = s.seg[1].copy()
    cs.l, cs.db = 0, 1  # compatibility mode
    s.seg[1] = cs
    s.cr4 |= CR4_PCIDE
    faulted(go(s), Vector.GP, 0)
    s.cr4 &= ~CR4_PCIDE
    halted(go(s))
    assert not s.efer & EFER_LMA


def test_cr8() -> None:
    """CR8 = TPR[7:4]: bits 63:4 reserved, #GP(0) (SDM Vol. 2B MOV CR; Vol. 3A 10.8.6.1)."""
    code = c("long64", "440f22c0", "mov cr8, rax") + c("long64", "440f20c3", "mov rbx, cr8")
    s = mk("long64", code, rax=0xF, rbx=M64)
    halted(go(s))
    assert s.cr8 == 0xF and reg(s, "rbx") == 0xF
    faulted(go(mk("long64", code, rax=0x10)), Vector.GP, 0)


def test_lock_mov_cr0_is_cr8_on_amd() -> None:
    """APM Vol. 3 MOV CRn: LOCK MOV CR0 accesses CR8 (CPUID AltMovCr8, advertised by the default model)."""
    raw = bytes.fromhex("f00f22c0")
    text = str(next(iter(Decoder(32, raw, DecoderOptions.AMD))))
    assert text == "mov cr8,eax"
    s = mk("prot32", "f00f22c0", rax=5)
    old = s.cr0
    halted(go(s))
    assert s.cr8 == 5 and s.cr0 == old


@pytest.mark.parametrize("mode", ["prot32", "long64", "v86"])
def test_mov_cr_at_cpl3_gp(mode: str) -> None:
    """MOV CR at CPL > 0 (virtual-8086 mode included) -> #GP(0) (SDM Vol. 2B MOV CR)."""
    cpl = 0 if mode == "v86" else 3
    r = "r" if mode == "long64" else "e"
    for code, text in (("0f20c0", f"mov {r}ax, cr0"), ("0f22d8", f"mov cr3, {r}ax")):
        s = mk(mode, c(mode, code, text), cpl=cpl, rax=0x1234)
        old = (s.cr0, s.cr3)
        faulted(go(s), Vector.GP, 0)
        assert (s.cr0, s.cr3) == old and reg(s, "rax") == 0x1234


# -- debug registers (SDM Vol. 2B MOV--Move to/from Debug Registers; Vol. 3A 17.2) ------------------------

@pytest.mark.parametrize("mode", MODES)
def test_dr0_round_trip(mode: str) -> None:
    r = "r" if mode == "long64" else "e"
    code = c(mode, "0f23c0", f"mov dr0, {r}ax") + c(mode, "0f21c3", f"mov {r}bx, dr0")
    v = 0xFFFF_8000_1234_5678 if mode == "long64" else 0x1234_5678
    s = mk(mode, code, rax=v | (0 if mode == "long64" else 0xABCD << 32))
    halted(go(s))
    assert s.dr[0] == v and reg(s, "rbx") == v


@pytest.mark.parametrize("written,dr6,dr7", [(0, 0xFFFF_0FF0, 0x400), (M32, 0xFFFF_EFFF, 0xFFFF_27FF),
                                             (0x2000, 0xFFFF_2FF0, 0x2400)])
def test_dr6_dr7_fixed_bits(written: int, dr6: int, dr7: int) -> None:
    """DR6 bits 4-11, 16-31 read 1 and bit 12 reads 0; DR7 bit 10 reads 1, bits 11, 12, 14, 15 read 0
    (SDM Vol. 3A 17.2.3, 17.2.4; APM Vol. 2 13.1.1.3-4)."""
    code = (c("long64", "0f23f0", "mov dr6, rax") + c("long64", "0f21f3", "mov rbx, dr6")
            + c("long64", "0f23f8", "mov dr7, rax"))
    s = mk("long64", code, rax=written)
    halted(go(s))
    assert s.dr[6] == dr6 and reg(s, "rbx") == dr6 and s.dr[7] == dr7


@pytest.mark.parametrize("code,text", [("0f23f0", "mov dr6, rax"), ("0f23f8", "mov dr7, rax")])
def test_dr6_dr7_high_bits_gp(code: str, text: str) -> None:
    """Writing 1 to DR6/DR7 bits 63:32 -> #GP(0) (SDM Vol. 2B MOV DR "64-Bit Mode Exceptions")."""
    s = mk("long64", c("long64", code, text), rax=1 << 32)
    faulted(go(s), Vector.GP, 0)


def test_dr4_dr5_alias_without_de() -> None:
    """CR4.DE = 0: DR4/DR5 alias DR6/DR7 (SDM Vol. 3A 17.2.2)."""
    code = c("long64", "0f23e0", "mov dr4, rax") + c("long64", "0f21eb", "mov rbx, dr5")
    s = mk("long64", code, rax=0x1)
    halted(go(s))
    assert s.dr[6] == 0xFFFF_0FF1 and reg(s, "rbx") == s.dr[7] == 0x400


@pytest.mark.parametrize("code,text", [("0f23e0", "mov dr4, rax"), ("0f21eb", "mov rbx, dr5")])
def test_dr4_dr5_ud_with_de(code: str, text: str) -> None:
    s = mk("long64", c("long64", code, text))
    s.cr4 |= CR4_DE
    faulted(go(s), Vector.UD)


def test_general_detect_db() -> None:
    """DR7.GD = 1: any MOV DR raises #DB before the access, DR6.BD is set and GD cleared for the handler
    (SDM Vol. 3A 17.2.4, 17.3.1.2).  #DB is a fault here: RIP stays at the MOV."""
    s = mk("long64", c("long64", "0f21c3", "mov rbx, dr0"), rbx=7)
    s.dr[0] = 0x55
    s.dr[7] = 0x2400
    faulted(go(s), Vector.DB)
    assert s.dr[6] & (1 << 13) and not s.dr[7] & (1 << 13) and reg(s, "rbx") == 7
    halted(go(s))  # the re-executed MOV now succeeds
    assert reg(s, "rbx") == 0x55


def test_debug_register_check_order() -> None:
    """CPL first (#GP(0)), then DR4/DR5 with CR4.DE (#UD), then GD (#DB) (SDM Vol. 2B MOV DR exceptions)."""
    s = mk("prot32", c("prot32", "0f21e0", "mov eax, dr4"), cpl=3)
    s.dr[7] = 0x2400
    s.cr4 |= CR4_DE
    faulted(go(s), Vector.GP, 0)
    s = mk("prot32", c("prot32", "0f21e0", "mov eax, dr4"))
    s.dr[7] = 0x2400
    s.cr4 |= CR4_DE
    faulted(go(s), Vector.UD)
    assert s.dr[6] == 0xFFFF_0FF0  # no BD: the #DB was not raised


@pytest.mark.parametrize("mode", ["prot32", "long64", "v86"])
def test_mov_dr_cpl3_gp(mode: str) -> None:
    r = "r" if mode == "long64" else "e"
    cpl = 0 if mode == "v86" else 3
    s = mk(mode, c(mode, "0f23f8", f"mov dr7, {r}ax"), cpl=cpl, rax=0x1)
    faulted(go(s), Vector.GP, 0)
    assert s.dr[7] == 0x400


# -- privilege: CPL > 0 and virtual-8086 mode (SDM Vol. 3A 5.9) ------------------------------------------

PRIVILEGED = [  # (encoding, {bits: iced text}) -- memory operands through rAX / BX+SI
    ("0f0110", {32: "lgdt [eax]", 64: "lgdt [rax]", 16: "lgdt [bx+si]"}),
    ("0f0118", {32: "lidt [eax]", 64: "lidt [rax]", 16: "lidt [bx+si]"}),
    ("0f01f0", {32: "lmsw ax", 64: "lmsw ax", 16: "lmsw ax"}),
    ("0f06", {32: "clts", 64: "clts", 16: "clts"}),
    ("0f0138", {32: "invlpg [eax]", 64: "invlpg [rax]", 16: "invlpg [bx+si]"}),
    ("0f08", {32: "invd", 64: "invd", 16: "invd"}),
    ("0f09", {32: "wbinvd", 64: "wbinvd", 16: "wbinvd"}),
    ("f30f09", {32: "wbnoinvd", 64: "wbnoinvd", 16: "wbnoinvd"}),
    ("0f32", {32: "rdmsr", 64: "rdmsr", 16: "rdmsr"}),
    ("0f30", {32: "wrmsr", 64: "wrmsr", 16: "wrmsr"}),
    ("0f00d0", {32: "lldt ax", 64: "lldt ax", 16: "lldt ax"}),
    ("0f00d8", {32: "ltr ax", 64: "ltr ax", 16: "ltr ax"}),
]


@pytest.mark.parametrize("mode", ["prot32", "long64", "v86"])
@pytest.mark.parametrize("code,texts", PRIVILEGED)
def test_privileged_at_cpl3(mode: str, code: str, texts: dict[int, str]) -> None:
    """#GP(0) at CPL 3 and in virtual-8086 mode -- except LLDT/LTR, #UD in virtual-8086 mode (SDM Vol. 2A
    LLDT/LTR "Virtual-8086 Mode Exceptions")."""
    cpl = 0 if mode == "v86" else 3
    s = mk(mode, c(mode, code, texts[BITS[mode]]), cpl=cpl, rax=DATA, rbx=0, rsi=DATA, rcx=0xC000_0080)
    ev = go(s)
    if mode == "v86" and code in ("0f00d0", "0f00d8"):
        faulted(ev, Vector.UD)
    else:
        faulted(ev, Vector.GP, 0)
    assert s.tlb_events == []


def test_swapgs_cpl3_gp() -> None:
    s = mk("long64", c("long64", "0f01f8", "swapgs"), cpl=3)
    faulted(go(s), Vector.GP, 0)


# -- LGDT, LIDT, SGDT, SIDT (SDM Vol. 2A LGDT/LIDT, Vol. 2B SGDT, SIDT) --------------------------------------

PSEUDO = (0x1234).to_bytes(2, "little") + (0x1122_3344_5566_7788).to_bytes(8, "little")


@pytest.mark.parametrize("code,text,base", [
    ("0f01160060", "lgdt [0x6000]", 0x66_7788),  # operand size 16: 24-bit base, byte 6 ignored
    ("660f01160060", "lgdt [0x6000]", 0x5566_7788),  # operand size 32
])
def test_lgdt_real_mode_operand_sizes(code: str, text: str, base: int) -> None:
    s = mk("real", c("real", code, text))
    s.mem.phys.write_bytes(DATA, PSEUDO)
    halted(go(s))
    assert (s.gdtr.base, s.gdtr.limit) == (base, 0x1234)


def test_lidt_prot32_and_long64() -> None:
    s = mk("prot32", c("prot32", "0f0118", "lidt [eax]"), rax=DATA)
    s.mem.phys.write_bytes(DATA, PSEUDO)
    halted(go(s))
    assert (s.idtr.base, s.idtr.limit) == (0x5566_7788, 0x1234)
    s = mk("long64", c("long64", "0f011c2500600000", "lidt [0x6000]"))
    s.mem.phys.write_bytes(DATA, (0xFFF).to_bytes(2, "little") + (0xFFFF_8000_0000_1000).to_bytes(8, "little"))
    halted(go(s))
    assert (s.idtr.base, s.idtr.limit) == (0xFFFF_8000_0000_1000, 0xFFF)


@pytest.mark.parametrize("code,text", [("0f01142500600000", "lgdt [0x6000]"), ("0f011c2500600000", "lidt [0x6000]")])
def test_lgdt_lidt_noncanonical_base_gp(code: str, text: str) -> None:
    """64-bit mode: a non-canonical base is #GP(0) (APM Vol. 3 LGDT/LIDT exceptions)."""
    s = mk("long64", c("long64", code, text))
    s.mem.phys.write_bytes(DATA, PSEUDO)
    old = (s.gdtr.base, s.idtr.base)
    faulted(go(s), Vector.GP, 0)
    assert (s.gdtr.base, s.idtr.base) == old


@given(limit=st.integers(0, 0xFFFF), base=st.integers(0, (1 << 47) - 1), high=st.booleans())
@settings(max_examples=40)
def test_lgdt_sgdt_round_trip_long64(limit: int, base: int, high: bool) -> None:
    """SGDT stores exactly what LGDT loaded: 2 + 8 bytes in 64-bit mode."""
    if high:
        base |= M64 ^ ((1 << 47) - 1)  # canonical upper half
    code = c("long64", "0f0110", "lgdt [rax]") + c("long64", "0f0103", "sgdt [rbx]")
    s = mk("long64", code, rax=DATA, rbx=DATA + 0x100)
    s.mem.phys.write_bytes(DATA, limit.to_bytes(2, "little") + base.to_bytes(8, "little"))
    halted(go(s))
    assert s.mem.phys.read_bytes(DATA + 0x100, 10) == s.mem.phys.read_bytes(DATA, 10)


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32"])
def test_sgdt_sidt_store_full_32bit_base(mode: str) -> None:
    """Outside 64-bit mode SGDT/SIDT store the limit and the full 32-bit base at either operand size
    (current SDM Vol. 2B SGDT "Operation"); the bytes after the 6 are untouched."""
    if BITS[mode] == 16:
        code = c(mode, "0f01060060", "sgdt [0x6000]") + c(mode, "0f010e1060", "sidt [0x6010]")
    else:
        code = c(mode, "0f010500600000", "sgdt [0x6000]") + c(mode, "0f010d10600000", "sidt [0x6010]")
    s = mk(mode, code)
    s.gdtr.base, s.gdtr.limit = 0xFFFF_8000_1234_5678, 0xABCD  # bits 63:32 are not stored
    s.idtr.base, s.idtr.limit = 0x8765_4321, 0x7FF
    s.mem.phys.write_bytes(DATA, b"\xee" * 0x20)
    halted(go(s))
    assert s.mem.phys.read_bytes(DATA, 7) == bytes.fromhex("cdab 78563412 ee")
    assert s.mem.phys.read_bytes(DATA + 0x10, 7) == bytes.fromhex("ff07 21436587 ee")


def test_sgdt_at_cpl3_and_umip() -> None:
    """SGDT/SIDT run at any CPL unless CR4.UMIP = 1, then #GP(0) at CPL > 0 (SDM Vol. 2B SGDT; 3A 2.5)."""
    code = c("prot32", "0f0100", "sgdt [eax]")
    s = mk("prot32", code, cpl=3, rax=DATA)
    finished(s, go(s))
    assert s.mem.phys.read(DATA, 2) == s.gdtr.limit
    for sidt in (False, True):
        code = c("prot32", "0f0108", "sidt [eax]") if sidt else c("prot32", "0f0100", "sgdt [eax]")
        s = mk("prot32", code, cpl=3, rax=DATA)
        s.cr4 |= CR4_UMIP
        faulted(go(s), Vector.GP, 0)
        s = mk("prot32", code, rax=DATA)
        s.cr4 |= CR4_UMIP
        halted(go(s))


# -- LLDT, LTR, SLDT, STR (SDM Vol. 2A LLDT, LTR; Vol. 2B SLDT, STR) ---------------------------------------

LDT_BASE = 0x5000


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_lldt_loads_ldtr_and_ldt_is_used(mode: str) -> None:
    """LLDT loads LDTR from a GDT LDT descriptor (the RPL is ignored); a later MOV DS with TI = 1 reads
    the new LDT (SDM Vol. 2A LLDT; Vol. 3A 3.5.1)."""
    code = c(mode, "0f00d0", "lldt ax") + c(mode, "8ed9", "mov ds, cx")
    s = mk(mode, code, rax=0x30 | 3, rcx=0x0C)  # DS <- LDT index 1
    add_desc(s, 6, sysdesc(LDT_BASE, 0xFF, 2))
    put(s, LDT_BASE + 8, encode_descriptor(Segment(base=0x12340, limit=0xFFFF, type=3, s=1, dpl=0, p=1, db=1)))
    halted(go(s))
    assert (s.ldtr.selector, s.ldtr.base, s.ldtr.limit, s.ldtr.type) == (0x33, LDT_BASE, 0xFF, 2)
    assert not s.ldtr.unusable
    assert s.seg[3].base == 0x12340 and s.seg[3].selector == 0x0C


def test_lldt_long_mode_16_byte_descriptor() -> None:
    """IA-32e mode: the LDT descriptor is 16 bytes, base bits 63:32 in the third doubleword (SDM Vol. 3A
    7.2.3, Figure 7-4)."""
    s = mk("long64", c("long64", "0f00d0", "lldt ax"), rax=0x30)
    base = 0xFFFF_8000_0000_5000
    add_desc(s, 6, sysdesc(base, 0xFF, 2), base >> 32)
    halted(go(s))
    assert (s.ldtr.selector, s.ldtr.base, s.ldtr.limit, s.ldtr.type) == (0x30, base, 0xFF, 2)


@pytest.mark.parametrize("sel", [0, 1, 3])
def test_lldt_null_makes_ldtr_unusable(sel: int) -> None:
    s = mk("prot32", c("prot32", "0f00d0", "lldt ax"), rax=sel)
    halted(go(s))
    assert s.ldtr.unusable and s.ldtr.selector == sel


def test_lldt_faults() -> None:
    """TI = 1 or not an LDT descriptor or beyond the GDT limit -> #GP(selector); not present ->
    #NP(selector); IA-32e mode: upper type field != 0 or non-canonical base -> #GP(selector)."""
    code = c("prot32", "0f00d0", "lldt ax")
    cases = [
        (0x34, None, Vector.GP, 0x34),  # TI = 1
        (0x30, sysdesc(LDT_BASE, 0xFF, 9), Vector.GP, 0x30),  # a TSS
        (0x30, encode_descriptor(Segment(type=3, s=1)), Vector.GP, 0x30),  # a data segment
        (0x30, sysdesc(LDT_BASE, 0xFF, 2, p=0), Vector.NP, 0x30),
        (0x48, None, Vector.GP, 0x48),  # beyond the limit
    ]
    for sel, desc, vec, err in cases:
        s = mk("prot32", code, rax=sel)
        if desc is not None:
            add_desc(s, 6, desc)
        old = s.ldtr.copy()
        faulted(go(s), vec, err)
        assert s.ldtr == old
    lcode = c("long64", "0f00d0", "lldt ax")
    for high in (1 << 40, 0x0001_0000):  # upper type bit 8; base bit 48 -> non-canonical
        s = mk("long64", lcode, rax=0x30)
        add_desc(s, 6, sysdesc(LDT_BASE, 0xFF, 2), high)
        faulted(go(s), Vector.GP, 0x30)
    s = mk("long64", lcode, rax=0x30)  # 16-byte descriptor must lie within the limit
    add_desc(s, 6, sysdesc(LDT_BASE, 0xFF, 2))
    faulted(go(s), Vector.GP, 0x30)


@pytest.mark.parametrize("mode", ["real", "v86"])
@pytest.mark.parametrize("code,text", [("0f00d0", "lldt ax"), ("0f00d8", "ltr ax"), ("0f00c0", "sldt ax"),
                                       ("0f00c8", "str ax"), ("0f02c3", "lar ax, bx"), ("0f03c3", "lsl ax, bx"),
                                       ("0f00e0", "verr ax"), ("0f00e8", "verw ax")])
def test_protected_mode_only_ud(mode: str, code: str, text: str) -> None:
    """#UD in real-address and virtual-8086 mode (SDM Vol. 2A LLDT/LTR/LAR/LSL, Vol. 2B SLDT/STR/VERR)."""
    s = mk(mode, c(mode, code, text), rax=0x30, rbx=0x08)
    faulted(go(s), Vector.UD)


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_ltr_marks_busy(mode: str) -> None:
    """LTR loads TR from an available TSS and sets the busy bit in memory; loading it again is #GP(sel)
    (SDM Vol. 2A LTR, Vol. 3A 7.2.2)."""
    long = mode == "long64"
    base = 0x0000_0001_0000_4000 if long else 0x4000
    s = mk(mode, c(mode, "0f00d8", "ltr ax"), rax=0x38)
    add_desc(s, 7, sysdesc(base, 0x67, 9), (base >> 32) if long else None)
    halted(go(s))
    assert (s.tr.selector, s.tr.base, s.tr.limit, s.tr.type) == (0x38, base, 0x67, 0xB)
    assert (s.mem.phys.read(GDT + 0x38 + 5, 1) & 0xF) == 0xB
    s.halted, s.rip = False, 0x1000
    faulted(go(s), Vector.GP, 0x38)


def test_ltr_faults_and_16bit_tss() -> None:
    code = c("prot32", "0f00d8", "ltr ax")
    s = mk("prot32", code, rax=0x38)
    add_desc(s, 7, sysdesc(0x4000, 0x2B, 1))  # 16-bit available TSS: valid outside IA-32e mode
    halted(go(s))
    assert s.tr.type == 3
    s = mk("long64", c("long64", "0f00d8", "ltr ax"), rax=0x38)
    add_desc(s, 7, sysdesc(0x4000, 0x2B, 1), 0)  # ... but not in IA-32e mode
    faulted(go(s), Vector.GP, 0x38)
    for sel, desc, vec, err in [(0, None, Vector.GP, 0), (3, None, Vector.GP, 0), (0x3C, None, Vector.GP, 0x3C),
                                (0x38, sysdesc(0x4000, 0x67, 9, p=0), Vector.NP, 0x38),
                                (0x38, sysdesc(0x4000, 0x67, 2), Vector.GP, 0x38)]:
        s = mk("prot32", code, rax=sel)
        if desc is not None:
            add_desc(s, 7, desc)
        faulted(go(s), vec, err)
        assert s.tr.selector == 0 and (desc is None or s.mem.phys.read(GDT + 0x38 + 5, 1) == desc >> 40 & 0xFF)


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
def test_sldt_str_destinations(mode: str) -> None:
    """Register: the selector zero-extended to the operand size (a 16-bit register keeps its upper bits);
    memory: 16 bits (SDM Vol. 2B SLDT, STR)."""
    if BITS[mode] == 16:
        code = (c(mode, "0f00c8", "str ax") + c(mode, "660f00c1", "sldt ecx")
                + c(mode, "0f000e0060", "str [0x6000]"))
    elif BITS[mode] == 32:
        code = (c(mode, "660f00c8", "str ax") + c(mode, "0f00c1", "sldt ecx")
                + c(mode, "0f000d00600000", "str [0x6000]"))
    else:
        code = (c(mode, "660f00c8", "str ax") + c(mode, "480f00c1", "sldt rcx")
                + c(mode, "0f000c2500600000", "str [0x6000]"))
    s = mk(mode, code, rax=M64, rcx=M64)
    s.tr = Segment(selector=0x38, type=0xB, s=0)
    s.ldtr = Segment(selector=0x30, type=2, s=0)
    s.mem.phys.write_bytes(DATA, b"\xee" * 4)
    halted(go(s))
    assert reg(s, "rax") == (M64 & ~0xFFFF) | 0x38 and reg(s, "rcx") == 0x30
    assert s.mem.phys.read_bytes(DATA, 4) == bytes.fromhex("3800eeee")


def test_sldt_str_umip() -> None:
    for code, text in (("0f00c0", "sldt eax"), ("0f00c8", "str eax")):
        s = mk("prot32", c("prot32", code, text), cpl=3)
        finished(s, go(s))
        s = mk("prot32", c("prot32", code, text), cpl=3)
        s.cr4 |= CR4_UMIP
        faulted(go(s), Vector.GP, 0)


# -- LMSW, SMSW, CLTS (SDM Vol. 2A LMSW, CLTS; Vol. 2B SMSW) ----------------------------------------------

def test_lmsw() -> None:
    """LMSW loads CR0 bits 3:0 only; it can set PE (entering protected mode) but never clear it."""
    code = c("real", "0f01f0", "lmsw ax") + c("real", "0f01f3", "lmsw bx")
    s = mk("real", code, rax=0xFFFF, rbx=0xFFF0)
    halted(go(s))
    assert s.cr0 == CR0_ET | CR0_PE  # after the second LMSW: PE kept, MP/EM/TS cleared
    assert s.tlb_events == [("cr0", CR0_ET, CR0_ET | 0xF), ("cr0", CR0_ET | 0xF, CR0_ET | CR0_PE)]


@pytest.mark.parametrize("mode", MODES)
def test_smsw(mode: str) -> None:
    """Register: CR0 at the operand size (zero-extended; 16-bit keeps the upper bits); memory: CR0[15:0]."""
    if BITS[mode] == 16:
        code = c(mode, "0f01e0", "smsw ax") + c(mode, "660f01e1", "smsw ecx") + c(mode, "0f01260060", "smsw [0x6000]")
    elif BITS[mode] == 32:
        code = (c(mode, "660f01e0", "smsw ax") + c(mode, "0f01e1", "smsw ecx")
                + c(mode, "0f012500600000", "smsw [0x6000]"))
    else:
        code = (c(mode, "660f01e0", "smsw ax") + c(mode, "480f01e1", "smsw rcx")
                + c(mode, "0f01242500600000", "smsw [0x6000]"))
    s = mk(mode, code, rax=M64, rcx=M64)
    s.cr0 |= CR0_TS | 1 << 5
    s.mem.phys.write_bytes(DATA, b"\xee" * 4)
    halted(go(s))
    assert reg(s, "rax") == (M64 & ~0xFFFF) | (s.cr0 & 0xFFFF) and reg(s, "rcx") == s.cr0
    assert s.mem.phys.read(DATA, 4) == 0xEEEE_0000 | (s.cr0 & 0xFFFF)


def test_smsw_umip() -> None:
    s = mk("long64", c("long64", "0f01e0", "smsw eax"), cpl=3)
    finished(s, go(s))
    s = mk("long64", c("long64", "0f01e0", "smsw eax"), cpl=3)
    s.cr4 |= CR4_UMIP
    faulted(go(s), Vector.GP, 0)


@pytest.mark.parametrize("mode", MODES)
def test_clts(mode: str) -> None:
    s = mk(mode, c(mode, "0f06", "clts") + c(mode, "0f06", "clts"))
    s.cr0 |= CR0_TS
    halted(go(s))
    assert not s.cr0 & CR0_TS and s.tlb_events == [("cr0", s.cr0 | CR0_TS, s.cr0)]


# -- INVLPG, INVD, WBINVD, WBNOINVD ------------------------------------------------------------------------

def test_invlpg_records_linear_address() -> None:
    """INVLPG takes the linear address (segment base + offset) and accesses nothing: no #PF for an
    unmapped page, no segment-limit check (SDM Vol. 2A INVLPG)."""
    code = c("long64", "0f0138", "invlpg [rax]") + c("long64", "640f0138", "invlpg fs:[rax]")
    s = mk("long64", code, rax=0x7FFF_0000_1234)  # not mapped by the flat tables
    fs = s.seg[4].copy()
    fs.base = 0x1000
    s.seg[4] = fs
    halted(go(s))
    assert s.tlb_events == [("invlpg", 0x7FFF_0000_1234), ("invlpg", 0x7FFF_0000_2234)]
    s = mk("prot32", c("prot32", "0f0138", "invlpg [eax]"), rax=0xFFFF_F000)
    ds = s.seg[3].copy()
    ds.base, ds.limit = 0x2000, 0xFFF
    s.seg[3] = ds
    halted(go(s))
    assert s.tlb_events == [("invlpg", 0x1000)]  # wraps at 4 GiB; beyond DS.limit but not checked


def test_invlpg_noncanonical_is_nop() -> None:
    """64-bit mode: a non-canonical address makes INVLPG a NOP (SDM Vol. 2A INVLPG)."""
    s = mk("long64", c("long64", "0f0138", "invlpg [rax]"), rax=0x0000_8000_0000_0000)
    halted(go(s))
    assert s.tlb_events == []


@pytest.mark.parametrize("mode", MODES)
def test_cache_control_at_cpl0(mode: str) -> None:
    code = c(mode, "0f08", "invd") + c(mode, "0f09", "wbinvd") + c(mode, "f30f09", "wbnoinvd")
    s = mk(mode, code)
    halted(go(s))
    assert s.rip == 0x1000 + 8


# -- LAR, LSL, VERR, VERW (SDM Vol. 2A LAR Table 3-53, LSL; Vol. 2B VERR/VERW; APM Vol. 3) ----------------

LAR_LEGACY = {1, 2, 3, 4, 5, 9, 0xB, 0xC}
LAR_IA32E = {"amd": {2, 9, 0xB, 0xC}, "intel": {9, 0xB, 0xC}}
LSL_LEGACY = {1, 2, 3, 9, 0xB}
LSL_IA32E = {2, 9, 0xB}


def probe_ref(op: str, ia32e: bool, vendor: str, cpl: int, sel: int, desc: int, high: int) -> tuple[bool, int]:
    """(ZF, value) from the manuals' tables, with plain ints."""
    hi = desc >> 32
    s_bit, typ, dpl = hi >> 12 & 1, hi >> 8 & 0xF, hi >> 13 & 3
    conforming = s_bit == 1 and typ & 0b1100 == 0b1100
    visible = conforming or dpl >= max(cpl, sel & 3)
    upper_ok = (high >> 40) & 0x1F == 0
    if op == "verr":
        return (s_bit == 1 and (typ & 8 == 0 or typ & 2 != 0) and visible), 0
    if op == "verw":
        return (s_bit == 1 and typ & 8 == 0 and typ & 2 != 0 and visible), 0
    if s_bit:
        valid = True
    elif op == "lar":
        valid = typ in (LAR_IA32E[vendor] if ia32e else LAR_LEGACY) and (upper_ok or not ia32e)
    else:
        valid = typ in (LSL_IA32E if ia32e else LSL_LEGACY) and (upper_ok or not ia32e)
    ok = valid and visible
    if op == "lar":
        return ok, hi & 0x00F0_FF00
    limit = (desc & 0xFFFF) | (hi & 0xF_0000)
    if hi >> 23 & 1:
        limit = limit << 12 | 0xFFF
    return ok, limit


PROBE_CODE = {"lar": ("0f02c3", "lar eax, ebx"), "lsl": ("0f03c3", "lsl eax, ebx"),
              "verr": ("0f00e3", "verr bx"), "verw": ("0f00eb", "verw bx")}


@given(op=st.sampled_from(sorted(PROBE_CODE)), mode=st.sampled_from(["prot32", "long64"]),
       vendor=st.sampled_from(["amd", "intel"]), cpl=st.sampled_from([0, 3]), rpl=st.integers(0, 3),
       desc=st.integers(0, M64), upper=st.sampled_from([0, 1 << 40, 0x1F << 40]))
@settings(max_examples=150)
def test_probes_match_reference(op: str, mode: str, vendor: str, cpl: int, rpl: int, desc: int,
                                upper: int) -> None:
    """LAR/LSL/VERR/VERW against the manuals' validity tables and privilege rule, over random descriptors."""
    code, text = PROBE_CODE[op]
    s = mk(mode, c(mode, code, text), cpl=cpl, rax=M64, rbx=0x30 | rpl)
    high = upper | 0x1234
    add_desc(s, 6, desc, high if mode == "long64" else None)
    s.set_flag(F.CF, s.D.true())
    finished(s, go(s, vendor))
    ok, value = probe_ref(op, mode == "long64", vendor, cpl, 0x30 | rpl, desc, high)
    assert flag(s, F.ZF) == ok and flag(s, F.CF)
    if op in ("lar", "lsl"):
        assert reg(s, "rax") == (value if ok else M64)


@pytest.mark.parametrize("op", sorted(PROBE_CODE))
def test_probe_unreachable_selectors_clear_zf(op: str) -> None:
    """Null selector, beyond the GDT limit, an LDT selector with LDTR unusable: ZF = 0, no fault, no write."""
    code, text = PROBE_CODE[op]
    for sel in (0, 3, 0x48, 0x0C):
        s = mk("prot32", c("prot32", code, text), rax=M64, rbx=sel)
        s.ldtr = Segment(type=2, s=0, unusable=True)
        s.set_flag(F.ZF, s.D.true())
        halted(go(s))
        assert not flag(s, F.ZF) and reg(s, "rax") == M64


def test_lar_lsl_operand_sizes() -> None:
    """16-bit destination: LAR masks with FF00H, LSL keeps the low 16 bits of the limit; 64-bit: zero-extended."""
    code = (c("long64", "660f02c3", "lar ax, bx") + c("long64", "480f03cb", "lsl rcx, rbx")
            + c("long64", "660f03d3", "lsl dx, bx"))
    s = mk("long64", code, rax=M64, rbx=0x10, rcx=M64, rdx=M64)
    halted(go(s))
    hi = s.mem.phys.read(GDT + 0x10 + 4, 4)
    assert reg(s, "rax") == (M64 & ~0xFFFF) | (hi & 0xFF00)
    assert reg(s, "rcx") == 0xFFFF_FFFF and reg(s, "rdx") == (M64 & ~0xFFFF) | 0xFFFF


def test_lar_through_ldt() -> None:
    code = c("prot32", "0f02c3", "lar eax, ebx")
    s = mk("prot32", code, rbx=0x0C | 3)
    s.ldtr = Segment(selector=0x30, base=LDT_BASE, limit=0xF, type=2, s=0)
    put(s, LDT_BASE + 8, encode_descriptor(Segment(base=0, limit=0xFFFF, type=0x3, s=1, dpl=3, p=1)))
    halted(go(s))
    assert flag(s, F.ZF) and reg(s, "rax") == 0xF300


# -- guest programs that switch modes (real -> protected -> paging -> PAE -> long -> compatibility) ---------

GDT2, PSEUDO2 = 0x2100, 0x2000
PROGRAM = [
    (0x1000, 16, [("0f01160020", "lgdt [0x2000]"), ("0f20c0", "mov eax, cr0"), ("6683c801", "or eax, 0x1"),
                  ("0f22c0", "mov cr0, eax"), ("ea00110800", "jmp far 0x1100, 0x0008")]),
    (0x1100, 32, [("66b81000", "mov ax, 0x10"), ("8ed8", "mov ds, ax"), ("8ed0", "mov ss, ax"),
                  ("8ec0", "mov es, ax"), ("bc00800000", "mov esp, 0x8000"),
                  # 32-bit paging with 4-MiB pages
                  ("0f20e0", "mov eax, cr4"), ("83c810", "or eax, 0x10"), ("0f22e0", "mov cr4, eax"),
                  ("b800300000", "mov eax, 0x3000"), ("0f22d8", "mov cr3, eax"), ("0f20c0", "mov eax, cr0"),
                  ("0d00000080", "or eax, 0x80000000"), ("0f22c0", "mov cr0, eax"),
                  ("8b1d00604000", "mov ebx, [0x406000]"),
                  # PAE paging: paging off, CR3 = PDPT, CR4.PAE, paging on (loads the PDPTEs)
                  ("0f20c0", "mov eax, cr0"), ("25ffffff7f", "and eax, 0x7fffffff"), ("0f22c0", "mov cr0, eax"),
                  ("b800400000", "mov eax, 0x4000"), ("0f22d8", "mov cr3, eax"), ("0f20e0", "mov eax, cr4"),
                  ("83c820", "or eax, 0x20"), ("0f22e0", "mov cr4, eax"), ("0f20c0", "mov eax, cr0"),
                  ("0d00000080", "or eax, 0x80000000"), ("0f22c0", "mov cr0, eax"),
                  ("8b3504604000", "mov esi, [0x406004]"),
                  # IA-32e: paging off, EFER.LME, CR3 = PML4, paging on -> LMA, then a far jump to 64-bit code
                  ("0f20c0", "mov eax, cr0"), ("25ffffff7f", "and eax, 0x7fffffff"), ("0f22c0", "mov cr0, eax"),
                  ("b9800000c0", "mov ecx, 0xc0000080"), ("0f32", "rdmsr"), ("0d00010000", "or eax, 0x100"),
                  ("0f30", "wrmsr"), ("b800900000", "mov eax, 0x9000"), ("0f22d8", "mov cr3, eax"),
                  ("0f20c0", "mov eax, cr0"), ("0d00000080", "or eax, 0x80000000"), ("0f22c0", "mov cr0, eax"),
                  ("ea001300001800", "jmp far 0x00001300, 0x0018")]),
    (0x1300, 64, [("488b3c2508604000", "mov rdi, [0x406008]"), ("0f20c5", "mov rbp, cr0"),
                  ("ff2c2500610000", "jmp far fword ptr [0x6100]")]),
    (0x1400, 32, [("0f20c0", "mov eax, cr0"), ("25ffffff7f", "and eax, 0x7fffffff"), ("0f22c0", "mov cr0, eax"),
                  ("f4", "hlt")]),
]


def build_program() -> MachineState:
    s = flat_machine("real")
    for addr, bits, insns in PROGRAM:
        code = ""
        for hexcode, text in insns:
            check({16: "real", 32: "prot32", 64: "long64"}[bits], hexcode, text)
            code += hexcode
        s.mem.phys.write_bytes(addr, bytes.fromhex(code))
    s.rip = 0x1000
    gdt = [0, encode_descriptor(Segment(limit=0xFFFF_FFFF, type=0xB, s=1, p=1, db=1, g=1)),
           encode_descriptor(Segment(limit=0xFFFF_FFFF, type=0x3, s=1, p=1, db=1, g=1)),
           encode_descriptor(Segment(limit=0xFFFF_FFFF, type=0xB, s=1, p=1, l=1, g=1))]
    for k, raw in enumerate(gdt):
        put(s, GDT2 + 8 * k, raw)
    s.mem.phys.write_bytes(PSEUDO2, (8 * len(gdt) - 1).to_bytes(2, "little") + GDT2.to_bytes(4, "little"))
    paging_tables(s)
    put(s, DATA, 0x1111_1111, 4)
    put(s, DATA + 4, 0x2222_2222, 4)
    put(s, DATA + 8, 0x3333_3333_3333_3333)
    s.mem.phys.write_bytes(0x6100, (0x1400).to_bytes(4, "little") + (0x08).to_bytes(2, "little"))
    s.tlb_events = []
    return s


def test_guest_program_switches_through_every_mode() -> None:
    """One guest program: real mode -> protected mode (LGDT, CR0.PE, far JMP) -> 32-bit paging -> PAE
    paging (PDPTE load) -> IA-32e mode (EFER.LME by WRMSR, CR0.PG -> LMA, far JMP to a 64-bit segment)
    -> compatibility mode (far JMP) -> paging off (LMA cleared).  Each paging mode is proven by a read
    through a mapping that exists only there (linear 0x400000 -> physical 0)."""
    s = build_program()
    ev = SpecCPU(s).run(200)
    halted(ev)
    assert reg(s, "rbx") == 0x1111_1111  # 32-bit paging
    assert reg(s, "rsi") == 0x2222_2222  # PAE paging
    assert reg(s, "rdi") == 0x3333_3333_3333_3333  # 64-bit mode (REX.W)
    assert reg(s, "rbp") == CR0_PE | CR0_ET | CR0_PG  # CR0 read in 64-bit mode
    assert s.pdptes == [PD_PAE | 1, 0, 0, 0]
    assert s.efer == EFER_LME and s.cr0 == CR0_PE | CR0_ET and s.code_bits == 32
    effs = [e for e in s.tlb_events if e[0] == "efer"]  # type: ignore[union-attr]
    assert effs == [("efer", 0, EFER_LME), ("efer", EFER_LME, EFER_LME | EFER_LMA),
                    ("efer", EFER_LME | EFER_LMA, EFER_LME)]


def test_guest_program_mode_switch_state_without_far_jumps() -> None:
    """The same transitions checked on the state after each MOV CR0 (independent of far JMP): run the
    real-mode prologue up to the far jump, and the 32-bit part from a prepared protected-mode state."""
    s = build_program()
    cpu = SpecCPU(s)
    for _ in range(4):
        assert cpu.step() is None
    assert s.protected and s.code_bits == 16 and (s.gdtr.base, s.gdtr.limit) == (GDT2, 0x1F)


# -- a whole privileged sequence at CPL 0 in each mode: events and no faults --------------------------------

@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_event_order_is_program_order(mode: str) -> None:
    r = "r" if mode == "long64" else "e"
    code = (c(mode, "0f0138", f"invlpg [{r}ax]") + c(mode, "0f20db", f"mov {r}bx, cr3")
            + c(mode, "0f22db", f"mov cr3, {r}bx") + c(mode, "0f06", "clts"))
    s = mk(mode, code, rax=0x5000)
    s.cr0 |= CR0_TS
    halted(go(s))
    assert [e[0] for e in s.tlb_events] == ["invlpg", "cr3", "cr0"]  # type: ignore[union-attr]


def test_invlpg_real_mode() -> None:
    """INVLPG is valid in real mode (CPL 0): the linear address is segment base + offset."""
    s = mk("real", c("real", "0f013e0060", "invlpg [0x6000]"))
    ds = s.seg[3].copy()
    ds.selector, ds.base = 0x100, 0x1000
    s.seg[3] = ds
    halted(go(s))
    assert s.tlb_events == [("invlpg", 0x7000)]


def test_lmsw_long_mode_and_memory_operand() -> None:
    """LMSW with a 16-bit memory source in 64-bit mode: only bits 3:0 are loaded (PE already 1)."""
    s = mk("long64", c("long64", "0f01342500600000", "lmsw [0x6000]"))
    put(s, DATA, 0xFFFE, 2)
    halted(go(s))
    assert s.cr0 & 0xF == 0xF and s.cr0 & CR0_PG
