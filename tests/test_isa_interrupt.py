"""Software interrupts (INT3, INT n, INTO, INT1) and the decoder's #UD / #GP(0) rules.

At this stage exceptions are not delivered through the IDT: the CPU stops
with a fault event.  INT n, INT3, INTO and INT1 are traps (SDM Vol. 3A 6.5,
Vol. 2A "INT n/INTO/INT3/INT1"): the event's RIP is the next instruction.
Faults (#UD, #GP) report the RIP of the faulting instruction and leave no
trace in the state (SDM Vol. 3A 6.5: faults are restartable).

Every hand-written encoding here is cross-checked with iced-x86 (AMD decoder
options where the vendors differ: UD0 has no ModRM byte on AMD).
"""

from __future__ import annotations

import pytest
import z3
from iced_x86 import Code, Decoder, DecoderOptions, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import explore, prove
from spec.faults import Fault, Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE, MODES, flat_machine
from spec.state import MachineState
from spec.symexec import run_symbolic
from tests.conftest import GPR, reg

REGS = {name: 0x0101_0101_0101_0101 * (k + 1) for k, name in enumerate(GPR) if name != "rsp"}
FLAGS_IN = (1 << F.CF) | (1 << F.ZF) | (1 << F.SF)


def machine(mode: str, code: bytes, *, flags: int = FLAGS_IN) -> tuple[MachineState, SpecCPU]:
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    for name, v in REGS.items():
        s.gpr[GPR[name]] = v
    s.write_rflags(flags | 2)
    return s, SpecCPU(s)


def snapshot(s: MachineState) -> tuple:
    """Everything an instruction could have changed, for the no-state-change checks."""
    return (list(s.gpr), s.D.concrete(s.read_rflags()), s.undefined, [seg.copy() for seg in s.seg],
            s.mem.phys.read_bytes(0, 0x8000), s.mem.phys.read_bytes(0x10000, 0x1000))


def first_event(mode: str, code: bytes, flags: int = FLAGS_IN) -> tuple[MachineState, StopEvent, tuple]:
    """Run until the first stop; returns the state, the event and the state snapshot taken before."""
    s, cpu = machine(mode, code, flags=flags)
    before = snapshot(s)
    return s, cpu.run(100), before


def iced(bits: int, code: bytes) -> str:
    """The iced-x86 (AMD options) reading of ``code``: ``"INVALID"`` or the formatted instruction."""
    d = Decoder(bits, code, options=DecoderOptions.AMD, ip=CODE)
    ins = d.decode()
    return "INVALID" if ins.code == Code.INVALID else Formatter(FormatterSyntax.INTEL).format(ins)


def semantics_raise(mode: str, code: bytes) -> Fault | None:
    """Run one instruction's semantic function directly and return what it raised (for attribute checks)."""
    s = flat_machine(mode, code)  # type: ignore[arg-type]
    insn = decode(code, BITS[mode])
    x = Exec(s)
    x.i = insn
    x.next_rip = CODE + insn.length
    try:
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    except Fault as f:
        return f
    return None


def assert_trap(s: MachineState, ev: StopEvent, before: tuple, vector: int, length: int) -> None:
    """A trap-like software interrupt: the event names the vector, RIP is past it, nothing else changed."""
    assert ev.kind == "fault" and ev.vector == vector and ev.error_code is None, ev
    assert ev.rip == CODE + length and s.rip == CODE + length
    assert snapshot(s) == before
    assert s.icount == 1


def assert_fault(s: MachineState, ev: StopEvent, before: tuple, vector: int, error_code: int | None = None) -> None:
    """A fault: the event names the vector, RIP is the instruction's, and the state is untouched."""
    assert ev.kind == "fault" and ev.vector == vector and ev.error_code == error_code, ev
    assert ev.rip == CODE and s.rip == CODE
    assert snapshot(s) == before
    assert s.icount == 0


# -- INT3, INT n, INT1, INTO --------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_int3(mode: str) -> None:
    """CC: #BP, a trap: RIP after the one-byte instruction (SDM Vol. 2A INT3)."""
    assert iced(BITS[mode], b"\xcc") == "int3"
    s, ev, before = first_event(mode, b"\xcc")
    assert_trap(s, ev, before, Vector.BP, 1)


@pytest.mark.parametrize("mode", MODES)
def test_int_n_every_vector(mode: str) -> None:
    """CD ib raises vector ib for every ib, RIP after the two bytes (SDM Vol. 2A INT n)."""
    assert iced(BITS[mode], b"\xcd\x80") == "int 80h"
    for n in range(256):
        s, ev, before = first_event(mode, bytes([0xCD, n]))
        assert_trap(s, ev, before, n, 2)


@pytest.mark.parametrize("mode", MODES)
def test_int_n_with_prefix_length(mode: str) -> None:
    """The trap's RIP is past the whole instruction, prefixes included."""
    code = bytes.fromhex("66cd21")
    assert iced(BITS[mode], code) == "int 21h"
    s, ev, before = first_event(mode, code)
    assert_trap(s, ev, before, 0x21, 3)


@pytest.mark.parametrize("mode", MODES)
def test_int1(mode: str) -> None:
    """F1 (INT1/ICEBP): #DB as a trap (SDM Vol. 2A INT1)."""
    assert iced(BITS[mode], b"\xf1") == "int1"
    s, ev, before = first_event(mode, b"\xf1")
    assert_trap(s, ev, before, Vector.DB, 1)


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32"])
def test_into_overflow_set(mode: str) -> None:
    """CE with OF=1: #OF, a trap (SDM Vol. 2A INTO)."""
    assert iced(BITS[mode], b"\xce") == "into"
    s, ev, before = first_event(mode, b"\xce", flags=FLAGS_IN | 1 << F.OF)
    assert_trap(s, ev, before, Vector.OF, 1)


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32"])
def test_into_overflow_clear_continues(mode: str) -> None:
    """CE with OF=0 does nothing: execution reaches the HLT after it."""
    s, ev, before = first_event(mode, b"\xce")
    assert ev.kind == "halted" and ev.rip == CODE + 2
    assert snapshot(s) == before


def test_into_invalid_in_64bit_mode() -> None:
    """CE is #UD in 64-bit mode whatever OF is (SDM Vol. 2A INTO: "#UD If in 64-bit mode")."""
    assert iced(64, b"\xce") == "INVALID"
    for of in (0, 1):
        s, ev, before = first_event("long64", b"\xce", flags=FLAGS_IN | of << F.OF)
        assert_fault(s, ev, before, Vector.UD)


def test_fault_attributes() -> None:
    """INT n/INT3/INTO are software-generated traps (DPL-checked at delivery); INT1 is a trap without that check."""
    for code, vector, software in ((b"\xcc", 3, True), (b"\xcd\x40", 0x40, True), (b"\xf1", 1, False)):
        f = semantics_raise("prot32", code)
        assert f is not None and (f.vector, f.trap, f.software, f.error_code) == (vector, True, software, None)
    s = flat_machine("prot32", b"\xce")
    s.write_rflags(2 | 1 << F.OF)
    x = Exec(s)
    insn = decode(b"\xce", 32)
    x.i, x.next_rip = insn, CODE + 1
    with pytest.raises(Fault) as e:
        SEMANTICS["INTO"].fn(x, insn)
    assert (e.value.vector, e.value.trap, e.value.software) == (Vector.OF, True, True)


def test_into_symbolic_raises_exactly_when_of() -> None:
    """Over a symbolic OF, INTO raises #OF on exactly the paths where OF = 1."""
    paths = explore(lambda D: run_symbolic(D, "prot32", b"\xce"))
    assert len(paths) == 2
    for p in paths:
        of = p.result.inputs["OF"]
        raised = p.result.fault is not None
        if raised:
            assert p.result.fault.vector == Vector.OF and p.result.fault.trap  # type: ignore[union-attr]
        assert prove(z3.Implies(p.condition, of if raised else z3.Not(of))) is None


# -- #UD: reserved encodings (SDM Vol. 2A UD, Vol. 2D Appendix A opcode-map holes) --------------------
UD_CASES = [
    ("0f0b", "ud2"),  # UD2
    ("0fb9c0", "ud1 eax,eax"),  # UD1 register form
    ("0fb903", "ud1 eax,[rbx]"),  # UD1 memory form (no access is made)
    ("0fff", "ud0"),  # UD0 (AMD: no ModRM)
    ("fef8", "INVALID"),  # FE /7
    ("fe10", "INVALID"),  # FE /2 memory form
    ("8fc8", "INVALID"),  # 8F /1: #UD; only XOP-capable AMD parts (Bulldozer family) read it as an XOP escape
    ("c6c8", "INVALID"),  # C6 /1
    ("c7d0", "INVALID"),  # C7 /2
    ("fff8", "INVALID"),  # FF /7
    ("0f00f0", "INVALID"),  # 0F 00 /6
    ("0fbac0", "INVALID"),  # 0F BA /0
    ("660f0b", "ud2"),  # prefixes do not change UD2
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hexcode,iced_text", UD_CASES)
def test_reserved_encodings_raise_ud(mode: str, hexcode: str, iced_text: str) -> None:
    code = bytes.fromhex(hexcode)
    if BITS[mode] == 64:  # the iced cross-check is done in 64-bit mode ([rbx] spelling)
        assert iced(64, code) == iced_text
    else:
        assert (iced(BITS[mode], code) == "INVALID") == (iced_text == "INVALID")
    s, ev, before = first_event(mode, code)
    assert_fault(s, ev, before, Vector.UD)


# -- LOCK (SDM Vol. 2A LOCK: #UD unless a lockable instruction with a memory destination) -----------
def _mem_dst(mode: str) -> str:
    """ModRM for [BX] (16-bit addressing) or [EBX]/[RBX]."""
    return "07" if BITS[mode] == 16 else "03"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("body", ["90", "01c0", "fec0", "38{m}", "8b{m}", "a4", "f4", "0fb1c8", "85{m}"])
def test_lock_invalid_gives_ud(mode: str, body: str) -> None:
    """LOCK with NOP, a register destination (ADD/INC/CMPXCHG), or a non-lockable op (CMP/MOV/MOVS/HLT/TEST)."""
    code = bytes.fromhex("f0" + body.format(m=_mem_dst(mode)))
    assert iced(BITS[mode], code) == "INVALID", iced(BITS[mode], code)
    s, ev, before = first_event(mode, code)
    assert_fault(s, ev, before, Vector.UD)


@pytest.mark.parametrize("mode", MODES)
def test_lock_on_memory_destination_executes(mode: str) -> None:
    """The control case: LOCK ADD [rBX], eAX is valid and executes."""
    code = bytes.fromhex("f001" + _mem_dst(mode))
    assert iced(BITS[mode], code).startswith("lock add")
    s, cpu = machine(mode, code)
    s.gpr[GPR["rbx"]] = 0x3000
    s.gpr[GPR["rax"]] = 5
    s.mem.phys.write_bytes(0x3000, b"\x10\x00\x00\x00")
    ev = cpu.run(10)
    assert ev.kind == "halted", ev
    assert s.mem.phys.read_bytes(0x3000, 2) == b"\x15\x00"


# -- instructions invalid in 64-bit mode (the map's i64 rows, SDM Vol. 2D A.2.5) ----------------------
I64_CASES = ["06", "07", "0e", "16", "17", "1e", "1f", "27", "2f", "37", "3f", "60", "61", "ce", "d40a", "d50a",
             "d6", "9a785634120800", "ea785634120800", "82c001"]


@pytest.mark.parametrize("hexcode", I64_CASES)
def test_i64_opcodes_ud_in_64bit_mode(hexcode: str) -> None:
    code = bytes.fromhex(hexcode)
    assert iced(64, code) == "INVALID"
    assert iced(32, code) != "INVALID"
    decode(code, 32)  # valid outside 64-bit mode (decodes without a fault)
    s, ev, before = first_event("long64", code)
    assert_fault(s, ev, before, Vector.UD)


# -- the 15-byte limit (SDM Vol. 2A 2.3.11: longer instructions raise #GP(0)) ------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_sixteen_byte_instruction_gp0(mode: str) -> None:
    code = bytes.fromhex("66" * 15 + "90")
    assert iced(BITS[mode], code) == "INVALID"
    s, ev, before = first_event(mode, code)
    assert_fault(s, ev, before, Vector.GP, 0)


@pytest.mark.parametrize("mode", MODES)
def test_fifteen_byte_instruction_executes(mode: str) -> None:
    code = bytes.fromhex("66" * 14 + "90")
    assert iced(BITS[mode], code) != "INVALID"
    _, ev, _ = first_event(mode, code)
    assert ev.kind == "halted" and ev.rip == CODE + 16


def test_length_limit_counts_the_immediate() -> None:
    """8 prefixes + REX.W ADD rax, imm32 is 15 bytes (valid); 10 prefixes make it 17 (#GP(0))."""
    ok = bytes.fromhex("3e" * 8 + "4881c078563412")
    bad = bytes.fromhex("3e" * 10 + "4881c078563412")
    assert iced(64, ok) == "add rax,12345678h" and iced(64, bad) == "INVALID"
    s, ev, _ = first_event("long64", ok)
    assert ev.kind == "halted" and reg(s, "rax") == (REGS["rax"] + 0x12345678) & (1 << 64) - 1
    s, ev, before = first_event("long64", bad)
    assert_fault(s, ev, before, Vector.GP, 0)
