"""Near control transfers (spec/isa/control.py): JMP, Jcc, CALL, RET, LOOP/LOOPE/LOOPNE, JrCXZ.

Branch targets are checked against iced-x86 decoding the same bytes with its AMD option (the
spec's default vendor: 66 gives a 16-bit operand size for near branches in 64-bit mode, APM
Vol. 3 1.2.5), which computes the target independently, truncation to 16 bits included.  The
fault rules (CS limit outside 64-bit mode, canonical check in it, SDM Vol. 2A JMP/CALL, Vol. 2B
RET exception lists; SDM Vol. 1 6.3.7) are written here as plain-int references.
"""

from __future__ import annotations

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, DecoderOptions, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Vector
from spec.isa.control import is_canonical
from spec.machine import BITS, CODE, STACK_TOP, flat_machine
from spec.state import MachineState
from spec.symexec import run_symbolic

M64 = (1 << 64) - 1
CS = 1
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
STACK_BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}
OPSIZES = {"real": (16, 32), "prot16": (16, 32), "prot32": (32, 16), "long64": (64, 16)}
ADDRSIZES = {"real": (16, 32), "prot16": (16, 32), "prot32": (32, 16), "long64": (64, 32)}
MODES = ("real", "prot16", "prot32", "long64")
_FMT = Formatter(FormatterSyntax.INTEL)


def mask(w: int) -> int:
    return (1 << w) - 1


def machine(mode: str, code: bytes | str, *, flags: int | None = None, cs_limit: int | None = None,
            **regs: int) -> MachineState:
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    for name, v in regs.items():
        s.gpr[GPR.index(name)] = v & M64
    if flags is not None:
        s.write_rflags(flags | 2)
    if cs_limit is not None:
        seg = s.seg[CS].copy()
        seg.limit = cs_limit
        s.seg[CS] = seg
    return s


def step(s: MachineState) -> StopEvent | None:
    return SpecCPU(s).step()


def r(s: MachineState, name: str) -> int:
    return s.D.concrete(s.gpr[GPR.index(name)])


def iced(mode: str, code: bytes) -> tuple[int, str, int]:
    """(length, Intel-syntax text, near-branch target) as iced-x86 decodes ``code`` at CODE (AMD rules)."""
    d = Decoder(BITS[mode], code, DecoderOptions.AMD, ip=CODE)
    i = d.decode()
    return i.len, _FMT.format(i), i.near_branch_target


def expect_transfer(s: MachineState, mode: str, target: int, ev: StopEvent | None) -> bool:
    """Check ``ev`` against the fault rules for ``target``; True if the branch was taken without fault."""
    if mode == "long64":
        ok = target >> 47 in (0, 0x1FFFF)  # SDM Vol. 1 3.3.7.1, 48-bit linear addresses
    else:
        ok = target <= s.seg[CS].limit  # SDM Vol. 2A JMP: #GP(0) beyond the CS limit
    if ok:
        assert ev is None, ev
        assert s.rip == target
    else:
        assert ev is not None and (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", Vector.GP, 0, CODE)
        assert s.rip == CODE
    return ok


# -- relative encodings ----------------------------------------------------------------------------

def rel_code(prefix: bytes, opcode: bytes, disp: int, width: int) -> bytes:
    return prefix + opcode + (disp & mask(width)).to_bytes(width // 8, "little")


def z_width(opsize: int) -> int:
    return 16 if opsize == 16 else 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p66", [False, True])
@pytest.mark.parametrize("form", ["rel8", "relz"])
@given(disp=st.integers(-(1 << 31), (1 << 31) - 1), limit=st.sampled_from([None, 0x1FFF, 0xFFFF]))
@settings(max_examples=30)
def test_jmp_relative(mode: str, p66: bool, form: str, disp: int, limit: int | None) -> None:
    """JMP rel8 (EB) / rel16 / rel32 (E9): target = next IP + disp, truncated to the operand size;
    #GP(0) beyond CS.limit (real and protected mode) or if non-canonical (64-bit mode)."""
    opsize = OPSIZES[mode][p66]
    width = 8 if form == "rel8" else z_width(opsize)
    disp = (disp & mask(width)) - ((disp & (1 << (width - 1))) << 1)
    code = rel_code(b"\x66" if p66 else b"", b"\xeb" if form == "rel8" else b"\xe9", disp, width)
    length, text, target = iced(mode, code)
    assert length == len(code) and "jmp" in text
    s = machine(mode, code, cs_limit=limit if mode != "long64" else None)
    assert target == (CODE + len(code) + disp) & mask(opsize)
    expect_transfer(s, mode, target, step(s))


@pytest.mark.parametrize(("mode", "hexcode", "target"), [
    ("real", "e900e0", 0xF003),          # IP wraps inside 64 KiB
    ("prot16", "e900e0", 0xF003),
    ("prot32", "66e900e0", 0xF004),      # 16-bit operand size: EIP = (EIP + rel16) AND FFFFH
    ("prot32", "66eb80", 0x0F83),
    ("long64", "66e900e0", 0xF004),      # AMD: 66 selects 16-bit near branches in 64-bit mode
    ("long64", "66e8f0ef", 0xFFF4),
    ("prot32", "66e8f0ef", 0xFFF4),
    ("real", "e8f0ef", 0xFFF3),
])
def test_near_branch_truncation(mode: str, hexcode: str, target: int) -> None:
    """A 16-bit operand size truncates the target to 16 bits (SDM Vol. 2A JMP/CALL Operation)."""
    code = bytes.fromhex(hexcode)
    assert iced(mode, code)[2] == target and iced(mode, code)[0] == len(code)
    s = machine(mode, code)
    assert step(s) is None
    assert s.rip == target


def test_real_mode_32bit_jump_beyond_limit() -> None:
    """Real mode, 66 E9 rel32 past 0xFFFF: #GP(0) (SDM Vol. 2A JMP "Real-Address Mode Exceptions")."""
    s = machine("real", "66e900000100")
    ev = step(s)
    assert ev is not None and (ev.vector, ev.error_code, ev.rip) == (Vector.GP, 0, CODE)


# -- JMP / CALL indirect -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p66", [False, True])
@given(target=st.one_of(st.integers(0, M64), st.sampled_from([0x7FFF_FFFF_FFFF, 0x8000_0000_0000,
                                                               0xFFFF_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF])))
@settings(max_examples=30)
def test_jmp_indirect_register(mode: str, p66: bool, target: int) -> None:
    """JMP r/m (FF /4): the operand-size register is the target; non-canonical #GP(0) in 64-bit mode,
    with RIP at the JMP (SDM Vol. 2A JMP "64-Bit Mode Exceptions")."""
    code = bytes.fromhex(("66" if p66 else "") + "ffe0")
    assert iced(mode, code)[0] == len(code)
    opsize = OPSIZES[mode][p66]
    s = machine(mode, code, rax=target)
    expect_transfer(s, mode, target & mask(opsize), step(s))


@pytest.mark.parametrize("mode", MODES)
def test_jmp_indirect_memory(mode: str) -> None:
    """JMP m: the operand-size value at the address is the target."""
    opsize = OPSIZES[mode][0]
    code = "ff27" if BITS[mode] == 16 else "ff23"  # jmp [bx] / jmp [ebx] / jmp [rbx]
    s = machine(mode, code, rbx=0x2000)
    s.mem.phys.write(0x2000, 8, 0x0000_0000_0000_5678 | 0x1234_0000_0000_0000)
    expect_transfer(s, mode, 0x1234_0000_0000_5678 & mask(opsize), step(s))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p66", [False, True])
@given(disp=st.integers(-0x800, 0x6000))
@settings(max_examples=15)
def test_call_relative(mode: str, p66: bool, disp: int) -> None:
    """CALL rel (E8): push the next IP at the operand size, then jump (SDM Vol. 2A CALL)."""
    opsize = OPSIZES[mode][p66]
    n = opsize // 8
    code = rel_code(b"\x66" if p66 else b"", b"\xe8", disp, z_width(opsize))
    length, text, target = iced(mode, code)
    assert length == len(code) and "call" in text
    s = machine(mode, code)
    assert step(s) is None
    assert s.rip == target
    assert r(s, "rsp") == STACK_TOP - n
    assert s.mem.phys.read(STACK_TOP - n, n) == CODE + len(code)


@pytest.mark.parametrize("mode", MODES)
def test_call_indirect_rsp_uses_old_value(mode: str) -> None:
    """CALL [rSP]: the target is read before the return address is pushed (SDM Vol. 2A CALL)."""
    opsize = OPSIZES[mode][0]
    n = opsize // 8
    code = {"real": "67ff1424", "prot16": "67ff1424", "prot32": "ff1424", "long64": "ff1424"}[mode]
    assert iced(mode, bytes.fromhex(code))[0] == len(code) // 2
    s = machine(mode, code, rsp=STACK_TOP - 8)
    s.mem.phys.write(STACK_TOP - 8, 8, 0x3000)
    assert step(s) is None
    assert s.rip == 0x3000
    assert s.mem.phys.read(STACK_TOP - 8 - n, n) == CODE + len(code) // 2


@pytest.mark.parametrize("target", [0x0000_8000_0000_0000, 0x1234_5678_9ABC_DEF0])
def test_call_non_canonical_pushes_nothing(target: int) -> None:
    """CALL to a non-canonical target: #GP(0) at the CALL, stack untouched (SDM Vol. 2A CALL)."""
    s = machine("long64", "ffd0", rax=target)
    ev = step(s)
    assert ev is not None and (ev.vector, ev.error_code, ev.rip) == (Vector.GP, 0, CODE)
    assert r(s, "rsp") == STACK_TOP and s.mem.phys.read(STACK_TOP - 8, 8) == 0


def test_call_beyond_cs_limit() -> None:
    s = machine("prot32", "e800100000", cs_limit=0x1FFF)  # target 0x2005
    ev = step(s)
    assert ev is not None and (ev.vector, ev.error_code) == (Vector.GP, 0)
    assert r(s, "rsp") == STACK_TOP


# -- RET ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p66", [False, True])
@pytest.mark.parametrize("imm", [None, 0, 8, 0xFFFE])
@given(ret=st.integers(0, M64))
@settings(max_examples=10)
def test_ret(mode: str, p66: bool, imm: int | None, ret: int) -> None:
    """RET / RET imm16: pop the return address (operand size, truncated), check it, then add imm16 to
    rSP at the stack address size (SDM Vol. 2B RET)."""
    opsize = OPSIZES[mode][p66]
    n = opsize // 8
    sw = STACK_BITS[mode]
    code = ("66" if p66 else "") + ("c3" if imm is None else "c2" + imm.to_bytes(2, "little").hex())
    assert iced(mode, bytes.fromhex(code))[0] == len(code) // 2
    s = machine(mode, code, rsp=STACK_TOP - 16)
    s.mem.phys.write(STACK_TOP - 16, 8, ret)
    ev = step(s)
    if expect_transfer(s, mode, ret & mask(opsize), ev):
        assert r(s, "rsp") == (STACK_TOP - 16 + n + (imm or 0)) & mask(sw)
    else:
        assert r(s, "rsp") == STACK_TOP - 16


def test_ret_16bit_stack_wraps() -> None:
    """RET imm16 on a 16-bit stack: SP wraps and ESP[31:16] is untouched."""
    s = machine("prot16", "c20400", rsp=0x5555_FFFE)
    s.mem.phys.map_page(0xF000)
    s.mem.phys.write(0xFFFE, 2, 0x1234)
    assert step(s) is None
    assert s.rip == 0x1234 and r(s, "rsp") == 0x5555_0004


# -- Jcc -------------------------------------------------------------------------------------------------

def cond_ref(cc: int, fl: int) -> bool:
    """SDM Vol. 1 Appendix B Table B-1, from the RFLAGS bits as plain ints."""
    cf, pf, zf, sf, of = ((fl >> b) & 1 for b in (F.CF, F.PF, F.ZF, F.SF, F.OF))
    base = [of, cf, zf, cf | zf, sf, pf, sf ^ of, zf | (sf ^ of)][cc >> 1]
    return bool(base ^ (cc & 1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cc", range(16))
@given(flags=st.integers(0, 0xFFF), p66=st.booleans(), long_form=st.booleans(), disp=st.integers(-0x80, 0x7F))
@settings(max_examples=15)
def test_jcc(mode: str, cc: int, flags: int, p66: bool, long_form: bool, disp: int) -> None:
    """Jcc rel8 (70+cc) and rel16/32 (0F 80+cc): taken iff the condition holds (SDM Vol. 2A Jcc)."""
    fl = flags & F.STATUS_MASK
    opsize = OPSIZES[mode][p66]
    pfx = b"\x66" if p66 else b""
    if long_form:
        code = rel_code(pfx, bytes([0x0F, 0x80 + cc]), disp, z_width(opsize))
    else:
        code = rel_code(pfx, bytes([0x70 + cc]), disp, 8)
    length, _, target = iced(mode, code)
    assert length == len(code)
    assert decode(code, BITS[mode]).name == "J" + ("O NO B AE E NE BE A S NS P NP L GE LE G".split()[cc])
    s = machine(mode, code, flags=fl)
    ev = step(s)
    assert ev is None
    assert s.rip == (target if cond_ref(cc, fl) else CODE + len(code))


def test_jcc_not_taken_does_not_check_target() -> None:
    """The limit check applies only to a taken branch (SDM Vol. 2A Jcc Operation)."""
    s = machine("prot32", "0f8400100000", cs_limit=0x1FFF, flags=0)  # JE, ZF = 0
    assert step(s) is None and s.rip == CODE + 6
    s = machine("prot32", "0f8400100000", cs_limit=0x1FFF, flags=1 << F.ZF)
    ev = step(s)
    assert ev is not None and ev.vector == Vector.GP


# -- LOOP family and JrCXZ ----------------------------------------------------------------------------------

LOOPS = {"LOOPNE": 0xE0, "LOOPE": 0xE1, "LOOP": 0xE2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LOOPS))
@pytest.mark.parametrize("p67", [False, True])
@given(count=st.one_of(st.integers(0, M64), st.sampled_from([0, 1, 2, 0x1_0000, 0x1_0001, 0x1_0000_0001])),
       zf=st.booleans(), p66=st.booleans())
@settings(max_examples=15)
def test_loop(mode: str, name: str, p67: bool, count: int, zf: bool, p66: bool) -> None:
    """LOOP/LOOPE/LOOPNE: decrement CX/ECX/RCX (by the address size: 67 switches it), branch if the count
    is non-zero (and ZF = 1 / ZF = 0); flags unchanged (SDM Vol. 2A LOOP/LOOPcc)."""
    aw = ADDRSIZES[mode][p67]
    code = (b"\x66" if p66 else b"") + (b"\x67" if p67 else b"") + bytes([LOOPS[name], 0xF0])
    length, text, target = iced(mode, code)
    assert length == len(code) and name.lower() in text
    fl = (1 << F.ZF) if zf else 0
    s = machine(mode, code, rcx=count, flags=fl)
    assert step(s) is None
    new = (count - 1) & mask(aw)
    # A CX write keeps the upper bits; an ECX write zero-extends RCX (SDM Vol. 1 3.4.1.1).
    assert r(s, "rcx") == ((count & ~0xFFFF) | new if aw == 16 else new)
    taken = new != 0 and (name == "LOOP" or (name == "LOOPE") == zf)
    assert s.rip == (target if taken else CODE + len(code))
    assert bool(s.get_flag(F.ZF)) == zf


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p67", [False, True])
@given(count=st.one_of(st.integers(0, M64), st.sampled_from([0, 0x1_0000, 0x1_0000_0000, 1 << 63])))
@settings(max_examples=15)
def test_jrcxz(mode: str, p67: bool, count: int) -> None:
    """JCXZ/JECXZ/JRCXZ: jump if the address-size count register is zero; no decrement (SDM Vol. 2A Jcc)."""
    aw = ADDRSIZES[mode][p67]
    code = (b"\x67" if p67 else b"") + b"\xe3\x10"
    name = {16: "JCXZ", 32: "JECXZ", 64: "JRCXZ"}[aw]
    length, text, target = iced(mode, code)
    assert length == len(code) and name.lower() in text
    assert decode(code, BITS[mode]).name == name
    s = machine(mode, code, rcx=count)
    assert step(s) is None
    assert s.rip == (target if count & mask(aw) == 0 else CODE + len(code))
    assert r(s, "rcx") == count


def test_loop_fault_is_precise() -> None:
    """A taken LOOP whose target is beyond CS.limit faults and leaves ECX unchanged."""
    s = machine("prot32", "e210", rcx=5, cs_limit=0x1005)
    ev = step(s)
    assert ev is not None and (ev.vector, ev.rip) == (Vector.GP, CODE)
    assert r(s, "rcx") == 5


# -- canonical form ----------------------------------------------------------------------------------------

def test_is_canonical_widths() -> None:
    """48-bit canonical form, 57-bit with CR4.LA57 (SDM Vol. 1 3.3.7.1; Vol. 3A 4.5)."""
    s = flat_machine("long64")
    for addr, ok48, ok57 in [(0, True, True), (0x7FFF_FFFF_FFFF, True, True), (0x8000_0000_0000, False, True),
                             (0xFFFF_8000_0000_0000, True, True), (0x00FF_FFFF_FFFF_FFFF, False, True),
                             (0x0100_0000_0000_0000, False, False), (0xFF00_0000_0000_0000, False, True),
                             (0xFE00_0000_0000_0000, False, False), (M64, True, True)]:
        s.cr4 &= ~(1 << 12)
        assert is_canonical(s, addr) == ok48, hex(addr)
        s.cr4 |= 1 << 12
        assert is_canonical(s, addr) == ok57, hex(addr)


# -- symbolic twins -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cc", range(16))
def test_symbolic_jcc(cc: int) -> None:
    """For all flag values: JCC is taken exactly when the Table B-1 condition holds."""
    code = bytes([0x0F, 0x80 + cc]) + (0x100).to_bytes(4, "little")

    def go(D: SymbolicDomain):  # type: ignore[no-untyped-def]
        return run_symbolic(D, "long64", code)

    paths = explore(go)
    assert len(paths) == 2
    for p in paths:
        run = p.result
        fl = {f: z3.Bool(F.NAMES[f]) for f in F.STATUS}
        cf, pf, zf, sf, of = fl[F.CF], fl[F.PF], fl[F.ZF], fl[F.SF], fl[F.OF]
        base = [of, cf, zf, z3.Or(cf, zf), sf, pf, z3.Xor(sf, of), z3.Or(zf, z3.Xor(sf, of))][cc >> 1]
        ref = z3.Not(base) if cc & 1 else base
        taken = run.next_rip == CODE + 6 + 0x100
        assert taken or run.next_rip == CODE + 6
        assert prove(z3.Implies(p.condition, ref if taken else z3.Not(ref))) is None


@pytest.mark.parametrize(("mode", "code", "aw"), [("long64", "e210", 64), ("long64", "67e210", 32),
                                                  ("prot32", "e210", 32), ("real", "e210", 16)])
def test_symbolic_loop(mode: str, code: str, aw: int) -> None:
    """For all RCX: LOOP leaves count - 1 in the count register and is taken iff that is non-zero."""
    raw = bytes.fromhex(code)

    def go(D: SymbolicDomain):  # type: ignore[no-untyped-def]
        return run_symbolic(D, mode, raw)  # type: ignore[arg-type]

    paths = explore(go)
    assert len(paths) == 2
    for p in paths:
        run = p.result
        rcx0 = z3.Extract(aw - 1, 0, run.inputs["rcx"])
        new = z3.Extract(aw - 1, 0, run.reg("rcx"))
        assert prove(z3.Implies(p.condition, new == rcx0 - 1)) is None
        taken = run.next_rip != CODE + len(raw)
        cond = rcx0 != 1
        assert prove(z3.Implies(p.condition, cond if taken else z3.Not(cond))) is None
