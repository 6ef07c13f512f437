"""Real-address mode as the hardware does it: address formation, wraparound, A20, IP, decode limits, LOCK.

References (the section a test pins is named in its docstring):

* SDM Vol. 3A 20.1.1 "Address Translation in Real-Address Mode": linear =
  selector * 16 + 16-bit offset, up to 10FFEFH; a 32-bit offset above FFFFH
  faults ("pseudo-protection faults").
* SDM Vol. 3A 22.33.1 "Segment Wraparound": the Intel386 and later raise
  #GP (CS, DS, ES, FS, GS) or #SS (SS) where the 8086 wrapped an operand
  across offset FFFFH; a popped stack wraps to 0 without a fault; A20M#
  forces the 1-MiB wrap of the 8086.
* 80386 Programmer's Reference Manual 14.7 item 8 "Sequential execution
  across offset 65,535": the 8086 continues at offset 0, the 80386 faults.
* SDM Vol. 1 3.7.5 and Vol. 2A 2.1.5 Table 2-1: 16-bit effective addresses
  are computed modulo 64 KiB; [BP+...] defaults to SS (Vol. 1 3.7.4.1).
* SDM Vol. 2A 2.3.11: an instruction longer than 15 bytes is #GP(0).
* SDM Vol. 2B LOCK: LOCK is valid only on ADD ADC AND BTC BTR BTS CMPXCHG
  CMPXCHG8B DEC INC NEG NOT OR SBB SUB XOR XADD XCHG with a memory
  destination; anything else is #UD.

The guest programs at the end are hand-assembled; every instruction's
encoding is checked against capstone before anything runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import capstone
import pytest
import z3
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Fault, Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import flat_machine
from spec.memory import PAGE
from spec.state import CR0_PE, MachineState
from spec.symexec import symbolic_state

ES, CS, SS, DS, FS, GS = range(6)
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
M64 = (1 << 64) - 1
_CS16 = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16)
_CS32 = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)


def disasm(code: bytes, bits: int = 16, addr: int = 0) -> list[str]:
    md = _CS16 if bits == 16 else _CS32
    return [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(code, addr)]


def real_machine(code: bytes | str = b"", *, cs: int = 0, ip: int = 0x1000, hlt: bool = True,
                 pages: Sequence[int] = (), **regs: int) -> MachineState:
    """A real-mode machine: low 32 KiB and 0x10000 mapped, ``code`` at CS:IP, registers set."""
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine("real")
    for p in pages:
        s.mem.phys.map_page(p)
    set_seg(s, CS, cs)
    s.rip = ip
    s.mem.phys.write_bytes(((cs << 4) + ip), code + (b"\xf4" if hlt else b""))
    for name, v in regs.items():
        s.gpr[GPRS.index(name)] = v & M64
    return s


def set_seg(s: MachineState, sreg: int, selector: int) -> None:
    """Load a segment register as real mode does (base = selector * 16; limit and attributes kept)."""
    seg = s.seg[sreg].copy()
    seg.selector, seg.base = selector, selector << 4
    s.seg[sreg] = seg


def reg(s: MachineState, name: str) -> int:
    return s.D.concrete(s.gpr[GPRS.index(name)])


def run(s: MachineState, budget: int = 2000, **kw: object) -> StopEvent:
    return SpecCPU(s, **kw).run(budget)  # type: ignore[arg-type]


# == 16-bit effective addresses (SDM Vol. 2A Table 2-1; Vol. 1 3.7.5) ==========================

# r/m -> (base, index) register names, and whether the default segment is SS ([BP+...]).
RM16 = {0: ("rbx", "rsi"), 1: ("rbx", "rdi"), 2: ("rbp", "rsi"), 3: ("rbp", "rdi"), 4: ("rsi", None),
        5: ("rdi", None), 6: ("rbp", None), 7: ("rbx", None)}

# Map all of the first 1 MiB + 64 KiB lazily: the hypothesis test needs any linear address.
_ALL_PAGES = range(0, 0x110000, PAGE)


@settings(max_examples=120)
@given(rm=st.integers(0, 7), mod=st.integers(0, 2), word=st.booleans(), regs=st.lists(st.integers(0, 0xFFFF),
       min_size=4, max_size=4), disp=st.integers(0, 0xFFFF), ds=st.integers(0, 0xFFFF), ss=st.integers(0, 0xFFFF))
def test_effective_address_wraps_and_default_segment(rm: int, mod: int, word: bool, regs: list[int], disp: int,
                                                     ds: int, ss: int) -> None:
    """MOV [r/m16], AL/AX in real mode writes at seg * 16 + (EA mod 64 KiB), the plain-int reference.

    * EA = base + index + disp computed in 16 bits (SDM Vol. 1 3.7.5; Vol. 2A Table 2-1);
      mod 00 r/m 110 is a bare disp16 (DS), any other form with BP uses SS (SDM Vol. 1 3.7.4.1);
    * linear = selector * 16 + EA, up to 10FFEFH with A20 enabled (SDM Vol. 3A 20.1.1);
    * a word at offset FFFFH crosses the 64-KiB limit: #GP(0), or #SS(0) through SS (SDM Vol. 3A 22.33.1).
    """
    bx, bp, si, di = regs
    values = {"rbx": bx, "rbp": bp, "rsi": si, "rdi": di}
    if mod == 0:
        disp_bytes = disp.to_bytes(2, "little") if rm == 6 else b""
    elif mod == 1:
        disp &= 0xFF
        disp_bytes = bytes([disp])
    else:
        disp_bytes = disp.to_bytes(2, "little")
    code = bytes([0x89 if word else 0x88, (mod << 6) | rm]) + disp_bytes  # mov [..], ax / al
    # Independent reference: which registers, which displacement, which segment.
    if mod == 0 and rm == 6:
        ea, seg_is_ss = disp, False
    else:
        base, index = RM16[rm]
        d = disp if mod == 2 else (disp - 0x100 if disp & 0x80 else disp) if mod == 1 else 0
        ea = (values[base] + (values[index] if index else 0) + d) & 0xFFFF
        seg_is_ss = base == "rbp"
    s = real_machine(code, pages=_ALL_PAGES, rax=0xA55A, **values)
    set_seg(s, DS, ds)
    set_seg(s, SS, ss)
    lin = ((ss if seg_is_ss else ds) << 4) + ea
    code_lin = 0x1000
    n = 2 if word else 1
    assume(not code_lin - n < lin < code_lin + len(code) + 1)  # not writing over the code itself
    ev = run(s, 5)
    if word and ea == 0xFFFF:
        assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.SS if seg_is_ss else Vector.GP, 0,
                                                                0x1000), ev
        return
    assert ev.kind == "halted", ev
    assert s.mem.phys.read(lin, n) == 0xA55A & ((1 << (8 * n)) - 1)
    assert disasm(code)[0].startswith("mov")


def _sym_mov(D: SymbolicDomain, code: bytes, ds: int, ss: int) -> tuple[MachineState, Fault | None]:
    s, _ = symbolic_state(D, "real")
    s.seg_checks = True  # prove the real-mode limit rule too
    s.seg[DS].base, s.seg[SS].base = ds << 4, ss << 4
    insn = decode(code, 16)
    x = Exec(s)
    x.i = insn
    x.next_rip = 0x1000 + insn.length
    try:
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    except Fault as f:
        return s, f
    return s, None


@pytest.mark.parametrize(("code", "base_regs", "disp", "seg_is_ss"), [
    ("89 80 34 12", ("rbx", "rsi"), 0x1234, False),  # mov [bx+si+0x1234], ax
    ("89 43 fe", ("rbp", "rdi"), -2, True),  # mov [bp+di-2], ax
])
def test_symbolic_real_mode_address_formation(code: str, base_regs: tuple[str, str], disp: int,
                                              seg_is_ss: bool) -> None:
    """For ALL register values: the word lands at selector * 16 + ((base + index + disp) mod 2^16), and the
    one faulting path is exactly EA = FFFFH (#GP(0) via DS, #SS(0) via SS; SDM Vol. 3A 22.33.1)."""
    raw = bytes.fromhex(code.replace(" ", ""))
    assert disasm(raw)[0].startswith("mov word ptr [b")
    ds, ss = 0x1234, 0x0F00
    paths = explore(lambda D: _sym_mov(D, raw, ds, ss))
    assert len(paths) == 2
    b, i = (z3.BitVec(n, 64) for n in base_regs)
    ea = z3.Extract(15, 0, b) + z3.Extract(15, 0, i) + z3.BitVecVal(disp & 0xFFFF, 16)
    lin = z3.ZeroExt(48, ea) + z3.BitVecVal((ss if seg_is_ss else ds) << 4, 64)
    ax = z3.Extract(15, 0, z3.BitVec("rax", 64))
    for p in paths:
        s, fault = p.result
        if fault is None:
            arr = s.mem.phys.array
            stored = z3.Concat(z3.Select(arr, lin + 1), z3.Select(arr, lin))
            assert prove(z3.Implies(p.condition, stored == ax)) is None
            assert prove(z3.Implies(p.condition, ea != 0xFFFF)) is None
        else:
            assert (fault.vector, fault.error_code) == (Vector.SS if seg_is_ss else Vector.GP, 0)
            assert prove(p.condition == (ea == 0xFFFF)) is None


def test_bx_si_wraps_at_64k_and_bp_defaults_to_ss() -> None:
    """[BX+SI] with BX + SI > FFFFH wraps (SDM Vol. 1 3.7.5); [BP+d8] uses SS (SDM Vol. 1 3.7.4.1);
    a DS override on [BP] uses DS."""
    assert disasm(bytes.fromhex("8900")) == ["mov word ptr [bx + si], ax"]
    s = real_machine("89 00", rax=0x1234, rbx=0xFFF0, rsi=0x0020)
    set_seg(s, DS, 0x0500)
    assert run(s).kind == "halted"
    assert s.mem.phys.read(0x5010, 2) == 0x1234  # 0500:0010, not 0500:10010

    assert disasm(bytes.fromhex("8946fe")) == ["mov word ptr [bp - 2], ax"]
    s = real_machine("89 46 fe", rax=0xBEEF, rbp=0x0000)
    set_seg(s, SS, 0x0100)
    set_seg(s, DS, 0x0600)
    assert run(s).kind == "halted"
    assert s.mem.phys.read(0x1000 + 0xFFFE, 2) == 0xBEEF  # SS:FFFE = 0x10FFE (d8 = -2 wraps)

    assert disasm(bytes.fromhex("3e894600")) == ["mov word ptr ds:[bp], ax"]
    s = real_machine("3e 89 46 00", rax=0x4242, rbp=0x0010)
    set_seg(s, SS, 0x0600)
    set_seg(s, DS, 0x0300)
    assert run(s).kind == "halted"
    assert s.mem.phys.read(0x3010, 2) == 0x4242


# == A20 (SDM Vol. 3A 20.1.1, 22.33.1: A20M# forces the 8086 wrap at 1 MiB) =====================

HMA = 0x100000


@pytest.mark.parametrize("a20", [True, False])
def test_ffff_0010_lands_above_1mib_or_wraps(a20: bool) -> None:
    """A write through FFFF:0010 reaches linear 100000H; with the A20 gate closed, physical 000000H.

    Also FFFF:FFFF, the highest real-mode byte: 10FFEFH, or FFEFH with A20 masked (SDM Vol. 3A 22.33.1).
    """
    code = "26 c7 06 10 00 cd ab 26 c6 06 ff ff 77"  # mov word es:[0x10], 0xabcd; mov byte es:[0xffff], 0x77
    assert disasm(bytes.fromhex(code.replace(" ", ""))) == ["mov word ptr es:[0x10], 0xabcd",
                                                            "mov byte ptr es:[0xffff], 0x77"]
    s = real_machine(code, pages=(HMA, HMA + 0xF000, 0xF000))
    set_seg(s, ES, 0xFFFF)
    s.a20 = a20
    assert run(s).kind == "halted"
    phys = s.mem.phys
    if a20:
        assert phys.read(HMA, 2) == 0xABCD and phys.read(0, 2) == 0
        assert phys.read(0x10FFEF, 1) == 0x77 and phys.read(0xFFEF, 1) == 0
    else:
        assert phys.read(0, 2) == 0xABCD and phys.read(HMA, 2) == 0
        assert phys.read(0xFFEF, 1) == 0x77 and phys.read(0x10FFEF, 1) == 0


@pytest.mark.parametrize("a20", [True, False])
def test_code_fetch_above_1mib_follows_a20(a20: bool) -> None:
    """Instruction fetch goes through the same gate: CS = FFFF, IP = 0020 is linear 100010H."""
    s = real_machine(b"", cs=0xFFFF, ip=0x0020, hlt=False, pages=(HMA,))
    s.mem.phys.write_bytes(HMA + 0x10, bytes.fromhex("b0 01 f4"))  # mov al, 1; hlt
    s.mem.phys.write_bytes(0x10, bytes.fromhex("b0 02 f4"))  # mov al, 2; hlt
    s.a20 = a20
    assert run(s).kind == "halted"
    assert reg(s, "rax") & 0xFF == (1 if a20 else 2)


def test_a20_masks_protected_mode_without_paging_not_long_mode() -> None:
    """The gate masks physical bit 20 whenever paging is off (a platform signal, not a mode feature);
    in long mode it never applies (the MMU's documented model)."""
    for mode, lands in (("prot32", 0x0), ("long64", HMA)):
        s = flat_machine(mode, bytes.fromhex("c7 00 44 33 22 11 f4"))  # mov dword [eax], 0x11223344
        s.mem.phys.map_page(HMA)
        s.gpr[0] = HMA
        s.a20 = False
        assert run(s).kind == "halted"
        assert s.mem.phys.read(lands, 4) == 0x11223344


# == offset-limit faults (SDM Vol. 3A 20.1.1, 22.33.1) =======================================

def test_32bit_offset_above_ffff_faults() -> None:
    """67-prefixed addressing may form a 32-bit offset; above FFFFH it faults: #GP(0) through DS,
    #SS(0) through SS (SDM Vol. 3A 20.1.1)."""
    assert disasm(bytes.fromhex("67 8b 03".replace(" ", ""))) == ["mov ax, word ptr [ebx]"]
    s = real_machine("67 8b 03", rbx=0xFFFE)
    assert run(s).kind == "halted"  # FFFE..FFFF: inside the limit
    s = real_machine("67 8b 03", rbx=0x10000, rax=0x1111)
    ev = run(s)
    assert (ev.vector, ev.error_code, ev.rip) == (Vector.GP, 0, 0x1000) and reg(s, "rax") == 0x1111
    s = real_machine("67 8b 45 00", rbp=0x1_0000)
    ev = run(s)
    assert (ev.vector, ev.error_code) == (Vector.SS, 0)


def test_stack_wraparound_rules() -> None:
    """SDM Vol. 3A 22.33.1: PUSH with SP = 0 writes at SS:FFFE (no violation); POP of the last word
    (SP = FFFE) wraps SP to 0 without a fault; PUSH of a word with SP = 1 is #SS(0)."""
    s = real_machine("6a 7b", rsp=0)  # push 0x7b
    set_seg(s, SS, 0x0100)
    assert run(s).kind == "halted"
    assert reg(s, "rsp") == 0xFFFE and s.mem.phys.read(0x1000 + 0xFFFE, 2) == 0x7B

    s = real_machine("58", rsp=0xFFFE)  # pop ax
    set_seg(s, SS, 0x0100)
    s.mem.phys.write(0x1000 + 0xFFFE, 2, 0x5150)
    assert run(s).kind == "halted"
    assert reg(s, "rsp") == 0 and reg(s, "rax") & 0xFFFF == 0x5150

    s = real_machine("6a 7b", rsp=1)
    ev = run(s)
    assert (ev.vector, ev.error_code, ev.rip) == (Vector.SS, 0, 0x1000) and reg(s, "rsp") == 1


# == IP: sequential execution and branches at the 64-KiB limit ==============================

def test_sequential_execution_past_ffff_faults() -> None:
    """A one-byte instruction at IP = FFFF ends inside the limit and completes; execution does not wrap
    to IP = 0 (the 8086 did) -- the next fetch, at EIP = 10000H, is beyond CS.limit: #GP(0)
    (386 PRM 14.7 item 8; SDM Vol. 3A 22.33.1: CS accesses crossing FFFFH fault)."""
    s = real_machine(b"\x90", cs=0x0100, ip=0xFFFF, hlt=False)  # NOP at linear 0x10FFF
    s.mem.phys.write_bytes(0x1000, b"\xf4")  # a HLT at CS:0000 must not be reached
    ev = run(s)
    assert (ev.kind, ev.vector, ev.error_code) == ("fault", Vector.GP, 0)
    assert s.rip == 0x10000 and s.icount == 1 and not s.halted


def test_instruction_straddling_the_limit_faults() -> None:
    """An instruction whose bytes run past offset FFFFH is #GP(0) before it executes (SDM Vol. 3A 22.33.1;
    the Pentium Pro/4 note there: instructions crossing the limit fault); one ending at FFFFH runs."""
    s = real_machine(bytes.fromhex("b8 34 12"), cs=0x0100, ip=0xFFFE, hlt=False, rax=0x5555)
    ev = run(s)
    assert (ev.vector, ev.error_code, ev.rip) == (Vector.GP, 0, 0xFFFE) and reg(s, "rax") == 0x5555
    s = real_machine(bytes.fromhex("b8 34 12"), cs=0x0100, ip=0xFFFD, hlt=False, rax=0x5555)
    ev = run(s)
    assert reg(s, "rax") == 0x1234 and (ev.vector, s.rip) == (Vector.GP, 0x10000)


def test_branch_targets_wrap_to_16_bits() -> None:
    """Near branches with a 16-bit operand size truncate the target: EIP <- tempEIP AND FFFFH
    (SDM Vol. 2A JMP/Jcc Operation) -- the way real-mode code legitimately crosses offset 0."""
    assert disasm(bytes.fromhex("eb10"), addr=0xFFF0) == ["jmp 0x10002"]  # capstone does not wrap
    s = real_machine("eb 10", cs=0x0100, ip=0xFFF0, hlt=False)
    s.mem.phys.write_bytes(0x1002, bytes.fromhex("b0 99 f4"))  # CS:0002: mov al, 0x99; hlt
    assert run(s).kind == "halted"
    assert reg(s, "rax") & 0xFF == 0x99 and s.rip == 0x0005


def test_16bit_protected_code_runs_past_ffff_with_a_large_limit() -> None:
    """With a 4-GiB CS limit (prot16 flat), EIP keeps counting past FFFFH in 16-bit code: sequential
    execution is not truncated to 16 bits (only branches are)."""
    s = flat_machine("prot16")
    s.rip = 0xFFFF
    s.mem.phys.map_page(0xF000)
    s.mem.phys.write_bytes(0xFFFF, b"\x90")  # NOP at FFFF, HLT at 10000 (the data page)
    s.mem.phys.write_bytes(0x10000, b"\xf4")
    assert run(s).kind == "halted"
    assert s.rip == 0x10001


# == the 15-byte limit and #UD in real mode ===================================================

@pytest.mark.parametrize("mode", ["real", "prot16"])
def test_instruction_length_limit_16bit(mode: str) -> None:
    """15 bytes (prefixes included) decode; 16 are #GP(0), nothing executed (SDM Vol. 2A 2.3.11)."""
    ok = "26" * 14 + "40"  # 14 x ES: inc ax
    s = flat_machine(mode, bytes.fromhex(ok + "f4"))  # type: ignore[arg-type]
    assert run(s).kind == "halted" and reg(s, "rax") == 1
    s = flat_machine(mode, bytes.fromhex("26" + ok + "f4"))  # type: ignore[arg-type]
    ev = run(s)
    assert (ev.vector, ev.error_code, ev.rip, reg(s, "rax")) == (Vector.GP, 0, 0x1000, 0)

    # A long instruction with its own operand bytes: 66 67 81 /0 SIB disp32 imm32 is 13 bytes.
    body = "66 67 81 84 20 00 60 00 00 78 56 34 12".replace(" ", "")  # add dword [eax*1+0x6000] (SIB), imm32
    assert disasm(bytes.fromhex("2e3e" + body)) == ["add dword ptr ds:[eax + 0x6000], 0x12345678"]
    s = flat_machine(mode, bytes.fromhex("2e3e" + body + "f4"))  # type: ignore[arg-type]
    assert run(s).kind == "halted" and s.mem.phys.read(0x6000, 4) == 0x12345678
    s = flat_machine(mode, bytes.fromhex("262e3e" + body + "f4"))  # type: ignore[arg-type]
    ev = run(s)
    assert (ev.vector, ev.error_code) == (Vector.GP, 0) and s.mem.phys.read(0x6000, 4) == 0


UD_CASES = [
    ("0f0b", "UD2 (SDM Vol. 2B UD)"), ("0fff", "UD0"), ("0fb9c0", "UD1"),
    ("8ec8", "MOV CS, r/m (SDM Vol. 2B MOV: #UD)"), ("8cf0", "MOV r/m, Sreg 6 (reserved encoding)"),
    ("8ef8", "MOV Sreg 7 (reserved)"), ("fed0", "FE /2 (group 4)"), ("fff8", "FF /7 (group 5)"),
    ("c6c800", "C6 /1 (group 11)"), ("8fc8", "8F /1 (group 1A)"), ("8dc3", "LEA with a register source"),
    ("0fb2c3", "LSS with a register source"),
    # LOCK where it is not allowed (SDM Vol. 2B LOCK; Vol. 2A 2.1.1)
    ("f090", "LOCK NOP"), ("f08b07", "LOCK MOV r, m"), ("f08907", "LOCK MOV m, r"),
    ("f03807", "LOCK CMP m, r"), ("f08507", "LOCK TEST m, r"), ("f00fa307", "LOCK BT m, r"),
    ("f00fba2703", "LOCK BT m, imm8"), ("f001c0", "LOCK ADD r, r"), ("f087c1", "LOCK XCHG r, r"),
    ("f00fc1c1", "LOCK XADD r, r"), ("f0f7d0", "LOCK NOT r"), ("f0fec0", "LOCK INC r8"),
    ("f00fabc0", "LOCK BTS r, r"), ("f00fb1c1", "LOCK CMPXCHG r, r"), ("f0a4", "LOCK MOVSB"),
    ("f040", "LOCK INC r16 (40+r has no memory form)"),
]


@pytest.mark.parametrize(("hexcode", "what"), UD_CASES)
def test_invalid_encodings_are_ud_in_real_mode(hexcode: str, what: str) -> None:
    """Reserved and undefined encodings, and misplaced LOCK prefixes, are #UD in real mode; #UD is a
    fault, so nothing changes and IP stays at the instruction."""
    s = real_machine(hexcode, rbx=0x6000, rsi=0x6100, rdi=0x6200, rcx=1)
    before = (list(s.gpr), [g.copy() for g in s.seg], s.mem.phys.read_bytes(0x6000, 0x300))
    ev = run(s)
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.UD, None, 0x1000), what
    assert (list(s.gpr), s.seg, s.mem.phys.read_bytes(0x6000, 0x300)) == before


@pytest.mark.parametrize("hexcode", ["c5f877", "c4e27918c0", "62f1fd48"])
def test_vex_evex_in_real_mode_are_ud(hexcode: str) -> None:
    """VEX/EVEX instructions are #UD in real-address mode (SDM Vol. 2A 2.8 exception tables, "VEX prefix"
    row: Real #UD), and so are LES/LDS/BOUND register forms on a processor without them -- either way #UD."""
    ev = run(real_machine(hexcode))
    assert (ev.kind, ev.vector) == ("fault", Vector.UD)


# == LOCK with memory destinations is valid in real mode (SDM Vol. 2B LOCK) =====================

# (hexcode of the [BX]-destination form, expected capstone text)
LOCKABLE = [
    ("0107", "add word ptr [bx], ax"), ("1107", "adc word ptr [bx], ax"), ("2107", "and word ptr [bx], ax"),
    ("0907", "or word ptr [bx], ax"), ("1907", "sbb word ptr [bx], ax"), ("2907", "sub word ptr [bx], ax"),
    ("3107", "xor word ptr [bx], ax"), ("800705", "add byte ptr [bx], 5"), ("81073412", "add word ptr [bx], 0x1234"),
    ("8337fb", "xor word ptr [bx], 0xfffb"), ("0fbb07", "btc word ptr [bx], ax"), ("0fb307", "btr word ptr [bx], ax"),
    ("0fab07", "bts word ptr [bx], ax"), ("0fba3f03", "btc word ptr [bx], 3"), ("0fba3703", "btr word ptr [bx], 3"),
    ("0fba2f03", "bts word ptr [bx], 3"), ("0fb10f", "cmpxchg word ptr [bx], cx"),
    ("0fb00f", "cmpxchg byte ptr [bx], cl"), ("0fc70f", "cmpxchg8b qword ptr [bx]"),
    ("ff0f", "dec word ptr [bx]"), ("ff07", "inc word ptr [bx]"), ("fe0f", "dec byte ptr [bx]"),
    ("fe07", "inc byte ptr [bx]"), ("f71f", "neg word ptr [bx]"), ("f717", "not word ptr [bx]"),
    ("f61f", "neg byte ptr [bx]"), ("0fc10f", "xadd word ptr [bx], cx"), ("0fc00f", "xadd byte ptr [bx], cl"),
    ("870f", "xchg word ptr [bx], cx"), ("860f", "xchg byte ptr [bx], cl"),
]


@pytest.mark.parametrize(("hexcode", "text"), LOCKABLE)
def test_lock_rmw_with_memory_destination(hexcode: str, text: str) -> None:
    """LOCK on a read-modify-write with a memory destination runs, with exactly the effect of the
    unlocked instruction (a single-CPU model has nothing else to lock), in real mode and with 66/67."""
    assert disasm(bytes.fromhex("f0" + hexcode)) == ["lock " + text]
    regs = {"rax": 0x8001, "rbx": 0x6000, "rcx": 0x1357, "rdx": 0x2468}
    init = bytes.fromhex("0f f0 0f f0 aa 55 aa 55")
    states = []
    for pfx in ("", "f0"):
        s = real_machine(pfx + hexcode, **regs)
        s.mem.phys.write_bytes(0x6000, init)
        ev = run(s)
        assert ev.kind == "halted", (pfx, ev)
        states.append((list(s.gpr), s.D.concrete(s.read_rflags()), s.mem.phys.read_bytes(0x6000, 8), s.rip))
    assert states[0][0] == states[1][0] and states[0][1:3] == states[1][1:3]
    assert states[1][3] == states[0][3] + 1
    # The same with an operand-size prefix where the form has one (the LOCK may come first or after).
    if not hexcode.startswith(("80", "81", "86", "fe", "f6", "0fb0", "0fc0", "0fc7")):  # byte/imm16 forms
        s = real_machine("66 f0" + hexcode, **regs)
        s.mem.phys.write_bytes(0x6000, init)
        assert run(s).kind == "halted"


# == far-pointer loads and segment arithmetic in real mode ==================================

def test_lds_les_and_far_pointer_normalisation() -> None:
    """LES/LDS load selector * 16 bases (SDM Vol. 3A 20.1.1); two far pointers naming one linear address
    (0100:1234 and 0223:0004) reach the same byte."""
    code = "c4 3e 00 60 26 c6 05 5a c5 36 04 60 80 3c 5a 0f 94 c0"
    assert disasm(bytes.fromhex(code.replace(" ", ""))) == [
        "les di, ptr [0x6000]", "mov byte ptr es:[di], 0x5a", "lds si, ptr [0x6004]",
        "cmp byte ptr [si], 0x5a", "sete al"]
    s = real_machine(code)
    s.mem.phys.write_bytes(0x6000, bytes.fromhex("3412 0001 0400 2302"))
    assert run(s).kind == "halted"
    assert s.seg[ES].base == 0x1000 and s.seg[DS].base == 0x2230
    assert s.mem.phys.read(0x2234, 1) == 0x5A and reg(s, "rax") & 0xFF == 1


# == a BIOS/boot-style real-mode guest =======================================================

def assemble(program: list[tuple[str, str | None]], origin: int = 0, bits: int = 16) -> tuple[bytes, dict[str, int]]:
    """Lay out a hand-assembled program and check every instruction with capstone.

    ``program`` is ``[(hex, asm)]``; ``hex`` may hold ``{rel8:L}``, ``{rel16:L}``, ``{rel32:L}`` (a
    displacement to label ``L`` from the end of the instruction) or ``{abs16:L}``/``{abs32:L}`` (the
    label's address); a row ``("L:", "")`` defines label ``L``.  ``asm`` is the text capstone must
    print, with ``{L}`` standing for the label's address in hex (``None``: data bytes).  Nothing is encoded for you: the
    bytes are the ones written here.
    """
    widths = {"rel8": 1, "rel16": 2, "rel32": 4, "abs16": 2, "abs32": 4}
    labels: dict[str, int] = {}
    addr = origin
    for hx, _asm in program:
        if hx.endswith(":"):
            labels[hx[:-1]] = addr
            continue
        fixed = re.sub(r"\{\w+:\w+\}", "", hx).replace(" ", "")
        addr += len(fixed) // 2 + sum(widths[k] for k in re.findall(r"\{(\w+):\w+\}", hx))
    out = bytearray()
    addr = origin
    for hx, asm in program:
        if hx.endswith(":"):
            continue
        parts = re.split(r"(\{\w+:\w+\})", hx)
        size = sum(len(p.replace(" ", "")) // 2 if not p.startswith("{") else widths[p[1:].split(":")[0]]
                   for p in parts)
        end = addr + size
        enc = bytearray()
        for p in parts:
            if not p.startswith("{"):
                enc += bytes.fromhex(p.replace(" ", ""))
                continue
            kind, label = p[1:-1].split(":")
            n = widths[kind]
            v = labels[label] - end if kind.startswith("rel") else labels[label]
            enc += (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        if asm is not None:  # None: data bytes, not an instruction
            want = asm.format(**{k: hex(v) for k, v in labels.items()})
            got = disasm(bytes(enc), bits, addr)
            assert got == [want], f"{hx!r} at {addr:#x}: capstone says {got}, the listing says {want!r}"
        out += enc
        addr = end
    return bytes(out), labels


CODE_SEG = 0x0100  # CS = DS: code at linear 1000H, data at offset 0400H
DATA_OFF = 0x0400
STACK_SEG, STACK_TOP = 0x0700, 0x1000  # SS:SP = 0700:1000 (linear 8000H)
BUF_SEG = 0x0500
VIDEO = 0xB8000
ATTR = 0x1F

MSG, MSG2, HEXDIGITS, VIDEO_PTR, TABLE_PTR = 0x400, 0x404, 0x408, 0x418, 0x41C
RESULT, NORM_PTR, CHECKSUM, NUMBERS, SQUARES, BLOCK = 0x420, 0x422, 0x426, 0x430, 0x440, 0x450
BCD_NUMBERS = (0x1234, 0x5678, 0x0999, 0x0001)
BLOCK_DATA = bytes(range(0x30, 0x40))  # 16 bytes copied with CS: REP MOVSW
FAR_PTR = (0x1234, CODE_SEG)  # normalised by the guest

BIOS_GUEST = [
    ("fa", "cli"),
    ("b8 00 07", "mov ax, 0x700"),
    ("8e d0", "mov ss, ax"),
    ("bc 00 10", "mov sp, 0x1000"),
    ("8c c8", "mov ax, cs"),
    ("8e d8", "mov ds, ax"),
    ("fc", "cld"),
    # far pointers: ES:DI -> text screen, DS:SI -> the BCD table (DS reloaded through the pointer)
    ("c4 3e 18 04", "les di, ptr [0x418]"),
    ("c5 36 1c 04", "lds si, ptr [0x41c]"),
    # packed-BCD sum of four words: ADD/ADC + DAA per byte
    ("31 d2", "xor dx, dx"),
    ("b9 04 00", "mov cx, 4"),
    ("sum_loop:", ""),
    ("ac", "lodsb al, byte ptr [si]"),
    ("00 d0", "add al, dl"),
    ("27", "daa"),
    ("88 c2", "mov dl, al"),
    ("ac", "lodsb al, byte ptr [si]"),
    ("10 f0", "adc al, dh"),
    ("27", "daa"),
    ("88 c6", "mov dh, al"),
    ("e2 {rel8:sum_loop}", "loop {sum_loop}"),
    ("89 16 20 04", "mov word ptr [0x420], dx"),
    # "SUM=" then the four digits
    ("be 00 04", "mov si, 0x400"),
    ("b4 1f", "mov ah, 0x1f"),
    ("b9 04 00", "mov cx, 4"),
    ("msg_loop:", ""),
    ("ac", "lodsb al, byte ptr [si]"),
    ("ab", "stosw word ptr es:[di], ax"),
    ("e2 {rel8:msg_loop}", "loop {msg_loop}"),
    ("52", "push dx"),
    ("e8 {rel16:print_bcd}", "call {print_bcd}"),
    ("5a", "pop dx"),
    # " N=" then the sum of squares 0..4 from a CS-relative table (XLAT with a CS override), via AAM
    ("be 04 04", "mov si, 0x404"),
    ("b9 03 00", "mov cx, 3"),
    ("msg2_loop:", ""),
    ("ac", "lodsb al, byte ptr [si]"),
    ("ab", "stosw word ptr es:[di], ax"),
    ("e2 {rel8:msg2_loop}", "loop {msg2_loop}"),
    ("bb 40 04", "mov bx, 0x440"),
    ("31 d2", "xor dx, dx"),
    ("b9 05 00", "mov cx, 5"),
    ("sq_loop:", ""),
    ("88 c8", "mov al, cl"),
    ("fe c8", "dec al"),
    ("2e d7", "xlatb"),
    ("00 c2", "add dl, al"),
    ("e2 {rel8:sq_loop}", "loop {sq_loop}"),
    ("88 d0", "mov al, dl"),
    ("d4 0a", "aam 0xa"),
    ("0d 30 30", "or ax, 0x3030"),
    ("89 c3", "mov bx, ax"),
    ("88 f8", "mov al, bh"),
    ("b4 1f", "mov ah, 0x1f"),
    ("ab", "stosw word ptr es:[di], ax"),
    ("88 d8", "mov al, bl"),
    ("ab", "stosw word ptr es:[di], ax"),
    # copy 8 words CS:0450 -> 0500:0000 with DS = 0, so only the CS override finds the source
    ("06", "push es"),
    ("57", "push di"),
    ("31 c0", "xor ax, ax"),
    ("8e d8", "mov ds, ax"),
    ("b8 00 05", "mov ax, 0x500"),
    ("8e c0", "mov es, ax"),
    ("31 ff", "xor di, di"),
    ("be 50 04", "mov si, 0x450"),
    ("b9 08 00", "mov cx, 8"),
    ("2e f3 a5", "rep movsw word ptr es:[di], word ptr cs:[si]"),
    ("0e", "push cs"),
    ("1f", "pop ds"),
    ("5f", "pop di"),
    ("07", "pop es"),
    # segment arithmetic: normalise the far pointer 0100:1234 -> 0223:0004
    ("b8 34 12", "mov ax, 0x1234"),
    ("89 c2", "mov dx, ax"),
    ("b1 04", "mov cl, 4"),
    ("d3 e8", "shr ax, cl"),
    ("8c cb", "mov bx, cs"),
    ("01 d8", "add ax, bx"),
    ("83 e2 0f", "and dx, 0xf"),
    ("89 16 22 04", "mov word ptr [0x422], dx"),
    ("a3 24 04", "mov word ptr [0x424], ax"),
    # checksum(ptr = 0450, len = 16): a Pascal-style callee with ENTER/LEAVE and RET imm16
    ("6a 10", "push 0x10"),
    ("68 50 04", "push 0x450"),
    ("e8 {rel16:checksum}", "call {checksum}"),
    ("a3 26 04", "mov word ptr [0x426], ax"),
    ("f4", "hlt"),
    # print_bcd: DX = four packed-BCD digits -> ES:DI (char, attribute); PUSHA/POPA keep every register
    ("print_bcd:", ""),
    ("60", "pushaw"),
    ("bb 08 04", "mov bx, 0x408"),
    ("b9 04 00", "mov cx, 4"),
    ("digit_loop:", ""),
    ("c1 c2 04", "rol dx, 4"),
    ("88 d0", "mov al, dl"),
    ("24 0f", "and al, 0xf"),
    ("d7", "xlatb"),
    ("b4 1f", "mov ah, 0x1f"),
    ("ab", "stosw word ptr es:[di], ax"),
    ("e2 {rel8:digit_loop}", "loop {digit_loop}"),
    ("61", "popaw"),
    ("83 c7 08", "add di, 8"),
    ("c3", "ret"),
    # checksum: ENTER with nesting level 1 (a display of one frame pointer), a local at [BP-4] (SS)
    ("checksum:", ""),
    ("c8 04 00 01", "enter 4, 1"),
    ("56", "push si"),
    ("51", "push cx"),
    ("8b 76 04", "mov si, word ptr [bp + 4]"),
    ("8b 4e 06", "mov cx, word ptr [bp + 6]"),
    ("c7 46 fc 00 00", "mov word ptr [bp - 4], 0"),
    ("ck_loop:", ""),
    ("ac", "lodsb al, byte ptr [si]"),
    ("30 e4", "xor ah, ah"),
    ("01 46 fc", "add word ptr [bp - 4], ax"),
    ("e2 {rel8:ck_loop}", "loop {ck_loop}"),
    ("8b 46 fc", "mov ax, word ptr [bp - 4]"),
    ("59", "pop cx"),
    ("5e", "pop si"),
    ("c9", "leave"),
    ("c2 04 00", "ret 4"),
]


def bios_data() -> bytes:
    """The guest's data area (offset 0400H of its segment)."""
    d = bytearray(0x60)

    def put(off: int, b: bytes) -> None:
        d[off - DATA_OFF: off - DATA_OFF + len(b)] = b

    put(MSG, b"SUM=")
    put(MSG2, b" N=")
    put(HEXDIGITS, b"0123456789ABCDEF")
    put(VIDEO_PTR, (0).to_bytes(2, "little") + (VIDEO >> 4).to_bytes(2, "little"))
    put(TABLE_PTR, NUMBERS.to_bytes(2, "little") + CODE_SEG.to_bytes(2, "little"))
    put(NUMBERS, b"".join(n.to_bytes(2, "little") for n in BCD_NUMBERS))
    put(SQUARES, bytes(k * k for k in range(16)))
    put(BLOCK, BLOCK_DATA)
    return bytes(d)


def test_bios_guest_program() -> None:
    """A boot-style program: segment set-up, LES/LDS, a DAA-based BCD sum printed through XLAT into
    text-mode video memory, AAM, CS-overridden XLAT and REP MOVSW, PUSHA/POPA, ENTER/LEAVE, far-pointer
    normalisation -- run to HLT on the spec CPU, its final state checked against values computed here."""
    code, labels = assemble(BIOS_GUEST)
    assert len(code) <= DATA_OFF
    base = CODE_SEG << 4
    s = real_machine(b"", cs=CODE_SEG, ip=0, hlt=False, pages=(VIDEO,), rsp=0xDEAD, rbp=0x7777)
    s.mem.phys.write_bytes(base, code)
    s.mem.phys.write_bytes(base + DATA_OFF, bios_data())
    ev = run(s, 5000)
    assert ev.kind == "halted", ev.describe()
    assert s.rip == labels["print_bcd"]  # just past the HLT

    # -- what the program computes, by plain Python ----------------------------------------
    bcd_sum = sum(int(f"{n:x}") for n in BCD_NUMBERS) % 10000  # 1234 + 5678 + 999 + 1
    sq = sum(k * k for k in range(5))
    text = f"SUM={bcd_sum:04d} N={sq // 10}{sq % 10}"
    checksum = sum(BLOCK_DATA)
    lin = (FAR_PTR[1] << 4) + FAR_PTR[0]
    phys = s.mem.phys

    assert phys.read(base + RESULT, 2) == int(str(bcd_sum), 16)  # stored as packed BCD
    video = phys.read_bytes(VIDEO, 2 * len(text))
    assert video == b"".join(bytes([ord(c), ATTR]) for c in text)
    assert phys.read_bytes(BUF_SEG << 4, len(BLOCK_DATA)) == BLOCK_DATA
    assert (phys.read(base + NORM_PTR, 2), phys.read(base + NORM_PTR + 2, 2)) == (lin & 0xF, lin >> 4)
    assert phys.read(base + CHECKSUM, 2) == checksum

    # registers and segments at HLT
    assert [s.seg[k].selector for k in (ES, CS, SS, DS)] == [VIDEO >> 4, CODE_SEG, STACK_SEG, CODE_SEG]
    assert [s.seg[k].base for k in (ES, CS, SS, DS)] == [VIDEO, base, STACK_SEG << 4, base]
    assert reg(s, "rsp") == STACK_TOP  # every push popped, RET 4 released the arguments
    assert reg(s, "rdi") == 2 * len(text)  # POPA restored DI, print_bcd then advanced it by 8
    assert reg(s, "rax") == checksum
    assert reg(s, "rbp") == 0x7777  # LEAVE restored the caller's BP
    assert reg(s, "rdx") == lin & 0xF and reg(s, "rbx") == CODE_SEG
    assert reg(s, "rcx") == 4  # CL = 4 from the shift count; the callee saved/restored CX
    assert reg(s, "rsi") == BLOCK + len(BLOCK_DATA)
    # ENTER 4,1 left its display (the new frame pointer) at [BP-2] in the stack segment
    ss_base = STACK_SEG << 4
    frame = STACK_TOP - 4 - 2 - 2  # two arguments, the return address, the saved BP
    assert phys.read(ss_base + frame, 2) == 0x7777  # saved BP
    assert phys.read(ss_base + frame - 2, 2) == frame  # the display entry = FrameTemp
    assert not s.rflags_sys & (1 << F.IF) and not s.rflags_sys & (1 << F.DF)


# == real mode -> 32-bit protected mode ======================================================

PM_GDT = 0x0800
PM_GUEST = [
    ("fa", "cli"),
    ("31 c0", "xor ax, ax"),
    ("8e d8", "mov ds, ax"),
    ("0f 01 16 {abs16:gdt_desc}", "lgdt [{gdt_desc}]"),
    ("0f 20 c0", "mov eax, cr0"),
    ("66 83 c8 01", "or eax, 1"),
    ("0f 22 c0", "mov cr0, eax"),
    ("66 ea {abs32:pm32} 08 00", "ljmp 8:{pm32}"),
    ("gdt_desc:", ""),
    ("17 00 00 08 00 00", None),  # data: the pseudo-descriptor (limit 0017H, base 00000800H)
    ("pm32:", ""),
]
PM_GUEST32 = [
    ("66 b8 10 00", "mov ax, 0x10"),
    ("8e d8", "mov ds, eax"),
    ("8e c0", "mov es, eax"),
    ("8e d0", "mov ss, eax"),
    ("bc 00 70 00 00", "mov esp, 0x7000"),
    ("b9 64 00 00 00", "mov ecx, 0x64"),
    ("31 c0", "xor eax, eax"),
    ("loop32:", ""),
    ("01 c8", "add eax, ecx"),
    ("e2 {rel8:loop32}", "loop {loop32}"),
    ("a3 00 00 10 00", "mov dword ptr [0x100000], eax"),
    ("50", "push eax"),
    ("bf 04 00 10 00", "mov edi, 0x100004"),
    ("b9 04 00 00 00", "mov ecx, 4"),
    ("f3 ab", "rep stosd dword ptr es:[edi], eax"),
    ("5b", "pop ebx"),
    ("f4", "hlt"),
]


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """A GDT descriptor from its fields (SDM Vol. 3A Figure 3-8), independent of the spec's helpers."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | (base >> 24) << 56)


def test_real_to_protected_mode_switch() -> None:
    """The classic switch: LGDT, set CR0.PE, far JMP to a 32-bit code segment, load the data segments,
    run 32-bit code (a loop, a store above 1 MiB, REP STOSD), HLT (SDM Vol. 3A 9.9.1 steps 1-8)."""
    code16, labels = assemble(PM_GUEST, origin=0x1000)
    pm32 = labels["pm32"]
    code32, _ = assemble(PM_GUEST32, origin=pm32, bits=32)
    code = code16 + code32
    gdt = [0, gdt_entry(0, 0xFFFFF, 0x9A, 0xC), gdt_entry(0, 0xFFFFF, 0x92, 0xC)]
    assert code16[labels["gdt_desc"] - 0x1000:][:6] == (23).to_bytes(2, "little") + PM_GDT.to_bytes(4, "little")
    s = real_machine(code, hlt=False, pages=(0x100000,))
    for k, d in enumerate(gdt):
        s.mem.phys.write(PM_GDT + 8 * k, 8, d)
    ev = run(s, 1000)
    assert ev.kind == "halted", ev.describe()
    total = sum(range(1, 101))
    assert s.cr0 & CR0_PE and s.code_bits == 32
    assert (s.gdtr.base, s.gdtr.limit) == (PM_GDT, 23)
    cs = s.seg[CS]
    assert (cs.selector, cs.base, cs.limit, cs.db) == (0x08, 0, 0xFFFF_FFFF, 1)
    for k in (DS, ES, SS):
        assert (s.seg[k].selector, s.seg[k].base, s.seg[k].limit, s.seg[k].db) == (0x10, 0, 0xFFFF_FFFF, 1)
    assert s.mem.phys.read(0x100000, 4) == total
    assert [s.mem.phys.read(0x100004 + 4 * k, 4) for k in range(4)] == [total] * 4
    assert reg(s, "rax") == total and reg(s, "rbx") == total and reg(s, "rsp") == 0x7000
    assert reg(s, "rdi") == 0x100014 and reg(s, "rcx") == 0
    # The descriptor loads set the accessed bits in the GDT (SDM Vol. 3A 3.4.5.1).
    assert all(s.mem.phys.read(PM_GDT + 8 * k + 5, 1) & 1 for k in (1, 2))
