"""The VM run loop: dispatch, hooks at work, MMIO emulation, TSC, hypercalls, fail-stop, statistics.

Most tests run a small guest under both paging strategies and on the bare spec CPU
(:class:`refvmm.vm.BareMachine`: the same memory map and devices, no VMM) and require the
same guest-visible final state -- registers, memory, what the devices saw.  The guests are
assembled bytes (GNU as, AT&T syntax shown next to them).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refvmm.actions import Inject, Resume, Stop
from refvmm.config import ConfigError, DeviceConfig, MemoryConfig, MmioConfig, VMConfig, parse_config
from refvmm.exits import HANDLERS as EXIT_HANDLERS
from refvmm.exits import HYPERCALL_VERSION, dispatch
from refvmm.mmio import emulate_instruction
from refvmm.vm import VM, BareMachine
from spec import flags as F
from spec.machine import HANDLER_STRIDE, HANDLERS, flat_machine
from spec.snapshot import Snapshot
from spec.state import MachineState
from spec.svm.exitcodes import ExitCode

PAGINGS = ("shadow", "nested")
MMIO_GPA = 0x200000

DEVICES = [DeviceConfig(kind="uart16550", name="com1"), DeviceConfig(kind="debugcon", name="debug"),
           DeviceConfig(kind="mmio-scratch", name="scratch")]


def config(paging: str = "nested", **kw: object) -> VMConfig:
    base: dict[str, object] = {"paging": paging, "memory": MemoryConfig(size=0), "devices": DEVICES,
                               "mmio": [MmioConfig(gpa=MMIO_GPA, device="scratch")], "budget": 10_000}
    base.update(kw)
    return VMConfig(**base)  # type: ignore[arg-type]


def entry(code: str, mode: str = "long64", **regs: int) -> MachineState:
    st = flat_machine(mode, bytes.fromhex(code), idt=True)  # type: ignore[arg-type]
    for n, v in regs.items():
        st.gpr[int(n[1:])] = v
    return st


def comparable(snap: Snapshot) -> dict:
    """A snapshot as a dict, with the status flags undefined on the bare machine masked out.

    The spec tracks which flags are architecturally undefined; a VMCB holds RFLAGS as plain
    bits, so that mark does not survive a #VMEXIT -- the values are compared where defined.
    """
    d = snap.model_dump()
    d.pop("undefined_flags")
    return d


def assert_equivalent(code: str, mode: str = "long64", *, cfg: dict | None = None, **regs: int) -> list[VM]:
    """Run ``code`` on the bare spec and under both strategies; same final guest state and device output."""
    bare = BareMachine(config(**(cfg or {})), entry=entry(code, mode, **regs))
    ev = bare.run(10_000)
    want = Snapshot.from_state(bare.state)
    undefined = bare.state.undefined
    vms = []
    for paging in PAGINGS:
        vm = VM(config(paging, **(cfg or {})), entry=entry(code, mode, **regs))
        result = vm.run()
        got = vm.guest_snapshot()
        mask = ~undefined & ((1 << 64) - 1)
        a, b = comparable(want), comparable(got)
        a["regs"]["rflags"] &= mask
        b["regs"]["rflags"] &= mask
        assert b == a, (paging, result.describe(), ev.describe())
        assert result.reason == {"halted": "halted", "shutdown": "shutdown", "budget": "budget"}[ev.kind]
        assert vm.output.by_source() == bare.output.by_source()
        assert result.stats.guest_instructions == bare.state.icount
        vms.append(vm)
    return vms


def reg(vm: VM, n: int) -> int:
    return vm.get_gpr(n)


# -- hooks ----------------------------------------------------------------------------------------


def test_unhooked_port_reads_all_ones_hooked_port_answers() -> None:
    # mov $0x1234,%dx; in %dx,%eax; mov %eax,%ebx; mov $0x61,%dx; in %dx,%al; mov $0x44,%al; out %al,%dx;
    # in %dx,%al; hlt
    code = "66ba3412ed89c366ba6100ecb044eeecf4"
    hooks = [{"kind": "port", "port": "0x61", "value": "0x20", "writable": True}]
    for vm in assert_equivalent(code, cfg={"hooks": parse_config({"hooks": hooks}).hooks}):
        assert reg(vm, 3) == 0xFFFF_FFFF  # an empty bus
        assert reg(vm, 0) & 0xFF == 0x44  # the hooked port kept the value written
        assert vm.stats.exits["IOIO"] == 4 and vm.stats.port_accesses == 4


def test_msr_hook_and_unknown_msr_gp() -> None:
    # ecx=C0011029: rdmsr; r8,r9 := rax,rdx; wrmsr 0x22:0x11; rdmsr; r10,r11 := rax,rdx;
    # ecx=C0011FFF (no such MSR): rdmsr -> #GP(0) -> the guest's #GP handler stub (HLT)
    code = "b9291001c00f324989c04989d1b811000000ba220000000f300f324989c24989d3b9ff1f01c00f32f4"
    hooks = parse_config({"hooks": [{"kind": "msr", "index": "0xC0011029", "value": "0x500000007"}]}).hooks
    for paging in PAGINGS:
        vm = VM(config(paging, hooks=hooks), entry=entry(code))
        r = vm.run()
        assert r.reason == "halted" and r.rip == HANDLERS + HANDLER_STRIDE * 13 + 1, r.describe()
        assert (reg(vm, 8), reg(vm, 9)) == (7, 5)
        assert (reg(vm, 10), reg(vm, 11)) == (0x11, 0x22)
        assert set(vm.stats.injections) == {"13"}  # (shadow paging re-injects it after filling the stack page)
    # Without the hook the same MSR is unknown: #GP at the first RDMSR, on the VM as on the bare machine.
    assert_equivalent(code)


@pytest.mark.parametrize(("name", "code"), [
    # mov $0xC0000080,%ecx; rdmsr: the guest's EFER, without the SVME bit the real one has
    ("efer", "b9800000c00f32f4"),
    # ecx=TSC_AUX: wrmsr 0x77; rdtscp (intercepted, emulated with the VM's MSR file)
    ("tsc_aux", "b9030100c0b87700000031d20f300f01f9f4"),
    # ecx=TSC: wrmsr 0x100; nop; rdtsc -> 0x102 on the bare machine too
    ("tsc_write", "b910000000b80001000031d20f30900f31f4"),
    # out %al,$0x80 twice; mov $0x3f8,%dx; in %dx,%al; rdtsc: the TSC counts emulated instructions
    ("tsc_after_exits", "e680e68066baf803ec0f31f4"),
    # vmload %rax: #UD for a guest without SVM
    ("vmload", "0f01daf4"),
    # pushfq; orq $0x100,(%rsp); popfq; out %al,$0x80; nop: single-step #DB after the emulated OUT
    ("trap_flag", "9c48810c24000100009de68090f4"),
])
def test_equivalent_to_bare(name: str, code: str) -> None:
    vms = assert_equivalent(code)
    if name == "efer":
        assert reg(vms[0], 0) == 0x500 and vms[0].vmcb.efer & (1 << 12)  # real EFER has SVME
    if name == "tsc_after_exits":
        assert reg(vms[0], 0) == 4  # TSC = instructions retired before RDTSC (the spec's TscClock)
    if name == "vmload":
        assert vms[0].guest_state().rip == HANDLERS + HANDLER_STRIDE * 6 + 1
    if name == "trap_flag":
        assert vms[0].guest_state().rip == HANDLERS + HANDLER_STRIDE * 1 + 1


def test_cpuid_policy_in_the_guest() -> None:
    # mov $1,%eax; cpuid; mov %rcx,%r8; mov $0x40000000,%eax; cpuid; hlt
    code = "b8010000000fa24989c8b8000000400fa2f4"
    for paging in PAGINGS:
        vm = VM(config(paging), entry=entry(code))
        assert vm.run().reason == "halted"
        assert reg(vm, 8) >> 31 & 1  # hypervisor present
        sig = b"".join(reg(vm, n).to_bytes(4, "little") for n in (3, 1, 2))
        assert sig == b"refvmm\0\0\0\0\0\0" and reg(vm, 0) >= 0x4000_0001
        assert vm.stats.exits["CPUID"] == 2


# -- MMIO ------------------------------------------------------------------------------------------


def test_mmio_emulated_by_the_spec_under_both_strategies() -> None:
    # rbx=0x200000: mov (%rbx),%eax (ID); movq $0x55,0x10(%rbx); mov 0x10(%rbx),%rcx; mov 8(%rbx),%rdx (counter);
    # add %rcx,0x10(%rbx) (read-modify-write); mov 0x10(%rbx),%rsi; movsbl 0x13(%rbx),%edi
    code = "48c7c3000020008b0348c7431055000000488b4b10488b530848014b10488b73100fbe7b13f4"
    vms = assert_equivalent(code)
    for vm in vms:
        assert reg(vm, 0) == int.from_bytes(b"RVMM", "little")
        assert (reg(vm, 1), reg(vm, 6)) == (0x55, 0xAA)
        dev = vm.devices["scratch"]
        assert [a[0] for a in dev.accesses] == ["r", "w", "r", "r", "r", "w", "r", "r"]  # each access exactly once
        assert vm.stats.mmio_accesses == 8
    assert vms[1].stats.exits.get("NPF", 0) == 7  # nested: one #NPF per MMIO instruction
    assert vms[0].stats.exits.get("EXCP14", 0) >= 7  # shadow: MMIO pages are never mapped


def test_emulate_instruction_directly() -> None:
    """The emulation function on a VM stopped before a MOV to MMIO, then before an invalid opcode."""
    # mov $0x200000,%rbx; movl $0x12345678,0x20(%rbx); ud2
    code = "48c7c300002000c7432078563412" + "0f0b"
    vm = VM(config(), entry=entry(code))
    vm.set_gpr(3, MMIO_GPA)
    vm.vmcb.rip += 7  # skip the MOV to RBX (done by hand above)
    action = emulate_instruction(vm)
    assert action == Resume(advance=True) and vm.vmcb.nrip == vm.vmcb.rip + 7
    assert vm.devices["scratch"].mmio_read(0x20, 4) == 0x12345678
    vm.advance_rip()
    assert emulate_instruction(vm) == Inject.exception(6)  # #UD: rolled back, injected, RIP unchanged


# -- run loop, fail-stop, hypercalls, budget ------------------------------------------------------------


def test_unhandled_exit_fails_stop() -> None:
    vm = VM(config(), entry=entry("f390f4"))  # pause; hlt
    vm.vmcb.set_intercept(ExitCode.PAUSE)  # an intercept nobody handles
    r = vm.run()
    assert r.reason == "unhandled-exit" and r.rip == 0x1000
    assert r.detail.startswith("unhandled exit VMEXIT_PAUSE at rip=0x1000")
    assert r.stats.exits == {"PAUSE": 1} and r.stats.guest_instructions == 0


_DISPATCH_VM = VM(config(), entry=flat_machine("long64", b"\xf4", idt=True))


def test_dispatch_of_synthetic_exits() -> None:
    vm = VM(config(), entry=entry("f4"))
    assert dispatch(vm, ExitCode.INTR, 0, 0) == Resume()
    assert dispatch(vm, ExitCode.SHUTDOWN, 0, 0).reason == "shutdown"  # type: ignore[union-attr]
    assert dispatch(vm, ExitCode.INVALID, 0, 0).reason == "error"  # type: ignore[union-attr]
    hlt = dispatch(vm, ExitCode.HLT, 0, 0)
    assert isinstance(hlt, Stop) and hlt.reason == "halted" and hlt.advance
    for code in (ExitCode.VMRUN, ExitCode.VMSAVE, ExitCode.STGI, ExitCode.CLGI, ExitCode.SKINIT, ExitCode.INVLPGA):
        assert dispatch(vm, code, 0, 0) == Inject.exception(6)
    for code in (ExitCode.RDPMC, ExitCode.WBINVD, ExitCode.TASK_SWITCH, 0x7FF):
        out = dispatch(vm, code, 1, 2)
        assert isinstance(out, Stop) and out.reason == "unhandled-exit"


def test_hypercalls() -> None:
    # lea msg(%rip),%rbx; mov $5,%ecx; rax=0 WRITE; r8 := rax; rax=2 VERSION; r9 := rax; rax=1 EXIT(7); msg: "hello"
    code = "488d1d26000000b90500000031c00f01d94989c0b8020000000f01d94989c1b801000000bb070000000f01d9f4" \
           + b"hello".hex()
    for paging in PAGINGS:
        vm = VM(config(paging), entry=entry(code))
        r = vm.run()
        assert (r.reason, r.exit_code) == ("exit", 7)
        assert r.output == {"hypercall": "hello"}
        assert (reg(vm, 8), reg(vm, 9)) == (5, HYPERCALL_VERSION)
        assert vm.vmcb.rip == 0x1000 + len(bytes.fromhex(code)) - 6  # past the last VMMCALL, at the HLT
        vm_off = VM(config(paging, hypercalls=False), entry=entry(code))
        assert vm_off.run().rip == HANDLERS + HANDLER_STRIDE * 6 + 1  # VMMCALL is #UD, as on the bare machine


def test_budget_stops_exactly_like_the_bare_machine() -> None:
    for paging in PAGINGS:
        vm = VM(config(paging, budget=777), entry=entry("ebfe"))  # jmp .
        r = vm.run()
        assert r.reason == "budget" and r.stats.guest_instructions == 777
        assert r.stats.exits["INTR"] == 1
        r2 = vm.run(100)  # a run continues where the last stopped
        assert r2.reason == "budget" and r2.stats.guest_instructions == 877


def test_guest_with_interrupts_disabled_is_still_preempted() -> None:
    vm = VM(config(budget=50), entry=entry("fa" + "ebfe"))  # cli; jmp .
    assert vm.run().reason == "budget"


def test_triple_fault_is_shutdown() -> None:
    st = flat_machine("prot32", bytes.fromhex("0f0b"))  # ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown
    st.idtr.limit = 0
    for paging in PAGINGS:
        r = VM(config(paging), entry=st.copy()).run()
        assert r.reason == "shutdown" and r.stats.exits["SHUTDOWN"] == 1
    assert BareMachine(config(), entry=st.copy()).run(100).kind == "shutdown"


def test_stats_record() -> None:
    vm = VM(config(), entry=entry("e680e680f4"))  # out %al,$0x80 twice; hlt
    r = vm.run()
    s = r.stats
    assert s.guest_instructions == 3 and s.emulated_instructions == 3 and s.hardware_instructions == 0
    assert s.exits == {"IOIO": 2, "HLT": 1} and s.total_exits == 3 and s.exits_per_1000 == 1000.0
    dumped = s.model_dump()
    assert dumped["guest_instructions"] == 3 and dumped["exits_per_1000"] == 1000.0
    assert vm.devices["debug"].post_codes == [0, 0]


def test_vm_config_errors_name_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "big.bin"
    img.write_bytes(b"\x90" * 0x3000)
    cfg = parse_config({"memory": {"size": "8K"}, "image": {"kind": "flat", "path": str(img), "load": "0x9000"},
                        "entry": {"mode": "real"}})
    with pytest.raises(ConfigError, match=r"image.load: .*does not fit"):
        VM(cfg)
    with pytest.raises(ConfigError, match=r"mmio\[0\].device: 'com1' \(uart16550\) has no MMIO registers"):
        VM(config(mmio=[MmioConfig(gpa=MMIO_GPA, device="com1")]), entry=entry("f4"))
    with pytest.raises(ConfigError, match="EFER belongs to the VMM"):
        VM(config(hooks=parse_config({"hooks": [{"kind": "msr", "index": "0xC0000080"}]}).hooks), entry=entry("f4"))
    with pytest.raises(ConfigError, match="image: the configuration names no guest image"):
        VM(config())


def test_rflags_tf_flag_constant() -> None:
    assert F.TF == 8  # the single-step bit the run loop checks (SDM Vol. 1 3.4.3.3)


# -- the tests bite: deliberately broken VMMs are caught ----------------------------------------------


def _no_tsc_offset(vm: VM) -> None:
    vm.vmcb.tsc_offset = 0  # forget that emulated instructions advance the guest's clock


def _bus_reads_zero(self: object, port: int, size: int) -> int:
    return 0  # an empty bus that reads 0 instead of all ones


def _emulated_not_counted(self: VM) -> None:
    v = self.vmcb
    v.rip = v.nrip  # RIP moves, but the instruction is not counted as retired


def _equivalent(code: str) -> Callable[[], object]:
    return lambda: assert_equivalent(code)


@pytest.mark.parametrize(("target", "replacement", "check"), [
    ("refvmm.vm.VM._set_tsc_offset", _no_tsc_offset, _equivalent("e680e68066baf803ec0f31f4")),
    ("refvmm.hooks.PortBus.read", _bus_reads_zero, test_unhooked_port_reads_all_ones_hooked_port_answers),
    ("refvmm.vm.VM.advance_rip", _emulated_not_counted, _equivalent("e680e680f4")),
])
def test_mutants_are_caught(monkeypatch: pytest.MonkeyPatch, target: str, replacement: object,
                            check: Callable[[], object]) -> None:
    check()  # the real VMM passes
    monkeypatch.setattr(target, replacement)
    with pytest.raises(AssertionError):
        check()


EXIT_CODES = st.sampled_from(sorted({int(c) for c in ExitCode} | {0x7FF, 0x12345}))


@given(EXIT_CODES)
def test_every_exit_is_handled_or_fails_stop(code: int) -> None:
    """Fail-stop as a property: an exit nobody owns stops the VM with its name, never resumes the guest."""
    vm = _DISPATCH_VM
    out = dispatch(vm, code, 0, 0)
    if code in EXIT_HANDLERS or vm.paging.handles(code):
        return
    assert isinstance(out, Stop) and out.reason == "unhandled-exit" and not out.advance
    assert out.detail.startswith("unhandled exit VMEXIT_")


def test_a_halted_guest_stays_halted() -> None:
    for paging in PAGINGS:
        vm = VM(config(paging), entry=entry("f4" + "90f4"))  # hlt; nop; hlt
        first = vm.run()
        again = vm.run()
        assert (first.reason, again.reason) == ("halted", "halted") and first.rip == again.rip == 0x1001
        assert again.stats.guest_instructions == 1 and vm.guest_state().halted
        halted_entry = entry("90f4")
        halted_entry.halted = True
        r = VM(config(paging), entry=halted_entry).run()
        assert r.reason == "halted" and r.stats.vmruns == 0
    bare_entry = entry("90f4")
    bare_entry.halted = True
    assert BareMachine(config(), entry=bare_entry).run(10).kind == "halted"
