"""The VMCB: the 4 KiB virtual-machine control block of SVM, as a typed view over physical memory
(AMD APM Vol. 2 15.5, Appendix B, Tables B-1 and B-2).

A :class:`VMCB` is ``(phys, pa)``: every property reads or writes the bytes
of the field in ``phys`` at ``pa + offset``, so the VMCB *is* the memory
(a VMM and the processor see the same bytes, as on hardware).  The control
area is at offsets 000h-3FFh, the state-save area at 400h-FFFh.  Every field
is declared once in :data:`FIELDS` (name -> offset, byte width, bit position,
bit count), which the tests check against Appendix B.

Segment registers in the state-save area (Table B-2) are 16 bytes: selector
(+0, 16 bits), attributes (+2, 16 bits), limit (+4, 32 bits, byte-granular:
already scaled by G), base (+8, 64 bits).  The attribute word packs the
descriptor's access bits: bits 7:0 = descriptor bits 47:40 (type, S, DPL, P),
bits 11:8 = descriptor bits 55:52 (AVL, L, D/B, G) (APM 15.5.1 "Segment
state").  The spec's ``unusable`` mark has no field of its own: an unusable
(null) segment is stored with P = 0, as AMD processors keep it, and a segment
loaded with P = 0 is unusable; the spec keeps P = 1 in the hidden attributes
of a segment it marks unusable, so :meth:`VMCB.load_segment` gives P = 1
back -- the spec never holds a not-present usable segment (loading one
faults).  GDTR/IDTR use only the limit and base.

EVENTINJ (0A8h) and EXITINTINFO (088h) share one format (APM 15.20,
Figure 15-3): vector 7:0, type 10:8 (0 INTR, 2 NMI, 3 exception, 4 software
interrupt), EV (error code valid) 11, V (valid) 31, error code 63:32 --
:class:`EventInj`.

The I/O permission map (IOPM, APM 15.10.1) is 12 KiB, one bit per port
(bit ``p`` at byte ``p >> 3``); an access of ``n`` bytes at port ``p`` is
intercepted if any of the bits ``p .. p+n-1`` is set (the third 4 KiB page
holds the bits of the bytes beyond port FFFFh).  The MSR permission map
(MSRPM, APM 15.11) is 8 KiB, two bits per MSR (even bit: RDMSR, odd bit:
WRMSR) in three 2 KiB vectors for MSRs 0000_0000-0000_1FFF,
C000_0000-C000_1FFF and C001_0000-C001_1FFF; RDMSR/WRMSR of any other MSR
is always intercepted when the MSR intercept is on.

The VMCB and the machine state: :func:`load_guest_state` / :func:`save_guest_state`
move what VMRUN loads and #VMEXIT saves (APM 15.5.1, 15.6: ES, CS, SS, DS,
GDTR, IDTR, EFER, CR0, CR2, CR3, CR4, DR6, DR7, RFLAGS, RIP, RSP, RAX, CPL,
G_PAT with nested paging); :func:`vmload_state` / :func:`vmsave_state` what
VMLOAD/VMSAVE move (APM 15.5.2: FS, GS, TR, LDTR with their hidden parts,
KernelGSBase, STAR, LSTAR, CSTAR, SFMASK, SYSENTER_CS/ESP/EIP).  The VMCB
clean bits (0C0h) are hints a processor may ignore; the model always reloads
everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from spec.cpumodel import (
    CSTAR,
    IA32_PAT,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_EIP,
    IA32_SYSENTER_ESP,
    KERNEL_GS_BASE,
    LSTAR,
    SFMASK,
    STAR,
)
from spec.state import CR0_ET, CR0_PE, CR0_PG, EFER_LMA, EFER_LME, MachineState, Segment, TableRegister
from spec.svm.exitcodes import INTERCEPT_BITS, ExitCode, intercept_bit

PAGE = 4096
STATE_SAVE = 0x400

# -- field table (APM Vol. 2 Appendix B) -----------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One VMCB field: ``width`` bytes at ``offset``; a bit field when ``bits`` is set (``shift`` = low bit)."""

    offset: int
    width: int
    shift: int = 0
    bits: int | None = None


FIELDS: dict[str, Field] = {
    # Control area (Table B-1).
    "intercept_cr_read": Field(0x000, 2),
    "intercept_cr_write": Field(0x002, 2),
    "intercept_dr_read": Field(0x004, 2),
    "intercept_dr_write": Field(0x006, 2),
    "intercept_exceptions": Field(0x008, 4),
    "intercept_word3": Field(0x00C, 4),  # INTR .. SHUTDOWN (exit codes 60h-7Fh)
    "intercept_word4": Field(0x010, 4),  # VMRUN .. CR15 write trap (80h-9Fh)
    "intercept_word5": Field(0x014, 4),  # INVLPGB .. (A0h-BFh)
    "pause_filter_threshold": Field(0x03C, 2),
    "pause_filter_count": Field(0x03E, 2),
    "iopm_base_pa": Field(0x040, 8),
    "msrpm_base_pa": Field(0x048, 8),
    "tsc_offset": Field(0x050, 8),
    "guest_asid": Field(0x058, 4),
    "tlb_control": Field(0x05C, 1),
    "v_tpr": Field(0x060, 8, 0, 8),
    "v_irq": Field(0x060, 8, 8, 1),
    "v_gif": Field(0x060, 8, 9, 1),
    "v_intr_prio": Field(0x060, 8, 16, 4),
    "v_ign_tpr": Field(0x060, 8, 20, 1),
    "v_intr_masking": Field(0x060, 8, 24, 1),
    "v_gif_enable": Field(0x060, 8, 25, 1),
    "avic_enable": Field(0x060, 8, 31, 1),
    "v_intr_vector": Field(0x060, 8, 32, 8),
    "interrupt_shadow": Field(0x068, 8, 0, 1),
    "guest_interrupt_mask": Field(0x068, 8, 1, 1),
    "exitcode": Field(0x070, 8),
    "exitinfo1": Field(0x078, 8),
    "exitinfo2": Field(0x080, 8),
    "exitintinfo": Field(0x088, 8),
    "np_enable": Field(0x090, 8, 0, 1),
    "sev_enable": Field(0x090, 8, 1, 1),
    "sev_es_enable": Field(0x090, 8, 2, 1),
    "gmet_enable": Field(0x090, 8, 3, 1),
    "avic_apic_bar": Field(0x098, 8, 0, 52),
    "ghcb_pa": Field(0x0A0, 8),
    "eventinj": Field(0x0A8, 8),
    "n_cr3": Field(0x0B0, 8),
    "lbr_virtualization_enable": Field(0x0B8, 8, 0, 1),
    "vmsave_vmload_virtualization": Field(0x0B8, 8, 1, 1),
    "vmcb_clean": Field(0x0C0, 4),
    "nrip": Field(0x0C8, 8),
    "guest_insn_len": Field(0x0D0, 1),
    "avic_backing_page": Field(0x0E0, 8, 0, 52),
    "avic_logical_table": Field(0x0F0, 8, 0, 52),
    "avic_physical_table": Field(0x0F8, 8, 0, 52),
    "vmsa_pa": Field(0x108, 8),
    # State-save area (Table B-2), offsets from the VMCB start.
    "cpl": Field(0x4CB, 1),
    "efer": Field(0x4D0, 8),
    "xss": Field(0x540, 8),
    "cr4": Field(0x548, 8),
    "cr3": Field(0x550, 8),
    "cr0": Field(0x558, 8),
    "dr7": Field(0x560, 8),
    "dr6": Field(0x568, 8),
    "rflags": Field(0x570, 8),
    "rip": Field(0x578, 8),
    "rsp": Field(0x5D8, 8),
    "s_cet": Field(0x5E0, 8),
    "ssp": Field(0x5E8, 8),
    "isst_addr": Field(0x5F0, 8),
    "rax": Field(0x5F8, 8),
    "star": Field(0x600, 8),
    "lstar": Field(0x608, 8),
    "cstar": Field(0x610, 8),
    "sfmask": Field(0x618, 8),
    "kernel_gs_base": Field(0x620, 8),
    "sysenter_cs": Field(0x628, 8),
    "sysenter_esp": Field(0x630, 8),
    "sysenter_eip": Field(0x638, 8),
    "cr2": Field(0x640, 8),
    "g_pat": Field(0x668, 8),
    "dbgctl": Field(0x670, 8),
    "br_from": Field(0x678, 8),
    "br_to": Field(0x680, 8),
    "lastexcpfrom": Field(0x688, 8),
    "lastexcpto": Field(0x690, 8),
}

GUEST_INSN_BYTES = 0x0D1
"""Guest instruction bytes (up to 15) of the decode assist, after the count byte at 0D0h (APM 15.33.4)."""

SEGMENTS: dict[str, int] = {
    "es": 0x400, "cs": 0x410, "ss": 0x420, "ds": 0x430, "fs": 0x440, "gs": 0x450,
    "gdtr": 0x460, "ldtr": 0x470, "idtr": 0x480, "tr": 0x490,
}
"""Offsets of the 16-byte segment-register slots of the state-save area (Table B-2)."""

SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")
"""The spec's ``state.seg`` index order (ES, CS, SS, DS, FS, GS)."""


class _Prop:
    """Descriptor: a property of :class:`VMCB` backed by a :class:`Field`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.field = FIELDS[name]

    def __get__(self, vmcb: Any, owner: Any = None) -> Any:
        if vmcb is None:
            return self
        f = self.field
        raw = vmcb.phys.read(vmcb.pa + f.offset, f.width)
        if f.bits is None:
            return raw
        return (raw >> f.shift) & ((1 << f.bits) - 1)

    def __set__(self, vmcb: Any, value: int) -> None:
        f = self.field
        addr = vmcb.pa + f.offset
        if f.bits is None:
            vmcb.phys.write(addr, f.width, int(value) & ((1 << (8 * f.width)) - 1))
            return
        mask = ((1 << f.bits) - 1) << f.shift
        raw = vmcb.phys.read(addr, f.width)
        vmcb.phys.write(addr, f.width, (raw & ~mask) | ((int(value) << f.shift) & mask))


# -- events: EVENTINJ / EXITINTINFO -----------------------------------------------------------------


class EventType(IntEnum):
    """The TYPE field of EVENTINJ/EXITINTINFO (APM 15.20)."""

    INTR = 0
    NMI = 2
    EXCEPTION = 3
    SOFTWARE = 4


EVENT_VALID = 1 << 31
EVENT_EV = 1 << 11


@dataclass(frozen=True)
class EventInj:
    """An event in the EVENTINJ/EXITINTINFO format (APM 15.20, 15.7.2)."""

    vector: int
    type: int = EventType.EXCEPTION
    error_code: int | None = None  # EV = 1 iff not None
    valid: bool = True

    def encode(self) -> int:
        v = (self.vector & 0xFF) | (self.type & 7) << 8 | (EVENT_VALID if self.valid else 0)
        if self.error_code is not None:
            v |= EVENT_EV | (self.error_code & 0xFFFF_FFFF) << 32
        return v

    @classmethod
    def decode(cls, raw: int) -> EventInj:
        ec = (raw >> 32) & 0xFFFF_FFFF if raw & EVENT_EV else None
        return cls(vector=raw & 0xFF, type=(raw >> 8) & 7, error_code=ec, valid=bool(raw & EVENT_VALID))


# -- segments ---------------------------------------------------------------------------------------


def pack_attrib(seg: Segment) -> int:
    """The VMCB attribute word of a segment (APM 15.5.1): descriptor bits 47:40 and 55:52."""
    p = seg.p and not seg.unusable
    return ((seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | int(bool(p)) << 7
            | (seg.avl & 1) << 8 | (seg.l & 1) << 9 | (seg.db & 1) << 10 | (seg.g & 1) << 11)


def unpack_attrib(selector: int, attrib: int, limit: int, base: int) -> Segment:
    """A spec :class:`Segment` from a VMCB slot (P = 0 means unusable; module docstring)."""
    present = (attrib >> 7) & 1
    return Segment(selector=selector, base=base, limit=limit, type=attrib & 0xF, s=(attrib >> 4) & 1,
                   dpl=(attrib >> 5) & 3, p=1, avl=(attrib >> 8) & 1, l=(attrib >> 9) & 1,
                   db=(attrib >> 10) & 1, g=(attrib >> 11) & 1, unusable=not present)


# -- the VMCB -------------------------------------------------------------------------------------


class VMCB:
    """A typed view of the VMCB at physical address ``pa`` (4 KiB aligned) in ``phys``."""

    def __init__(self, phys: Any, pa: int) -> None:
        if pa & (PAGE - 1):
            raise ValueError(f"VMCB address {pa:#x} is not 4 KiB aligned")
        self.phys = phys
        self.pa = pa

    # Control area.
    intercept_cr_read = _Prop("intercept_cr_read")
    intercept_cr_write = _Prop("intercept_cr_write")
    intercept_dr_read = _Prop("intercept_dr_read")
    intercept_dr_write = _Prop("intercept_dr_write")
    intercept_exceptions = _Prop("intercept_exceptions")
    intercept_word3 = _Prop("intercept_word3")
    intercept_word4 = _Prop("intercept_word4")
    intercept_word5 = _Prop("intercept_word5")
    pause_filter_threshold = _Prop("pause_filter_threshold")
    pause_filter_count = _Prop("pause_filter_count")
    iopm_base_pa = _Prop("iopm_base_pa")
    msrpm_base_pa = _Prop("msrpm_base_pa")
    tsc_offset = _Prop("tsc_offset")
    guest_asid = _Prop("guest_asid")
    tlb_control = _Prop("tlb_control")
    v_tpr = _Prop("v_tpr")
    v_irq = _Prop("v_irq")
    v_gif = _Prop("v_gif")
    v_intr_prio = _Prop("v_intr_prio")
    v_ign_tpr = _Prop("v_ign_tpr")
    v_intr_masking = _Prop("v_intr_masking")
    v_gif_enable = _Prop("v_gif_enable")
    avic_enable = _Prop("avic_enable")
    v_intr_vector = _Prop("v_intr_vector")
    interrupt_shadow = _Prop("interrupt_shadow")
    guest_interrupt_mask = _Prop("guest_interrupt_mask")
    exitcode_raw = _Prop("exitcode")
    exitinfo1 = _Prop("exitinfo1")
    exitinfo2 = _Prop("exitinfo2")
    exitintinfo = _Prop("exitintinfo")
    np_enable = _Prop("np_enable")
    sev_enable = _Prop("sev_enable")
    sev_es_enable = _Prop("sev_es_enable")
    gmet_enable = _Prop("gmet_enable")
    avic_apic_bar = _Prop("avic_apic_bar")
    ghcb_pa = _Prop("ghcb_pa")
    eventinj = _Prop("eventinj")
    n_cr3 = _Prop("n_cr3")
    lbr_virtualization_enable = _Prop("lbr_virtualization_enable")
    vmsave_vmload_virtualization = _Prop("vmsave_vmload_virtualization")
    vmcb_clean = _Prop("vmcb_clean")
    nrip = _Prop("nrip")
    guest_insn_len = _Prop("guest_insn_len")
    avic_backing_page = _Prop("avic_backing_page")
    avic_logical_table = _Prop("avic_logical_table")
    avic_physical_table = _Prop("avic_physical_table")
    vmsa_pa = _Prop("vmsa_pa")
    # State-save area.
    cpl = _Prop("cpl")
    efer = _Prop("efer")
    xss = _Prop("xss")
    cr4 = _Prop("cr4")
    cr3 = _Prop("cr3")
    cr0 = _Prop("cr0")
    dr7 = _Prop("dr7")
    dr6 = _Prop("dr6")
    rflags = _Prop("rflags")
    rip = _Prop("rip")
    rsp = _Prop("rsp")
    s_cet = _Prop("s_cet")
    ssp = _Prop("ssp")
    isst_addr = _Prop("isst_addr")
    rax = _Prop("rax")
    star = _Prop("star")
    lstar = _Prop("lstar")
    cstar = _Prop("cstar")
    sfmask = _Prop("sfmask")
    kernel_gs_base = _Prop("kernel_gs_base")
    sysenter_cs = _Prop("sysenter_cs")
    sysenter_esp = _Prop("sysenter_esp")
    sysenter_eip = _Prop("sysenter_eip")
    cr2 = _Prop("cr2")
    g_pat = _Prop("g_pat")
    dbgctl = _Prop("dbgctl")
    br_from = _Prop("br_from")
    br_to = _Prop("br_to")
    lastexcpfrom = _Prop("lastexcpfrom")
    lastexcpto = _Prop("lastexcpto")

    # -- whole page ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Zero the whole 4 KiB (a fresh VMCB)."""
        self.phys.write_bytes(self.pa, bytes(PAGE))

    # -- exit code ------------------------------------------------------------------------------
    @property
    def exitcode(self) -> int:
        """EXITCODE as a signed number (VMEXIT_INVALID = -1 is stored as all ones)."""
        raw = self.exitcode_raw
        return raw - (1 << 64) if raw >> 63 else raw

    @exitcode.setter
    def exitcode(self, code: int) -> None:
        self.exitcode_raw = code & ((1 << 64) - 1)

    # -- intercepts -----------------------------------------------------------------------------
    def intercept_vector(self) -> int:
        """The 192-bit intercept vector at 000h-017h: bit ``k`` intercepts exit code ``k``."""
        return self.phys.read(self.pa, INTERCEPT_BITS // 8)

    def set_intercept_vector(self, value: int) -> None:
        self.phys.write(self.pa, INTERCEPT_BITS // 8, value & ((1 << INTERCEPT_BITS) - 1))

    def set_intercept(self, which: int | str, on: bool = True) -> None:
        """Turn the intercept of exit code ``which`` (an :class:`ExitCode`, its value or name) on or off."""
        bit = intercept_bit(_code(which))
        addr = self.pa + (bit >> 3)
        b = self.phys.read(addr, 1)
        self.phys.write(addr, 1, (b | 1 << (bit & 7)) if on else (b & ~(1 << (bit & 7))))

    def intercepted(self, which: int | str) -> bool:
        bit = intercept_bit(_code(which))
        return bool(self.phys.read(self.pa + (bit >> 3), 1) >> (bit & 7) & 1)

    # -- events ---------------------------------------------------------------------------------
    @property
    def event_injection(self) -> EventInj:
        return EventInj.decode(self.eventinj)

    @event_injection.setter
    def event_injection(self, ev: EventInj | None) -> None:
        self.eventinj = 0 if ev is None else ev.encode()

    @property
    def exit_int_info(self) -> EventInj:
        return EventInj.decode(self.exitintinfo)

    # -- decode assist ----------------------------------------------------------------------------
    def guest_insn_bytes(self) -> bytes:
        """The guest instruction bytes stored by the last #VMEXIT (``guest_insn_len`` of them)."""
        n = min(self.guest_insn_len, 15)
        return self.phys.read_bytes(self.pa + GUEST_INSN_BYTES, n)

    def set_guest_insn_bytes(self, data: bytes) -> None:
        data = data[:15]
        self.guest_insn_len = len(data)
        self.phys.write_bytes(self.pa + GUEST_INSN_BYTES, data.ljust(15, b"\0"))

    # -- segment registers ------------------------------------------------------------------------
    def load_segment(self, name: str) -> Segment:
        """The segment register ``name`` (es, cs, ss, ds, fs, gs, ldtr, tr) as a spec :class:`Segment`."""
        off = self.pa + SEGMENTS[name]
        r = self.phys.read
        return unpack_attrib(r(off, 2), r(off + 2, 2), r(off + 4, 4), r(off + 8, 8))

    def store_segment(self, name: str, seg: Segment) -> None:
        off = self.pa + SEGMENTS[name]
        w = self.phys.write
        w(off, 2, seg.selector & 0xFFFF)
        w(off + 2, 2, pack_attrib(seg))
        w(off + 4, 4, seg.limit & 0xFFFF_FFFF)
        w(off + 8, 8, seg.base & ((1 << 64) - 1))

    def load_table(self, name: str) -> TableRegister:
        """GDTR or IDTR (only limit and base are used: APM Table B-2)."""
        off = self.pa + SEGMENTS[name]
        return TableRegister(base=self.phys.read(off + 8, 8), limit=self.phys.read(off + 4, 4) & 0xFFFF)

    def store_table(self, name: str, reg: TableRegister) -> None:
        off = self.pa + SEGMENTS[name]
        self.phys.write(off, 4, 0)
        self.phys.write(off + 4, 4, reg.limit & 0xFFFF)
        self.phys.write(off + 8, 8, reg.base & ((1 << 64) - 1))


def _code(which: int | str) -> int:
    if isinstance(which, str):
        return ExitCode[which.upper()]
    return int(which)


# -- the VMCB and the machine state (APM 15.5.1, 15.5.2, 15.6) -------------------------------------------

VMLOAD_MSRS: tuple[tuple[str, int], ...] = (
    ("kernel_gs_base", KERNEL_GS_BASE), ("star", STAR), ("lstar", LSTAR), ("cstar", CSTAR), ("sfmask", SFMASK),
    ("sysenter_cs", IA32_SYSENTER_CS), ("sysenter_esp", IA32_SYSENTER_ESP), ("sysenter_eip", IA32_SYSENTER_EIP))
"""The MSRs VMLOAD/VMSAVE move (APM 15.5.2), by VMCB field name."""


def _msr(s: MachineState, index: int) -> int:
    v = s.msrs.get(index)
    return s.model.msr_reset.get(index, 0) if v is None else v


def vmload_state(vmcb: VMCB, s: MachineState) -> None:
    """VMLOAD (APM 15.5.2): FS, GS, TR, LDTR (hidden parts included) and the :data:`VMLOAD_MSRS` from the VMCB."""
    seg = list(s.seg)
    seg[4], seg[5] = vmcb.load_segment("fs"), vmcb.load_segment("gs")
    s.seg = seg
    s.tr = vmcb.load_segment("tr")
    s.ldtr = vmcb.load_segment("ldtr")
    for name, index in VMLOAD_MSRS:
        s.msrs[index] = getattr(vmcb, name)


def vmsave_state(s: MachineState, vmcb: VMCB) -> None:
    """VMSAVE (APM 15.5.2): the state :func:`vmload_state` loads, stored to the VMCB."""
    vmcb.store_segment("fs", s.seg[4])
    vmcb.store_segment("gs", s.seg[5])
    vmcb.store_segment("tr", s.tr)
    vmcb.store_segment("ldtr", s.ldtr)
    for name, index in VMLOAD_MSRS:
        setattr(vmcb, name, _msr(s, index))


def load_guest_state(vmcb: VMCB, s: MachineState) -> None:
    """The guest state VMRUN loads (APM 15.5.1): ES, CS, SS, DS, GDTR, IDTR, EFER, CR0, CR2, CR3, CR4, DR6,
    DR7, RFLAGS, RIP, RSP, RAX, CPL -- and G_PAT as the guest's PAT when nested paging is on (APM 15.25.8).

    Model rules: CR0.ET reads as 1 (hardwired); EFER.LMA is recomputed as
    LME AND PG (the status bit follows the mode the guest is in); the CPL
    field is the CPL -- the spec keeps CPL as SS.DPL in protected mode, so
    SS.DPL is set from it there (a VMCB whose SS.DPL differs from CPL is
    inconsistent on hardware too).
    """
    D = s.D
    seg = list(s.seg)
    for k, name in enumerate(SEG_ORDER):
        if name not in ("fs", "gs"):
            seg[k] = vmcb.load_segment(name)
    s.gdtr = vmcb.load_table("gdtr")
    s.idtr = vmcb.load_table("idtr")
    efer = vmcb.efer
    cr0 = vmcb.cr0 | CR0_ET
    s.efer = (efer | EFER_LMA) if efer & EFER_LME and cr0 & CR0_PG else efer & ~EFER_LMA
    s.cr0 = cr0
    s.cr2, s.cr3, s.cr4 = vmcb.cr2, vmcb.cr3, vmcb.cr4
    dr = list(s.dr)
    dr[6], dr[7] = vmcb.dr6, vmcb.dr7
    s.dr = dr
    s.write_rflags(D.const(64, vmcb.rflags))
    s.rip = vmcb.rip
    gpr = list(s.gpr)
    gpr[0], gpr[4] = D.const(64, vmcb.rax), D.const(64, vmcb.rsp)
    s.gpr = gpr
    cpl = vmcb.cpl & 3
    if cr0 & CR0_PE and not s.rflags_sys >> 17 & 1 and seg[2].dpl != cpl:
        ss = seg[2].copy()
        ss.dpl = cpl
        seg[2] = ss
    s.seg = seg
    if vmcb.np_enable:
        s.msrs[IA32_PAT] = vmcb.g_pat


def save_guest_state(s: MachineState, vmcb: VMCB) -> None:
    """The guest state #VMEXIT saves (APM 15.6): what :func:`load_guest_state` loads, from ``s``."""
    D = s.D
    for k, name in enumerate(SEG_ORDER):
        if name not in ("fs", "gs"):
            vmcb.store_segment(name, s.seg[k])
    vmcb.store_table("gdtr", s.gdtr)
    vmcb.store_table("idtr", s.idtr)
    vmcb.efer = s.efer
    vmcb.cr0, vmcb.cr2, vmcb.cr3, vmcb.cr4 = s.cr0, s.cr2, s.cr3, s.cr4
    vmcb.dr6, vmcb.dr7 = s.dr[6], s.dr[7]
    vmcb.rflags = D.concrete(s.read_rflags())
    vmcb.rip = s.rip
    vmcb.rax = D.concrete(s.gpr[0])
    vmcb.rsp = D.concrete(s.gpr[4])
    vmcb.cpl = s.cpl
    if vmcb.np_enable:
        vmcb.g_pat = _msr(s, IA32_PAT)


# -- permission maps ------------------------------------------------------------------------------

IOPM_SIZE = 3 * PAGE
MSRPM_SIZE = 2 * PAGE

MSRPM_RANGES: tuple[tuple[int, int], ...] = ((0x0000_0000, 0x000), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))
"""(first MSR, byte offset in the MSRPM) of the three 8192-MSR vectors (APM 15.11, Table 15-6)."""


def iopm_bit(port: int) -> tuple[int, int]:
    """(byte offset, bit) of ``port``'s bit in the IOPM (ports up to FFFFh + 3 for wide accesses)."""
    return port >> 3, port & 7


def iopm_set(phys: Any, base: int, port: int, on: bool = True) -> None:
    """Intercept (``on``) or pass through I/O to one port."""
    off, bit = iopm_bit(port)
    b = phys.read(base + off, 1)
    phys.write(base + off, 1, (b | 1 << bit) if on else (b & ~(1 << bit)))


def iopm_intercepts(phys: Any, base: int, port: int, size: int) -> bool:
    """Is an ``size``-byte access at ``port`` intercepted: any of its bytes' bits set (APM 15.10.1)?"""
    for p in range(port, port + size):
        off, bit = iopm_bit(p)
        if phys.read(base + off, 1) >> bit & 1:
            return True
    return False


def msrpm_position(msr: int) -> tuple[int, int] | None:
    """(byte offset, bit of the read permission) of ``msr`` in the MSRPM; None outside the three ranges."""
    for first, byte in MSRPM_RANGES:
        if first <= msr < first + 0x2000:
            k = 2 * (msr - first)
            return byte + (k >> 3), k & 7
    return None


def msrpm_set(phys: Any, base: int, msr: int, read: bool, write: bool) -> None:
    """Set ``msr``'s read/write intercept bits; ``ValueError`` for an MSR the map cannot describe."""
    pos = msrpm_position(msr)
    if pos is None:
        raise ValueError(f"MSR {msr:#x} is outside the MSRPM ranges (always intercepted)")
    off, bit = pos
    b = phys.read(base + off, 1) & ~(3 << bit)
    phys.write(base + off, 1, b | int(read) << bit | int(write) << (bit + 1))


def msrpm_intercepts(phys: Any, base: int, msr: int, write: bool) -> bool:
    """Is RDMSR (``write`` False) / WRMSR of ``msr`` intercepted (APM 15.11)?  MSRs outside: always."""
    pos = msrpm_position(msr)
    if pos is None:
        return True
    off, bit = pos
    return bool(phys.read(base + off, 1) >> (bit + int(write)) & 1)


__all__ = ["EVENT_EV", "EVENT_VALID", "FIELDS", "GUEST_INSN_BYTES", "IOPM_SIZE", "MSRPM_RANGES", "MSRPM_SIZE",
           "SEGMENTS", "SEG_ORDER", "STATE_SAVE", "VMCB", "VMLOAD_MSRS", "EventInj", "EventType", "Field", "iopm_bit",
           "iopm_intercepts", "iopm_set", "load_guest_state", "msrpm_intercepts", "msrpm_position", "msrpm_set",
           "pack_attrib", "save_guest_state", "unpack_attrib", "vmload_state", "vmsave_state"]
