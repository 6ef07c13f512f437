"""SALC, BOUND, ARPL: concrete properties against plain-int references, and their symbolic twins.

References: Intel SDM Vol. 2A BOUND ("Operation", "Protected Mode Exceptions": #BR, #UD for a
register operand, "64-Bit Mode Exceptions": #UD), ARPL ("Operation", "Flags Affected",
"Real-Address Mode Exceptions" and "Virtual-8086 Mode Exceptions": #UD); AMD APM Vol. 3 BOUND,
ARPL and Appendix A.2.1 / B.3 for SALC (D6, invalid in 64-bit mode; otherwise undocumented).
"""

from __future__ import annotations

import capstone
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.decode.decoder import decode
from spec.domain.symbolic import explore, prove
from spec.faults import Vector
from spec.machine import CODE
from spec.symexec import run_symbolic
from tests.conftest import flag, reg, run_code

LEGACY_MODES = ("real", "prot16", "prot32")
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)
M64 = (1 << 64) - 1
TABLE = 0x6000  # bounds pair / ARPL memory operand: a mapped page reachable with 16-bit offsets


@pytest.mark.parametrize(("bits", "hexcode", "text"), [
    (32, "d6", "salc"),
    (32, "6203", "bound eax, qword ptr [ebx]"), (32, "666203", "bound ax, dword ptr [ebx]"),
    (16, "6207", "bound ax, dword ptr [bx]"), (16, "666207", "bound eax, qword ptr [bx]"),
    (32, "63c8", "arpl ax, cx"), (16, "63c8", "arpl ax, cx"),
    (32, "6303", "arpl word ptr [ebx], ax"), (16, "6307", "arpl word ptr [bx], ax"),
    (32, "37", "aaa"), (64, "63c8", "movsxd ecx, eax"),
])
def test_encodings_match_capstone(bits: int, hexcode: str, text: str) -> None:
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    (ins,) = list(capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(bytes.fromhex(hexcode), 0))
    assert f"{ins.mnemonic} {ins.op_str}".strip() == text


def _flags_out(s) -> dict[int, bool]:
    return {f: bool(s.get_flag(f)) for f in STATUS}


def _signed(w: int, v: int) -> int:
    v &= (1 << w) - 1
    return v - (1 << w) if v >> (w - 1) else v


flags_in = st.integers(0, 0xFFF).map(lambda v: v & F.STATUS_MASK)


# -- SALC ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", LEGACY_MODES)
@settings(max_examples=50)
@given(rax=st.integers(0, M64), fin=flags_in)
def test_salc(mode: str, rax: int, fin: int) -> None:
    """AL := FFH if CF else 00H; the rest of RAX and every flag unchanged."""
    s, ev = run_code(mode, "d6", rax=rax, flags=fin)
    assert ev.kind == "halted" and s.rip == CODE + 2
    al = 0xFF if fin & 1 else 0
    assert reg(s, "rax") == (rax & ~0xFF & M64) | al
    assert _flags_out(s) == {f: bool(fin >> f & 1) for f in STATUS}


def test_salc_keeps_undefined_set() -> None:
    """SALC defines no flag: the flags AAA left undefined stay undefined."""
    s, _ = run_code("prot32", "37 d6", rax=0x0F, flags=0)
    assert s.undefined == sum(1 << f for f in (F.OF, F.SF, F.ZF, F.PF))
    assert reg(s, "rax") & 0xFF == 0xFF  # AAA adjusted, so CF = 1


# -- BOUND ---------------------------------------------------------------------------------------
def _bound_code(mode: str, w: int) -> str:
    """``bound r, [bx]`` / ``bound r, [ebx]`` with operand size ``w`` in ``mode``."""
    default = 32 if mode == "prot32" else 16
    modrm = "03" if mode == "prot32" else "07"
    return ("" if w == default else "66") + "62" + modrm


@st.composite
def bound_case(draw: st.DrawFn) -> tuple[int, int, int, int]:
    w = draw(st.sampled_from((16, 32)))
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    a, b = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
    lower, upper = draw(st.sampled_from(((min(a, b), max(a, b)), (a, b))))  # ordered, or possibly inverted
    index = draw(st.one_of(st.integers(lo, hi),
                           st.sampled_from([lower - 1, lower, upper, upper + 1]).filter(lambda v: lo <= v <= hi)))
    return w, index, lower, upper


@pytest.mark.parametrize("mode", LEGACY_MODES)
@settings(max_examples=100)
@given(case=bound_case(), noise=st.integers(0, M64), fin=flags_in)
def test_bound_property(mode: str, case: tuple[int, int, int, int], noise: int, fin: int) -> None:
    """#BR iff index < lower or index > upper (signed, operand size); otherwise nothing changes."""
    w, index, lower, upper = case
    mask = (1 << w) - 1
    rax = (noise & ~mask & M64) | (index & mask)  # bits above the operand size are ignored
    pair = (lower & mask).to_bytes(w // 8, "little") + (upper & mask).to_bytes(w // 8, "little")
    s, ev = run_code(mode, _bound_code(mode, w), rax=rax, rbx=TABLE, flags=fin, mem={TABLE: pair})
    if index < lower or index > upper:
        assert ev.kind == "fault" and ev.vector == Vector.BR and ev.rip == CODE and s.rip == CODE
    else:
        assert ev.kind == "halted"
    assert reg(s, "rax") == rax and reg(s, "rbx") == TABLE
    assert _flags_out(s) == {f: bool(fin >> f & 1) for f in STATUS}
    assert s.undefined == 0


@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize(("w", "index", "lower", "upper", "br"), [
    (16, 5, 5, 10, False), (16, 10, 5, 10, False), (16, 4, 5, 10, True), (16, 11, 5, 10, True),
    (16, -3, -5, -1, False), (16, -6, -5, -1, True), (16, 0, -5, -1, True), (16, -1, -5, -1, False),
    (16, 0x7FFF, -0x8000, 0x7FFF, False), (16, -0x8000, -0x8000, 0x7FFF, False),
    (16, 0, 1, 0, True),  # inverted bounds: every index is out of range
    (32, 100, -100, 100, False), (32, 101, -100, 100, True), (32, -101, -100, 100, True),
    (32, -0x8000_0000, -0x8000_0000, -0x8000_0000, False), (32, 0x7FFF_FFFF, 0, 0x7FFF_FFFE, True),
    (32, 0xFFFF, 0, 0x7FFF, True),  # unsigned compare would pass; signed and 32-bit: fails
])
def test_bound_edges(mode: str, w: int, index: int, lower: int, upper: int, br: bool) -> None:
    """Inside, at and outside the bounds; negative bounds; signed comparison (SDM BOUND "Operation")."""
    mask = (1 << w) - 1
    pair = (lower & mask).to_bytes(w // 8, "little") + (upper & mask).to_bytes(w // 8, "little")
    _, ev = run_code(mode, _bound_code(mode, w), rax=index & mask, rbx=TABLE, mem={TABLE: pair})
    assert (ev.kind == "fault" and ev.vector == Vector.BR and ev.rip == CODE) if br else ev.kind == "halted"


def _ud_or_evex_gap(ev) -> bool:
    """#UD (a processor without AVX-512) or the decoder's named model gap for an EVEX encoding.

    62 is the EVEX escape in 64-bit mode and, with ModRM.mod = 11b, in every mode (SDM Vol. 2A
    2.7.1); the decoder (``vex`` attribute) reports those bytes as ``unimplemented``.  Either way
    BOUND's semantics do not run, and no architectural event other than #UD is claimed.
    """
    if ev.kind == "fault":
        return ev.vector == Vector.UD and ev.rip == CODE
    return ev.kind == "unimplemented" and "EVEX" in ev.detail and ev.rip == CODE


@pytest.mark.parametrize("mode", LEGACY_MODES)
@pytest.mark.parametrize("code", ["62c0", "6662c0", "62d9"])
def test_bound_register_operand(mode: str, code: str) -> None:
    """SDM BOUND: "#UD If second operand is not a memory location" -- or EVEX on AVX-512 parts."""
    s, ev = run_code(mode, code, rax=0x55)
    assert _ud_or_evex_gap(ev), ev
    assert reg(s, "rax") == 0x55


# -- ARPL ----------------------------------------------------------------------------------------
def ref_arpl(dest: int, src: int) -> tuple[int, bool]:
    if (dest & 3) < (src & 3):
        return (dest & ~3) | (src & 3), True
    return dest, False


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
@settings(max_examples=100)
@given(rax=st.integers(0, M64), rcx=st.integers(0, M64), fin=flags_in)
def test_arpl_register(mode: str, rax: int, rcx: int, fin: int) -> None:
    """``arpl ax, cx``: only AX bits 1:0 and ZF may change (SDM ARPL "Operation", "Flags Affected")."""
    s, ev = run_code(mode, "63c8", rax=rax, rcx=rcx, flags=fin)
    assert ev.kind == "halted"
    d, z = ref_arpl(rax & 0xFFFF, rcx & 0xFFFF)
    assert reg(s, "rax") == (rax & ~0xFFFF & M64) | d
    assert reg(s, "rcx") == rcx
    want = {f: bool(fin >> f & 1) for f in STATUS}
    want[F.ZF] = z
    assert _flags_out(s) == want


@pytest.mark.parametrize(("dest", "src", "out", "zf"), [
    (0x0008, 0x0003, 0x000B, True),  # RPL 0 < 3: adjusted
    (0x0011, 0x0012, 0x0012, True),  # RPL 1 < 2
    (0x001B, 0x0003, 0x001B, False),  # equal RPLs
    (0x0023, 0x0001, 0x0023, False),  # dest RPL higher: unchanged
    (0xFFFC, 0xFFFF, 0xFFFF, True),
])
def test_arpl_cases(dest: int, src: int, out: int, zf: bool) -> None:
    for mode in ("prot16", "prot32"):
        s, _ = run_code(mode, "63c8", rax=dest, rcx=src, flags=0 if zf else 1 << F.ZF)
        assert reg(s, "rax") == out and flag(s, F.ZF) == zf


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
@pytest.mark.parametrize(("dest", "src"), [(0x0010, 0x0002), (0x0013, 0x0001), (0x0012, 0x0002)])
def test_arpl_memory(mode: str, dest: int, src: int) -> None:
    """Memory destination: written only when the RPL changes (SDM pseudo-code assigns DEST only then)."""
    code = "6303" if mode == "prot32" else "6307"
    s, ev = run_code(mode, code, rax=src, rbx=TABLE, mem={TABLE: dest.to_bytes(2, "little") + b"\xaa"})
    assert ev.kind == "halted"
    out, zf = ref_arpl(dest, src)
    assert s.mem.phys.read_bytes(TABLE, 3) == out.to_bytes(2, "little") + b"\xaa"
    assert flag(s, F.ZF) == zf


def test_arpl_memory_no_write_when_unchanged() -> None:
    from spec.cpu import SpecCPU
    from spec.machine import flat_machine

    for dest, src, writes in ((0x0013, 0x0001, 0), (0x0010, 0x0003, 1)):
        st_ = flat_machine("prot32", bytes.fromhex("6303f4"))
        st_.gpr[0], st_.gpr[3] = src, TABLE
        st_.mem.phys.write_bytes(TABLE, dest.to_bytes(2, "little"))
        seen: list[tuple[int, int]] = []
        orig = st_.mem.write

        def spy(linear, n, value, user=False, implicit=False, _orig=orig, _seen=seen):
            _seen.append((linear, n))
            return _orig(linear, n, value, user, implicit)

        st_.mem.write = spy  # type: ignore[method-assign]
        assert SpecCPU(st_).step() is None
        assert len(seen) == writes


def test_arpl_defines_only_zf() -> None:
    """After AAA (OF SF ZF PF undefined), ARPL defines ZF and leaves the other three undefined."""
    s, _ = run_code("prot32", "37 63c8", rax=0, rcx=3)
    assert s.undefined == sum(1 << f for f in (F.OF, F.SF, F.PF))
    assert flag(s, F.ZF)


def test_arpl_real_mode_is_ud() -> None:
    """SDM ARPL "Real-Address Mode Exceptions": #UD (not recognized in real-address mode)."""
    s, ev = run_code("real", "63c8", rax=0, rcx=3)
    assert ev.kind == "fault" and ev.vector == Vector.UD and ev.rip == CODE
    assert reg(s, "rax") == 0


def test_arpl_v86_mode_is_ud() -> None:
    """SDM ARPL "Virtual-8086 Mode Exceptions": #UD (not recognized in virtual-8086 mode)."""
    s, ev = run_code("prot32", "63c8", rax=0, rcx=3, flags=1 << F.VM)
    assert s.code_bits == 16 and s.cpl == 3
    assert ev.kind == "fault" and ev.vector == Vector.UD and ev.rip == CODE
    assert reg(s, "rax") == 0


def test_arpl_opcode_is_movsxd_in_64bit_mode() -> None:
    """63 /r is MOVSXD in 64-bit mode (SDM ARPL: "not encodable in 64-bit mode"): ARPL never runs there."""
    assert decode(bytes.fromhex("63c8"), 64).row.mnemonic == "MOVSXD"
    assert decode(bytes.fromhex("63c8"), 32).row.mnemonic == "ARPL"


# -- 64-bit mode ---------------------------------------------------------------------------------
def test_salc_ud_in_64bit_mode() -> None:
    """SALC is invalid in 64-bit mode (APM Vol. 3 B.3; opcode row i64): #UD, nothing changes."""
    s, ev = run_code("long64", "d6", rax=0x1234, flags=1)
    assert ev.kind == "fault" and ev.vector == Vector.UD and ev.rip == CODE
    assert reg(s, "rax") == 0x1234


@pytest.mark.parametrize("code", ["6203", "666203", "62c0"])
def test_bound_not_executed_in_64bit_mode(code: str) -> None:
    """SDM BOUND "64-Bit Mode Exceptions": #UD; 62 is the EVEX escape there (see ``_ud_or_evex_gap``)."""
    s, ev = run_code("long64", code, rax=0x1234, rbx=TABLE)
    assert _ud_or_evex_gap(ev), ev
    assert reg(s, "rax") == 0x1234


# -- symbolic twins ------------------------------------------------------------------------------
def test_salc_symbolic() -> None:
    """Over every RAX and CF: AL = CF ? FFH : 0, the rest of RAX and all flags unchanged."""
    (p,) = explore(lambda D: run_symbolic(D, "prot32", bytes.fromhex("d6")))
    r = p.result
    rax, cf = r.inputs["rax"], r.inputs["CF"]
    want = z3.Concat(z3.Extract(63, 8, rax), z3.If(cf, z3.BitVecVal(0xFF, 8), z3.BitVecVal(0, 8)))
    claim = z3.And(r.reg("rax") == want, *[r.flag(f) == r.inputs[F.NAMES[f]] for f in STATUS])
    assert r.fault is None and prove(claim) is None


@pytest.mark.parametrize(("mode", "code", "w"), [("prot32", "6203", 32), ("prot32", "666203", 16),
                                                 ("real", "6207", 16), ("prot16", "666207", 32)])
def test_bound_symbolic(mode: str, code: str, w: int) -> None:
    """Over every index, base register and memory content: #BR exactly when the signed index is out of bounds."""
    paths = explore(lambda D: run_symbolic(D, mode, bytes.fromhex(code)))
    assert len(paths) == 2
    for p in paths:
        r = p.result
        aw = 32 if mode == "prot32" else 16
        base = z3.ZeroExt(64 - aw, z3.Extract(aw - 1, 0, r.inputs["rbx"]))  # flat segments, base 0
        mem = r.inputs["mem"]
        n = w // 8

        def word(off: int, _mem=mem, _base=base, _n=n) -> z3.BitVecRef:
            return z3.Concat(*[z3.Select(_mem, _base + off + k) for k in reversed(range(_n))])

        idx = z3.Extract(w - 1, 0, r.inputs["rax"])
        out = z3.Or(idx < word(0), idx > word(n))  # z3 < and > on bit-vectors are signed
        faulted = r.fault is not None
        if faulted:
            assert r.fault.vector == Vector.BR
        assert prove(z3.Implies(p.condition, out if faulted else z3.Not(out))) is None


@pytest.mark.parametrize("code", ["63c8", "6303"])
def test_arpl_symbolic(code: str) -> None:
    """Over every operand value: DEST.RPL := max(DEST.RPL, SRC.RPL), ZF = (it changed), other bits kept."""
    for p in explore(lambda D: run_symbolic(D, "prot32", bytes.fromhex(code))):
        r = p.result
        assert r.fault is None
        src = z3.Extract(15, 0, r.inputs["rcx" if code == "63c8" else "rax"])
        if code == "63c8":
            dest, after = z3.Extract(15, 0, r.inputs["rax"]), r.reg("rax", 16)
            keep = z3.Extract(63, 16, r.reg("rax")) == z3.Extract(63, 16, r.inputs["rax"])
        else:
            addr = z3.ZeroExt(32, z3.Extract(31, 0, r.inputs["rbx"]))
            rd = lambda m, a=addr: z3.Concat(z3.Select(m, a + 1), z3.Select(m, a))  # noqa: E731
            dest, after = rd(r.inputs["mem"]), rd(r.state.mem.phys.array)
            keep = z3.BoolVal(True)
        drpl, srpl = z3.Extract(1, 0, dest), z3.Extract(1, 0, src)
        adjust = z3.ULT(drpl, srpl)
        want = z3.If(adjust, z3.Concat(z3.Extract(15, 2, dest), srpl), dest)
        others = [r.flag(f) == r.inputs[F.NAMES[f]] for f in STATUS if f != F.ZF]
        claim = z3.And(after == want, r.flag(F.ZF) == adjust, keep, *others)
        assert prove(z3.Implies(p.condition, claim)) is None
