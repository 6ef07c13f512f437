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
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from spec.decode.decoder import MAX_LENGTH, decode
from spec.decode.insn import Insn
from spec.faults import Fault, Unimplemented, Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec, Halt
from spec.memory import PAGE, AccessKind
from spec.segmentation import fetch_window
from spec.state import MachineState

StopKind = Literal["halted", "fault", "budget", "unimplemented", "shutdown"]


class StopEvent(BaseModel):
    """Why the CPU stopped (a boundary type: difftest and the VMM report it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: StopKind
    rip: int
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.kind == "fault":
            try:
                name = "#" + Vector(self.vector).name  # type: ignore[arg-type]
            except ValueError:
                name = f"vector {self.vector}"
            ec = "" if self.error_code is None else f"({self.error_code:#x})"
            cr2 = "" if self.cr2 is None else f" cr2={self.cr2:#x}"
            return f"fault {name}{ec} at rip={self.rip:#x}{cr2}"
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.kind} at rip={self.rip:#x}{extra}"


_IP_MASK = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}


class SpecCPU:
    """The reference interpreter over a :class:`MachineState` (any domain)."""

    def __init__(self, state: MachineState, *, vendor: str = "amd") -> None:
        self.state = state
        self.vendor = vendor
        self.x = Exec(state)
        self.x.vendor = vendor
        self._decoded: dict[tuple[int, bytes], Insn] = {}

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
        key = (bits, code)
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

        insn = decode(code, bits, more, vendor=self.vendor)
        if first == MAX_LENGTH:
            self._decoded[key] = insn
        return insn

    # -- execution -------------------------------------------------------------------
    def step(self) -> StopEvent | None:
        s = self.state
        if s.halted:
            return StopEvent(kind="halted", rip=s.rip)
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
            return StopEvent(kind="halted", rip=s.rip)
        except Fault as f:
            return self.exception(f, saved, x.next_rip)
        except Unimplemented as u:
            self._rollback(saved)
            return StopEvent(kind="unimplemented", rip=s.rip, detail=str(u))
        finally:
            mem.journal = None
        s.rip = x.next_rip
        s.icount += 1
        return None

    def exception(self, f: Fault, saved: tuple, next_rip: int) -> StopEvent | None:
        """An instruction raised ``f``: the one place exceptions are handled.

        Faults are rolled back (RIP stays at the instruction); traps (INT n,
        INT3, INTO, INT1) complete the instruction, so RIP points past it.
        The exception is reported as a ``fault`` stop event.
        """
        s = self.state
        if f.trap:
            s.rip = next_rip
            s.icount += 1
        else:
            self._rollback(saved)
        return StopEvent(kind="fault", rip=s.rip, vector=f.vector, error_code=f.error_code, cr2=f.cr2)

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
