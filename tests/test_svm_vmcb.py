"""The VMCB layout (AMD APM Vol. 2 Appendix B), exit codes (Appendix C), EVENTINJ, the IOPM/MSRPM
layout (APM 15.10.1, 15.11) and the state round trip machine state -> VMCB -> machine state."""

from __future__ import annotations

import pytest
import z3
from hypothesis import given
from hypothesis import strategies as st
from svm_harness import MODEL

from spec.domain.concrete import CONCRETE as D
from spec.memory import PhysicalMemory
from spec.state import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    EFER_LMA,
    EFER_LME,
    EFER_SVME,
    MachineState,
    Segment,
    TableRegister,
)
from spec.svm.exitcodes import (
    ExitCode,
    IoioInfo,
    exit_name,
    exitcode_from_u64,
    exitcode_to_u64,
    intercept_bit,
    ioio_info,
)
from spec.svm.vmcb import (
    FIELDS,
    IOPM_SIZE,
    MSRPM_SIZE,
    SEGMENTS,
    VMCB,
    EventInj,
    iopm_intercepts,
    iopm_set,
    load_guest_state,
    msrpm_intercepts,
    msrpm_set,
    pack_attrib,
    save_guest_state,
    unpack_attrib,
    vmload_state,
    vmsave_state,
)

# (offset, width in bytes, low bit, bit count) from APM Vol. 2 Tables B-1 and B-2, typed in independently.
APM_LAYOUT = {
    "intercept_cr_read": (0x000, 2, 0, None), "intercept_cr_write": (0x002, 2, 0, None),
    "intercept_dr_read": (0x004, 2, 0, None), "intercept_dr_write": (0x006, 2, 0, None),
    "intercept_exceptions": (0x008, 4, 0, None), "intercept_word3": (0x00C, 4, 0, None),
    "intercept_word4": (0x010, 4, 0, None), "intercept_word5": (0x014, 4, 0, None),
    "pause_filter_threshold": (0x03C, 2, 0, None), "pause_filter_count": (0x03E, 2, 0, None),
    "iopm_base_pa": (0x040, 8, 0, None), "msrpm_base_pa": (0x048, 8, 0, None), "tsc_offset": (0x050, 8, 0, None),
    "guest_asid": (0x058, 4, 0, None), "tlb_control": (0x05C, 1, 0, None),
    "v_tpr": (0x060, 8, 0, 8), "v_irq": (0x060, 8, 8, 1), "v_intr_prio": (0x060, 8, 16, 4),
    "v_ign_tpr": (0x060, 8, 20, 1), "v_intr_masking": (0x060, 8, 24, 1), "v_intr_vector": (0x060, 8, 32, 8),
    "interrupt_shadow": (0x068, 8, 0, 1), "exitcode": (0x070, 8, 0, None), "exitinfo1": (0x078, 8, 0, None),
    "exitinfo2": (0x080, 8, 0, None), "exitintinfo": (0x088, 8, 0, None), "np_enable": (0x090, 8, 0, 1),
    "eventinj": (0x0A8, 8, 0, None), "n_cr3": (0x0B0, 8, 0, None), "vmcb_clean": (0x0C0, 4, 0, None),
    "nrip": (0x0C8, 8, 0, None), "guest_insn_len": (0x0D0, 1, 0, None),
    "cpl": (0x4CB, 1, 0, None), "efer": (0x4D0, 8, 0, None), "cr4": (0x548, 8, 0, None), "cr3": (0x550, 8, 0, None),
    "cr0": (0x558, 8, 0, None), "dr7": (0x560, 8, 0, None), "dr6": (0x568, 8, 0, None),
    "rflags": (0x570, 8, 0, None), "rip": (0x578, 8, 0, None), "rsp": (0x5D8, 8, 0, None),
    "rax": (0x5F8, 8, 0, None), "star": (0x600, 8, 0, None), "lstar": (0x608, 8, 0, None),
    "cstar": (0x610, 8, 0, None), "sfmask": (0x618, 8, 0, None), "kernel_gs_base": (0x620, 8, 0, None),
    "sysenter_cs": (0x628, 8, 0, None), "sysenter_esp": (0x630, 8, 0, None), "sysenter_eip": (0x638, 8, 0, None),
    "cr2": (0x640, 8, 0, None), "g_pat": (0x668, 8, 0, None),
}
APM_SEGMENTS = {"es": 0x400, "cs": 0x410, "ss": 0x420, "ds": 0x430, "fs": 0x440, "gs": 0x450, "gdtr": 0x460,
                "ldtr": 0x470, "idtr": 0x480, "tr": 0x490}


def fresh() -> VMCB:
    phys = PhysicalMemory()
    phys.map_page(0x5000)
    return VMCB(phys, 0x5000)


@pytest.mark.parametrize("name", sorted(APM_LAYOUT))
def test_field_layout_matches_appendix_b(name: str) -> None:
    f = FIELDS[name]
    assert (f.offset, f.width, f.shift, f.bits) == APM_LAYOUT[name]


def test_segment_slots_match_appendix_b() -> None:
    assert SEGMENTS == APM_SEGMENTS


@pytest.mark.parametrize("name", sorted(APM_LAYOUT))
def test_each_field_writes_its_own_bytes_only(name: str) -> None:
    """Writing all ones to a field sets exactly its bits in the page (a mutation check of the offsets)."""
    v = fresh()
    setattr(v, "exitcode_raw" if name == "exitcode" else name, (1 << 64) - 1)
    offset, width, shift, bits = APM_LAYOUT[name]
    page = v.phys.read_bytes(v.pa, 4096)
    expected = ((1 << bits) - 1) << shift if bits is not None else (1 << (8 * width)) - 1
    assert int.from_bytes(page[offset:offset + width], "little") == expected
    assert not any(page[:offset]) and not any(page[offset + width:])


def test_exit_codes_match_appendix_c() -> None:
    expected = {"CR0_READ": 0, "CR15_READ": 0xF, "CR0_WRITE": 0x10, "CR8_WRITE": 0x18, "DR0_READ": 0x20,
                "DR7_WRITE": 0x37, "EXCP0": 0x40, "EXCP_PF": 0x4E, "EXCP31": 0x5F, "INTR": 0x60, "NMI": 0x61,
                "SMI": 0x62, "INIT": 0x63, "VINTR": 0x64, "CR0_SEL_WRITE": 0x65, "IDTR_READ": 0x66,
                "GDTR_READ": 0x67, "LDTR_READ": 0x68, "TR_READ": 0x69, "IDTR_WRITE": 0x6A, "GDTR_WRITE": 0x6B,
                "LDTR_WRITE": 0x6C, "TR_WRITE": 0x6D, "RDTSC": 0x6E, "RDPMC": 0x6F, "PUSHF": 0x70, "POPF": 0x71,
                "CPUID": 0x72, "RSM": 0x73, "IRET": 0x74, "SWINT": 0x75, "INVD": 0x76, "PAUSE": 0x77, "HLT": 0x78,
                "INVLPG": 0x79, "INVLPGA": 0x7A, "IOIO": 0x7B, "MSR": 0x7C, "TASK_SWITCH": 0x7D,
                "FERR_FREEZE": 0x7E, "SHUTDOWN": 0x7F, "VMRUN": 0x80, "VMMCALL": 0x81, "VMLOAD": 0x82,
                "VMSAVE": 0x83, "STGI": 0x84, "CLGI": 0x85, "SKINIT": 0x86, "RDTSCP": 0x87, "ICEBP": 0x88,
                "WBINVD": 0x89, "MONITOR": 0x8A, "MWAIT": 0x8B, "MWAIT_CONDITIONAL": 0x8C, "XSETBV": 0x8D,
                "EFER_WRITE_TRAP": 0x8F, "CR0_WRITE_TRAP": 0x90, "NPF": 0x400, "INVALID": -1}
    for name, code in expected.items():
        assert ExitCode[name] == code, name
    assert exitcode_to_u64(ExitCode.INVALID) == (1 << 64) - 1
    assert exitcode_from_u64((1 << 64) - 1) == -1
    assert exit_name(0x7B) == "IOIO" and exit_name(0x1234) == "exit 0x1234"


def test_intercept_bits_follow_the_vector_layout() -> None:
    """Bit k of the 192-bit vector is exit code k (word 3 bit 0 = INTR, word 4 bit 0 = VMRUN, APM Table B-1)."""
    v = fresh()
    v.set_intercept(ExitCode.INTR)
    v.set_intercept("vmrun")
    v.set_intercept(ExitCode.CR3_WRITE)
    v.set_intercept(ExitCode.EXCP_PF)
    v.set_intercept(ExitCode.DR7_READ)
    assert v.intercept_word3 == 1 and v.intercept_word4 == 1
    assert v.intercept_cr_write == 1 << 3 and v.intercept_exceptions == 1 << 14 and v.intercept_dr_read == 1 << 7
    v.set_intercept(ExitCode.INTR, False)
    assert v.intercept_word3 == 0 and not v.intercepted("intr") and v.intercepted(ExitCode.VMRUN)
    with pytest.raises(ValueError):
        intercept_bit(ExitCode.NPF)


@given(st.integers(0, 255), st.sampled_from([0, 2, 3, 4]), st.none() | st.integers(0, 0xFFFF_FFFF), st.booleans())
def test_eventinj_round_trip(vector: int, typ: int, ec: int | None, valid: bool) -> None:
    ev = EventInj(vector, typ, ec, valid)
    raw = ev.encode()
    assert EventInj.decode(raw) == ev
    assert raw & 0xFF == vector and (raw >> 8) & 7 == typ and bool(raw >> 31 & 1) == valid
    assert bool(raw >> 11 & 1) == (ec is not None) and (raw >> 32 == (ec or 0))


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([16, 32, 64]), st.integers(0, 5))
def test_ioio_info_round_trip(port: int, size: int, is_in: bool, string: bool, rep: bool, abits: int,
                              seg: int) -> None:
    info = IoioInfo(port, size, is_in, string, rep, abits, seg)
    raw = info.encode()
    assert IoioInfo.decode(raw) == info
    assert raw >> 16 == port and raw & 1 == is_in  # APM Figure 15-2: PORT 31:16, TYPE 0
    assert raw == ioio_info(port, size, is_in, string=string, rep=rep, address_bits=abits, segment=seg)


# -- segment attributes and the state round trip -------------------------------------------------------------

segments = st.builds(Segment, selector=st.integers(0, 0xFFFF), base=st.integers(0, (1 << 64) - 1),
                     limit=st.integers(0, 0xFFFF_FFFF), type=st.integers(0, 15), s=st.integers(0, 1),
                     dpl=st.integers(0, 3), p=st.just(1), avl=st.integers(0, 1), l=st.integers(0, 1),
                     db=st.integers(0, 1), g=st.integers(0, 1), unusable=st.booleans())


@given(segments)
def test_segment_attributes_round_trip(seg: Segment) -> None:
    attrib = pack_attrib(seg)
    assert attrib >> 12 == 0
    assert attrib & 0xFF == seg.type | seg.s << 4 | seg.dpl << 5 | (0 if seg.unusable else 1) << 7
    assert unpack_attrib(seg.selector, attrib, seg.limit, seg.base) == seg


@st.composite
def guest_states(draw: st.DrawFn) -> MachineState:
    """Machine states as the spec keeps them: P = 1 in every hidden part, CPL = SS.DPL in protected mode,
    LMA = LME AND PG, CR0.ET = 1."""
    s = MachineState.concrete()
    s.model = MODEL
    s.seg = [draw(segments) for _ in range(6)]
    s.ldtr, s.tr = draw(segments), draw(segments)
    u64 = st.integers(0, (1 << 64) - 1)
    s.gdtr = TableRegister(draw(u64), draw(st.integers(0, 0xFFFF)))
    s.idtr = TableRegister(draw(u64), draw(st.integers(0, 0xFFFF)))
    s.gpr = [D.const(64, draw(u64)) for _ in range(16)]
    s.rip = draw(u64)
    s.write_rflags(D.const(64, draw(st.integers(0, 0x3F_FFFF)) & ~(1 << 17)))  # VM = 0 (see below for v86)
    cr0 = (draw(st.integers(0, 0xFFFF_FFFF)) & ~(1 << 29)) | CR0_ET
    efer = draw(st.integers(0, 0x1FFF)) & MODEL.efer_allowed | EFER_SVME
    efer = (efer | EFER_LMA) if efer & EFER_LME and cr0 & CR0_PG else efer & ~EFER_LMA
    s.cr0, s.efer = cr0, efer
    s.cr2, s.cr3, s.cr4 = draw(u64), draw(u64), draw(st.integers(0, MODEL.cr4_allowed)) & MODEL.cr4_allowed
    dr = list(s.dr)
    dr[6], dr[7] = draw(st.integers(0, 0xFFFF_FFFF)), draw(st.integers(0, 0xFFFF_FFFF))
    s.dr = dr
    for index in (0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102, 0x174, 0x175, 0x176):
        s.msrs[index] = draw(u64)
    return s


def _view(s: MachineState) -> tuple:
    return (s.rip, [D.concrete(v) for v in s.gpr], D.concrete(s.read_rflags()), list(s.seg), s.ldtr, s.tr,
            (s.gdtr.base, s.gdtr.limit), (s.idtr.base, s.idtr.limit), s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.dr[6], s.dr[7], s.cpl, dict(s.msrs))


@given(guest_states())
def test_state_round_trip_through_the_vmcb(s: MachineState) -> None:
    """Property: guest state -> VMCB (VMSAVE + #VMEXIT save) -> guest state (VMLOAD + VMRUN load) is identical."""
    v = fresh()
    save_guest_state(s, v)
    vmsave_state(s, v)
    t = MachineState.concrete()
    t.model = MODEL
    vmload_state(v, t)
    load_guest_state(v, t)
    gpr = list(t.gpr)
    for k in range(16):
        if k not in (0, 4):
            gpr[k] = s.gpr[k]  # the other GPRs travel through the host's list, not the VMCB
    t.gpr = gpr
    assert _view(t) == _view(s)
    assert v.cpl == s.cpl and v.rax == D.concrete(s.gpr[0]) and v.rsp == D.concrete(s.gpr[4])


def test_cpl_field_sets_ss_dpl_in_protected_mode() -> None:
    v = fresh()
    v.cr0 = CR0_PE | CR0_ET
    v.cpl = 3
    s = MachineState.concrete()
    load_guest_state(v, s)
    assert s.cpl == 3 and s.seg[2].dpl == 3


# -- IOPM / MSRPM ------------------------------------------------------------------------------------------

def test_iopm_multibyte_access_checks_every_byte_across_the_byte_boundary() -> None:
    phys = PhysicalMemory()
    for k in range(3):
        phys.map_page(0x10000 + 0x1000 * k)
    iopm_set(phys, 0x10000, 0x3F9)  # bit 1 of byte 0x7F
    assert iopm_intercepts(phys, 0x10000, 0x3F9, 1)
    assert not iopm_intercepts(phys, 0x10000, 0x3F8, 1)
    assert iopm_intercepts(phys, 0x10000, 0x3F8, 2)  # covers 3F8-3F9
    assert iopm_intercepts(phys, 0x10000, 0x3F6, 4)  # 3F6-3F9
    assert not iopm_intercepts(phys, 0x10000, 0x3FA, 4)
    iopm_set(phys, 0x10000, 0x3F9, False)
    iopm_set(phys, 0x10000, 0x400)  # first bit of the next byte
    assert iopm_intercepts(phys, 0x10000, 0x3FE, 4) and iopm_intercepts(phys, 0x10000, 0x3FF, 2)
    assert not iopm_intercepts(phys, 0x10000, 0x3FC, 4)
    iopm_set(phys, 0x10000, 0x10001)  # beyond port FFFF: the third page
    assert phys.read(0x10000 + 0x2000, 1) == 0b10
    assert iopm_intercepts(phys, 0x10000, 0xFFFE, 4) and not iopm_intercepts(phys, 0x10000, 0xFFFE, 2)


def _iopm_reference(bitmap: bytes, port: int, size: int) -> bool:
    """APM 15.10.1 as a formula: bit p of the map at byte p // 8, bit p % 8; any of the accessed ports."""
    return any(bitmap[(p) // 8] >> (p % 8) & 1 for p in range(port, port + size))


def test_iopm_lookup_equals_the_reference_for_every_port_and_size() -> None:
    """Exhaustive (concrete) over all 65536 ports x sizes 1, 2, 4 with a pseudo-random map."""
    import random

    rng = random.Random(5)
    bitmap = bytes(rng.choice((0, 0, 0, 1, 2, 0x80, 0xFF)) for _ in range(IOPM_SIZE))
    phys = PhysicalMemory()
    for k in range(3):
        phys.map_page(0x20000 + 0x1000 * k)
    phys.write_bytes(0x20000, bitmap)
    for port in range(0x10000):
        for size in (1, 2, 4):
            assert iopm_intercepts(phys, 0x20000, port, size) == _iopm_reference(bitmap, port, size)


MSR_RANGES = ((0, 0), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))


def _msrpm_reference(bitmap: bytes, msr: int, write: bool) -> bool:
    """APM 15.11 Table 15-6: two bits per MSR, read then write, three 2-KiB vectors; others intercepted."""
    for first, byte in MSR_RANGES:
        if first <= msr <= first + 0x1FFF:
            bit = 8 * byte + 2 * (msr - first) + int(write)
            return bool(bitmap[bit // 8] >> (bit % 8) & 1)
    return True


def test_msrpm_lookup_equals_the_reference_in_and_around_every_range() -> None:
    import random

    rng = random.Random(9)
    bitmap = bytes(rng.randrange(256) for _ in range(MSRPM_SIZE))
    phys = PhysicalMemory()
    for k in range(2):
        phys.map_page(0x30000 + 0x1000 * k)
    phys.write_bytes(0x30000, bitmap)
    msrs = [m for first, _ in MSR_RANGES for m in range(first, first + 0x2000)]
    msrs += [0x2000, 0xBFFF_FFFF, 0xC000_2000, 0xC000_FFFF, 0xC001_2000, 0x4000_0000, 0xFFFF_FFFF]
    msrs += [rng.randrange(1 << 32) for _ in range(2000)]
    for msr in msrs:
        for write in (False, True):
            assert msrpm_intercepts(phys, 0x30000, msr, write) == _msrpm_reference(bitmap, msr, write), hex(msr)


def test_msrpm_set_sets_exactly_the_two_bits() -> None:
    phys = PhysicalMemory()
    for k in range(2):
        phys.map_page(0x30000 + 0x1000 * k)
    msrpm_set(phys, 0x30000, 0xC000_0080, read=False, write=True)  # EFER: byte 0x800 + 0x20, bits 1
    assert phys.read(0x30000 + 0x820, 1) == 0b10
    msrpm_set(phys, 0x30000, 0xC001_0003, read=True, write=True)
    assert phys.read(0x30000 + 0x1000, 1) == 0b1100_0000
    assert not msrpm_intercepts(phys, 0x30000, 0xC000_0080, False)
    assert msrpm_intercepts(phys, 0x30000, 0xC000_0080, True)
    assert msrpm_intercepts(phys, 0x30000, 0x4000_0000, False)  # outside the ranges: always
    with pytest.raises(ValueError):
        msrpm_set(phys, 0x30000, 0x4000_0000, read=True, write=True)


def test_permission_map_layouts_proved_with_z3() -> None:
    """Symbolic twin of the layout (Z3, all ports / all MSRs): every IOPM bit an access of up to 4 bytes
    can reach lies inside the 12 KiB map; MSRPM positions lie inside the first 6 KiB, are distinct for
    distinct (MSR, read/write) pairs, and the three vectors do not overlap."""
    port, k = z3.BitVec("port", 32), z3.BitVec("k", 32)
    s = z3.Solver()
    s.add(z3.ULE(port, 0xFFFF), z3.ULT(k, 4), z3.UGE(port + k, 8 * IOPM_SIZE))
    assert s.check() == z3.unsat

    def pos(msr: z3.BitVecRef, w: z3.BitVecRef) -> z3.BitVecRef:
        bit = z3.BitVecVal(0, 64)
        for first, byte in reversed(MSR_RANGES):
            inside = z3.And(z3.UGE(msr, first), z3.ULE(msr, first + 0x1FFF))
            bit = z3.If(inside, 8 * byte + 2 * (z3.ZeroExt(32, msr) - first) + z3.ZeroExt(63, w), bit)
        return bit

    def in_ranges(msr: z3.BitVecRef) -> z3.BoolRef:
        return z3.Or(*[z3.And(z3.UGE(msr, f), z3.ULE(msr, f + 0x1FFF)) for f, _ in MSR_RANGES])

    m1, m2 = z3.BitVec("m1", 32), z3.BitVec("m2", 32)
    w1, w2 = z3.BitVec("w1", 1), z3.BitVec("w2", 1)
    s = z3.Solver()
    s.add(in_ranges(m1), in_ranges(m2), z3.Or(m1 != m2, w1 != w2), pos(m1, w1) == pos(m2, w2))
    assert s.check() == z3.unsat
    s = z3.Solver()
    s.add(in_ranges(m1), z3.UGE(pos(m1, w1), 8 * 0x1800))
    assert s.check() == z3.unsat
    # and the implementation agrees with the formula at every range edge
    phys = PhysicalMemory()
    for kk in range(2):
        phys.map_page(0x30000 + 0x1000 * kk)
    for first, _ in MSR_RANGES:
        for msr in (first, first + 1, first + 0x1FFF):
            for w in (0, 1):
                phys.write_bytes(0x30000, bytes(MSRPM_SIZE))
                b = z3.simplify(pos(z3.BitVecVal(msr, 32), z3.BitVecVal(w, 1))).as_long()
                phys.write(0x30000 + b // 8, 1, 1 << (b % 8))
                assert msrpm_intercepts(phys, 0x30000, msr, bool(w))
                assert not msrpm_intercepts(phys, 0x30000, msr, not w)
