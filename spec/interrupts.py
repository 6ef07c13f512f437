"""Exception and interrupt delivery (SDM Vol. 3A chapter 6, 20.1.4; AMD APM Vol. 2 chapter 8).

One event -- a hardware exception raised by an instruction, a software
interrupt (INT n, INT3, INTO), an external interrupt (INTR) or an NMI -- is
delivered by :func:`deliver`; :func:`take` wraps it with the rules for an
exception raised *during* delivery (serial delivery, double fault, shutdown).
The CPU (:class:`spec.cpu.SpecCPU`) calls :func:`take` from its one
exception hook and at instruction boundaries.

Real-address mode (SDM Vol. 3A 20.1.4; Vol. 2A INT n "REAL-ADDRESS-MODE"):
the 4-byte IVT entry at ``IDTR.base + 4 * vector`` (#GP if ``4 * vector + 3``
exceeds the IDTR limit) gives CS:IP; FLAGS, CS and IP are pushed as words;
IF, TF, AC (and RF) are cleared; no error code is ever pushed.

Protected mode and IA-32e mode (SDM Vol. 3A 6.10-6.14; Vol. 2A INT n
"PROTECTED-MODE", "IA-32e-MODE", "TRAP-OR-INTERRUPT-GATE",
"INTER-/INTRA-PRIVILEGE-LEVEL-INTERRUPT"), checked in this order:

1. the gate lies within the IDT limit (8-byte gates; 16-byte in IA-32e mode)
   and is an interrupt or trap gate (types 6/7 16-bit, E/F 32-bit; in IA-32e
   mode only E/F, the 64-bit gates) or, outside IA-32e mode, a task gate
   (type 5), with S = 0; else #GP(vector * 8 + 2 + EXT);
2. software interrupts only (INT n, INT3, INTO -- not INT1, not exceptions):
   gate DPL >= CPL, else #GP(vector * 8 + 2) (EXT = 0);
3. gate present, else #NP(vector * 8 + 2 + EXT);
4. task gates: :class:`~spec.faults.Unimplemented` -- hardware task
   switching (SDM Vol. 3A 7.3) is outside the model;
5. target code segment: null -> #GP(EXT); outside its table -> #GP(sel + EXT);
   not a code segment, or DPL > CPL -> #GP(sel + EXT); not present ->
   #NP(sel + EXT); in IA-32e mode not a 64-bit code segment (L = 1, D = 0)
   -> #GP(vector * 8 + 2 + EXT) (SDM Vol. 3A 6.14.1);
6. stack: a non-conforming target with DPL < CPL switches to the stack of the
   new privilege level.  Legacy: SS:ESP for the DPL from the TSS (32-bit TSS
   at ``tr.base + 8 * DPL + 4``; 16-bit TSS at ``tr.base + 4 * DPL + 2``;
   beyond the TSS limit -> #TS(TR selector + EXT)); the new SS must be
   non-null (#TS(EXT)), within its table with RPL = DPL (#TS(SS + EXT)), a
   writable data segment of that DPL (#TS(SS + EXT)), present
   (#SS(SS + EXT)).  IA-32e mode: RSPn from the 64-bit TSS at
   ``tr.base + 4 + 8 * n``, or, for a gate with IST = k != 0, ISTk at
   ``tr.base + 0x24 + 8 * (k - 1)`` *whether or not* the privilege changes;
   the new RSP must be canonical (#SS(EXT)) and is aligned down to 16 bytes;
   on a privilege change SS becomes the null selector with RPL = new CPL
   (SDM Vol. 3A 6.14.2-6.14.5).  TSS, GDT/LDT and IDT reads are implicit
   supervisor accesses;
7. room on the stack for the frame within the SS limit (legacy), else
   #SS(SS + EXT) on a stack switch, #SS(EXT) otherwise; the handler offset
   within the new CS limit (legacy) or canonical (IA-32e), else #GP(EXT).

The frame, from higher to lower addresses: (SS, ESP,) EFLAGS, CS, EIP,
(error code), each slot the width of the gate (2 bytes for 16-bit gates, 4
for 32-bit gates, 8 for 64-bit gates; IA-32e mode always pushes SS:RSP).
Selectors are written zero-extended to the slot (the SDM defines only their
low 16 bits).  The stack writes are ordinary data writes at the *new* CPL
(user accesses when it is 3), not implicit supervisor accesses.  Error codes
are pushed for the hardware exceptions of :data:`spec.faults.HAS_ERROR_CODE`
only -- never for INT n, external interrupts or NMI, even on vectors 8-17
(SDM Vol. 3A 6.13) -- and #DF pushes 0.

RFLAGS after delivery (SDM Vol. 2A INT n "TRAP-OR-INTERRUPT-GATE" ending:
"IF interrupt gate THEN IF <- 0; TF <- 0; VM <- 0; RF <- 0; NT <- 0"; SDM
Vol. 3A 6.12.1.3): TF, NT, RF and VM cleared; IF cleared for interrupt gates
only (trap gates keep it).  The RF bit of the pushed image (SDM Vol. 3A
17.3.1.1) is 1 for fault-class exceptions and for events between the
iterations of a REP string instruction; otherwise the current RF (0 for
software interrupts, which clear it when they start).

Error codes name a selector (SDM Vol. 3A 6.13): bit 0 EXT is set when the
exception arises while delivering an event external to the program (an
external interrupt, NMI or an earlier hardware exception -- INT1 included) and
clear while delivering INT n, INT3 or INTO; bit 1 IDT says the index is an
IDT vector.

Double fault (SDM Vol. 3A 6.15 "Interrupt 8", Tables 6-4 and 6-5): events
are benign (vectors 1-7, 9, 16-19, every INT n and external interrupt),
contributory (0, 10-13, 21) or page faults (14, 20).  A contributory
exception while delivering a contributory one, or a contributory exception or
page fault while delivering a page fault, becomes #DF with error code 0;
every other pair is delivered serially (the second exception is delivered
instead, as a fault of the instruction or boundary that raised the first).
An exception while delivering #DF is a triple fault: the processor shuts down
(a ``shutdown`` stop event).  A failed delivery leaves no trace (stack
writes, accessed bits and register changes are undone) except CR2: it is
written whenever a page fault is taken for delivery, even one that becomes
#DF or happens while delivering #DF (SDM Vol. 3A "Interrupt 14", Figure 6-9
footnote).

Not modeled: task gates and hardware task switching, and delivery from
virtual-8086 mode (both raise :class:`~spec.faults.Unimplemented`); shadow
stacks (CET); #MC/#VE sources; instruction and data breakpoints.  NMI
blocking is the flag ``state.nmi_blocked`` (set when an NMI is delivered,
cleared by IRET); an NMI whose own delivery faults does not block NMIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from spec import flags as F
from spec.faults import HAS_ERROR_CODE, Fault, Unimplemented, Vector
from spec.isa.segments import descriptor_address, descriptor_cache, set_accessed
from spec.memory import AccessKind
from spec.state import CR0_PE, MachineState, Segment
from spec.svm.intercepts import GuestControls, VMExit

CR4_LA57 = 1 << 12
DR6_BS = 1 << 14  # single-step (SDM Vol. 3A 17.2.3)

_TF, _IF, _NT, _RF, _VM, _AC = (1 << F.TF, 1 << F.IF, 1 << F.NT, 1 << F.RF, 1 << F.VM, 1 << F.AC)
_CLEAR_PROTECTED = _TF | _NT | _RF | _VM
_CLEAR_REAL = _IF | _TF | _AC | _RF
_M16, _M32, _M64 = 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

_LEGACY_GATES = frozenset({0x5, 0x6, 0x7, 0xE, 0xF})  # task, 16-bit int/trap, 32-bit int/trap (SDM Table 3-2)
_LONG_GATES = frozenset({0xE, 0xF})  # 64-bit interrupt/trap gates (SDM Vol. 3A 6.14.1)
TASK_GATE = 0x5


class EventKind(IntEnum):
    """Where an event comes from: what its delivery checks and which EXT bit its faults carry."""

    EXCEPTION = 0  # raised by the processor (INT1/ICEBP included, SDM Vol. 2A INT1)
    SOFTWARE = 1  # INT n, INT3, INTO: gate DPL checked, EXT = 0
    EXTERNAL = 2  # maskable interrupt (INTR)
    NMI = 3


class EventClass(IntEnum):
    """Exception classes of SDM Vol. 3A Table 6-4."""

    BENIGN = 0
    CONTRIBUTORY = 1
    PAGE_FAULT = 2


_CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.CP})
_PAGE_FAULT = frozenset({Vector.PF, Vector.VE})

# Fault-class exceptions (SDM Vol. 3A Table 6-1 "Type" column): RF = 1 in the image (17.3.1.1).
# #DB is a fault only for instruction breakpoints, which the model does not raise; #DF/#MC are aborts.
_FAULT_CLASS = frozenset({Vector.DE, Vector.BR, Vector.UD, Vector.NM, 9, Vector.TS, Vector.NP, Vector.SS,
                          Vector.GP, Vector.PF, Vector.MF, Vector.AC, Vector.XM, Vector.VE, Vector.CP})


@dataclass(frozen=True, slots=True)
class Event:
    """One event to deliver.

    ``error_code`` is the value pushed (``None``: nothing is pushed).
    ``rf`` is the RF bit forced into the pushed RFLAGS image (fault class,
    or an event between REP iterations); ``cr2`` the faulting address of a #PF.
    ``soft_exception`` marks INT3/INTO (kind SOFTWARE): delivered as software
    interrupts, but exceptions (#BP, #OF) for SVM's exception intercepts and
    EXITINTINFO type (AMD APM Vol. 2 15.12, 15.20).
    """

    vector: int
    kind: EventKind = EventKind.EXCEPTION
    error_code: int | None = None
    rf: bool = False
    cr2: int | None = None
    soft_exception: bool = False

    @property
    def ext(self) -> int:
        """The EXT bit of error codes raised while delivering this event (SDM Vol. 3A 6.13)."""
        return 0 if self.kind == EventKind.SOFTWARE else 1

    @property
    def cls(self) -> EventClass:
        if self.kind != EventKind.EXCEPTION:
            return EventClass.BENIGN  # "All INT n" and "All INTR" are benign (Table 6-4); NMI too
        if self.vector in _CONTRIBUTORY:
            return EventClass.CONTRIBUTORY
        if self.vector in _PAGE_FAULT:
            return EventClass.PAGE_FAULT
        return EventClass.BENIGN

    @classmethod
    def from_fault(cls, f: Fault, *, rf: bool = False) -> Event:
        """The event an instruction's :class:`Fault` delivers.

        Software interrupts push no error code whatever the vector; hardware
        exceptions of :data:`HAS_ERROR_CODE` push one (0 if the raiser gave none).
        """
        if f.software:
            return cls(f.vector, EventKind.SOFTWARE)
        code = (f.error_code or 0) if f.vector in HAS_ERROR_CODE else None
        fault_class = not f.trap and f.vector in _FAULT_CLASS
        return cls(f.vector, EventKind.EXCEPTION, code, rf or fault_class, f.cr2)


DOUBLE_FAULT = Event(Vector.DF, EventKind.EXCEPTION, 0)

# EXITINTINFO / EVENTINJ TYPE field by event kind (AMD APM Vol. 2 15.20): INTR 0, NMI 2, exception 3, INTn 4.
_SVM_TYPE = {EventKind.EXTERNAL: 0, EventKind.NMI: 2, EventKind.EXCEPTION: 3, EventKind.SOFTWARE: 4}
_EXCP0 = 0x40  # exit code of the vector-0 exception intercept (APM Appendix C)


def svm_event_info(ev: Event) -> int:
    """``ev`` in the EXITINTINFO/EVENTINJ format (APM 15.7.2, 15.20): vector, type, EV, V, error code."""
    typ = 3 if ev.soft_exception else _SVM_TYPE[ev.kind]
    v = (ev.vector & 0xFF) | typ << 8 | 1 << 31
    if ev.error_code is not None:
        v |= 1 << 11 | (ev.error_code & 0xFFFF_FFFF) << 32
    return v


def _svm_exception_exit(svm: GuestControls, ev: Event, outer: Event | None) -> None:
    """#VMEXIT instead of delivering ``ev`` if it is an intercepted exception (APM 15.12).

    EXITINFO1 = the error code (0 if none), EXITINFO2 = the faulting address
    of a #PF -- CR2 is *not* written; EXITINTINFO = ``outer``, the event whose
    delivery raised ``ev`` (APM 15.7.2).
    """
    if (ev.kind == EventKind.EXCEPTION or ev.soft_exception) and svm.exception_intercepted(ev.vector):
        info2 = (ev.cr2 or 0) if ev.vector == Vector.PF else 0
        raise VMExit(_EXCP0 + ev.vector, ev.error_code or 0, info2,
                     intinfo=0 if outer is None else svm_event_info(outer))


def escalates(first: Event, second: Event) -> bool:
    """SDM Vol. 3A Table 6-5: does ``second`` (raised while delivering ``first``) become #DF?"""
    c1, c2 = first.cls, second.cls
    if c1 == EventClass.CONTRIBUTORY:
        return c2 == EventClass.CONTRIBUTORY
    if c1 == EventClass.PAGE_FAULT:
        return c2 != EventClass.BENIGN
    return False


def set_sti_shadow(s: MachineState, if_before: bool | None = None) -> None:
    """Record the STI interrupt shadow (SDM Vol. 2B STI).

    "If interrupts are disabled when STI executes, external interrupts and
    NMIs may be blocked for one instruction": the shadow is set only when IF
    was 0 before the STI.  Call it *before* STI sets IF, or pass ``if_before``.
    The CPU clears the shadow at the next instruction boundary.
    """
    was = bool(s.rflags_sys >> F.IF & 1) if if_before is None else if_before
    if not was:
        s.interrupt_shadow = True


def canonical(s: MachineState, addr: int) -> bool:
    """Is ``addr`` canonical: sign-extended from bit 47 (bit 56 with CR4.LA57) (SDM Vol. 1 3.3.7.1)?"""
    bits = 57 if s.cr4 & CR4_LA57 else 48
    top = addr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


# -- helpers -------------------------------------------------------------------------------

def _read(s: MachineState, lin: int, n: int) -> int:
    """An implicit supervisor read (IDT, GDT/LDT, TSS; SDM Vol. 3A 4.6.1)."""
    return s.D.concrete(s.mem.read(lin, n, AccessKind.READ, False, implicit=True))


def _descriptor(s: MachineState, selector: int, vector: int, ext: int) -> tuple[int, int]:
    """``(raw descriptor, linear address)``; a selector outside its table raises ``vector(sel + EXT)``."""
    try:
        lin = descriptor_address(s, selector)
    except Fault:
        raise Fault(vector, (selector & 0xFFFC) | ext) from None
    return _read(s, lin, 8), lin


def _stack_ok(seg: Segment, offset: int, n: int) -> bool:
    """Do ``n`` bytes at ``offset`` lie within the stack segment (SDM Vol. 3A 5.3, expand-down: 3.4.5.1)?"""
    last = offset + n - 1
    if seg.type & 0x4 and seg.s and not seg.type & 0x8:  # expand-down data segment
        upper = _M32 if seg.db else _M16
        return offset > seg.limit and last <= upper
    return last <= seg.limit


def _frame_addresses(s: MachineState, ss: Segment, sp: int, sw: int, sizes: list[int], ss_code: int,
                     check_limit: bool) -> tuple[list[int], int]:
    """Linear addresses of pushes of ``sizes`` bytes below ``sp``, and the final SP; #SS(``ss_code``) if no room.

    ``sw`` is the stack-pointer width: 16/32 (offsets in SS, checked against
    its limit when ``check_limit``) or 64 (linear = RSP, each push canonical).
    """
    mask = (1 << sw) - 1
    addrs = []
    off = sp & mask
    for n in sizes:
        off = (off - n) & mask
        if sw == 64:
            if not canonical(s, off) or not canonical(s, (off + n - 1) & _M64):
                raise Fault(Vector.SS, ss_code)
            addrs.append(off)
        else:
            if check_limit and not _stack_ok(ss, off, n):
                raise Fault(Vector.SS, ss_code)
            addrs.append((ss.base + off) & _M32)
    return addrs, off


def _write_frame(s: MachineState, addrs: list[int], slots: list[tuple[int, object]], user: bool) -> None:
    """The frame writes: ordinary data writes at the new CPL (not implicit supervisor accesses)."""
    write = s.mem.write
    for (n, value), lin in zip(slots, addrs):
        write(lin, n, value, user)


def _flags_image(s: MachineState, ev: Event, width: int) -> object:
    D = s.D
    img = s.read_rflags()
    if ev.rf:
        img = D.or_(64, img, D.const(64, _RF))
    return D.extract(img, width - 1, 0)


# -- real-address mode ----------------------------------------------------------------------

def _deliver_real(s: MachineState, ev: Event, rip: int) -> None:
    """Real-address mode (SDM Vol. 3A 20.1.4; Vol. 2A INT n "REAL-ADDRESS-MODE")."""
    v = ev.vector
    if v * 4 + 3 > s.idtr.limit:
        raise Fault(Vector.GP, 0)
    D = s.D
    ss = s.seg[2]
    cs = s.seg[1]
    sp = D.concrete(s.gpr[4])
    slots = [(2, _flags_image(s, ev, 16)), (2, D.const(16, cs.selector)), (2, D.const(16, rip & _M16))]
    addrs, new_sp = _frame_addresses(s, ss, sp, 16, [2, 2, 2], 0, True)
    entry = _read(s, (s.idtr.base + 4 * v) & _M32, 4)
    _write_frame(s, addrs, slots, False)
    s.gpr[4] = D.const(64, (sp & ~_M16 & _M64) | new_sp)
    sel = entry >> 16
    new_cs = cs.copy()
    new_cs.selector, new_cs.base, new_cs.unusable = sel, sel << 4, False
    s.seg[1] = new_cs
    s.rip = entry & _M16
    s.rflags_sys &= ~_CLEAR_REAL


# -- protected mode and IA-32e mode ---------------------------------------------------------

def deliver(s: MachineState, ev: Event, rip: int) -> None:
    """Deliver ``ev`` with return address ``rip``; raise :class:`Fault` if delivery itself faults.

    On a fault the state may be partly updated (memory writes journaled);
    :func:`take` restores it.  State changes are made only after every check.
    """
    if not s.cr0 & CR0_PE:
        _deliver_real(s, ev, rip)
        return
    if s.rflags_sys & _VM:
        raise Unimplemented("interrupt/exception delivery from virtual-8086 mode (SDM Vol. 3A 20.3) is not modeled")
    D = s.D
    ext = ev.ext
    v = ev.vector
    idt_code = v * 8 + 2 + ext
    cpl = s.cpl
    long_mode = s.long_mode

    # 1-4. The gate.
    size = 16 if long_mode else 8
    if v * size + size - 1 > s.idtr.limit:
        raise Fault(Vector.GP, idt_code)
    gate_lin = s.idtr.base + v * size
    gate_lin &= _M64 if long_mode else _M32
    lo = _read(s, gate_lin, 8)
    hi = _read(s, (gate_lin + 8) & _M64, 8) if long_mode else 0
    gtype = (lo >> 40) & 0xF
    if (lo >> 44) & 1 or gtype not in (_LONG_GATES if long_mode else _LEGACY_GATES):
        raise Fault(Vector.GP, idt_code)
    if ev.kind == EventKind.SOFTWARE and (lo >> 45) & 3 < cpl:
        raise Fault(Vector.GP, v * 8 + 2)
    if not (lo >> 47) & 1:
        raise Fault(Vector.NP, idt_code)
    if gtype == TASK_GATE:
        raise Unimplemented(f"vector {v:#x} goes through a task gate: hardware task switching "
                            "(SDM Vol. 3A 7.3) is outside the model")
    interrupt_gate = not gtype & 1
    gate_bits = 64 if long_mode else (32 if gtype & 0x8 else 16)
    offset = (lo & 0xFFFF) | ((lo >> 48) << 16)
    if long_mode:
        offset |= (hi & _M32) << 32
    elif gate_bits == 16:
        offset &= _M16
    ist = (lo >> 32) & 7 if long_mode else 0

    # 5. The target code segment.
    sel = (lo >> 16) & 0xFFFF
    if sel & 0xFFFC == 0:
        raise Fault(Vector.GP, ext)
    sel_code = (sel & 0xFFFC) | ext
    cs_raw, cs_lin = _descriptor(s, sel, Vector.GP, ext)
    cs_hi = cs_raw >> 32
    cs_type, cs_s, cs_dpl, cs_p = (cs_hi >> 8) & 0xF, (cs_hi >> 12) & 1, (cs_hi >> 13) & 3, (cs_hi >> 15) & 1
    if not cs_s or not cs_type & 0x8 or cs_dpl > cpl:
        raise Fault(Vector.GP, sel_code)
    if not cs_p:
        raise Fault(Vector.NP, sel_code)
    if long_mode and not ((cs_hi >> 21) & 1 and not (cs_hi >> 22) & 1):
        raise Fault(Vector.GP, idt_code)  # SDM Vol. 3A 6.14.1: the target must be a 64-bit code segment
    inner = not cs_type & 0x4 and cs_dpl < cpl
    new_cpl = cs_dpl if inner else cpl

    # 6. The stack.
    old_ss = s.seg[2]
    old_rsp = D.concrete(s.gpr[4])
    tr = s.tr
    new_ss = old_ss
    if long_mode:
        if ist or inner:
            slot = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
            if slot + 7 > tr.limit:
                raise Fault(Vector.TS, (tr.selector & 0xFFFC) | ext)
            sp = _read(s, (tr.base + slot) & _M64, 8)
        else:
            sp = old_rsp
        if not canonical(s, sp):
            raise Fault(Vector.SS, ext)
        sp &= ~0xF & _M64
        if inner:
            new_ss = old_ss.copy()
            new_ss.selector, new_ss.dpl, new_ss.unusable = new_cpl, new_cpl, True
        sw = 64
        ss_code = ext
    elif inner:
        if tr.type & 0x8:  # 32-bit TSS: ESPn at 8n + 4, SSn at 8n + 8
            slot = (new_cpl << 3) + 4
            if slot + 5 > tr.limit:
                raise Fault(Vector.TS, (tr.selector & 0xFFFC) | ext)
            sp = _read(s, (tr.base + slot) & _M32, 4)
            ss_sel = _read(s, (tr.base + slot + 4) & _M32, 2)
        else:  # 16-bit TSS: SPn at 4n + 2, SSn at 4n + 4
            slot = (new_cpl << 2) + 2
            if slot + 3 > tr.limit:
                raise Fault(Vector.TS, (tr.selector & 0xFFFC) | ext)
            sp = _read(s, (tr.base + slot) & _M32, 2)
            ss_sel = _read(s, (tr.base + slot + 2) & _M32, 2)
        if ss_sel & 0xFFFC == 0:
            raise Fault(Vector.TS, ext)
        ss_code = (ss_sel & 0xFFFC) | ext
        if ss_sel & 3 != new_cpl:
            raise Fault(Vector.TS, ss_code)
        ss_raw, ss_lin = _descriptor(s, ss_sel, Vector.TS, ext)
        ss_hi = ss_raw >> 32
        ss_type = (ss_hi >> 8) & 0xF
        if (ss_hi >> 13) & 3 != new_cpl or not (ss_hi >> 12) & 1 or ss_type & 0x8 or not ss_type & 0x2:
            raise Fault(Vector.TS, ss_code)
        if not (ss_hi >> 15) & 1:
            raise Fault(Vector.SS, ss_code)
        new_ss = descriptor_cache(ss_sel, ss_raw | (1 << 40))
        sw = 32 if new_ss.db else 16
    else:
        sp = old_rsp
        sw = 32 if old_ss.db else 16
        ss_code = ext

    # 7. The frame, then the handler address.
    slot_n = gate_bits // 8
    C = D.const
    w = gate_bits
    slots: list[tuple[int, object]] = []
    if inner or long_mode:
        slots += [(slot_n, C(w, old_ss.selector)), (slot_n, C(w, old_rsp & ((1 << w) - 1)))]
    slots += [(slot_n, _flags_image(s, ev, w)), (slot_n, C(w, s.seg[1].selector)),
              (slot_n, C(w, rip & ((1 << w) - 1)))]
    if ev.error_code is not None:
        slots.append((slot_n, C(w, ev.error_code & ((1 << w) - 1))))
    # Room for the whole frame before the handler address is checked (Vol. 2A INT n order).
    addrs, new_sp = _frame_addresses(s, new_ss, sp, sw, [n for n, _ in slots], ss_code, sw != 64)
    cs = descriptor_cache((sel & 0xFFFC) | new_cpl, cs_raw | (1 << 40))
    if long_mode:
        if not canonical(s, offset):
            raise Fault(Vector.GP, ext)
    elif offset > cs.limit:
        raise Fault(Vector.GP, ext)
    if inner and not long_mode:
        set_accessed(s, ss_lin, ss_raw)
    set_accessed(s, cs_lin, cs_raw)
    _write_frame(s, addrs, slots, new_cpl == 3)
    if sw == 16:  # a 16-bit stack (SS.B = 0) updates SP only (SDM Vol. 3A 3.4.5, D/B flag)
        new_sp |= sp & ~_M16 & _M32
    s.gpr[4] = C(64, new_sp)
    s.seg[1] = cs
    s.seg[2] = new_ss
    s.rip = offset
    clear = _CLEAR_PROTECTED | (_IF if interrupt_gate else 0)
    s.rflags_sys &= ~clear


# -- taking an event: delivery with the double-fault rules ----------------------------------

def _snapshot(s: MachineState) -> tuple:
    return s.gpr[4], list(s.seg), s.rflags_sys, s.rip, s.halted, len(s.mem.journal)  # type: ignore[arg-type]


def _restore(s: MachineState, snap: tuple) -> None:
    s.gpr[4], s.seg, s.rflags_sys, s.rip, s.halted, mark = snap
    journal = s.mem.journal
    assert journal is not None
    phys = s.mem.phys
    for saved in reversed(journal[mark:]):
        phys.restore(saved)
    del journal[mark:]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :func:`take` did.

    ``delivered`` is the event that reached its handler (``None`` on
    shutdown); ``serial`` is true when an exception during delivery replaced
    the requested event (serially, or as #DF); ``shutdown`` names the triple fault.
    """

    delivered: Event | None
    shutdown: str | None = None
    serial: bool = False
    fault: Fault | None = None  # with ``nested=False``: the exception that stopped delivery

    @property
    def first(self) -> bool:
        """Did the requested event itself reach its handler?"""
        return self.delivered is not None and not self.serial


def take(s: MachineState, ev: Event, rip: int, restart_rip: int, *, nested: bool = True,
         intercept: bool = True) -> Outcome:
    """Deliver ``ev`` (return address ``rip``), applying the double-fault rules.

    ``restart_rip`` is the return address of an exception raised *during*
    the delivery: the instruction that raised ``ev``, or the boundary at which
    an external event or trap was being delivered (such exceptions are faults
    of that instruction/boundary).  With ``nested=False`` such an exception
    is not delivered but returned in :attr:`Outcome.fault` (state restored).
    May raise :class:`Unimplemented` (with the state restored).

    In SVM guest mode (``s.svm``) an intercepted exception -- ``ev`` itself
    unless ``intercept`` is false (events injected by VMRUN are not
    intercepted, APM 15.20), or one raised while delivering, #DF included --
    raises :class:`~spec.svm.intercepts.VMExit` with the state restored; so
    does a #VMEXIT during delivery (a nested page fault), with EXITINTINFO =
    the event being delivered (APM 15.7.2).
    """
    mem = s.mem
    own_journal = mem.journal is None
    if own_journal:
        mem.journal = []
    serial = False
    svm = s.svm
    outer: Event | None = None
    try:
        while True:
            if svm is not None and intercept:
                _svm_exception_exit(svm, ev, outer)
            intercept = True
            if ev.vector == Vector.PF and ev.kind == EventKind.EXCEPTION and ev.cr2 is not None:
                s.cr2 = ev.cr2
            snap = _snapshot(s)
            try:
                deliver(s, ev, rip)
            except VMExit as e:
                _restore(s, snap)
                if not e.intinfo:
                    e.intinfo = svm_event_info(ev)
                raise
            except Fault as f2:
                _restore(s, snap)
                if svm is not None:
                    _svm_exception_exit(svm, Event.from_fault(f2), ev)
                if f2.vector == Vector.PF and f2.cr2 is not None:
                    s.cr2 = f2.cr2  # updated even when it becomes #DF or shuts down (Figure 6-9 note)
                if not nested:
                    return Outcome(None, None, True, f2)
                if ev.kind == EventKind.EXCEPTION and ev.vector == Vector.DF:
                    return Outcome(None, f"triple fault: {f2!r} while delivering #DF")
                second = Event.from_fault(f2, rf=True)
                outer = ev
                ev = DOUBLE_FAULT if escalates(ev, second) else second
                rip = restart_rip
                serial = True
                continue
            except Unimplemented:
                _restore(s, snap)
                raise
            s.halted = False
            s.interrupt_shadow = False
            if ev.kind == EventKind.NMI:
                s.nmi_blocked = True  # until the next IRET (SDM Vol. 3A 6.7.1)
            return Outcome(ev, None, serial)
    finally:
        if own_journal:
            mem.journal = None


__all__ = ["DOUBLE_FAULT", "DR6_BS", "Event", "EventClass", "EventKind", "Outcome", "canonical", "deliver",
           "escalates", "set_sti_shadow", "svm_event_info", "take"]
