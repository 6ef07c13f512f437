"""What an exit handler decides: the outcome of one #VMEXIT.

Every exit is dispatched to exactly one handler (``refvmm.exits.dispatch``), which
returns one :data:`Action`:

* :class:`Resume` -- re-enter the guest.  ``advance=True`` means the handler has
  *completed* the intercepted instruction on the guest's behalf (its effect is in
  the VMCB / GPRs / guest memory), so the run loop moves RIP past it -- the one
  place RIP is advanced, ``VM.advance_rip()``, using the VMCB's next-RIP field
  (nRIP, APM Vol. 2 15.7.1).  ``advance=False`` re-executes the instruction at
  RIP (e.g. after a shadow-page fill or a nested-table fix-up).
* :class:`Inject` -- re-enter the guest with an event in EVENTINJ (APM 15.20): the
  hardware delivers it through the guest's IDT on VMRUN.  ``advance`` as above
  (a trap-class event is reported after the instruction; a fault at RIP is not).
* :class:`Stop` -- leave the run loop; ``reason`` is one of the VM's stop
  reasons ("halted", "shutdown", "exit", "budget", "unhandled-exit", "error").
  ``advance=True`` when the stopping instruction itself completed (a HLT leaves
  RIP past the HLT, as on the bare machine).

Handlers never write RIP themselves and never re-enter the guest: the VM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spec.faults import HAS_ERROR_CODE, Fault
from spec.svm.vmcb import EventInj, EventType


@dataclass(frozen=True, slots=True)
class Resume:
    """Re-enter the guest; ``advance`` moves RIP to nRIP first (the instruction was emulated)."""

    advance: bool = False


@dataclass(frozen=True, slots=True)
class Inject:
    """Re-enter the guest delivering an event through EVENTINJ (APM 15.20).

    ``cr2`` is the faulting linear address of an injected #PF: hardware does not
    write CR2 for an injected event, so the VMM writes the VMCB's CR2 before VMRUN.
    """

    vector: int
    type: EventType = EventType.EXCEPTION
    error_code: int | None = None
    cr2: int | None = None
    advance: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.vector <= 255:
            raise ValueError(f"event vector out of range: {self.vector}")
        if self.error_code is not None and not 0 <= self.error_code <= 0xFFFF_FFFF:
            raise ValueError(f"event error code out of range: {self.error_code:#x}")

    @classmethod
    def exception(cls, vector: int, error_code: int | None = None, *, cr2: int | None = None) -> Inject:
        """A fault-class exception; the error code is pushed only for the vectors that have one."""
        code = (error_code or 0) if vector in HAS_ERROR_CODE else None
        return cls(int(vector), EventType.EXCEPTION, code, cr2)

    @classmethod
    def from_fault(cls, fault: Fault) -> Inject:
        """The injection that makes the guest see ``fault`` exactly as the bare CPU raised it."""
        return cls.exception(fault.vector, fault.error_code, cr2=fault.cr2)

    def event(self) -> EventInj:
        """The EVENTINJ value (APM 15.20: VECTOR 7:0, TYPE 10:8, EV 11, V 31, ERRORCODE 63:32)."""
        return EventInj(self.vector, int(self.type), self.error_code)

    def eventinj(self) -> int:
        """The 64-bit EVENTINJ encoding."""
        return self.event().encode()

    def describe(self) -> str:
        code = "" if self.error_code is None else f" error code {self.error_code:#x}"
        return f"inject {EventType(self.type).name.lower()} vector {self.vector}{code}"


StopReason = Literal["halted", "shutdown", "exit", "budget", "unhandled-exit", "error"]


@dataclass(frozen=True, slots=True)
class Stop:
    """Leave the run loop with ``reason`` (and a one-line ``detail`` for the user)."""

    reason: StopReason
    detail: str = ""
    exit_code: int | None = None  # the guest's code for reason "exit" (hypercall EXIT)
    advance: bool = False  # the stopping instruction completed (HLT, the EXIT hypercall): RIP moves past it


Action = Resume | Inject | Stop

__all__ = ["Action", "EventType", "Inject", "Resume", "Stop", "StopReason"]
