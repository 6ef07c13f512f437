"""The backend interface of differential testing: one machine snapshot in, one outcome out.

Every implementation under test -- the bare spec CPU, refvmm, Unicorn, KVM --
is a :class:`Backend`.  It says what it can run (:class:`Capabilities`) and runs
a snapshot for a bounded number of instructions, returning an :class:`Outcome`:
the stop event and the final snapshot.  A combination a backend cannot run is
reported as ``unsupported`` with a reason -- never as a divergence.

Stop kinds (``Stop.kind``):

* ``halted``        -- HLT retired (RIP after it);
* ``exception``     -- the first exception, not delivered (vector, error code
  where the backend can observe it, RIP of the faulting instruction or, for
  traps, of the next one, CR2 for #PF);
* ``shutdown``      -- triple fault;
* ``budget``        -- the instruction budget (or time bound) ran out;
* ``unsupported``   -- the backend cannot run this snapshot (reason in ``detail``);
* ``unimplemented`` -- the spec does not model what the guest did (a model gap).
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from spec.paging import paging_mode
from spec.snapshot import Snapshot

StopKind = Literal["halted", "exception", "shutdown", "budget", "unsupported", "unimplemented"]
ModeName = Literal["real", "prot16", "prot32", "compat", "long64"]
PagingName = Literal["none", "32-bit", "PAE", "4-level", "5-level"]


class Stop(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: StopKind
    rip: int = 0
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    detail: str = ""


class Outcome(BaseModel):
    """What one backend did with one snapshot."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    stop: Stop
    final: Snapshot | None = None
    executed_by: str = Field(description="what executed the code: spec, qemu-tcg, kvm-emulator, hardware, ...")


class Capabilities(BaseModel):
    """What a backend can run and observe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    available: bool = True
    reason: str = ""  # why it is unavailable
    modes: frozenset[ModeName] = frozenset({"real", "prot16", "prot32", "compat", "long64"})
    paging: frozenset[PagingName] = frozenset({"none", "32-bit", "PAE", "4-level", "5-level"})
    cpls: frozenset[int] = frozenset({0, 3})
    delivers_exceptions: bool = False  # through the guest's IDT
    reports_error_codes: bool = True

    def refuse(self, snap: Snapshot) -> str | None:
        """Why this backend cannot run ``snap`` (``None`` if it can)."""
        if not self.available:
            return f"backend unavailable: {self.reason}"
        mode, paging, cpl = describe(snap)
        if mode not in self.modes:
            return f"mode {mode} not supported"
        if paging not in self.paging:
            return f"paging mode {paging} not supported"
        if cpl not in self.cpls:
            return f"CPL {cpl} not supported"
        return None


class Backend(Protocol):
    name: str

    def capabilities(self) -> Capabilities: ...

    def run(self, snap: Snapshot, budget: int) -> Outcome: ...


def describe(snap: Snapshot) -> tuple[ModeName, PagingName, int]:
    """The operating mode, paging mode and CPL a snapshot starts in (SDM Vol. 3A 2.2, 4.1.1)."""
    cr0, cr4, efer = snap.control.cr0, snap.control.cr4, snap.efer
    cs, ss = snap.segments.cs, snap.segments.ss
    vm = bool(snap.regs.rflags >> 17 & 1)
    if not cr0 & 1:
        mode: ModeName = "real"
    elif efer & (1 << 10):
        mode = "long64" if cs.l else "compat"
    else:
        mode = "prot32" if cs.db else "prot16"
    pm = paging_mode(cr0, cr4, efer)
    paging: PagingName = "none" if pm is None else pm.name  # type: ignore[assignment]
    cpl = 0 if mode == "real" else (3 if vm else ss.dpl)
    return mode, paging, cpl


class SpecBackend:
    """The bare spec CPU: the reference every other backend is compared with."""

    name = "spec"

    def __init__(self, *, deliver_exceptions: bool = False) -> None:
        self.deliver_exceptions = deliver_exceptions

    def capabilities(self) -> Capabilities:
        return Capabilities(delivers_exceptions=self.deliver_exceptions)

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        from spec.cpu import SpecCPU

        st = snap.to_state()
        ev = SpecCPU(st, deliver_exceptions=self.deliver_exceptions).run(budget)
        kind: StopKind = "exception" if ev.kind == "fault" else ev.kind  # type: ignore[assignment]
        stop = Stop(kind=kind, rip=ev.rip, vector=ev.vector, error_code=ev.error_code, cr2=ev.cr2, detail=ev.detail)
        # like=snap: pages the run did not change stay the input's page objects (cheap to compare).
        return Outcome.model_construct(backend=self.name, stop=stop, final=Snapshot.from_state(st, like=snap),
                                       executed_by="spec")
