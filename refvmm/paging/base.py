"""The paging-strategy interface: how a VM virtualizes the guest's address translation.

A VM runs its guest with one of two strategies (registered by name in
``refvmm.paging.make_strategy``):

* ``shadow`` -- the hardware runs on VMM-built shadow tables (real CR3 in the VMCB);
  the guest's own CR0/CR3/CR4/EFER are *guest-visible* values kept by the strategy,
  with CR accesses, INVLPG and #PF intercepted (APM Vol. 2 15.9, 15.12).
* ``nested`` -- the hardware walks the guest's tables itself and then the nested
  tables built from the guest memory map (NP_ENABLE, nCR3; APM 15.25); no CR/INVLPG
  intercepts, #NPF reports guest-physical holes (MMIO).

Either way the VM asks the strategy for the guest-visible control registers
(:class:`GuestControlRegs`); with nested paging they are simply the VMCB's.

Contract with the VM (``refvmm.vm.VM``):

1. ``configure(vm)`` is called once, after guest memory, the VMCB (with the entry state's
   segments, RIP, RSP, RAX, RFLAGS, ...) and the VM's own intercepts are set up, and
   before the first VMRUN.  It builds its tables from the VM's memory map / allocator
   and writes what it owns in the VMCB: NP_ENABLE/N_CR3, the real CR0/CR2/CR3/CR4/EFER,
   TLB_CONTROL/ASID policy, and the intercepts it needs (CR reads/writes, INVLPG, the
   #PF exception intercept).  The entry state's control registers are in
   ``vm.entry_control`` (a :class:`GuestControlRegs`); the strategy takes ownership.
2. ``handles(exitcode)`` says which exits the strategy owns; the dispatcher routes those
   (and only those) to ``handle_exit`` -- before the VM's own table, so e.g. a #PF
   exception intercept or #NPF is the strategy's.
3. ``handle_exit`` returns one :data:`refvmm.actions.Action`; it never moves RIP (it
   returns ``Resume(advance=True)`` for an instruction it completed).  An exit it cannot
   resolve is ``Stop("error", ...)``, never a guess.  ``vm.emulate()`` runs the faulting
   guest instruction once on the spec over the guest's own view (guest-visible control
   registers, guest-physical memory, MMIO routed to devices) and applies the result --
   use it for MMIO and, if convenient, for MOV CR / LMSW / CLTS: control-register
   changes come back through ``set_guest_control``.
4. ``guest_control(vm)`` is what the guest currently believes CR0/CR2/CR3/CR4/EFER are
   (used by emulation, hypercalls, snapshots, equivalence tests).
5. ``set_guest_control(vm, regs)`` loads new guest-visible control registers (after
   emulation or a guest WRMSR EFER changed them); the strategy re-derives the real ones
   (and flushes/rebuilds whatever it must).

EFER belongs to the VM, not the strategy: the real EFER must have SVME set (APM 15.5.1,
VMRUN consistency checks) while the guest, whose CPUID hides SVM, must see SVME = 0.  So
the VM always intercepts RDMSR/WRMSR of EFER, emulates them on the guest-visible value,
and calls ``set_guest_control``.  ``GuestControlRegs.efer`` never contains SVME; a
strategy writes ``vmcb.efer = <real value> | EFER_SVME``.  (Nested paging: the guest-
visible EFER is the VMCB's without SVME; LMA as the hardware maintains it.)

CR2 is never virtualized: the guest's CR2 is the VMCB's CR2 under both strategies (a #PF
intercept does not write CR2, APM 15.12; the VM writes it when it injects a #PF), so
``GuestControlRegs.cr2`` is ``vm.vmcb.cr2``, and an emulated MOV to CR2 only writes the VMCB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from refvmm.actions import Action
    from refvmm.vm import VM


@dataclass(frozen=True, slots=True)
class GuestControlRegs:
    """The control registers as the guest sees them (not necessarily what hardware runs with)."""

    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int


@runtime_checkable
class PagingStrategy(Protocol):
    """One way to virtualize guest paging; see the module docstring for the contract."""

    name: str  # "shadow" | "nested"

    def configure(self, vm: VM) -> None:
        """Build tables and program the VMCB fields and intercepts this strategy needs."""
        ...

    def handles(self, exitcode: int) -> bool:
        """True for the exit codes this strategy owns (CR access, INVLPG, #PF, EFER MSR, NPF, ...)."""
        ...

    def handle_exit(self, vm: VM, exitcode: int, info1: int, info2: int) -> Action:
        """Resolve one owned exit; never moves RIP."""
        ...

    def guest_control(self, vm: VM) -> GuestControlRegs:
        """The guest-visible CR0/CR2/CR3/CR4/EFER."""
        ...

    def set_guest_control(self, vm: VM, regs: GuestControlRegs) -> None:
        """Load guest-visible control registers (after emulation or a guest EFER write changed them)."""
        ...
