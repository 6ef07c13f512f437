"""System instructions: control and debug registers, descriptor-table registers, TLB/cache control,
and the descriptor probes (SDM Vol. 2 per-instruction pages; Vol. 3A 2.5, 2.6, 4.1, 4.4.1, 17.2;
APM Vol. 2 3.1, Vol. 3).

MOV CRn/DRn share the MOV mnemonic with the data forms: :mod:`spec.isa.datamove`
dispatches to :func:`mov_control` when an operand is a control or debug
register.  The other instructions register their own mnemonics: LGDT, LIDT,
SGDT, SIDT, LLDT, LTR, SLDT, STR, LMSW, SMSW, CLTS, INVLPG, INVD, WBINVD,
WBNOINVD, LAR, LSL, VERR, VERW.

Privilege (SDM Vol. 3A 5.9): MOV CR/DR, LGDT, LIDT, LLDT, LTR, LMSW, CLTS,
INVLPG, INVD, WBINVD are #GP(0) at CPL > 0 (virtual-8086 mode is CPL 3, so
they fault there too).  SGDT, SIDT, SLDT, STR and SMSW run at any CPL unless
CR4.UMIP = 1, then #GP(0) at CPL > 0 (SDM Vol. 3A 2.5; CR4.UMIP can only be
set when the CPU model advertises UMIP).  LLDT, LTR, SLDT, STR, LAR, LSL,
VERR, VERW are #UD in real-address and virtual-8086 mode.  Each check comes
before any operand access.

Status flags.  LAR, LSL, VERR and VERW define ZF only.  For MOV to/from
CR/DR the SDM says OF, SF, ZF, AF, PF and CF are undefined; the APM lists no
flag effect.  The spec follows AMD and leaves them unchanged (the static
contract of the MOV mnemonic, shared with the data moves, declares no
undefined flags), so a comparison against an Intel processor has to mask them.

State the instructions change is written only after every check passed: a
faulting instruction leaves no trace (the CPU rolls back only GPRs, flags and
segment registers, not control registers).

TLB events
----------

The spec walks the page tables on every access, so it needs no TLB; but a
TLB model (:mod:`spec.tlb`) and the VMM's shadow pager must see the events
that invalidate translations.  When ``state.tlb_events`` is a list (it is
``None``, i.e. not recorded, by default), these instructions append tuples:

=================================  ==============================================================
``("cr3", new_cr3)``               MOV to CR3 (SDM Vol. 3A 4.10.4.1: non-global entries of the
                                   current PCID are invalidated)
``("cr3_keep", new_cr3)``          MOV to CR3 with CR4.PCIDE = 1 and bit 63 of the source set:
                                   nothing need be invalidated (bit 63 is not stored)
``("invlpg", linear)``             INVLPG of a canonical address (64-bit mode: a non-canonical
                                   one is a NOP and records nothing)
``("cr0", old, new)``              MOV to CR0, LMSW, CLTS, when the value changes
``("cr4", old, new)``              MOV to CR4, when the value changes
``("efer", old, new)``             WRMSR to EFER, or a MOV to CR0 that changes EFER.LMA
=================================  ==============================================================

Consumers decide which CR0/CR4/EFER bits matter to them (PG, WP, PAE, PGE,
PSE, SMEP, SMAP, PKE, LA57, PCIDE, NXE, LMA ...).  Events are appended in
program order and only by instructions that complete.  In SVM guest mode
``state.tlb_events`` is a :class:`spec.tlb.HardwareTLBEvents` sink that applies
each event to the hardware TLB (:func:`spec.svm.nested.attach_guest_memory`).
"""

from __future__ import annotations

from spec import flags as F
from spec.decode.insn import CR, DR, Insn
from spec.faults import Fault, Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.segments import descriptor_cache
from spec.memory import AccessKind
from spec.paging import PagingControl, pdpte_reserved
from spec.state import (
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    EFER_LMA,
    EFER_LME,
    MachineState,
    Segment,
)
from spec.svm.exitcodes import MOV_CR_VALID, ExitCode
from spec.svm.intercepts import VMExit

CR0_AM = 1 << 18
CR0_WRITABLE = CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG
CR4_DE, CR4_PSE, CR4_PAE, CR4_PGE, CR4_UMIP, CR4_LA57 = 1 << 3, 1 << 4, 1 << 5, 1 << 7, 1 << 11, 1 << 12
CR4_PCIDE, CR4_SMEP = 1 << 17, 1 << 20
CR3_NOFLUSH = 1 << 63

# Debug registers (SDM Vol. 3A 17.2.3, 17.2.4; APM Vol. 2 13.1.1): writable bits and bits that read as 1.
DR6_WRITABLE, DR6_ONES = 0xE00F, 0xFFFF_0FF0  # B0-B3, BD, BS, BT; bits 4-11 and 16-31 read 1, bit 12 reads 0
DR7_WRITABLE, DR7_ONES = 0xFFFF_23FF, 0x400  # L0-G3, LE, GE, GD, R/W and LEN fields; bit 10 reads 1
DR6_BD, DR7_GD = 1 << 13, 1 << 13

_M16, _M32, _M64 = 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1
_CS = 1
_VM = 1 << F.VM


# -- common checks -------------------------------------------------------------------------------------

def _gp(code: int = 0) -> Fault:
    return Fault(Vector.GP, code)


def require_cpl0(s: MachineState) -> None:
    """#GP(0) unless CPL = 0 (SDM Vol. 3A 5.9; virtual-8086 mode runs at CPL 3)."""
    if s.cpl:
        raise _gp()


def require_protected(s: MachineState) -> None:
    """#UD in real-address and virtual-8086 mode (LLDT, LTR, SLDT, STR, LAR, LSL, VERR, VERW)."""
    if not s.cr0 & CR0_PE or s.rflags_sys & _VM:
        raise Fault(Vector.UD)


def _umip(s: MachineState) -> None:
    """SGDT/SIDT/SLDT/STR/SMSW: #GP(0) at CPL > 0 with CR4.UMIP = 1 (SDM Vol. 3A 2.5, CR4.UMIP)."""
    if s.cr4 & CR4_UMIP and s.cpl:
        raise _gp()


def canonical(s: MachineState, addr: int) -> bool:
    """Sign-extended from bit 47, or bit 56 with CR4.LA57 (SDM Vol. 1 3.3.7.1)."""
    va = 57 if s.cr4 & CR4_LA57 else 48
    top = addr >> (va - 1)
    return top == 0 or top == (1 << (65 - va)) - 1


def emit(s: MachineState, event: tuple) -> None:
    """Record a TLB-relevant event (see the module docstring) if anyone listens."""
    events = s.tlb_events
    if events is not None:
        events.append(event)


def load_pdptes(s: MachineState, cr3: int) -> list[int]:
    """The four PAE PDPTEs at CR3[31:5] (SDM Vol. 3A 4.4.1), or #GP(0) if a present one has reserved bits set.

    The reads are physical (paging-structure accesses; under nested paging the
    MMU's ``tables`` view makes them guest page-table accesses, APM 15.25.5).
    The caller stores the result only once the whole instruction is known not to fault.
    """
    base = cr3 & 0xFFFF_FFE0
    rsv = pdpte_reserved(PagingControl(maxphyaddr=s.model.maxphyaddr))
    D = s.D
    tables = getattr(s.mem, "tables", s.mem.phys)
    out = []
    for k in range(4):
        e = D.concrete(tables.read(base + 8 * k, 8))
        if e & 1 and e & rsv:
            raise _gp()
        out.append(e)
    return out


def _pae_paging_after(cr0: int, cr4: int, efer: int) -> bool:
    """PAE paging (not 4/5-level) is in use with these values (SDM Vol. 3A 4.1.1, Table 4-1)."""
    return bool(cr0 & CR0_PG and cr4 & CR4_PAE and not efer & EFER_LME)


# -- MOV to/from control and debug registers ----------------------------------------------------------

def mov_control(x: Exec, i: Insn) -> None:
    """MOV CRn/DRn (0F 20-23; SDM Vol. 2B MOV--Move to/from Control/Debug Registers).

    The operand size is 32 bits outside 64-bit mode and 64 in it (the
    decoder's ``nat`` rows); the decoder has already raised #UD for CR1,
    CR5-CR7, CR9-CR15 and DR8-DR15, and turned AMD's LOCK MOV CR0 into CR8.
    """
    dst, src = i.operands
    s = x.s
    require_cpl0(s)
    D = x.D
    if dst.kind == CR:
        v = D.concrete(x.read(src))
        if s.svm is not None:
            _cr_write_intercept(x, dst.reg, src.reg, v)
        write_cr(x, dst.reg, v)
        if s.svm is not None:
            _cr_write_trap(x, dst.reg)
    elif src.kind == CR:
        # SVM: CRn read intercept, decode assist bit 63 + GPR (APM 15.8.1, 15.33.1).
        x.intercept(ExitCode.CR0_READ + src.reg, MOV_CR_VALID | dst.reg)
        x.write(dst, D.const(dst.size, read_cr(s, src.reg) & (_M64 if dst.size == 64 else _M32)))
    elif dst.kind == DR:
        n = _dr_index(s, dst.reg)
        x.intercept(ExitCode.DR0_WRITE + dst.reg, MOV_CR_VALID | src.reg)  # APM 15.8.2, 15.33.1
        write_dr(x, n, D.concrete(x.read(src)))
    else:
        n = _dr_index(s, src.reg)
        x.intercept(ExitCode.DR0_READ + src.reg, MOV_CR_VALID | dst.reg)
        x.write(dst, D.const(dst.size, s.dr[n] & (_M64 if dst.size == 64 else _M32)))


_CR0_SELECTIVE_FREE = CR0_TS | CR0_MP


def _cr_write_intercept(x: Exec, n: int, gpr: int, v: int) -> None:
    """SVM write intercepts of MOV to CRn (APM 15.8.1), before the value is checked (APM 15.9).

    CRn write intercept first; for CR0 without it, the selective CR0 write
    intercept fires when the write would change any bit other than TS and MP.
    EXITINFO1 = bit 63 (MOV) | GPR number (decode assist, APM 15.33.1).
    """
    x.intercept(ExitCode.CR0_WRITE + n, MOV_CR_VALID | gpr)
    if n == 0 and (x.s.cr0 ^ v) & ~_CR0_SELECTIVE_FREE:
        x.intercept(ExitCode.CR0_SEL_WRITE, MOV_CR_VALID | gpr)


def _cr_write_trap(x: Exec, n: int) -> None:
    """CRn write *trap* (APM 15.8.1, exit codes 90h-9Fh): after the write completed; EXITINFO1 = the new value."""
    svm = x.s.svm
    assert svm is not None
    code = ExitCode.CR0_WRITE_TRAP + n
    if svm.intercepts(code):
        raise VMExit(code, read_cr(x.s, n), nrip=x.next_rip, trap=True)


def read_cr(s: MachineState, n: int) -> int:
    if n == 0:
        return s.cr0
    if n == 2:
        return s.cr2
    if n == 3:
        return s.cr3
    if n == 4:
        return s.cr4
    svm = s.svm
    if svm is not None and svm.v_intr_masking:
        return svm.v_tpr  # APM 15.21.1: with V_INTR_MASKING, CR8 accesses go to V_TPR
    return s.cr8  # the decoder leaves only 0, 2, 3, 4, 8


def write_cr(x: Exec, n: int, v: int) -> None:
    if n == 0:
        write_cr0(x, v)
    elif n == 2:
        x.s.cr2 = v  # the page-fault linear address: any value (SDM Vol. 3A 2.5)
    elif n == 3:
        write_cr3(x, v)
    elif n == 4:
        write_cr4(x, v)
    else:
        # CR8 = TPR[7:4] (SDM Vol. 3A 10.8.6.1; APM Vol. 2 16.6.3): bits 63:4 reserved.
        if v & ~0xF:
            raise _gp()
        svm = x.s.svm
        if svm is not None and svm.v_intr_masking:
            svm.v_tpr = v  # APM 15.21.1: the guest's TPR is the virtual one
        else:
            x.s.cr8 = v


def write_cr0(x: Exec, v: int) -> None:
    """MOV to CR0 (SDM Vol. 2B MOV CR "Protected Mode/64-Bit Mode Exceptions"; Vol. 3A 2.5, 9.8.5).

    * bits 63:32 set -> #GP(0); the other reserved bits of 31:0 are ignored
      (they stay clear) and ET is hardwired to 1 (SDM Vol. 2B MOV CR);
    * PG = 1 with PE = 0, or NW = 1 with CD = 0 -> #GP(0);
    * setting PG with EFER.LME = 1 (activating IA-32e mode): #GP(0) if
      CR4.PAE = 0 or CS.L = 1 (SDM Vol. 3A 9.8.5; KVM checks the same);
    * clearing PG in 64-bit mode, or with CR4.PCIDE = 1 -> #GP(0) (leaving
      long mode is done from compatibility mode, SDM Vol. 3A 9.8.5.4);
    * afterwards EFER.LMA = LME AND PG (SDM Vol. 3A 2.2.1; APM Vol. 2 14.6);
    * if PAE paging is in use afterwards and PG, CD or NW changed, the PDPTEs
      are loaded from CR3 (#GP(0) on a reserved bit, SDM Vol. 3A 4.4.1).
    """
    s = x.s
    if v >> 32:
        raise _gp()
    old = s.cr0
    new = (v & CR0_WRITABLE) | CR0_ET
    if new & CR0_PG and not new & CR0_PE:
        raise _gp()
    if new & CR0_NW and not new & CR0_CD:
        raise _gp()
    efer = s.efer
    if new & CR0_PG and not old & CR0_PG and efer & EFER_LME:
        if not s.cr4 & CR4_PAE or s.seg[_CS].l:
            raise _gp()
    if old & CR0_PG and not new & CR0_PG and (s.code_bits == 64 or s.cr4 & CR4_PCIDE):
        raise _gp()
    new_efer = (efer | EFER_LMA) if (efer & EFER_LME and new & CR0_PG) else (efer & ~EFER_LMA)
    pdptes = None
    if _pae_paging_after(new, s.cr4, new_efer) and (old ^ new) & (CR0_PG | CR0_CD | CR0_NW):
        pdptes = load_pdptes(s, s.cr3)
    s.cr0 = new
    s.efer = new_efer
    if pdptes is not None:
        s.pdptes = pdptes
    if old != new:
        emit(s, ("cr0", old, new))
    if new_efer != efer:
        emit(s, ("efer", efer, new_efer))


def write_cr3(x: Exec, v: int) -> None:
    """MOV to CR3 (SDM Vol. 2B MOV CR; Vol. 3A 4.5 Table 4-12, 4.10.4.1).

    In IA-32e mode bits 63:MAXPHYADDR are reserved (#GP(0)); with
    CR4.PCIDE = 1 bit 63 of the source is the "do not invalidate" hint and
    is not stored (SDM Vol. 3A 4.10.4.1).  Outside IA-32e mode the operand is
    32 bits.  With PAE paging in use the PDPTEs are loaded from the new CR3
    (#GP(0) on reserved bits, SDM Vol. 3A 4.4.1).
    """
    s = x.s
    keep = False
    if s.cr4 & CR4_PCIDE:
        keep = bool(v & CR3_NOFLUSH)
        v &= ~CR3_NOFLUSH
    if s.efer & EFER_LMA and v >> s.model.maxphyaddr:
        raise _gp()
    pdptes = load_pdptes(s, v) if _pae_paging_after(s.cr0, s.cr4, s.efer) else None
    s.cr3 = v
    if pdptes is not None:
        s.pdptes = pdptes
    emit(s, ("cr3_keep" if keep else "cr3", v))


def write_cr4(x: Exec, v: int) -> None:
    """MOV to CR4 (SDM Vol. 2B MOV CR; Vol. 3A 2.5, 4.1.1, 4.4.1; APM Vol. 2 3.1.3).

    * a bit the CPU model does not implement (``model.cr4_allowed``; bits
      63:32 included) -> #GP(0);
    * in IA-32e mode (EFER.LMA = 1): clearing PAE -> #GP(0); changing LA57
      -> #GP(0) (SDM Vol. 3A 4.1.1);
    * setting PCIDE outside IA-32e mode or with CR3[11:0] != 0 -> #GP(0)
      (SDM Vol. 3A 2.5, 4.10.1);
    * with PAE paging in use afterwards and PAE, PGE, PSE or SMEP changed,
      the PDPTEs are loaded from CR3 (SDM Vol. 3A 4.4.1).
    """
    s = x.s
    if v & ~s.model.cr4_allowed:
        raise _gp()
    old = s.cr4
    lma = s.efer & EFER_LMA
    if lma and (not v & CR4_PAE or (old ^ v) & CR4_LA57):
        raise _gp()
    if v & CR4_PCIDE and not old & CR4_PCIDE and (not lma or s.cr3 & 0xFFF):
        raise _gp()
    pdptes = None
    if _pae_paging_after(s.cr0, v, s.efer) and (old ^ v) & (CR4_PAE | CR4_PGE | CR4_PSE | CR4_SMEP):
        pdptes = load_pdptes(s, s.cr3)
    s.cr4 = v
    if pdptes is not None:
        s.pdptes = pdptes
    if old != v:
        emit(s, ("cr4", old, v))


def _dr_index(s: MachineState, n: int) -> int:
    """Resolve DR4/DR5, then apply the general-detect check (SDM Vol. 3A 17.2.2, 17.2.4).

    Check order (SDM Vol. 2B MOV DR exceptions; CPL first, as the caller
    does): DR4/DR5 with CR4.DE = 1 -> #UD, else they alias DR6/DR7; then
    DR7.GD = 1 -> #DB (a fault, before the access) with DR6.BD set.  The
    processor clears GD on entering the #DB handler so that the handler can
    use the debug registers; the spec clears it here, when the fault is
    raised (nothing can observe DR7 in between).
    """
    if n == 4 or n == 5:
        if s.cr4 & CR4_DE:
            raise Fault(Vector.UD)
        n += 2
    if s.dr[7] & DR7_GD:
        dr = list(s.dr)
        dr[6] |= DR6_BD
        dr[7] &= ~DR7_GD
        s.dr = dr
        raise Fault(Vector.DB)
    return n


def write_dr(x: Exec, n: int, v: int) -> None:
    """MOV to DRn (SDM Vol. 3A 17.2; APM Vol. 2 13.1.1).

    DR0-DR3 hold any value of the operand size (breakpoint matching is not
    modelled).  DR6/DR7: bits 63:32 set -> #GP(0) (64-bit mode); the low
    reserved bits read as their fixed values whatever is written.
    """
    s = x.s
    if n >= 6 and v >> 32:
        raise _gp()
    if n == 6:
        v = (v & DR6_WRITABLE) | DR6_ONES
    elif n == 7:
        v = (v & DR7_WRITABLE) | DR7_ONES
    dr = list(s.dr)
    dr[n] = v
    s.dr = dr


# -- descriptor-table registers ----------------------------------------------------------------------

def _load_table_register(x: Exec, i: Insn, idt: bool) -> None:
    """LGDT/LIDT (SDM Vol. 2A LGDT/LIDT; APM Vol. 3 LGDT, LIDT).

    The pseudo-descriptor is a 16-bit limit followed by the base: 24 bits
    with operand size 16 (the sixth byte is ignored), 32 bits with operand
    size 32, 64 bits in 64-bit mode (10 bytes, operand size ignored).  In
    64-bit mode a non-canonical base is #GP(0) (APM Vol. 3 LGDT/LIDT
    exception tables; the SDM lists no such check, KVM and Bochs fault too).
    """
    s = x.s
    require_cpl0(s)
    x.intercept(ExitCode.IDTR_WRITE if idt else ExitCode.GDTR_WRITE)  # APM 15.9, before the operand read
    op = i.operands[0]
    raw = x.D.concrete(x.read(op))
    limit = raw & _M16
    base = raw >> 16
    if op.size == 80:
        if not canonical(s, base):
            raise _gp()
    elif i.opsize == 16:
        base &= 0xFF_FFFF
    reg = s.idtr if idt else s.gdtr
    reg.base, reg.limit = base, limit


def _store_table_register(x: Exec, i: Insn, idt: bool) -> None:
    """SGDT/SIDT (SDM Vol. 2B SGDT, SIDT): limit, then base.

    Outside 64-bit mode 6 bytes are stored whatever the operand size: the
    limit and the full 32-bit base (the current SDM; the 24-bit form with a
    zero sixth byte belongs to older processors).  In 64-bit mode 10 bytes.
    """
    s = x.s
    _umip(s)
    x.intercept(ExitCode.IDTR_READ if idt else ExitCode.GDTR_READ)
    op = i.operands[0]
    reg = s.idtr if idt else s.gdtr
    base = reg.base if op.size == 80 else reg.base & _M32
    x.write(op, x.D.const(op.size, reg.limit & _M16 | base << 16))


@instruction("LGDT", ref="SDM Vol. 2A LGDT/LIDT; APM Vol. 3 LGDT")
def lgdt(x: Exec, i: Insn) -> None:
    _load_table_register(x, i, idt=False)


@instruction("LIDT", ref="SDM Vol. 2A LGDT/LIDT; APM Vol. 3 LIDT")
def lidt(x: Exec, i: Insn) -> None:
    _load_table_register(x, i, idt=True)


@instruction("SGDT", ref="SDM Vol. 2B SGDT; APM Vol. 3 SGDT")
def sgdt(x: Exec, i: Insn) -> None:
    _store_table_register(x, i, idt=False)


@instruction("SIDT", ref="SDM Vol. 2B SIDT; APM Vol. 3 SIDT")
def sidt(x: Exec, i: Insn) -> None:
    _store_table_register(x, i, idt=True)


# -- system descriptors: LLDT, LTR ---------------------------------------------------------------------

def _system_descriptor(s: MachineState, selector: int) -> tuple[int, int, int]:
    """``(low 8 bytes, high 8 bytes or 0, linear address)`` of a GDT system descriptor for LLDT/LTR.

    The 8 bytes (16 in IA-32e mode, SDM Vol. 3A 3.5, 7.2.3) must lie within
    the GDT limit, else #GP(selector).  Implicit supervisor reads.
    """
    lma = s.efer & EFER_LMA
    offset = selector & 0xFFF8
    if offset + (15 if lma else 7) > s.gdtr.limit:
        raise _gp(selector & 0xFFFC)
    lin = (s.gdtr.base + offset) & (_M64 if lma else _M32)
    D = s.D
    low = D.concrete(s.mem.read(lin, 8, AccessKind.READ, False, implicit=True))
    high = D.concrete(s.mem.read((lin + 8) & _M64, 8, AccessKind.READ, False, implicit=True)) if lma else 0
    return low, high, lin


def _system_cache(s: MachineState, selector: int, low: int, high: int) -> Segment:
    """The hidden part an LDT/TSS descriptor loads; in IA-32e mode with base bits 63:32 and the checks
    on the upper half: its type field (bits 12:8 of the fourth doubleword) must be 0 and the base
    canonical, else #GP(selector) (SDM Vol. 2A LLDT/LTR "64-Bit Mode Exceptions"; APM Vol. 3 LLDT, LTR)."""
    cache = descriptor_cache(selector, low)
    if s.efer & EFER_LMA:
        cache.base |= (high & _M32) << 32
        if not canonical(s, cache.base):
            raise _gp(selector & 0xFFFC)
    return cache


def _upper_type_ok(s: MachineState, high: int) -> bool:
    return not (s.efer & EFER_LMA and (high >> 40) & 0x1F)


@instruction("LLDT", ref="SDM Vol. 2A LLDT; APM Vol. 3 LLDT")
def lldt(x: Exec, i: Insn) -> None:
    """Load LDTR from a GDT LDT descriptor (type 2).

    A null selector (index 0, TI 0) makes LDTR unusable without reading a
    descriptor.  TI = 1, or a descriptor that is not an LDT -> #GP(selector);
    not present -> #NP(selector).  The RPL is ignored.
    """
    s = x.s
    require_protected(s)
    require_cpl0(s)
    x.intercept(ExitCode.LDTR_WRITE)
    sel = x.D.concrete(x.read(i.operands[0])) & _M16
    if not sel & 0xFFFC:
        ldtr = s.ldtr.copy()
        ldtr.selector, ldtr.unusable = sel, True
        s.ldtr = ldtr
        return
    err = sel & 0xFFFC
    if sel & 4:
        raise _gp(err)
    low, high, _ = _system_descriptor(s, sel)
    hi = low >> 32
    if (hi >> 12) & 1 or (hi >> 8) & 0xF != 2 or not _upper_type_ok(s, high):
        raise _gp(err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.NP, err)
    s.ldtr = _system_cache(s, sel, low, high)


@instruction("LTR", ref="SDM Vol. 2A LTR; APM Vol. 3 LTR")
def ltr(x: Exec, i: Insn) -> None:
    """Load TR from an available TSS descriptor in the GDT and mark it busy (SDM Vol. 3A 7.2.4).

    Null selector -> #GP(0); TI = 1, or not an available TSS -> #GP(selector)
    (type 9; also type 1, the 16-bit TSS, outside IA-32e mode); not present
    -> #NP(selector).  The busy bit (type bit 1) is set in the descriptor in
    memory (an implicit supervisor write) and in the loaded TR.
    """
    s = x.s
    require_protected(s)
    require_cpl0(s)
    x.intercept(ExitCode.TR_WRITE)
    sel = x.D.concrete(x.read(i.operands[0])) & _M16
    if not sel & 0xFFFC:
        raise _gp()
    err = sel & 0xFFFC
    if sel & 4:
        raise _gp(err)
    low, high, lin = _system_descriptor(s, sel)
    hi = low >> 32
    typ = (hi >> 8) & 0xF
    ok = typ == 9 or (typ == 1 and not s.efer & EFER_LMA)
    if (hi >> 12) & 1 or not ok or not _upper_type_ok(s, high):
        raise _gp(err)
    if not (hi >> 15) & 1:
        raise Fault(Vector.NP, err)
    cache = _system_cache(s, sel, low, high)
    s.mem.write((lin + 5) & _M64, 1, x.D.const(8, (low >> 40) & 0xFF | 2), False, implicit=True)
    cache.type |= 2
    s.tr = cache


def _store_selector(x: Exec, i: Insn, seg: Segment, exitcode: int) -> None:
    """SLDT/STR: a register destination gets the selector zero-extended to the operand size, a
    memory destination 16 bits (SDM Vol. 2B SLDT, STR)."""
    s = x.s
    require_protected(s)
    _umip(s)
    x.intercept(exitcode)
    dst = i.operands[0]
    x.write(dst, x.D.const(dst.size, seg.selector & _M16))


@instruction("SLDT", ref="SDM Vol. 2B SLDT; APM Vol. 3 SLDT")
def sldt(x: Exec, i: Insn) -> None:
    """Store the LDTR selector."""
    _store_selector(x, i, x.s.ldtr, ExitCode.LDTR_READ)


@instruction("STR", ref="SDM Vol. 2B STR; APM Vol. 3 STR")
def str_(x: Exec, i: Insn) -> None:
    """Store the TR selector."""
    _store_selector(x, i, x.s.tr, ExitCode.TR_READ)


# -- machine status word, CLTS -----------------------------------------------------------------------

@instruction("LMSW", ref="SDM Vol. 2A LMSW; APM Vol. 3 LMSW")
def lmsw(x: Exec, i: Insn) -> None:
    """Load CR0 bits 3:0 (PE, MP, EM, TS) from the 16-bit source; PE can be set but not cleared."""
    s = x.s
    require_cpl0(s)
    x.intercept(ExitCode.CR0_WRITE)  # APM 15.8.1: LMSW is a CR0 write; no decode assist (bit 63 = 0)
    src = x.D.concrete(x.read(i.operands[0]))
    old = s.cr0
    new = (old & ~0xE) | (src & 0xF)  # bit 0 of the old value survives: PE can only be set
    if (old ^ new) & ~_CR0_SELECTIVE_FREE:
        x.intercept(ExitCode.CR0_SEL_WRITE)  # PE or EM would change
    if new != old:
        s.cr0 = new
        emit(s, ("cr0", old, new))


@instruction("SMSW", ref="SDM Vol. 2B SMSW; APM Vol. 3 SMSW")
def smsw(x: Exec, i: Insn) -> None:
    """Store CR0: CR0[15:0] to memory; a register receives CR0 truncated (or zero-extended) to the
    operand size.  SDM Vol. 2B SMSW: r32 outside 64-bit mode has "undefined" bits 31:16; the spec
    stores CR0[31:16] there, the rule the SDM gives for 64-bit mode."""
    s = x.s
    _umip(s)
    x.intercept(ExitCode.CR0_READ)  # APM 15.8.1: SMSW reads CR0; no decode assist
    dst = i.operands[0]
    w = dst.size
    x.write(dst, x.D.const(w, s.cr0 & ((1 << w) - 1)))


@instruction("CLTS", ref="SDM Vol. 2A CLTS; APM Vol. 3 CLTS")
def clts(x: Exec, i: Insn) -> None:
    """Clear CR0.TS (SDM Vol. 3A 2.5)."""
    s = x.s
    require_cpl0(s)
    x.intercept(ExitCode.CR0_WRITE)  # CLTS writes CR0 (TS only: never a selective write)
    old = s.cr0
    if old & CR0_TS:
        s.cr0 = old & ~CR0_TS
        emit(s, ("cr0", old, s.cr0))


# -- TLB and cache control -------------------------------------------------------------------------

@instruction("INVLPG", ref="SDM Vol. 2A INVLPG; APM Vol. 3 INVLPG")
def invlpg(x: Exec, i: Insn) -> None:
    """Invalidate the TLB entries for the page of the operand's linear address.

    The operand is not accessed (no segment-limit or paging check).  In
    64-bit mode a non-canonical address makes it a NOP (SDM Vol. 2A INVLPG).
    The spec has no TLB: the event is recorded for TLB models.
    """
    s = x.s
    require_cpl0(s)
    op = i.operands[0]
    lin = x.D.concrete(x.linear(op.seg, x.ea(op)))
    x.intercept(ExitCode.INVLPG, lin)  # APM 15.33.2: EXITINFO1 = the linear address
    if s.code_bits == 64 and not canonical(s, lin):
        return
    emit(s, ("invlpg", lin))


@instruction("INVD", "WBINVD", "WBNOINVD",
             ref="SDM Vol. 2A INVD, Vol. 2B WBINVD, WBNOINVD; APM Vol. 3 INVD, WBINVD, WBNOINVD")
def invd(x: Exec, i: Insn) -> None:
    """Invalidate / write back caches.  The spec models no caches, so only the privilege check
    remains.  F3 0F 09 (WBNOINVD) is WBINVD with an ignored prefix on a processor without it, which
    is the same here."""
    require_cpl0(x.s)
    x.intercept(ExitCode.INVD if i.row.mnemonic == "INVD" else ExitCode.WBINVD)  # WBNOINVD: the WBINVD intercept


# -- descriptor probes: LAR, LSL, VERR, VERW (SDM Vol. 2A LAR, LSL; Vol. 2B VERR/VERW) ------------------

# System descriptor types valid for LAR / LSL (SDM Vol. 2A Tables 3-53 and LSL; APM Vol. 3 LAR, LSL).
_LAR_LEGACY = frozenset({1, 2, 3, 4, 5, 9, 0xB, 0xC})
_LSL_LEGACY = frozenset({1, 2, 3, 9, 0xB})
_LAR_IA32E = {"amd": frozenset({2, 9, 0xB, 0xC}), "intel": frozenset({9, 0xB, 0xC})}
_LSL_IA32E = frozenset({2, 9, 0xB})


def _probe(s: MachineState, selector: int) -> tuple[int, int] | None:
    """``(descriptor, upper half or 0)`` for LAR/LSL/VERR/VERW, or ``None`` when the selector cannot
    name one (null, LDT unusable, beyond the table limit): the instruction then clears ZF.

    A system descriptor in IA-32e mode is 16 bytes: its upper half must be
    within the limit too, and is returned for the upper-type check (APM
    Vol. 3 LAR: "valid only if bits 12-8 of doubleword +12 are zero").
    """
    if not selector & 0xFFFC:
        return None
    if selector & 4:
        ldtr = s.ldtr
        if ldtr.unusable or not ldtr.selector & 0xFFFC:
            return None
        base, limit = ldtr.base, ldtr.limit
    else:
        base, limit = s.gdtr.base, s.gdtr.limit
    offset = selector & 0xFFF8
    if offset + 7 > limit:
        return None
    lma = s.efer & EFER_LMA
    lin = (base + offset) & (_M64 if lma else _M32)
    D = s.D
    raw = D.concrete(s.mem.read(lin, 8, AccessKind.READ, False, implicit=True))
    high = 0
    if lma and not (raw >> 44) & 1:
        if offset + 15 > limit:
            return None
        high = D.concrete(s.mem.read((lin + 8) & _M64, 8, AccessKind.READ, False, implicit=True))
    return raw, high


def _visible(s: MachineState, selector: int, hi: int) -> bool:
    """Privilege check of the probes: conforming code passes; anything else needs DPL >= max(CPL, RPL)."""
    if (hi >> 12) & 1 and (hi >> 8) & 0xC == 0xC:
        return True
    return (hi >> 13) & 3 >= max(s.cpl, selector & 3)


def _system_ok(s: MachineState, hi: int, high: int, legacy: frozenset[int], ia32e: frozenset[int]) -> bool:
    typ = (hi >> 8) & 0xF
    if not s.efer & EFER_LMA:
        return typ in legacy
    return typ in ia32e and not (high >> 40) & 0x1F


def _access_query(x: Exec, i: Insn, legacy: frozenset[int], ia32e: frozenset[int]
                  ) -> tuple[int, int] | None:
    """The common part of LAR and LSL: ``(selector, raw descriptor)`` if the descriptor is valid for
    the instruction (code/data always; system types from ``legacy``/``ia32e``) and visible at
    CPL/RPL, else ``None`` (then ZF = 0 and the destination is not written)."""
    s = x.s
    require_protected(s)
    sel = x.D.concrete(x.read(i.operands[1])) & _M16
    found = _probe(s, sel)
    if found is None:
        return None
    raw, high = found
    hi = raw >> 32
    if not (hi >> 12) & 1 and not _system_ok(s, hi, high, legacy, ia32e):
        return None
    return (sel, raw) if _visible(s, sel, hi) else None


@instruction("LAR", defines="ZF", ref="SDM Vol. 2A LAR; APM Vol. 3 LAR")
def lar(x: Exec, i: Insn) -> None:
    """Load access rights: ZF = 1 and the destination = descriptor bytes 4-7 masked, if the selector
    names a descriptor valid for LAR and visible at CPL/RPL; else ZF = 0 and no write.

    Mask: FF00H for a 16-bit destination, 00F0FF00H otherwise (type, S,
    DPL, P, AVL, L, D/B, G); SDM "bits 19:16 are undefined": the spec
    returns 0 there.  A 64-bit destination is zero-extended.  IA-32e mode:
    the LDT type is valid on AMD (APM Vol. 3 LAR) but not on Intel (SDM
    Table 3-53).  Other flags are unchanged.
    """
    dst = i.operands[0]
    D = x.D
    found = _access_query(x, i, _LAR_LEGACY, _LAR_IA32E.get(x.vendor, _LAR_IA32E["amd"]))
    if found is not None:
        hi = found[1] >> 32
        x.write(dst, D.const(dst.size, hi & (0xFF00 if dst.size == 16 else 0x00F0_FF00)))
    x.set_flag(F.ZF, D.boolean(found is not None))


@instruction("LSL", defines="ZF", ref="SDM Vol. 2A LSL; APM Vol. 3 LSL")
def lsl(x: Exec, i: Insn) -> None:
    """Load segment limit: the byte-granular limit (scaled by G, SDM Vol. 3A 3.4.5) into the
    destination (low 16 bits for a 16-bit destination, zero-extended for 64) and ZF = 1, if the
    descriptor is valid for LSL (code/data, LDT, TSS; no gates) and visible; else ZF = 0, no write."""
    dst = i.operands[0]
    D = x.D
    found = _access_query(x, i, _LSL_LEGACY, _LSL_IA32E)
    if found is not None:
        limit = descriptor_cache(*found).limit
        x.write(dst, D.const(dst.size, limit & (_M16 if dst.size == 16 else _M32)))
    x.set_flag(F.ZF, D.boolean(found is not None))


def _verify(x: Exec, i: Insn, write: bool) -> None:
    """VERR/VERW (SDM Vol. 2B VERR/VERW): ZF = 1 if the segment is a code/data segment readable
    (VERR: data, or readable code) or writable (VERW: writable data) and visible at CPL/RPL
    (conforming code needs no privilege check).  The present bit is not checked."""
    s = x.s
    require_protected(s)
    D = x.D
    sel = D.concrete(x.read(i.operands[0])) & _M16
    found = _probe(s, sel)
    ok = False
    if found is not None:
        hi = found[0] >> 32
        typ = (hi >> 8) & 0xF
        if (hi >> 12) & 1:
            code = typ & 8
            if write:
                ok = not code and bool(typ & 2) and _visible(s, sel, hi)
            else:
                ok = (not code or bool(typ & 2)) and _visible(s, sel, hi)
    x.set_flag(F.ZF, D.boolean(ok))


@instruction("VERR", defines="ZF", ref="SDM Vol. 2B VERR/VERW; APM Vol. 3 VERR")
def verr(x: Exec, i: Insn) -> None:
    _verify(x, i, write=False)


@instruction("VERW", defines="ZF", ref="SDM Vol. 2B VERR/VERW; APM Vol. 3 VERW")
def verw(x: Exec, i: Insn) -> None:
    _verify(x, i, write=True)


__all__ = ["canonical", "emit", "load_pdptes", "mov_control", "read_cr", "require_cpl0", "require_protected",
           "write_cr", "write_cr0", "write_cr3", "write_cr4", "write_dr"]
