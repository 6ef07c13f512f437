"""SVM intercepts (AMD APM Vol. 2 15.8-15.13): each fires with its exit code, EXITINFO1/2 and nRIP,
leaves no trace (the instruction is undone), and comes after the simple exceptions but before memory
and operand-value faults (APM 15.9).  Not-intercepted code runs exactly as on the bare machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as hst
from svm_harness import (
    IOPM_PA,
    MSRPM_PA,
    SVM_PAGES,
    compare,
    machine,
    make_guest,
    run_bare,
    snapshot,
    state_of,
)

from spec.cpu import SpecCPU
from spec.decode.encode import sample
from spec.decode.opcodes import ROWS, Row
from spec.decode.strategies import instructions
from spec.faults import Unimplemented
from spec.machine import BITS, CODE, DATA, TSS, enter_user_mode
from spec.state import CR0_TS, CR0_WP, MachineState
from spec.svm.exitcodes import (
    IOIO_A16,
    IOIO_A32,
    IOIO_A64,
    IOIO_REP,
    IOIO_STR,
    IOIO_SZ8,
    IOIO_SZ16,
    IOIO_SZ32,
    IOIO_TYPE_IN,
    MOV_CR_VALID,
    ExitCode,
)
from spec.svm.vmcb import iopm_set, msrpm_set

E = ExitCode
PAGING_PAGES = range(0x70, 0x80)  # the flat machine's page tables: the fetch sets their accessed bits


@dataclass
class Case:
    name: str
    code: str
    exit: int
    intercepts: tuple[int, ...] = ()
    info1: int | None = 0
    info2: int | None = 0  # None: the next RIP (IOIO)
    mode: str = "long64"
    regs: dict[int, int] = field(default_factory=dict)
    setup: Callable[[MachineState], None] | None = None
    trap: bool = False  # the instruction completes (write traps)
    nrip: bool = True  # nRIP = next instruction


def _of(st: MachineState) -> None:
    st.write_rflags(st.D.const(64, 0x802))  # OF = 1


def _bound_data(st: MachineState) -> None:
    st.mem.phys.write(DATA, 4, 0x10)
    st.mem.phys.write(DATA + 4, 4, 0x20)


CASES = [
    Case("cpuid", "0fa2", E.CPUID),
    Case("hlt", "f4", E.HLT),
    Case("pause", "f390", E.PAUSE),
    Case("invd", "0f08", E.INVD),
    Case("wbinvd", "0f09", E.WBINVD),
    Case("wbnoinvd", "f30f09", E.WBINVD),
    Case("rdtsc", "0f31", E.RDTSC),
    Case("rdtscp", "0f01f9", E.RDTSCP),
    Case("rdpmc", "0f33", E.RDPMC),
    Case("pushf", "9c", E.PUSHF),
    Case("popf", "9d", E.POPF),
    Case("iretq", "48cf", E.IRET),
    Case("int 0x80", "cd80", E.SWINT, info1=0x80),
    Case("int1", "f1", E.ICEBP),
    Case("rsm", "0faa", E.RSM),
    Case("invlpg", "0f013b", E.INVLPG, info1=0x1234_5000, regs={3: 0x1234_5000}),
    Case("invlpga", "0f01df", E.INVLPGA),
    Case("lgdt", "0f0113", E.GDTR_WRITE, regs={3: DATA}),
    Case("lidt", "0f011b", E.IDTR_WRITE, regs={3: DATA}),
    Case("sgdt", "0f0103", E.GDTR_READ, regs={3: DATA}),
    Case("sidt", "0f010b", E.IDTR_READ, regs={3: DATA}),
    Case("sldt", "0f00c0", E.LDTR_READ),
    Case("str", "0f00c8", E.TR_READ),
    Case("lldt", "0f00d0", E.LDTR_WRITE),
    Case("ltr", "0f00d8", E.TR_WRITE),
    Case("smsw", "0f01e0", E.CR0_READ),
    Case("lmsw", "0f01f0", E.CR0_WRITE),
    Case("clts", "0f06", E.CR0_WRITE),
    Case("mov rax, cr0", "0f20c0", E.CR0_READ, info1=MOV_CR_VALID | 0),
    Case("mov rbx, cr3", "0f20db", E.CR3_READ, info1=MOV_CR_VALID | 3),
    Case("mov cr3, rcx", "0f22d9", E.CR3_WRITE, info1=MOV_CR_VALID | 1, setup=lambda s: _set(s, 1, s.cr3)),
    Case("mov cr4, r9", "410f22e1", E.CR4_WRITE, info1=MOV_CR_VALID | 9, setup=lambda s: _set(s, 9, s.cr4)),
    Case("mov cr8, rax", "440f22c0", E.CR8_WRITE, info1=MOV_CR_VALID | 0),
    Case("mov rax, cr8", "440f20c0", E.CR8_READ, info1=MOV_CR_VALID | 0),
    Case("mov cr0 selective", "0f22c0", E.CR0_SEL_WRITE, info1=MOV_CR_VALID | 0,
         setup=lambda s: _set(s, 0, s.cr0 ^ CR0_WP)),
    Case("mov rax, dr7", "0f21f8", E.DR7_READ, info1=MOV_CR_VALID | 0),
    Case("mov dr0, rdx", "0f23c2", E.DR0_WRITE, info1=MOV_CR_VALID | 2),
    Case("mov rax, dr4 (alias)", "0f21e0", E.DR4_READ, info1=MOV_CR_VALID | 0),
    Case("in al, 0x60", "e460", E.IOIO, info1=0x60 << 16 | IOIO_SZ8 | IOIO_A64 | IOIO_TYPE_IN, info2=None),
    Case("out dx, ax", "66ef", E.IOIO, info1=0x3F8 << 16 | IOIO_SZ16 | IOIO_A64, info2=None, regs={2: 0x3F8}),
    Case("out dx, eax (32-bit)", "ef", E.IOIO, info1=0x3F8 << 16 | IOIO_SZ32 | IOIO_A32, info2=None,
         regs={2: 0x3F8}, mode="prot32"),
    Case("in ax, dx (16-bit)", "ed", E.IOIO, info1=0x70 << 16 | IOIO_SZ16 | IOIO_A16 | IOIO_TYPE_IN, info2=None,
         regs={2: 0x70}, mode="prot16"),
    Case("rep outsb", "f36e", E.IOIO, info1=0x80 << 16 | IOIO_STR | IOIO_REP | IOIO_SZ8 | IOIO_A64 | 3 << 10,
         info2=None, regs={2: 0x80, 1: 4, 6: DATA}),
    Case("rep outsb es: a32", "2667f36e", E.IOIO,
         info1=0x80 << 16 | IOIO_STR | IOIO_REP | IOIO_SZ8 | IOIO_A32 | 0 << 10, info2=None,
         regs={2: 0x80, 1: 4, 6: DATA}),
    Case("insd", "6d", E.IOIO, info1=0x80 << 16 | IOIO_STR | IOIO_SZ32 | IOIO_A64 | IOIO_TYPE_IN, info2=None,
         regs={2: 0x80, 7: DATA}),
    Case("rdmsr efer", "0f32", E.MSR, info1=0, regs={1: 0xC000_0080}),
    Case("wrmsr star", "0f30", E.MSR, info1=1, regs={1: 0xC000_0081}),
    Case("rdmsr outside the map", "0f32", E.MSR, info1=0, regs={1: 0x4000_0000}),
    Case("vmrun", "0f01d8", E.VMRUN, regs={0: 0xF0000}),
    Case("vmmcall", "0f01d9", E.VMMCALL),
    Case("vmload", "0f01da", E.VMLOAD),
    Case("vmsave", "0f01db", E.VMSAVE),
    Case("stgi", "0f01dc", E.STGI),
    Case("clgi", "0f01dd", E.CLGI),
    Case("skinit", "0f01de", E.SKINIT),
    Case("int3 -> #BP", "cc", E.EXCP_BP),
    Case("into -> #OF", "ce", E.EXCP_OF, mode="prot32", setup=_of),
    Case("bound -> #BR", "6203", E.EXCP_BR, mode="prot32", regs={0: 5, 3: DATA}, setup=_bound_data),
    Case("ud2 -> #UD", "0f0b", E.EXCP_UD, nrip=False),
    Case("lldt bad selector -> #GP(0xC)", "0f00d0", E.EXCP_GP, info1=0xC, regs={0: 0xC}, nrip=False),
    Case("read unmapped -> #PF", "488b03", E.EXCP_PF, info1=0, info2=0x4000_0000, regs={3: 0x4000_0000},
         nrip=False),
    Case("write unmapped -> #PF", "488903", E.EXCP_PF, info1=2, info2=0x4000_0008, regs={3: 0x4000_0008},
         nrip=False),
    Case("efer write trap", "0f30", E.EFER_WRITE_TRAP, info1=None, regs={1: 0xC000_0080}, trap=True,
         setup=lambda s: _set_edx_eax(s, s.efer)),
    Case("cr4 write trap", "410f22e1", E.CR4_WRITE_TRAP, info1=None, trap=True,
         setup=lambda s: _set(s, 9, s.cr4)),
]


def _set(st: MachineState, reg: int, value: int) -> None:
    st.gpr[reg] = st.D.const(64, value)


def _set_edx_eax(st: MachineState, value: int) -> None:
    _set(st, 0, value & 0xFFFF_FFFF)
    _set(st, 2, value >> 32)


def _guest_for(case: Case) -> tuple[object, MachineState]:
    code = bytes.fromhex(case.code)
    st = machine(case.mode, code + b"\xf4")
    for reg, v in case.regs.items():
        _set(st, reg, v)
    if case.setup is not None:
        case.setup(st)
    before = st.copy()
    g = make_guest(st, (case.exit,))
    if case.exit == E.IOIO:
        for p in range(0x10000):
            iopm_set(g.phys, IOPM_PA, p)
    if case.exit == E.MSR:
        msrpm_set(g.phys, MSRPM_PA, 0xC000_0080, read=True, write=True)
        msrpm_set(g.phys, MSRPM_PA, 0xC000_0081, read=True, write=True)
    return g, before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_intercept_fires_with_its_exitinfo_and_leaves_no_trace(case: Case) -> None:
    g, before = _guest_for(case)
    vmcb = g.run()  # type: ignore[attr-defined]
    length = len(bytes.fromhex(case.code))
    assert vmcb.exitcode == case.exit, f"{vmcb.exitcode:#x}"
    after = state_of(g)  # type: ignore[arg-type]
    if case.info1 is not None:
        assert vmcb.exitinfo1 == case.info1
    else:
        assert vmcb.exitinfo1 == (after.efer if case.exit == E.EFER_WRITE_TRAP else after.cr4)
    assert vmcb.exitinfo2 == (CODE + length if case.info2 is None else case.info2)
    assert vmcb.nrip == (CODE + length if case.nrip else 0)
    assert vmcb.exitintinfo == 0
    if case.trap:
        assert vmcb.rip == CODE + length
        return
    assert vmcb.rip == CODE
    assert not compare(snapshot(before, memory=False), snapshot(after, memory=False))
    assert not _ram_diff(before, after)
    assert g.proc.icount == before.icount  # type: ignore[attr-defined]


def _ram_diff(before: MachineState, after: MachineState) -> list[int]:
    """RAM pages that differ, outside the page tables (whose accessed bits the fetch sets) and the SVM pages."""
    a, b = before.mem.phys.pages, after.mem.phys.pages
    return [k for k in set(a) | set(b)
            if a.get(k) != b.get(k) and k not in PAGING_PAGES and k not in SVM_PAGES]


def test_pf_intercept_does_not_write_cr2_and_stores_the_instruction_bytes() -> None:
    case = next(c for c in CASES if c.name == "read unmapped -> #PF")
    g, before = _guest_for(case)
    vmcb = g.run()  # type: ignore[attr-defined]
    assert vmcb.cr2 == before.cr2 == 0
    assert vmcb.guest_insn_len == 15 and vmcb.guest_insn_bytes()[:4] == bytes.fromhex("488b03f4")


def test_not_intercepted_cr0_write_of_ts_only_is_not_a_selective_write() -> None:
    st = machine("long64", bytes.fromhex("0f22c0") + b"\xf4")
    _set(st, 0, st.cr0 ^ CR0_TS)
    g = make_guest(st, (E.CR0_SEL_WRITE, E.HLT))
    vmcb = g.run()
    assert vmcb.exitcode == E.HLT and vmcb.cr0 & CR0_TS


def test_cr0_write_intercept_has_priority_over_selective() -> None:
    st = machine("long64", bytes.fromhex("0f22c0") + b"\xf4")
    _set(st, 0, st.cr0 ^ CR0_WP)
    g = make_guest(st, (E.CR0_SEL_WRITE, E.CR0_WRITE))
    assert g.run().exitcode == E.CR0_WRITE


def test_msr_not_in_the_map_runs_and_io_port_bit_clear_runs() -> None:
    st = machine("long64", bytes.fromhex("0f32" "e460") + b"\xf4")
    _set(st, 1, 0xC000_0081)
    g = make_guest(st, (E.MSR, E.IOIO, E.HLT))
    iopm_set(g.phys, IOPM_PA, 0x61)  # a different port
    msrpm_set(g.phys, MSRPM_PA, 0xC000_0081, read=False, write=True)  # writes only
    vmcb = g.run()
    assert vmcb.exitcode == E.HLT
    assert vmcb.rax == 0xFF  # IN from the empty bus reads all ones; RDMSR STAR read 0 first


def test_pause_filter_counts_down() -> None:
    st = machine("long64", bytes.fromhex("f390" * 5) + b"\xf4")
    g = make_guest(st, (E.PAUSE,))
    g.vmcb.pause_filter_count = 3
    vmcb = g.run()
    assert vmcb.exitcode == E.PAUSE and vmcb.rip == CODE + 4  # the third PAUSE


def test_tsc_offset_applies_to_rdtsc_in_guest_mode() -> None:
    code = bytes.fromhex("0f31") + b"\xf4"
    bare = machine("long64", code)
    run_bare(bare)
    st = machine("long64", code)
    g = make_guest(st, (E.HLT,))
    g.vmcb.tsc_offset = 0x1_0000_0000
    g.run()
    bare_tsc = bare.D.concrete(bare.gpr[2]) << 32 | bare.D.concrete(bare.gpr[0])
    assert (g.gprs[2] << 32 | g.vmcb.rax) == bare_tsc + 0x1_0000_0000


def test_cr8_goes_to_v_tpr_with_v_intr_masking() -> None:
    st = machine("long64", bytes.fromhex("440f22c0" "440f20c3") + b"\xf4")  # mov cr8, rax; mov rbx, cr8
    _set(st, 0, 9)
    g = make_guest(st, (E.HLT,))
    vmcb = g.run()
    assert vmcb.v_tpr == 9 and g.gprs[3] == 9 and g.proc.cr8 == 0


def test_interrupt_shadow_is_reported_for_an_instruction_in_the_sti_shadow() -> None:
    st = machine("long64", bytes.fromhex("fb") + b"\xf4")  # STI (IF was 0); HLT intercepted
    g = make_guest(st, (E.HLT,))
    vmcb = g.run()
    assert vmcb.exitcode == E.HLT and vmcb.rip == CODE + 1 and vmcb.interrupt_shadow == 1
    assert vmcb.guest_interrupt_mask == 1


# -- priority against exceptions (APM 15.9) ---------------------------------------------------------------

def test_cpl_check_comes_before_the_hlt_intercept() -> None:
    st = enter_user_mode(machine("long64", b"\xf4"))
    g = make_guest(st, (E.HLT, E.EXCP_GP))
    vmcb = g.run()
    assert vmcb.exitcode == E.EXCP_GP and vmcb.exitinfo1 == 0


def test_ioio_permission_check_comes_before_the_ioio_intercept() -> None:
    st = enter_user_mode(machine("long64", bytes.fromhex("e460")))  # CPL 3 > IOPL 0
    st.mem.phys.write(TSS + 0x66, 2, 0x68)  # the TSS has no I/O bitmap: the port is denied (#GP)
    g = make_guest(st, (E.IOIO, E.EXCP_GP))
    for p in range(0x100):
        iopm_set(g.phys, IOPM_PA, p)
    assert g.run().exitcode == E.EXCP_GP


def test_tsd_check_comes_before_the_rdtsc_intercept() -> None:
    st = enter_user_mode(machine("long64", bytes.fromhex("0f31")))
    st.cr4 |= 1 << 2
    g = make_guest(st, (E.RDTSC, E.EXCP_GP))
    assert g.run().exitcode == E.EXCP_GP


def test_intercept_comes_before_the_memory_operand_fault() -> None:
    st = machine("long64", bytes.fromhex("0f0113"))  # LGDT [rbx], rbx unmapped
    _set(st, 3, 0x4000_0000)
    g = make_guest(st, (E.GDTR_WRITE, E.EXCP_PF))
    assert g.run().exitcode == E.GDTR_WRITE


def test_intercept_comes_before_the_operand_value_fault() -> None:
    st = machine("long64", bytes.fromhex("410f22e1"))  # MOV CR4, r9 with a reserved bit
    _set(st, 9, 1 << 40)
    g = make_guest(st, (E.CR4_WRITE, E.EXCP_GP))
    assert g.run().exitcode == E.CR4_WRITE
    st = machine("long64", bytes.fromhex("0f32"))  # RDMSR of an MSR the model lacks
    _set(st, 1, 0x1234)
    g = make_guest(st, (E.MSR, E.EXCP_GP))
    msrpm_set(g.phys, MSRPM_PA, 0x1234, read=True, write=False)
    assert g.run().exitcode == E.MSR


def test_cpuid_and_pushf_intercepts_come_first() -> None:
    st = enter_user_mode(machine("long64", bytes.fromhex("0fa2")))
    assert make_guest(st, (E.CPUID,)).run().exitcode == E.CPUID


def test_cpl_check_comes_before_the_svm_instruction_intercepts() -> None:
    st = enter_user_mode(machine("long64", bytes.fromhex("0f01dd")))
    assert make_guest(st, (E.CLGI, E.EXCP_GP)).run().exitcode == E.EXCP_GP


# -- not intercepted: identical to the bare machine ---------------------------------------------------------

ALU = {"ADD", "ADC", "SUB", "SBB", "AND", "OR", "XOR", "CMP", "TEST", "INC", "DEC", "NEG", "NOT", "SHL", "SHR",
       "SAR", "ROL", "ROR", "RCL", "RCR", "MOV", "MOVZX", "MOVSX", "LEA", "XCHG", "IMUL", "MUL", "DIV", "IDIV",
       "BT", "BTS", "BSF", "BSR", "CMOVCC", "SETCC", "PUSH", "POP", "PUSHF", "POPF", "NOP", "CPUID", "XADD",
       "BSWAP", "CBW", "CWD", "LAHF", "SAHF", "CLC", "STC", "CMC"}
ALU_ROWS = [r for r in ROWS if r.mnemonic in ALU and not any(o[0] in "CDS" for o in r.operands)]


@pytest.mark.parametrize("mode", ["long64", "prot32", "real"])
@settings(max_examples=100)
@given(data=hst.data())
def test_random_code_runs_identically_as_a_guest_without_intercepts(mode: str, data: hst.DataObject) -> None:
    """Property: random ALU/stack code (exceptions delivered through the IDT included) ends in the same
    state as a guest (only the mandatory VMRUN intercept, INTR and SHUTDOWN) as on the bare spec CPU."""
    encs = data.draw(hst.lists(instructions(BITS[mode], ALU_ROWS), min_size=1, max_size=8))
    regs = data.draw(hst.lists(hst.integers(0, (1 << 64) - 1), min_size=16, max_size=16))
    code = b"".join(e.code for e in encs) + b"\xf4"
    note(f"code={code.hex()} regs={[hex(r) for r in regs]}")
    bare = machine(mode, code)
    for k in range(16):
        if k != 4:
            _set(bare, k, regs[k] & (0xFFFF if mode == "real" else (1 << 64) - 1))
    st = bare.copy()
    cpu = SpecCPU(bare, deliver_exceptions=True)
    stop = None
    while stop is None and bare.icount < 200:  # the processor's budget counts retired instructions
        stop = cpu.step()
    g = make_guest(st)
    if stop is not None and stop.kind == "unimplemented":
        with pytest.raises(Unimplemented):
            g.run(budget=200)
        assert g.vmcb.rip == bare.rip
        return
    vmcb = g.run(budget=200)
    expected_exit = {"halted": E.INTR, "shutdown": E.SHUTDOWN}[stop.kind] if stop is not None else E.INTR
    assert vmcb.exitcode == expected_exit
    assert g.proc.last_guest.halted == bare.halted  # type: ignore[union-attr]
    assert not compare(snapshot(bare), snapshot(state_of(g)))
    assert not compare(snapshot(bare), snapshot(g.proc.last_guest))  # type: ignore[arg-type]
    assert g.proc.icount == bare.icount


# -- intercept completeness (a concrete sweep over the opcode table) ------------------------------------------

EXPECTED: dict[str, int] = {
    "CPUID": E.CPUID, "HLT": E.HLT, "INVD": E.INVD, "WBINVD": E.WBINVD, "WBNOINVD": E.WBINVD,
    "INVLPG": E.INVLPG, "INVLPGA": E.INVLPGA, "IN": E.IOIO, "OUT": E.IOIO, "INS": E.IOIO, "OUTS": E.IOIO,
    "RDMSR": E.MSR, "WRMSR": E.MSR, "RDTSC": E.RDTSC, "RDTSCP": E.RDTSCP, "RDPMC": E.RDPMC, "PUSHF": E.PUSHF,
    "POPF": E.POPF, "IRET": E.IRET, "INT": E.SWINT, "INT1": E.ICEBP, "INT3": E.EXCP_BP, "INTO": E.EXCP_OF,
    "RSM": E.RSM, "PAUSE": E.PAUSE, "LGDT": E.GDTR_WRITE, "LIDT": E.IDTR_WRITE, "SGDT": E.GDTR_READ,
    "SIDT": E.IDTR_READ, "LLDT": E.LDTR_WRITE, "LTR": E.TR_WRITE, "SLDT": E.LDTR_READ, "STR": E.TR_READ,
    "SMSW": E.CR0_READ, "LMSW": E.CR0_WRITE, "CLTS": E.CR0_WRITE, "VMRUN": E.VMRUN, "VMMCALL": E.VMMCALL,
    "VMLOAD": E.VMLOAD, "VMSAVE": E.VMSAVE, "STGI": E.STGI, "CLGI": E.CLGI, "SKINIT": E.SKINIT,
    "BOUND": E.EXCP_BR,
}
NOT_INTERCEPTABLE_IN_REAL_MODE = {"LLDT", "LTR", "SLDT", "STR", "VMRUN", "VMLOAD", "VMSAVE", "STGI", "CLGI",
                                  "SKINIT", "INVLPGA"}  # #UD in real mode, before any intercept (APM 15.9)


def _expected(row: Row) -> int | None:
    if row.mnemonic == "MOV" and any(o[0] in "CD" for o in row.operands):
        return -2  # a CR/DR access: checked by family below
    return EXPECTED.get(row.mnemonic)


SWEEP = [(r, m) for r in ROWS if _expected(r) is not None and "ud" not in r.attrs
         for m in ("real", "prot32", "long64")
         if not ("o64" in r.attrs and m != "long64") and not ("i64" in r.attrs and m == "long64")]


@pytest.mark.parametrize(("row", "mode"), SWEEP, ids=[f"{r.key}-{m}" for r, m in SWEEP])
def test_every_interceptable_row_exits_with_all_intercepts_set(row: Row, mode: str) -> None:
    """Intercept completeness, a concrete sweep (not a proof): with every intercept bit, the whole IOPM
    and MSRPM set, each opcode-table row the APM makes interceptable exits with its own exit code (the
    simple #UD of real mode excepted, which is itself intercepted as EXCP6)."""
    code = sample(row, BITS[mode])
    st = machine(mode, code)
    st.write_rflags(st.D.const(64, 0x802))  # OF = 1: INTO raises #OF
    if row.mnemonic == "BOUND":
        _bound_data(st)
        _set(st, 3, DATA)
    g = make_guest(st, all_intercepts=True)
    vmcb = g.run()
    want = _expected(row)
    if mode == "real" and row.mnemonic in NOT_INTERCEPTABLE_IN_REAL_MODE:
        want = E.EXCP_UD
    if want == -2:
        assert E.CR0_READ <= vmcb.exitcode <= E.DR15_WRITE
    elif row.mnemonic == "BOUND" and vmcb.exitcode != E.EXCP_BR:
        pytest.skip("the sample BOUND operand is in range")
    else:
        assert vmcb.exitcode == want, f"{vmcb.exitcode:#x} != {want:#x}"
    assert vmcb.rip == CODE
