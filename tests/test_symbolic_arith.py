"""Symbolic twins of the ALU tests: the flag and result definitions proved over ALL operands.

Each instruction is decoded and run once through the same semantic function the concrete
CPU uses (spec.symexec.run_symbolic), with every register and status flag a fresh Z3
variable, under spec.domain.symbolic.explore (every feasible path) -- then each claim is
proved valid with spec.domain.symbolic.prove.  The claims state the textbook meaning of
each flag (SDM Vol. 1 3.4.3.1, Vol. 2 instruction pages) in a formulation independent of
spec/flags.py: carries and overflows by widening to w+1 bits, parity by summing bits.

Widths 8, 16 and 32 run in 32-bit protected mode (66 for 16), width 64 in 64-bit mode
(REX.W); the partial-register write rules are proved in 64-bit mode.  The second half
swaps deliberately wrong flag definitions into spec.flags and shows each is REFUTED with a
counterexample, which is then replayed on the concrete CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import capstone
import pytest
import z3

from spec import flags as F
from spec.domain.base import Domain
from spec.domain.symbolic import explore, prove
from spec.symexec import SymbolicRun, run_symbolic
from tests.conftest import flag, run_code

# (mode, width): where each width is exercised.
CONFIGS = [("prot32", 8), ("prot32", 16), ("prot32", 32), ("long64", 64)]
ALU = {"ADD": 0, "OR": 1, "ADC": 2, "SBB": 3, "AND": 4, "SUB": 5, "XOR": 6, "CMP": 7}
UNARY = {"INC": (0xFE, 0), "DEC": (0xFE, 1), "NOT": (0xF6, 2), "NEG": (0xF6, 3)}
FAMILIES = (*ALU, "TEST", *UNARY)
BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}


def encode(mnem: str, w: int, mode: str) -> bytes:
    """``MNEM a, b`` with a = AL/AX/EAX/RAX and b = BL/BX/EBX/RBX (unary: ``MNEM a``)."""
    pfx = b""
    if w == 16 and BITS[mode] != 16:
        pfx = b"\x66"
    elif w == 64:
        pfx = b"\x48"
    v = 0 if w == 8 else 1
    if mnem in ALU:
        return pfx + bytes([ALU[mnem] * 8 + v, 0xD8])  # E,G form: ModRM 11 011(rbx) 000(rax)
    if mnem == "TEST":
        return pfx + bytes([0x84 + v, 0xD8])
    op, digit = UNARY[mnem]
    return pfx + bytes([op + v, 0xC0 | digit << 3])


_NAMES = {8: ("al", "bl"), 16: ("ax", "bx"), 32: ("eax", "ebx"), 64: ("rax", "rbx")}


@pytest.mark.parametrize(("mode", "w"), CONFIGS)
@pytest.mark.parametrize("mnem", FAMILIES)
def test_encodings(mnem: str, mode: str, w: int) -> None:
    """The hand-built encodings are what capstone reads."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32 if mode == "prot32" else capstone.CS_MODE_64)
    code = encode(mnem, w, mode)
    (i,) = md.disasm(code, 0)
    a, b = _NAMES[w]
    want = f"{a}, {b}" if mnem in ALU or mnem == "TEST" else a
    assert (i.mnemonic, i.op_str, i.size) == (mnem.lower(), want, len(code))


# ----------------------------------------------------------------------------------------------
# Independent formulations (plain Z3, no spec code)
# ----------------------------------------------------------------------------------------------

def msb(w: int, v: Any) -> Any:
    return z3.Extract(w - 1, w - 1, v) == 1


def even_parity(v: Any) -> Any:
    """The low byte has an even number of ones: the sum of its bits is even."""
    total = z3.Sum([z3.ZeroExt(3, z3.Extract(i, i, v)) for i in range(8)])
    return z3.Extract(0, 0, total) == 0


def carry_in(run: SymbolicRun, w: int) -> Any:
    return z3.If(run.inputs["CF"], z3.BitVecVal(1, w), z3.BitVecVal(0, w))


def nib(v: Any) -> Any:
    return z3.ZeroExt(1, z3.Extract(3, 0, v))  # low nibble, widened to 5 bits


def claims(mnem: str, w: int, run: SymbolicRun) -> dict[str, Any]:
    """Every claim about one symbolic execution of ``mnem`` at width ``w``, by name."""
    a = z3.Extract(w - 1, 0, run.inputs["rax"])
    b = z3.Extract(w - 1, 0, run.inputs["rbx"])
    cin = run.inputs["CF"]
    c = carry_in(run, w + 1)
    cf, zf, sf, of, pf, af = (run.flag(f) for f in (F.CF, F.ZF, F.SF, F.OF, F.PF, F.AF))
    out = run.reg("rax", w)
    zx, sx = (lambda v: z3.ZeroExt(1, v)), (lambda v: z3.SignExt(1, v))
    smin = z3.BitVecVal(1 << (w - 1), w)
    smax = z3.BitVecVal((1 << (w - 1)) - 1, w)
    state = run.state
    cl: dict[str, Any] = {}

    # The value SF/ZF/PF describe: the result, or the discarded difference/conjunction of CMP/TEST.
    r = {"CMP": a - b, "TEST": a & b}.get(mnem, out)
    if mnem != "NOT":
        cl["ZF iff result == 0"] = zf == (r == 0)
        cl["SF == msb(result)"] = sf == msb(w, r)
        cl["PF == even parity of the low byte"] = pf == even_parity(r)
    if mnem in ("CMP", "TEST"):
        cl["destination unchanged"] = run.reg("rax", 64) == run.inputs["rax"]

    if mnem == "ADD":
        cl["result = a + b"] = out == a + b
        cl["CF iff a + b > 2^w - 1 (w+1-bit sum)"] = cf == (z3.Extract(w, w, zx(a) + zx(b)) == 1)
        cl["OF iff the signed sum leaves w bits"] = of == (sx(a) + sx(b) != sx(out))
        cl["AF iff the low nibbles carry"] = af == (z3.Extract(4, 4, nib(a) + nib(b)) == 1)
    elif mnem == "ADC":
        cl["result = a + b + CF"] = out == a + b + carry_in(run, w)
        cl["CF iff a + b + CF > 2^w - 1"] = cf == z3.UGT(zx(a) + zx(b) + c, (1 << w) - 1)
        cl["OF iff a + b + CF leaves the signed range"] = of == (sx(a) + sx(b) + c != sx(out))
        cl["AF iff the low nibbles + CF carry"] = af == z3.UGT(nib(a) + nib(b) + carry_in(run, 5), 15)
    elif mnem in ("SUB", "CMP"):
        if mnem == "SUB":
            cl["result = a - b"] = out == a - b
        cl["CF iff a <u b"] = cf == z3.ULT(a, b)
        cl["OF iff the signed difference leaves w bits"] = of == (sx(a) - sx(b) != sx(r))
        cl["AF iff the low nibble borrows"] = af == z3.ULT(nib(a), nib(b))
        if mnem == "CMP":
            cl["ZF iff a == b"] = zf == (a == b)
            cl["SF xor OF iff a <s b"] = z3.Xor(sf, of) == (a < b)
            cl["CF or ZF iff a <=u b"] = z3.Or(cf, zf) == z3.ULE(a, b)
            cl["ZF or (SF xor OF) iff a <=s b"] = z3.Or(zf, z3.Xor(sf, of)) == (a <= b)
    elif mnem == "SBB":
        cl["result = a - b - CF"] = out == a - b - carry_in(run, w)
        cl["CF iff a < b + CF (unbounded)"] = cf == z3.ULT(zx(a), zx(b) + c)
        cl["OF iff a - b - CF leaves the signed range"] = of == (sx(a) - sx(b) - c != sx(out))
        cl["AF iff the low nibble borrows with CF"] = af == z3.ULT(nib(a), nib(b) + carry_in(run, 5))
    elif mnem in ("AND", "OR", "XOR", "TEST"):
        op = {"AND": a & b, "OR": a | b, "XOR": a ^ b, "TEST": a & b}[mnem]
        if mnem != "TEST":
            cl["result = a op b"] = out == op
        cl["CF = 0"] = cf == z3.BoolVal(False)
        cl["OF = 0"] = of == z3.BoolVal(False)
        cl["AF marked undefined"] = z3.BoolVal(state.undefined == 1 << F.AF)
    elif mnem == "INC":
        cl["result = a + 1"] = out == a + 1
        cl["CF preserved"] = cf == cin
        cl["OF iff a == 2^(w-1) - 1"] = of == (a == smax)
        cl["AF iff low nibble was 0xF"] = af == (z3.Extract(3, 0, a) == 0xF)
    elif mnem == "DEC":
        cl["result = a - 1"] = out == a - 1
        cl["CF preserved"] = cf == cin
        cl["OF iff a == -2^(w-1)"] = of == (a == smin)
        cl["AF iff low nibble was 0"] = af == (z3.Extract(3, 0, a) == 0)
    elif mnem == "NEG":
        cl["result = 0 - a"] = out == -a
        cl["CF iff a != 0"] = cf == (a != 0)
        cl["OF iff a == -2^(w-1)"] = of == (a == smin)
        cl["AF iff low nibble != 0"] = af == (z3.Extract(3, 0, a) != 0)
    elif mnem == "NOT":
        cl["result = ~a"] = out == ~a
        for f in F.STATUS:
            cl[f"{F.NAMES[f]} unchanged"] = run.flag(f) == run.inputs[F.NAMES[f]]
    if mnem not in ("AND", "OR", "XOR", "TEST"):
        cl["no flag left undefined"] = z3.BoolVal(state.undefined == 0)
    return cl


def describe(model: z3.ModelRef, run: SymbolicRun, w: int) -> str:
    """The counterexample's operands."""
    ev = lambda t: model.eval(t, model_completion=True)  # noqa: E731
    a = ev(z3.Extract(w - 1, 0, run.inputs["rax"])).as_long()
    b = ev(z3.Extract(w - 1, 0, run.inputs["rbx"])).as_long()
    c = z3.is_true(ev(run.inputs["CF"]))
    return f"a={a:#x} b={b:#x} CF_in={int(c)}"


def counterexample(claim: Any, path_cond: Any, run: SymbolicRun, w: int) -> str | None:
    model = prove(z3.Implies(path_cond, claim))
    return None if model is None else describe(model, run, w)


def assert_proved(claim: Any, path_cond: Any, run: SymbolicRun, w: int, what: str) -> None:
    """Prove ``claim`` on a path; on failure the message names the counterexample's operands."""
    cex = counterexample(claim, path_cond, run, w)
    assert cex is None, f"{what} fails for {cex}"


def symbolic(mode: str, code: bytes):
    return explore(lambda D: run_symbolic(D, mode, code))


@pytest.mark.parametrize(("mode", "w"), CONFIGS)
@pytest.mark.parametrize("mnem", FAMILIES)
def test_flags_and_result_proved(mnem: str, mode: str, w: int) -> None:
    """All claims about ``mnem`` hold for every operand value and carry-in."""
    paths = symbolic(mode, encode(mnem, w, mode))
    assert len(paths) == 1  # no data-dependent control flow in the ALU family
    for p in paths:
        run = p.result
        assert run.fault is None
        for name, claim in claims(mnem, w, run).items():
            assert_proved(claim, p.condition, run, w, f"{mnem} w={w} {mode}: {name}")


@pytest.mark.parametrize("w", [8, 16, 32])
@pytest.mark.parametrize("mnem", [m for m in FAMILIES if m not in ("CMP", "TEST")])
def test_partial_register_writes_proved(mnem: str, w: int) -> None:
    """SDM Vol. 1 3.4.1.1 in 64-bit mode: 8/16-bit results keep bits 63:w, 32-bit results zero them;
    the source register and every other register are unchanged."""
    (p,) = symbolic("long64", encode(mnem, w, "long64"))
    run = p.result
    rax, new = run.inputs["rax"], run.reg("rax", 64)
    upper = z3.Extract(63, w, new)
    claim = upper == (0 if w == 32 else z3.Extract(63, w, rax))
    assert prove(claim) is None, f"{mnem} w={w}: upper bits of rax wrong"
    for name in ("rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r15"):
        assert prove(run.reg(name, 64) == run.inputs[name]) is None, name


@pytest.mark.parametrize("mnem", ["ADD", "SUB", "AND", "ADC"])
def test_memory_destination_proved(mnem: str) -> None:
    """``MNEM dword [rbx], eax`` in 64-bit mode: memory at rbx gets the result, flags as for registers."""
    code = bytes([ALU[mnem] * 8 + 1, 0x03])
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    (i,) = md.disasm(code, 0)
    assert (i.mnemonic, i.op_str) == (mnem.lower(), "dword ptr [rbx], eax")
    (p,) = symbolic("long64", code)
    run = p.result
    mem0, mem1 = run.inputs["mem"], run.state.mem.phys.array
    addr = run.inputs["rbx"]
    load = lambda m: z3.Concat(*[z3.Select(m, addr + k) for k in (3, 2, 1, 0)])  # noqa: E731
    a, b = load(mem0), z3.Extract(31, 0, run.inputs["rax"])
    c = carry_in(run, 32)
    want = {"ADD": a + b, "SUB": a - b, "AND": a & b, "ADC": a + b + c}[mnem]
    assert prove(load(mem1) == want) is None
    assert prove(run.flag(F.ZF) == (want == 0)) is None
    if mnem == "SUB":
        assert prove(run.flag(F.CF) == z3.ULT(a, b)) is None
    # Bytes outside the four written are untouched.
    other = z3.BitVec("other", 64)
    outside = z3.And([other != addr + k for k in range(4)])
    assert prove(z3.Implies(outside, z3.Select(mem1, other) == z3.Select(mem0, other))) is None


# ----------------------------------------------------------------------------------------------
# Deliberately wrong definitions are refuted
# ----------------------------------------------------------------------------------------------

class SubCfSigned(F.SubKind):
    """WRONG: the borrow of SUB taken as a signed comparison."""

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.slt(w, a, b)


class AddOfFromCarry(F.AddKind):
    """WRONG: overflow of ADD taken to be the unsigned carry out."""

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.ult(w, r, a)


class AddCfIgnoresCarryIn(F.AddKind):
    """WRONG: carry of ADC computed as for ADD, forgetting the carry-in (a + b + 1 wrapping to a)."""

    def cf(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.ult(w, r, a)


class SubAfBit3(F.SubKind):
    """WRONG: the auxiliary borrow read from bit 3 of a ^ b ^ r instead of bit 4."""

    def af(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.bit(w, D.xor(w, D.xor(w, a, b), r), 3)


class SubOfLikeAdd(F.SubKind):
    """WRONG: overflow of SUB with ADD's sign rule (operands agree and the result differs)."""

    def of(self, D: Domain, w: int, a: Any, b: Any, r: Any, c: Any) -> Any:
        return D.msb(w, D.and_(w, D.xor(w, a, r), D.xor(w, b, r)))


def _ref_cf_sub(w: int, a: int, b: int, c: int) -> bool:
    return a < b + c


def _ref_of_add(w: int, a: int, b: int, c: int) -> bool:
    s = lambda v: v - (1 << w) if v >> (w - 1) else v  # noqa: E731
    return not -(1 << (w - 1)) <= s(a) + s(b) + c < 1 << (w - 1)


def _ref_cf_add(w: int, a: int, b: int, c: int) -> bool:
    return a + b + c > (1 << w) - 1


def _ref_af_sub(w: int, a: int, b: int, c: int) -> bool:
    return (a & 0xF) < (b & 0xF) + c


def _ref_of_sub(w: int, a: int, b: int, c: int) -> bool:
    s = lambda v: v - (1 << w) if v >> (w - 1) else v  # noqa: E731
    return not -(1 << (w - 1)) <= s(a) - s(b) - c < 1 << (w - 1)


WRONG: list[tuple[str, str, F.FlagKind, str, int, str, Callable[[int, int, int, int], bool]]] = [
    # (attribute of spec.flags to replace, broken kind, instruction, width, claim name, concrete reference)
    ("SUB", "CMP", SubCfSigned(), "CF", 32, "CF iff a <u b", _ref_cf_sub),
    ("SUB", "SUB", SubCfSigned(), "CF", 8, "CF iff a <u b", _ref_cf_sub),
    ("ADD", "ADD", AddOfFromCarry(), "OF", 64, "OF iff the signed sum leaves w bits", _ref_of_add),
    ("ADD", "ADC", AddCfIgnoresCarryIn(), "CF", 16, "CF iff a + b + CF > 2^w - 1", _ref_cf_add),
    ("SUB", "SBB", SubAfBit3(), "AF", 8, "AF iff the low nibble borrows with CF", _ref_af_sub),
    ("SUB", "SUB", SubOfLikeAdd(), "OF", 32, "OF iff the signed difference leaves w bits", _ref_of_sub),
]


@pytest.mark.parametrize(("attr", "mnem", "broken", "fname", "w", "claim", "ref"), WRONG,
                         ids=[f"{k[1]}-{type(k[2]).__name__}" for k in WRONG])
def test_wrong_definition_is_refuted(monkeypatch: pytest.MonkeyPatch, attr: str, mnem: str, broken: F.FlagKind,
                                     fname: str, w: int, claim: str, ref: Callable[[int, int, int, int], bool]) -> None:
    mode = "long64" if w == 64 else "prot32"
    code = encode(mnem, w, mode)
    monkeypatch.setattr(F, attr, broken)
    (p,) = symbolic(mode, code)
    run = p.result
    what = f"{type(broken).__name__} on {mnem} w={w}: {claim}"
    with pytest.raises(AssertionError, match=r"fails for a=0x[0-9a-f]+ b=0x[0-9a-f]+ CF_in=[01]") as refuted:
        assert_proved(claims(mnem, w, run)[claim], p.condition, run, w, what)
    print(f"refuted: {refuted.value}")
    model = prove(z3.Implies(p.condition, claims(mnem, w, run)[claim]))
    assert model is not None
    cex = describe(model, run, w)
    ev = lambda t: model.eval(t, model_completion=True)  # noqa: E731
    a = ev(z3.Extract(w - 1, 0, run.inputs["rax"])).as_long()
    b = ev(z3.Extract(w - 1, 0, run.inputs["rbx"])).as_long()
    c = int(z3.is_true(ev(run.inputs["CF"])))
    if mnem not in ("ADC", "SBB"):
        c = 0
    fl = getattr(F, fname)
    # Replay the counterexample concretely: the broken kind disagrees with the plain-int reference ...
    st, _ = run_code(mode, code, rax=a, rbx=b, flags=c)
    assert flag(st, fl) != ref(w, a, b, c), f"counterexample {cex} does not replay"
    # ... and the real definition agrees with it on the same input.
    monkeypatch.undo()
    st, _ = run_code(mode, code, rax=a, rbx=b, flags=c)
    assert flag(st, fl) == ref(w, a, b, c), f"real {fname} of {mnem} wrong at {cex}"
