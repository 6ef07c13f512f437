"""The spec CPU: fetch, decode, execute one instruction at a time, with explicit stop events.

``step()`` executes one instruction (one iteration of a REP string
instruction) and returns ``None``, or a :class:`StopEvent` when the machine
stops: halted (HLT), fault (an exception the CPU does not deliver: vector,
error code, RIP of the faulting instruction, CR2 for #PF), unimplemented
(the model does not define what the next instruction does -- never an
architectural event).  ``run(budget)`` steps until a stop or until ``budget``
instructions have retired (stop kind ``budget``).

An instruction that faults leaves no trace: registers, flags and the memory
writes it made are rolled back before the fault is reported (faults are
precise, SDM Vol. 3A 6.5), except writes that went to a device on the bus.

Events (:mod:`spec.interrupts` delivers them).  ``SpecCPU(state,
deliver_exceptions=True)`` delivers every exception through the IVT/IDT
(serial delivery, #DF, triple fault -> a ``shutdown`` stop event); the
default ``False`` keeps the stop-at-the-first-exception behaviour the
differential backends compare with (Unicorn never delivers).  Either way, at
each instruction boundary (SDM Vol. 3A 6.9, Table 6-2: traps of the previous
instruction, then NMI, then INTR):

* an interrupt shadow (MOV SS / POP SS, STI with IF = 0) blocks NMI and
  INTR at the boundary after the instruction that set it, and is cleared
  there (SDM Vol. 3A 6.8.3; Vol. 2B STI);
* a pending NMI (:meth:`SpecCPU.request_nmi`) is delivered unless NMIs are
  blocked (``state.nmi_blocked``, set by NMI delivery, cleared by IRET);
* with RFLAGS.IF = 1, a pending external interrupt
  (:meth:`SpecCPU.request_interrupt`, or an attached
  :class:`InterruptSource` such as a virtual PIC/APIC) is delivered;
* an event wakes a halted CPU (the return address is past the HLT).

Single-step (SDM Vol. 3A 17.3.1.4): TF set when an instruction starts ->
#DB (DR6.BS) after it completes, so POPF setting TF traps only after the
next instruction and POPF clearing TF still traps.  After MOV SS / POP SS the
trap waits for the end of the next instruction (SDM Vol. 3A 6.8.3).  A
faulting instruction, or one whose event (INT n/INT3/INTO/INT1) is delivered,
does not single-step (delivery clears TF; the model drops the trap, as
software debuggers must emulate INT n: SDM Vol. 3A 17.3.1.4).  RF (SDM Vol. 3A
17.3.1.1): cleared when an instruction other than IRET completes; pushed as
1 for fault-class exceptions and between REP iterations.  Instruction and
data breakpoints (DR0-DR3/DR7) are not modeled.

Exception priority (SDM Vol. 3A 6.9, Table 6-2) is structural: an instruction
stops at the first fault it meets, in the order fetch (CS limit, then the
code #PF of the bytes it needs) -> decode (#UD, length > 15 #GP) -> execution
(the semantics' own order).  Only the bytes the decoder needs are fetched:
an invalid opcode wholly before an unmapped page is #UD, one whose opcode
bytes continue on an unmapped page is #PF (SDM Table 6-2: class 8 before 9).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from spec import flags as F
from spec.decode.decoder import MAX_LENGTH, decode
from spec.decode.insn import Insn
from spec.faults import Fault, Unimplemented, Vector
from spec.interrupts import DR6_BS, Event, EventKind, take
from spec.isa import SEMANTICS
from spec.isa.context import Exec, Halt
from spec.memory import PAGE, AccessKind
from spec.segmentation import fetch_window
from spec.state import CR0_PE, MachineState
from spec.svm.intercepts import VMExit

StopKind = Literal["halted", "fault", "budget", "unimplemented", "shutdown", "vmexit"]


class StopEvent(BaseModel):
    """Why the CPU stopped (a boundary type: difftest and the VMM report it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: StopKind
    rip: int
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    detail: str = ""
    # kind "vmexit" (SVM guest mode, spec/svm): EXITCODE, EXITINFO1/2, EXITINTINFO and nRIP (AMD APM 15.7).
    exitcode: int | None = None
    exitinfo1: int = 0
    exitinfo2: int = 0
    exitintinfo: int = 0
    nrip: int = 0

    def describe(self) -> str:
        if self.kind == "fault":
            try:
                name = "#" + Vector(self.vector).name  # type: ignore[arg-type]
            except ValueError:
                name = f"vector {self.vector}"
            ec = "" if self.error_code is None else f"({self.error_code:#x})"
            cr2 = "" if self.cr2 is None else f" cr2={self.cr2:#x}"
            return f"fault {name}{ec} at rip={self.rip:#x}{cr2}"
        if self.kind == "vmexit":
            return (f"#VMEXIT {self.exitcode:#x} at rip={self.rip:#x} info1={self.exitinfo1:#x} "
                    f"info2={self.exitinfo2:#x}")
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.kind} at rip={self.rip:#x}{extra}"


# Sequential execution advances EIP as 32 bits outside 64-bit mode, 16-bit code included: running past
# offset FFFFH does not wrap to 0 as on the 8086; the next fetch is checked against CS.limit (#GP(0) in real
# mode; 386 PRM 14.7 item 8; SDM Vol. 3A 22.33.1).  Branches truncate their targets to the operand size.
_IP_MASK = {16: 0xFFFF_FFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}
_TF, _IF, _RF = 1 << F.TF, 1 << F.IF, 1 << F.RF
_TF_RF = _TF | _RF
_DEFERRED_DB = 1  # a single-step #DB held over a MOV SS / POP SS (bit 0 is never TF or RF)


class InterruptSource(Protocol):
    """An interrupt controller on the INTR line (a virtual PIC or APIC)."""

    def pending(self) -> bool:
        """Is INTR asserted?"""
        ...

    def acknowledge(self) -> int:
        """The interrupt-acknowledge cycle: the vector to deliver (the controller marks it in service)."""
        ...


DECODE_CACHE_SIZE = 1 << 14
"""Decoded 15-byte windows remembered per vendor (shared by every CPU; emptied when full)."""
_DECODED: dict[str, dict[tuple[int, bool, bytes], Insn]] = {}
"""vendor -> (code size, real mode, window) -> instruction: a decode depends on nothing else."""


class SpecCPU:
    """The reference interpreter over a :class:`MachineState` (any domain)."""

    def __init__(self, state: MachineState, *, vendor: str | None = None, deliver_exceptions: bool = False) -> None:
        vendor = vendor or state.model.vendor  # the CPU model decides unless the caller overrides it
        self.state = state
        self.vendor = vendor
        self.x = Exec(state)
        self.x.vendor = vendor
        self._decoded = _DECODED.setdefault(vendor, {})
        self.deliver_exceptions = deliver_exceptions
        self.interrupt_source: InterruptSource | None = None
        self._intr: deque[int] = deque()  # vectors requested on INTR, oldest first
        self._nmi = False  # NMI pending
        self._db_deferred = False  # single-step trap held over a MOV SS / POP SS
        self._shutdown: str | None = None  # triple fault: the reason; the CPU stays shut down
        self._attention = False  # any of the above: step() takes the slow boundary path
        self._shadow_at: tuple[int, int] | None = None  # (RIP, icount) of the last boundary in an interrupt shadow

    # -- fetch and decode ------------------------------------------------------------
    def fetch_linear(self) -> int:
        """Linear address of the next instruction: CS base + RIP (SDM Vol. 3A 3.4)."""
        s = self.state
        if s.code_bits == 64:
            return s.rip
        return (s.seg[1].base + s.rip) & 0xFFFF_FFFF

    def fetch_decode(self) -> Insn:
        """Fetch and decode the instruction at CS:RIP.

        Segmentation first (:func:`spec.segmentation.fetch_window`): only the
        bytes the instruction occupies must lie within CS.limit (canonical in
        64-bit mode), so the first window stops at the limit, and asking for a
        byte beyond it is #GP(0) -- raised before the next page is touched
        (segmentation precedes paging, SDM Vol. 3A 3.1).
        """
        s = self.state
        bits = s.code_bits
        lin, avail = fetch_window(s)
        user = s.cpl == 3
        first = min(MAX_LENGTH, PAGE - (lin & (PAGE - 1)), avail)
        window = s.mem.read(lin, first, AccessKind.FETCH, user)
        code = s.D.concrete(window).to_bytes(first, "little")
        real = not s.cr0 & CR0_PE or bool(s.rflags_sys >> F.VM & 1)  # real-address or virtual-8086 mode
        key = (bits, real, code)
        insn = self._decoded.get(key) if first == MAX_LENGTH else None
        if insn is not None:
            return insn

        def more(n: int) -> bytes:
            # The instruction continues past the window: fetch only the bytes it needs.
            if n > avail:
                raise Fault(Vector.GP, 0)  # a byte beyond CS.limit / the canonical range (SDM Vol. 3A 5.3)
            n = min(n, MAX_LENGTH)
            nxt = (lin + first) & (0xFFFF_FFFF_FFFF_FFFF if bits == 64 else 0xFFFF_FFFF)
            rest = s.mem.read(nxt, n - first, AccessKind.FETCH, user)
            return code + s.D.concrete(rest).to_bytes(n - first, "little")

        insn = decode(code, bits, more, vendor=self.vendor, real=real)
        if first == MAX_LENGTH:
            if len(self._decoded) >= DECODE_CACHE_SIZE:
                self._decoded.clear()
            self._decoded[key] = insn
        return insn

    # -- execution -------------------------------------------------------------------
    def step(self) -> StopEvent | None:
        s = self.state
        after = 0  # work once the instruction completes: _TF (single-step), _RF (clear RF), _DEFERRED_DB
        if s.halted or s.interrupt_shadow or self._attention or s.rflags_sys & _TF_RF:
            stop, proceed = self._boundary()
            if not proceed:
                return stop
            after = s.rflags_sys & _TF_RF
            if self._db_deferred:
                after |= _DEFERRED_DB
                self._db_deferred = False
                self._update_attention()
            rip0 = s.rip  # the instruction's own RIP (read only when ``after`` is set)
        x = self.x
        mem = s.mem
        saved = (list(s.gpr), s.flags.copy(), s.rflags_sys, s.undefined, list(s.seg))  # type: ignore[union-attr]
        mem.journal = []
        try:
            insn = self.fetch_decode()
            sem = SEMANTICS.get(insn.row.mnemonic)
            if sem is None:
                raise Unimplemented(f"no semantics for {insn.name} ({insn.row.key})")
            x.i = insn
            x.next_rip = (s.rip + insn.length) & _IP_MASK[s.code_bits]
            sem.fn(x, insn)
        except Halt:
            s.rip = x.next_rip
            s.halted = True
            s.icount += 1
            if after:
                mem.journal = None
                ev = self._after(insn, after, rip0)
                if ev is not None or not s.halted:
                    return ev
            return StopEvent(kind="halted", rip=s.rip)
        except Fault as f:
            return self.exception(f, saved, x.next_rip)
        except VMExit as e:
            if e.trap:  # a trap-like intercept (EFER/CRn write trap): the instruction completed
                s.rip = x.next_rip
                s.icount += 1
            else:  # intercepted instructions have no effect (AMD APM Vol. 2 15.9)
                self._rollback(saved)
            return self._vmexit(e)
        except Unimplemented as u:
            self._rollback(saved)
            return StopEvent(kind="unimplemented", rip=s.rip, detail=str(u))
        finally:
            mem.journal = None
        s.rip = x.next_rip
        s.icount += 1
        if after:
            return self._after(insn, after, rip0)
        return None

    def _vmexit(self, e: VMExit) -> StopEvent:
        """A ``vmexit`` stop.  An instruction undone by the exit was still in the interrupt shadow it
        started in, so the shadow is restored (the VMCB's INTERRUPT_SHADOW reports it, APM 15.21.5)."""
        s = self.state
        if self._shadow_at == (s.rip, s.icount):
            s.interrupt_shadow = True
        self.x.i = None
        return StopEvent(kind="vmexit", rip=self.state.rip, exitcode=e.code, exitinfo1=e.info1, exitinfo2=e.info2,
                         exitintinfo=e.intinfo, nrip=e.nrip)

    def _exception_vmexit(self, e: VMExit, f: Fault, ev: Event, saved: tuple, start: int,
                          next_rip: int) -> StopEvent:
        """#VMEXIT while taking the exception ``f`` of the instruction at ``start`` (AMD APM Vol. 2 15.7, 15.12).

        The exception intercept of INT1's #DB, a trap, comes after the
        instruction completed (RIP past it).  Otherwise the instruction is
        undone, RIP stays on it: INT3/INTO (#BP/#OF intercepted), a fault, or
        an exit while delivering a software interrupt.  nRIP is the next
        instruction for INT3, INTO and BOUND (APM 15.7.1) and for an exit while
        delivering INT n/INT3/INTO (so the VMM can re-inject it from EXITINTINFO).
        """
        s = self.state
        direct = not e.intinfo and e.code == 0x40 + f.vector  # the exception itself was intercepted
        mnemonic = self.x.i.row.mnemonic if self.x.i is not None else ""
        if direct and f.trap and not f.software:
            s.rip = next_rip
            s.icount += 1
            return self._vmexit(e)
        self._rollback(saved)
        s.rip = start
        if direct and mnemonic in ("INT3", "INTO", "BOUND"):
            e.nrip = next_rip
        elif not direct and ev.kind == EventKind.SOFTWARE:
            e.nrip = next_rip
        return self._vmexit(e)

    def exception(self, f: Fault, saved: tuple, next_rip: int) -> StopEvent | None:
        """An instruction raised ``f``: the one place exceptions are handled.

        Faults are rolled back (RIP stays at the instruction, the return
        address of a fault); traps (INT n, INT3, INTO, INT1) complete the
        instruction, so their return address is past it (SDM Vol. 3A 6.5).

        Without delivery the exception is reported as a ``fault`` stop event.
        With delivery it goes through :func:`spec.interrupts.take`: if the
        delivery of a trap faults, the instruction did not complete -- the
        second exception is a fault of the INT instruction (return address
        = its own RIP, as for the #GP of an INT n whose gate DPL < CPL).
        """
        s = self.state
        start = s.rip
        if not self.deliver_exceptions:
            if f.trap:
                s.rip = next_rip
                s.icount += 1
            else:
                self._rollback(saved)
            return StopEvent(kind="fault", rip=s.rip, vector=f.vector, error_code=f.error_code, cr2=f.cr2)
        if f.trap:
            s.rflags_sys &= ~_RF  # cleared as the instruction started: INT n pushes RF = 0 (SDM Vol. 3A 17.3.1.1)
        else:
            self._rollback(saved)
        ev = Event.from_fault(f)
        insn = self.x.i
        if s.svm is not None and f.software and insn is not None and insn.row.mnemonic != "INT":
            ev = replace(ev, soft_exception=True)  # INT3/INTO: #BP/#OF for the exception intercepts (APM 15.12)
        try:
            out = take(s, ev, next_rip if f.trap else start, start)
        except Unimplemented as u:
            self._rollback(saved)
            s.rip = start
            return StopEvent(kind="unimplemented", rip=start, detail=str(u))
        except VMExit as e:
            return self._exception_vmexit(e, f, ev, saved, start, next_rip)
        self.x.i = None
        if out.shutdown is not None:
            return self._shut_down(out.shutdown)
        if f.trap and out.first:
            s.icount += 1
        return None

    # -- events at instruction boundaries ------------------------------------------
    def request_interrupt(self, vector: int) -> None:
        """Queue a maskable external interrupt (INTR) with ``vector``; delivered when IF = 1."""
        self._intr.append(vector & 0xFF)
        self._update_attention()

    def request_nmi(self) -> None:
        """Raise NMI (edge: one pending NMI at most, SDM Vol. 3A 6.7.1)."""
        self._nmi = True
        self._update_attention()

    def attach_interrupt_source(self, source: InterruptSource | None) -> None:
        """Connect (or with ``None`` disconnect) an interrupt controller to INTR."""
        self.interrupt_source = source
        self._update_attention()

    @property
    def pending_interrupts(self) -> tuple[int, ...]:
        """Vectors queued on INTR, oldest first (not counting an attached source)."""
        return tuple(self._intr)

    @property
    def nmi_pending(self) -> bool:
        return self._nmi

    @property
    def shutdown(self) -> str | None:
        """Why the CPU shut down (a triple fault), or ``None``."""
        return self._shutdown

    def inject(self, vector: int, kind: EventKind = EventKind.EXCEPTION, error_code: int | None = None,
               *, cr2: int | None = None) -> StopEvent | None:
        """Deliver one event now, at the current instruction boundary (a VMM's event injection).

        Exceptions carry ``error_code`` as given (``None``: none pushed) and,
        for #PF, ``cr2``; the double-fault rules apply to faults during delivery.
        """
        rf = kind == EventKind.EXCEPTION and vector not in (Vector.DB, Vector.BP, Vector.OF, Vector.DF, Vector.MC)
        return self.deliver(Event(vector, kind, error_code, rf, cr2))

    def _update_attention(self) -> None:
        self._attention = bool(self._intr or self._nmi or self.interrupt_source is not None
                               or self._db_deferred or self._shutdown is not None)

    def _shut_down(self, reason: str) -> StopEvent:
        self._shutdown = reason
        self._update_attention()
        return StopEvent(kind="shutdown", rip=self.state.rip, detail=reason)

    def _boundary(self) -> tuple[StopEvent | None, bool]:
        """Instruction-boundary work: ``(stop event or None, proceed to execute the next instruction)``."""
        s = self.state
        if self._shutdown is not None:
            return StopEvent(kind="shutdown", rip=s.rip, detail=self._shutdown), False
        shadow = s.interrupt_shadow
        s.interrupt_shadow = False
        if shadow:
            self._shadow_at = (s.rip, s.icount)
        if self._attention and not shadow and s.gif:  # GIF = 0 holds NMI and INTR (AMD APM Vol. 2 15.17)
            if self._nmi and not s.nmi_blocked:
                self._nmi = False
                self._update_attention()
                return self.deliver(self._boundary_event(Vector.NMI, EventKind.NMI)), False
            if s.rflags_sys & _IF:
                vector = None
                if self._intr:
                    vector = self._intr.popleft()
                    self._update_attention()
                elif self.interrupt_source is not None and self.interrupt_source.pending():
                    vector = self.interrupt_source.acknowledge() & 0xFF
                if vector is not None:
                    return self.deliver(self._boundary_event(vector, EventKind.EXTERNAL)), False
        if s.halted:
            return StopEvent(kind="halted", rip=s.rip), False
        return None, True

    def _boundary_event(self, vector: int, kind: EventKind) -> Event:
        """An event between instructions; RF = 1 in its image between REP iterations (SDM Vol. 3A 17.3.1.1)."""
        x = self.x
        mid_rep = x.i is not None and x.i.rep is not None and x.next_rip == self.state.rip
        return Event(vector, kind, None, mid_rep)

    def deliver(self, ev: Event, return_rip: int | None = None, *, intercept: bool = True) -> StopEvent | None:
        """Deliver ``ev`` now, at the current boundary, with return address ``return_rip`` (default: RIP).

        In SVM guest mode a #VMEXIT during it (an intercepted exception, a
        nested page fault) is a ``vmexit`` stop; ``intercept=False`` exempts
        ``ev`` itself from the exception intercepts (VMRUN event injection,
        AMD APM Vol. 2 15.20).
        """
        s = self.state
        try:
            out = take(s, ev, s.rip if return_rip is None else return_rip, s.rip, nested=self.deliver_exceptions,
                       intercept=intercept)
        except Unimplemented as u:
            return StopEvent(kind="unimplemented", rip=s.rip, detail=str(u))
        except VMExit as e:
            return self._vmexit(e)
        self.x.i = None
        if out.shutdown is not None:
            return self._shut_down(out.shutdown)
        if out.fault is not None:
            f = out.fault
            return StopEvent(kind="fault", rip=s.rip, vector=f.vector, error_code=f.error_code, cr2=f.cr2)
        return None

    def _after(self, insn: Insn, after: int, rip0: int) -> StopEvent | None:
        """After a completed instruction: clear RF (unless IRET loaded it), take a single-step trap."""
        s = self.state
        if after & _RF and insn.row.mnemonic != "IRET":
            s.rflags_sys &= ~_RF
        if not after & (_TF | _DEFERRED_DB):
            return None
        if s.interrupt_shadow and insn.row.mnemonic != "STI":
            # MOV SS / POP SS: debug traps wait for the next instruction (SDM Vol. 3A 6.8.3).
            self._db_deferred = True
            self._update_attention()
            return None
        s.dr[6] |= DR6_BS
        if not self.deliver_exceptions:
            return StopEvent(kind="fault", rip=s.rip, vector=Vector.DB, detail="single-step trap")
        mid_rep = insn.rep is not None and s.rip == rip0
        return self.deliver(Event(Vector.DB, EventKind.EXCEPTION, None, mid_rep))

    def _rollback(self, saved: tuple) -> None:
        s = self.state
        s.mem.rollback()
        s.gpr, s.flags, s.rflags_sys, s.undefined, s.seg = saved

    def run(self, budget: int) -> StopEvent:
        """Step until a stop event or ``budget`` instructions (a bounded run always ends)."""
        step = self.step
        for _ in range(budget):
            ev = step()
            if ev is not None:
                return ev
        return StopEvent(kind="budget", rip=self.state.rip, detail=f"{budget} instructions executed")
