"""The VMM as a differential-testing backend: a snapshot runs as a guest of refvmm.

``RefvmmBackend(paging="shadow" | "nested")`` (registered as ``refvmm-shadow`` and
``refvmm-nested``) runs a :class:`~spec.snapshot.Snapshot` as a guest on the spec's SVM
processor under :class:`refvmm.vm.VM`:

* guest RAM is exactly the snapshot's pages, at the same guest-physical addresses (a
  page the snapshot lacks is a hole: reads all ones, writes dropped -- the bare spec's
  open bus); the snapshot's registers, segments and control registers are the guest's
  entry state;
* the machine the guest sees is the bare one as far as the VMM can make it: no devices
  on the port bus (ports read all ones), no features hidden from CPUID and no
  hypervisor bit (the CPUID leaves of the hypervisor range still answer);
* exceptions are delivered through the guest's IDT, as by
  ``SpecBackend(deliver_exceptions=True)`` -- the guest's own #PF included, which the
  shadow pager injects;
* the final snapshot is the guest-visible one (:meth:`refvmm.vm.VM.guest_snapshot`):
  registers, guest-visible CR0/CR2/CR3/CR4/EFER, the guest's PAE PDPTE registers, and
  every guest RAM page -- the guest's page tables with the accessed/dirty bits the
  shadow pager emulated or the nested walk set.

Stops: guest HLT -> ``halted`` (RIP past it), triple fault -> ``shutdown``, the budget
-> ``budget``.  The guest hit something the spec does not model -> ``unimplemented``
(as the bare spec reports it).  A VMM failure (an exit nobody handles, a VMCB VMRUN
refuses, an error in a handler) is *not* a guest event; it is reported as ``shutdown``
with ``detail`` starting ``refvmm error:`` so that a comparison flags it as a divergence
instead of skipping it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from difftest.backend import Capabilities, Outcome, Stop, StopKind
from spec.cpumodel import DEFAULT_MODEL
from spec.faults import Unimplemented
from spec.snapshot import Snapshot

if TYPE_CHECKING:
    from refvmm.paging.base import PagingStrategy

PagingName = Literal["shadow", "nested"]

UNIMPLEMENTED_MARK = "(unimplemented)"
"""How :meth:`refvmm.vm.VM.run` marks a stop caused by :class:`~spec.faults.Unimplemented` in the guest."""

_REASONS: dict[str, StopKind] = {"halted": "halted", "shutdown": "shutdown", "budget": "budget"}


class RefvmmBackend:
    """refvmm (shadow or nested paging) running a snapshot as its guest."""

    def __init__(self, paging: PagingName = "shadow", *, strategy: Callable[[], PagingStrategy] | None = None,
                 name: str | None = None) -> None:
        """``strategy`` replaces the named strategy's constructor (tests run deliberately broken pagers)."""
        if paging not in ("shadow", "nested"):
            raise ValueError(f"unknown paging strategy {paging!r} (shadow or nested)")
        self.paging: PagingName = paging
        self.strategy = strategy
        self.name = name or f"refvmm-{paging}"
        self.last_vm: object | None = None  # the VM of the last run (tests inspect its statistics)

    def capabilities(self) -> Capabilities:
        # Every operating mode and CPL; 5-level paging is outside the shadow pager (its real format is 4-level).
        return Capabilities(paging=frozenset({"none", "32-bit", "PAE", "4-level"}), delivers_exceptions=True)

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        from refvmm.config import ConfigError, CpuidConfig, MemoryConfig, VMConfig
        from refvmm.vm import VM

        refusal = self.capabilities().refuse(snap)
        if refusal is not None:
            return Outcome(backend=self.name, stop=Stop(kind="unsupported", detail=refusal), executed_by="spec")
        config = VMConfig(name="difftest", paging=self.paging, budget=max(budget, 1), memory=MemoryConfig(size=0),
                          devices=[], cpuid=CpuidConfig(hide=[], hypervisor_bit=False))
        try:
            strategy = self.strategy() if self.strategy is not None else None
            vm = VM(config, entry=snap.to_state(), strategy=strategy, base_model=DEFAULT_MODEL)
        except (ConfigError, ValueError) as e:
            return Outcome(backend=self.name, stop=Stop(kind="unsupported", detail=f"refvmm: {e}"),
                           executed_by="spec")
        self.last_vm = vm
        try:
            result = vm.run(budget)
        except Unimplemented as e:  # the guest did something the spec does not model (the processor says so)
            final = vm.guest_snapshot()
            stop = Stop(kind="unimplemented", rip=final.regs.rip, detail=str(e))
            return Outcome(backend=self.name, stop=stop, final=final, executed_by="spec")
        final = vm.guest_snapshot()
        rip = final.regs.rip
        kind = _REASONS.get(result.reason)
        if kind is not None:
            stop = Stop(kind=kind, rip=rip, detail=result.detail)
        elif result.reason == "error" and UNIMPLEMENTED_MARK in result.detail:
            stop = Stop(kind="unimplemented", rip=rip, detail=result.detail)
        else:
            stop = Stop(kind="shutdown", rip=rip, detail=f"refvmm error: {result.reason}: {result.detail}")
        return Outcome(backend=self.name, stop=stop, final=final, executed_by="spec")


def shadow() -> RefvmmBackend:
    return RefvmmBackend("shadow")


def nested() -> RefvmmBackend:
    return RefvmmBackend("nested")


BACKENDS = {"refvmm-shadow": shadow, "refvmm-nested": nested}
"""Read by :mod:`difftest.registry`: backend name -> zero-argument constructor."""

__all__ = ["BACKENDS", "RefvmmBackend", "nested", "shadow"]
