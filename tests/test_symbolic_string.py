"""Symbolic twins of the string-instruction tests: proofs over all register, flag and memory contents.

Each test runs the *same* semantic functions as the concrete tests, in the Z3
domain, on a state whose registers, status flags and memory are fresh
variables, explores every path of the decisions the semantics make (the
repeat count being 0, the repetition continuing), and proves the property
under each path's condition.  References: SDM Vol. 2A/2B CMPS, SCAS, MOVS,
LODS, STOS and REP/REPE/REPNE; Vol. 1 3.4.3.1 (status flags).
"""

from __future__ import annotations

from typing import Any

import pytest
import z3

from spec import flags as F
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Fault
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE
from spec.symexec import SymbolicRun, run_symbolic, symbolic_state

STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
WIDTHS = (8, 16, 32, 64)
PFX = {8: "", 16: "66", 32: "", 64: "48"}  # 64-bit mode encodings by element size
RAX, RCX, RSI, RDI = (z3.BitVec(n, 64) for n in ("rax", "rcx", "rsi", "rdi"))  # the symbolic_state inputs


def run_sym(D: SymbolicDomain, mode: str, code: bytes, df: bool = False) -> SymbolicRun:
    """Like :func:`spec.symexec.run_symbolic`, with a choice of RFLAGS.DF (concrete system state)."""
    st, inputs = symbolic_state(D, mode)  # type: ignore[arg-type]
    if df:
        st.rflags_sys |= 1 << F.DF
    insn = decode(code, BITS[mode])
    x = Exec(st)
    x.i = insn
    x.next_rip = CODE + insn.length
    fault = None
    try:
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    except Fault as f:
        fault = f
    return SymbolicRun(st, inputs, fault, x.next_rip)


def valid(claim: Any) -> None:
    model = prove(claim, timeout_ms=20_000)
    assert model is None, f"counterexample: {model}"


def load(mem: Any, addr: Any, n: int) -> Any:
    """n bytes of the memory array at a 64-bit address, little-endian (independent of the spec's reader)."""
    parts = [z3.Select(mem, addr + k) for k in reversed(range(n))]
    return parts[0] if n == 1 else z3.Concat(*parts)


def textbook_sub_flags(w: int, a: Any, b: Any) -> dict[int, Any]:
    """The six status flags of a - b by their definitions (SDM Vol. 1 3.4.3.1)."""
    r = a - b
    wide = z3.SignExt(1, a) - z3.SignExt(1, b)
    ones = sum(z3.ZeroExt(3, z3.Extract(k, k, r)) for k in range(8))
    return {
        F.CF: z3.ULT(a, b),  # borrow
        F.ZF: a == b,
        F.SF: r < 0,
        F.OF: wide != z3.SignExt(1, r),  # the true difference does not fit in w signed bits
        F.AF: z3.ULT(z3.Extract(3, 0, a), z3.Extract(3, 0, b)),  # borrow out of bit 3
        F.PF: z3.Extract(0, 0, ones) == 0,  # even number of ones in the low byte
    }


def only_path(code: bytes, mode: str = "long64", df: bool = False) -> SymbolicRun:
    paths = explore(lambda D: run_sym(D, mode, code, df))
    assert len(paths) == 1
    return paths[0].result


# -- CMPS/SCAS flags are SUB's flags on the same operands ---------------------------------------------
@pytest.mark.parametrize("w", WIDTHS)
def test_cmps_flags_are_textbook_sub_of_source_minus_destination(w: int) -> None:
    r = only_path(bytes.fromhex(PFX[w] + ("a6" if w == 8 else "a7")))
    mem = r.inputs["mem"]
    a, b = load(mem, RSI, w // 8), load(mem, RDI, w // 8)
    want = textbook_sub_flags(w, a, b)
    for f in STATUS:
        valid(r.flag(f) == want[f])
    assert r.state.undefined == 0


@pytest.mark.parametrize("w", WIDTHS)
def test_scas_flags_are_textbook_sub_of_accumulator_minus_destination(w: int) -> None:
    r = only_path(bytes.fromhex(PFX[w] + ("ae" if w == 8 else "af")))
    a, b = z3.Extract(w - 1, 0, RAX), load(r.inputs["mem"], RDI, w // 8)
    want = textbook_sub_flags(w, a, b)
    for f in STATUS:
        valid(r.flag(f) == want[f])


SUB_RM_REG = {8: "28c8", 16: "6629c8", 32: "29c8", 64: "4829c8"}  # sub al,cl / sub ax,cx / sub eax,ecx / sub rax,rcx


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("op", ["cmps", "scas"])
def test_compare_flags_equal_sub_instruction_flags(w: int, op: str) -> None:
    """The flags CMPS/SCAS leave are exactly those the SUB instruction computes for the same operand values."""
    opc = {"cmps": "a6", "scas": "ae"}[op]
    r = only_path(bytes.fromhex(PFX[w] + opc[0] + hex(int(opc[1], 16) + (w != 8))[2:]))
    mem = r.inputs["mem"]
    a = load(mem, RSI, w // 8) if op == "cmps" else z3.Extract(w - 1, 0, RAX)
    b = load(mem, RDI, w // 8)
    sub = only_path(bytes.fromhex(SUB_RM_REG[w]))  # SUB rAX(w), rCX(w): inputs rax, rcx
    ext = (lambda v: v) if w == 64 else (lambda v: z3.ZeroExt(64 - w, v))
    for f in STATUS:
        sub_f = z3.substitute(sub.flag(f), (RAX, ext(a)), (RCX, ext(b)))
        valid(r.flag(f) == sub_f)


# -- REPE/REPNE termination (SDM Vol. 2B REP/REPE/REPNE: Table "Repeat prefixes") ---------------------
def _rep_claims(paths: list, code: bytes, *, a: Any, b: Any, aw: int, repe: bool) -> None:
    """For every path: one iteration happened iff the count was non-zero; the instruction repeats iff
    the decremented count is non-zero and ZF still has the continuing value; count 0 changes nothing."""
    length = len(code)
    cnt = z3.Extract(aw - 1, 0, RCX)
    zf_go = (a == b) if repe else (a != b)
    for p in paths:
        r: SymbolicRun = p.result
        cond = p.condition
        assert r.fault is None
        repeated = r.next_rip == CODE
        assert r.next_rip in (CODE, CODE + length)
        expect_repeat = z3.And(cnt != 0, cnt - 1 != 0, zf_go)
        valid(z3.Implies(cond, expect_repeat if repeated else z3.Not(expect_repeat)))
        # Stops exactly when: the count was 0, or it reached 0, or ZF says stop.
        stop = z3.Or(cnt == 0, cnt - 1 == 0, z3.Not(zf_go))
        valid(z3.Implies(cond, z3.Not(stop) if repeated else stop))
        rcx_after = r.reg("rcx")
        after_cnt = z3.Extract(aw - 1, 0, rcx_after)
        valid(z3.Implies(z3.And(cond, cnt == 0), z3.And(
            rcx_after == RCX, r.reg("rsi") == RSI, r.reg("rdi") == RDI,
            *[r.flag(f) == r.inputs[F.NAMES[f]] for f in STATUS])))
        valid(z3.Implies(z3.And(cond, cnt != 0), z3.And(after_cnt == cnt - 1, r.flag(F.ZF) == (a == b))))
    assert len(paths) == 3  # count 0 / one iteration then stop / one iteration then repeat


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("rep", ["f3", "f2"])
def test_rep_cmps_termination(w: int, rep: str) -> None:
    code = bytes.fromhex(rep + PFX[w] + ("a6" if w == 8 else "a7"))
    paths = explore(lambda D: run_symbolic(D, "long64", code))
    r0 = paths[0].result
    mem = r0.inputs["mem"]
    _rep_claims(paths, code, a=load(mem, RSI, w // 8), b=load(mem, RDI, w // 8), aw=64,
                repe=rep == "f3")


@pytest.mark.parametrize("w", [8, 32])
@pytest.mark.parametrize("rep", ["f3", "f2"])
def test_rep_scas_termination(w: int, rep: str) -> None:
    code = bytes.fromhex(rep + PFX[w] + ("ae" if w == 8 else "af"))
    paths = explore(lambda D: run_symbolic(D, "long64", code))
    mem = paths[0].result.inputs["mem"]
    _rep_claims(paths, code, a=z3.Extract(w - 1, 0, RAX), b=load(mem, RDI, w // 8), aw=64,
                repe=rep == "f3")


@pytest.mark.parametrize("rep", ["f3", "f2"])
def test_repe_cmps_address_size_32_in_long_mode(rep: str) -> None:
    """With 67 the counter is ECX and the addresses are ESI/EDI (zero-extended)."""
    code = bytes.fromhex(rep + "67a6")
    paths = explore(lambda D: run_symbolic(D, "long64", code))
    mem = paths[0].result.inputs["mem"]
    esi, edi = z3.ZeroExt(32, z3.Extract(31, 0, RSI)), z3.ZeroExt(32, z3.Extract(31, 0, RDI))
    _rep_claims(paths, code, a=load(mem, esi, 1), b=load(mem, edi, 1), aw=32, repe=rep == "f3")


@pytest.mark.parametrize("mode", ["real", "prot32"])
def test_repe_cmps_legacy_modes(mode: str) -> None:
    """Real mode (SI/DI/CX, flat segments at 0) and 32-bit protected mode (ESI/EDI/ECX)."""
    code = bytes.fromhex("f3a6")
    aw = BITS[mode]
    paths = explore(lambda D: run_symbolic(D, mode, code))
    mem = paths[0].result.inputs["mem"]
    si = z3.ZeroExt(64 - aw, z3.Extract(aw - 1, 0, RSI))
    di = z3.ZeroExt(64 - aw, z3.Extract(aw - 1, 0, RDI))
    _rep_claims(paths, code, a=load(mem, si, 1), b=load(mem, di, 1), aw=aw, repe=True)


# -- data movement ----------------------------------------------------------------------------------
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("df", [False, True])
def test_movs_copies_and_steps(w: int, df: bool) -> None:
    n = w // 8
    r = only_path(bytes.fromhex(PFX[w] + ("a4" if w == 8 else "a5")), df=df)
    mem0, mem1 = r.inputs["mem"], r.state.mem.phys.array
    valid(load(mem1, RDI, n) == load(mem0, RSI, n))
    step = -n if df else n
    valid(z3.And(r.reg("rsi") == RSI + step, r.reg("rdi") == RDI + step, r.reg("rcx") == RCX))
    # Nothing outside ES:[rDI .. rDI+n) changed.
    p = z3.BitVec("p", 64)
    valid(z3.Implies(z3.UGE(p - RDI, n), z3.Select(mem1, p) == z3.Select(mem0, p)))
    for f in STATUS:
        valid(r.flag(f) == r.inputs[F.NAMES[f]])  # MOVS leaves the flags alone


@pytest.mark.parametrize("w", WIDTHS)
def test_lods_and_stos(w: int) -> None:
    n = w // 8
    lods = only_path(bytes.fromhex(PFX[w] + ("ac" if w == 8 else "ad")))
    v = load(lods.inputs["mem"], RSI, n)
    want = {8: z3.Concat(z3.Extract(63, 8, RAX), v), 16: z3.Concat(z3.Extract(63, 16, RAX), v),
            32: z3.ZeroExt(32, v), 64: v}[w]
    valid(z3.And(lods.reg("rax") == want, lods.reg("rsi") == RSI + n))
    stos = only_path(bytes.fromhex(PFX[w] + ("aa" if w == 8 else "ab")), df=True)
    valid(z3.And(load(stos.state.mem.phys.array, RDI, n) == z3.Extract(w - 1, 0, RAX), stos.reg("rdi") == RDI - n))


def test_rep_movs_zero_count_leaves_memory() -> None:
    paths = explore(lambda D: run_symbolic(D, "long64", bytes.fromhex("f348a5")))
    assert len(paths) == 3
    for p in paths:
        r = p.result
        if z3.is_true(z3.simplify(r.state.mem.phys.array == r.inputs["mem"])):
            continue  # structurally unchanged memory
        valid(z3.Implies(p.condition, RCX != 0))  # memory changed only on paths with a non-zero count


def test_real_mode_16bit_index_update_wraps_and_keeps_upper_bits() -> None:
    """SDM Vol. 1 3.4.1.1 / Vol. 2A 3.1.1.3: 16-bit addressing updates only SI/DI, modulo 2^16."""
    r = only_path(b"\xa4", mode="real", df=True)
    for name, v in (("rsi", RSI), ("rdi", RDI)):
        after = r.reg(name)
        valid(z3.And(z3.Extract(63, 16, after) == z3.Extract(63, 16, v),
                     z3.Extract(15, 0, after) == z3.Extract(15, 0, v) - 1))
