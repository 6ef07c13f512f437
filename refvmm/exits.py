"""Exit dispatch: one function from a #VMEXIT to what happens next.

:func:`dispatch` is the only way an exit is handled.  It asks the paging strategy first
(``strategy.handles(code)``: CR accesses, INVLPG, #PF, #NPF, ... -- see
:mod:`refvmm.paging.base`), then looks the code up in :data:`HANDLERS`; an exit found in
neither place stops the VM ("fail-stop": ``Stop("unhandled-exit", "unhandled exit
VMEXIT_X at rip ...")``), never a guess.  Handlers return an :data:`~refvmm.actions.Action`
and never move RIP (``Resume(advance=True)`` asks the run loop to).

The table (APM Vol. 2 Appendix C; what each handler does is in its docstring):

===============  ============================================================================
exit             outcome
===============  ============================================================================
INTR             host timer (the instruction budget): resume; the run loop checks the budget
HLT              stop "halted", RIP past the HLT (the VMM has no interrupt source that could
                 ever wake the guest, so a HLT ends the run whatever RFLAGS.IF says)
SHUTDOWN         stop "shutdown" (the guest triple-faulted)
IOIO             emulate the IN/OUT/INS/OUTS with the spec on the port bus (refvmm.hooks)
MSR              hooked MSR: its hook; else emulate RDMSR/WRMSR with the spec on the VM's MSR
                 file (unknown MSR -> #GP(0) as on hardware); EFER through the strategy
CPUID            the CPUID policy (refvmm.cpuid_policy)
RDTSCP           emulate with the spec (TSC_AUX lives in the VM's MSR file)
VMMCALL          the hypercall interface (below)
VMRUN, VMLOAD,   inject #UD: the guest's CPUID has no SVM and its EFER.SVME reads 0, so every
VMSAVE, STGI,    SVM instruction is #UD for it (APM Vol. 3: "#UD if EFER.SVME = 0")
CLGI, SKINIT,
INVLPGA
INVALID          stop "error": VMRUN refused the VMCB (consistency checks, APM 15.5.1)
===============  ============================================================================

Hypercalls (VMMCALL, APM Vol. 3 VMMCALL; configuration ``hypercalls = false`` makes VMMCALL
#UD instead, as on the bare machine whose CPUID has no SVM), from CPL 0 only (at CPL > 0 RAX := -1, as KVM
does), function number in RAX, result in RAX:

======  ==============  ===============================================================
RAX     name            effect
======  ==============  ===============================================================
0       WRITE           write RCX bytes (at most 4096) at guest linear address RBX to the
                        VM's output (source "hypercall"); RAX := bytes written, or -1 if
                        the buffer is not readable (no exception is injected)
1       EXIT            stop the VM: reason "exit", exit code RBX
2       VERSION         RAX := :data:`HYPERCALL_VERSION`
other   --              RAX := -1 (unknown function)
======  ==============  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from refvmm.actions import Action, Inject, Resume, Stop
from refvmm.mmio import emulate_instruction, guest_view
from spec.cpumodel import EFER
from spec.faults import Fault, Vector
from spec.memory import AccessKind
from spec.svm.exitcodes import MSR_WRITE, ExitCode, exit_name

if TYPE_CHECKING:
    from refvmm.vm import VM

M64 = (1 << 64) - 1
RAX, RCX, RDX, RBX = 0, 1, 2, 3
HYPERCALL_WRITE, HYPERCALL_EXIT, HYPERCALL_VERSION_FN = 0, 1, 2
HYPERCALL_VERSION = 1
HYPERCALL_MAX_WRITE = 4096
HYPERCALL_ERROR = M64  # -1

Handler = Callable[["VM", int, int], Action]


def dispatch(vm: VM, code: int, info1: int, info2: int) -> Action:
    """The one dispatch from exit to outcome (module docstring)."""
    if vm.paging.handles(code):
        return vm.paging.handle_exit(vm, code, info1, info2)
    handler = HANDLERS.get(code)
    if handler is None:
        return Stop("unhandled-exit", f"unhandled exit VMEXIT_{exit_name(code)} at rip={vm.vmcb.rip:#x} "
                                      f"(exitinfo1={info1:#x}, exitinfo2={info2:#x})")
    return handler(vm, info1, info2)


def on_intr(vm: VM, info1: int, info2: int) -> Action:
    """A physical interrupt (our host timer, the budget) arrived in guest mode: nothing for the guest."""
    return Resume()


def on_hlt(vm: VM, info1: int, info2: int) -> Action:
    """HLT: the guest waits for an interrupt that no device of this VMM can raise -- the run ends."""
    if_set = bool(vm.vmcb.rflags >> 9 & 1)
    why = "interrupts enabled but no interrupt source" if if_set else "interrupts disabled"
    return Stop("halted", f"HLT at rip={vm.vmcb.rip:#x} ({why})", advance=True)


def on_shutdown(vm: VM, info1: int, info2: int) -> Action:
    return Stop("shutdown", f"guest shutdown (triple fault) at rip={vm.vmcb.rip:#x}")


def on_invalid(vm: VM, info1: int, info2: int) -> Action:
    return Stop("error", "VMRUN failed its consistency checks (VMEXIT_INVALID, APM 15.5.1)")


def on_emulate(vm: VM, info1: int, info2: int) -> Action:
    """IOIO, RDTSCP: the spec executes the instruction on the guest's view (refvmm.mmio)."""
    return emulate_instruction(vm)


def on_msr(vm: VM, info1: int, info2: int) -> Action:
    """RDMSR/WRMSR (EXITINFO1 0/1, APM 15.11): a hook, else the spec on the guest's view."""
    index = vm.gprs[RCX] & 0xFFFF_FFFF
    write = info1 == MSR_WRITE
    if index in vm.hooks.msrs and index != EFER:
        if write:
            value = (vm.gprs[RDX] & 0xFFFF_FFFF) << 32 | vm.vmcb.rax & 0xFFFF_FFFF
            try:
                vm.hooks.msr_write(index, value)
            except Fault as f:
                return Inject.from_fault(f)
        else:
            value = vm.hooks.msr_read(index)
            vm.vmcb.rax = value & 0xFFFF_FFFF
            vm.gprs[RDX] = value >> 32
        return Resume(advance=True)
    return emulate_instruction(vm)


def on_cpuid(vm: VM, info1: int, info2: int) -> Action:
    """CPUID: EAX/EBX/ECX/EDX from the policy (32-bit writes zero-extend, SDM Vol. 1 3.4.1.1)."""
    view = guest_view(vm)
    a, b, c, d = vm.cpuid.leaf(view, vm.vmcb.rax & 0xFFFF_FFFF, vm.gprs[RCX] & 0xFFFF_FFFF)
    vm.vmcb.rax = a
    vm.gprs[RBX], vm.gprs[RCX], vm.gprs[RDX] = b, c, d
    return Resume(advance=True)


def on_svm_instruction(vm: VM, info1: int, info2: int) -> Action:
    """An SVM instruction in the guest: #UD, since the guest sees EFER.SVME = 0."""
    return Inject.exception(Vector.UD)


def on_vmmcall(vm: VM, info1: int, info2: int) -> Action:
    """The hypercall interface (module docstring)."""
    vmcb = vm.vmcb
    if not vm.config.hypercalls:
        return Inject.exception(Vector.UD)  # what VMMCALL does without SVM (the bare machine)
    if vmcb.cpl != 0:
        vmcb.rax = HYPERCALL_ERROR
        return Resume(advance=True)
    fn = vmcb.rax
    if fn == HYPERCALL_WRITE:
        vmcb.rax = _hypercall_write(vm, vm.gprs[RBX], vm.gprs[RCX])
        return Resume(advance=True)
    if fn == HYPERCALL_EXIT:
        code = vm.gprs[RBX]
        return Stop("exit", f"guest exit hypercall, code {code}", exit_code=code, advance=True)
    if fn == HYPERCALL_VERSION_FN:
        vmcb.rax = HYPERCALL_VERSION
        return Resume(advance=True)
    vmcb.rax = HYPERCALL_ERROR
    return Resume(advance=True)


def _hypercall_write(vm: VM, addr: int, length: int) -> int:
    if length > HYPERCALL_MAX_WRITE:
        return HYPERCALL_ERROR
    view = guest_view(vm)
    out = bytearray()
    try:
        for k in range(length):
            out.append(view.mem.read((addr + k) & M64, 1, AccessKind.READ) & 0xFF)
    except Fault:
        return HYPERCALL_ERROR
    vm.output.write("hypercall", bytes(out))
    return length


HANDLERS: dict[int, Handler] = {
    ExitCode.INTR: on_intr,
    ExitCode.HLT: on_hlt,
    ExitCode.SHUTDOWN: on_shutdown,
    ExitCode.INVALID: on_invalid,
    ExitCode.IOIO: on_emulate,
    ExitCode.RDTSCP: on_emulate,
    ExitCode.MSR: on_msr,
    ExitCode.CPUID: on_cpuid,
    ExitCode.VMMCALL: on_vmmcall,
    ExitCode.VMRUN: on_svm_instruction,
    ExitCode.VMLOAD: on_svm_instruction,
    ExitCode.VMSAVE: on_svm_instruction,
    ExitCode.STGI: on_svm_instruction,
    ExitCode.CLGI: on_svm_instruction,
    ExitCode.SKINIT: on_svm_instruction,
    ExitCode.INVLPGA: on_svm_instruction,
}
"""Exit code -> handler for the exits the VM itself owns (the strategy's come first)."""

INTERCEPTS: tuple[ExitCode, ...] = (
    ExitCode.INTR, ExitCode.HLT, ExitCode.SHUTDOWN, ExitCode.IOIO, ExitCode.MSR, ExitCode.CPUID, ExitCode.RDTSCP,
    ExitCode.VMMCALL, ExitCode.VMRUN, ExitCode.VMLOAD, ExitCode.VMSAVE, ExitCode.STGI, ExitCode.CLGI,
    ExitCode.SKINIT, ExitCode.INVLPGA)
"""The intercepts the VM sets in the VMCB (each has a handler above; VMRUN's is mandatory, APM 15.5.1)."""

__all__ = ["HANDLERS", "HYPERCALL_VERSION", "INTERCEPTS", "dispatch"]
