"""String instructions: MOVS, STOS, LODS, CMPS, SCAS with and without REP/REPE/REPNE.

References: SDM Vol. 1 7.3.9 (string operations, DF), Vol. 2A/2B MOVS, STOS,
LODS, CMPS, SCAS and REP/REPE/REPZ/REPNE/REPNZ; Vol. 2A 2.1.1 / 3.1.1.3
(address-size attribute selects SI/ESI/RSI, DI/EDI/RDI and CX/ECX/RCX).

The hypothesis properties run whole (repeated) string instructions in every
mode, element size, address size, direction and prefix, and compare the
result with an independent plain-int model of the instruction written here.
The examples pin the named edge cases.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.machine import BITS, CODE, MODES, PAGING_BASE, flat_machine
from spec.memory import PAGE
from spec.state import MachineState
from tests.conftest import GPR, flag, reg, run_code

M64 = (1 << 64) - 1
SRC, DST = 0x3000, 0x5000  # mapped (below the stack page) in every mode; offsets < 64 KiB
BUF = 0x100
ES, CS, SS, DS, FS, GS = range(6)
SEG_PREFIX = {ES: 0x26, CS: 0x2E, SS: 0x36, DS: 0x3E, FS: 0x64, GS: 0x65}
OPCODE = {"movs": 0xA4, "cmps": 0xA6, "stos": 0xAA, "lods": 0xAC, "scas": 0xAE}  # +1: word/dword/qword
NAME = {8: "b", 16: "w", 32: "d", 64: "q"}
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)


# -- encoding ----------------------------------------------------------------------------
def encode(mode: str, op: str, w: int, *, rep: int | None = None, a67: bool = False,
           seg: int | None = None) -> bytes:
    """Bytes of one string instruction: [seg] [rep] [67] [66] [REX.W] opcode."""
    bits = BITS[mode]
    out = bytearray()
    if seg is not None:
        out.append(SEG_PREFIX[seg])
    if rep is not None:
        out.append(rep)
    if a67:
        out.append(0x67)
    if (w == 16 and bits != 16) or (w == 32 and bits == 16):
        out.append(0x66)
    if w == 64:
        out.append(0x48)
    out.append(OPCODE[op] + (w != 8))
    return bytes(out)


def addr_size(mode: str, a67: bool) -> int:
    bits = BITS[mode]
    if bits == 64:
        return 32 if a67 else 64
    return (32 if bits == 16 else 16) if a67 else bits


_SI = {16: "si", 32: "esi", 64: "rsi"}


def test_encoder_agrees_with_iced() -> None:
    """Every encoding the tests build disassembles (iced-x86) to the intended form.

    (iced rather than capstone here: capstone 5 drops the REPNE of F2 A5, taking it for SSE2 MOVSD.)
    """
    fmt = Formatter(FormatterSyntax.INTEL)
    for mode in ("real", "prot32", "long64"):
        for op in OPCODE:
            for w in (8, 16, 32, 64) if mode == "long64" else (8, 16, 32):
                for rep in (None, 0xF3, 0xF2):
                    for a67 in (False, True):
                        code = encode(mode, op, w, rep=rep, a67=a67, seg=FS if op in ("movs", "lods") else None)
                        ins = Decoder(BITS[mode], code, ip=CODE).decode()
                        text = fmt.format(ins)
                        assert ins.len == len(code), text
                        words = text.split(" ", 2)
                        want_pfx = {None: [], 0xF3: ["repe" if op in ("cmps", "scas") else "rep"], 0xF2: ["repne"]}
                        assert words[: 1 + bool(rep)] == [*want_pfx[rep], op + NAME[w]], (code.hex(), text)
                        aw = addr_size(mode, a67)
                        if op not in ("stos", "scas"):
                            assert f"[{_SI[aw]}]" in text, (code.hex(), text)
                        if op in ("movs", "lods"):
                            assert "fs:" in text


# -- machines ------------------------------------------------------------------------------
class RecordingBus:
    """A device on the unbacked physical space that records every access."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []

    def read(self, addr: int, n: int) -> int:
        self.log.append(("r", addr, n))
        return (0x5A * 0x0101010101010101) & ((1 << (8 * n)) - 1)

    def write(self, addr: int, n: int, value: int) -> None:
        self.log.append(("w", addr, n))


def machine(mode: str, code: bytes, *, flags: int = 0, bases: dict[int, int] | None = None,
            mem: dict[int, bytes] | None = None, **regs: int) -> tuple[MachineState, SpecCPU]:
    """A flat machine with ``code`` + HLT at CODE, 64 KiB of data at 0x10000, chosen segment bases."""
    # 64 KiB of data pages only when a segment base points there (bases >= 0x10000).
    s = flat_machine(mode, code + b"\xf4", data_pages=16 if bases else 1)  # type: ignore[arg-type]
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & M64
    s.write_rflags(flags | 2)
    for seg, base in (bases or {}).items():
        s.seg[seg].base = base
        if mode == "real":
            assert base % 16 == 0 and base < 0x100000
            s.seg[seg].selector = base >> 4
    for addr, data in (mem or {}).items():
        s.mem.phys.write_bytes(addr, data)
    return s, SpecCPU(s)


def run(mode: str, code: bytes, **kw: int) -> tuple[MachineState, StopEvent]:
    """Run until the appended HLT (asserted: every case here completes without a fault)."""
    s, cpu = machine(mode, code, **kw)  # type: ignore[arg-type]
    ev = cpu.run(1000)
    assert halted_after(ev, code), ev
    return s, ev


def halted_after(ev: StopEvent, code: bytes) -> bool:
    return ev.kind == "halted" and ev.rip == CODE + len(code) + 1


# -- the independent reference model -----------------------------------------------------
def _parity(v: int) -> bool:
    return bin(v & 0xFF).count("1") % 2 == 0


def _signed(w: int, v: int) -> int:
    return v - (1 << w) if v >> (w - 1) else v


def sub_flags(w: int, a: int, b: int) -> dict[int, bool]:
    """Status flags of a - b from their textbook meaning (SDM Vol. 1 3.4.3.1, Appendix A)."""
    r = (a - b) & ((1 << w) - 1)
    d = _signed(w, a) - _signed(w, b)
    return {F.CF: a < b, F.ZF: a == b, F.SF: bool(r >> (w - 1)), F.PF: _parity(r),
            F.OF: not (-(1 << (w - 1)) <= d < (1 << (w - 1))), F.AF: (a & 0xF) < (b & 0xF)}


def reference(op: str, w: int, aw: int, df: bool, rep: int | None, regs: dict[str, int],
              mem: dict[int, int]) -> tuple[int, dict[int, bool] | None]:
    """Run the whole (repeated) instruction on plain ints; returns (iterations, flags of the last compare)."""
    n = w // 8
    am = (1 << aw) - 1
    wm = (1 << w) - 1

    def get(r: str) -> int:
        return regs[r] & am

    def put(r: str, v: int) -> None:
        v &= am
        regs[r] = (regs[r] & ~0xFFFF & M64) | v if aw == 16 else v  # 32-bit writes zero-extend

    def load(a: int) -> int:  # segment bases are 0 and elements stay inside the buffers
        return sum(mem[a + k] << (8 * k) for k in range(n))

    def store(a: int, v: int) -> None:
        for k in range(n):
            mem[a + k] = (v >> (8 * k)) & 0xFF

    step = -n if df else n
    its = 0
    fl = None
    while True:
        if rep is not None and get("rcx") == 0:
            break
        si, di = get("rsi"), get("rdi")
        equal = None
        if op == "movs":
            store(di, load(si))
        elif op == "stos":
            store(di, regs["rax"] & wm)
        elif op == "lods":
            v = load(si)
            regs["rax"] = v if w >= 32 else (regs["rax"] & ~wm & M64) | v
        elif op == "cmps":
            a, b = load(si), load(di)
            fl, equal = sub_flags(w, a, b), a == b
        else:
            a, b = regs["rax"] & wm, load(di)
            fl, equal = sub_flags(w, a, b), a == b
        if op in ("movs", "lods", "cmps"):
            put("rsi", si + step)
        if op != "lods":
            put("rdi", di + step)
        its += 1
        if rep is None:
            break
        put("rcx", get("rcx") - 1)
        if get("rcx") == 0:
            break
        if op in ("cmps", "scas") and equal != (rep == 0xF3):  # REPE stops on ZF=0, REPNE on ZF=1
            break
    return its, fl


@st.composite
def cases(draw: st.DrawFn, op: str) -> dict:
    mode = draw(st.sampled_from(MODES))
    bits = BITS[mode]
    w = draw(st.sampled_from((8, 16, 32, 64) if bits == 64 else (8, 16, 32)))
    a67 = draw(st.booleans())
    aw = addr_size(mode, a67)
    rep = draw(st.sampled_from((None, 0xF3, 0xF2)))
    df = draw(st.booleans())
    n = w // 8

    def high() -> int:  # register bits above the address size (must not matter for addressing)
        return 0 if aw == 64 else draw(st.integers(0, M64)) & ~((1 << aw) - 1) & M64

    si_off = draw(st.integers(0x40, 0xC0))
    di_off = draw(st.integers(0x40, 0xC0))
    count = draw(st.integers(0, 6))
    rax = draw(st.integers(0, M64))
    src = bytearray(draw(st.binary(min_size=BUF, max_size=BUF)))
    if op == "cmps":
        dst = bytearray(src[si_off - di_off + k] if 0 <= si_off - di_off + k < BUF else 0 for k in range(BUF))
    elif op == "scas":
        acc = rax.to_bytes(8, "little")[:n]
        dst = bytearray(acc[(k - di_off) % n] for k in range(BUF))
    else:
        dst = bytearray(draw(st.binary(min_size=BUF, max_size=BUF)))
    if op in ("cmps", "scas"):  # a few mismatching bytes near rDI, so REPE terminates early sometimes
        for pos in draw(st.lists(st.integers(di_off - 6 * n, di_off + 6 * n - 1), max_size=3)):
            dst[pos] ^= draw(st.integers(1, 255))
        if draw(st.booleans()):  # many differing elements: REPNE runs longer
            flips = draw(st.binary(min_size=BUF, max_size=BUF))
            dst = bytearray(d ^ (f & 0x81) for d, f in zip(dst, flips))
    status = draw(st.integers(0, 0xFFF)) & F.STATUS_MASK
    return {"mode": mode, "w": w, "a67": a67, "aw": aw, "rep": rep, "df": df, "rax": rax,
            "rsi": SRC + si_off | high(), "rdi": DST + di_off | high(), "rcx": count | high(),
            "src": bytes(src), "dst": bytes(dst), "flags": status | (df << F.DF)}


def check_against_reference(op: str, c: dict) -> None:
    code = encode(c["mode"], op, c["w"], rep=c["rep"], a67=c["a67"])
    regs = {r: c[r] for r in ("rax", "rcx", "rsi", "rdi")}
    s, ev = run(c["mode"], code, flags=c["flags"], mem={SRC: c["src"], DST: c["dst"]}, **regs)
    mem = {SRC + k: b for k, b in enumerate(c["src"])}
    mem.update({DST + k: b for k, b in enumerate(c["dst"])})
    exp = dict(regs)
    its, fl = reference(op, c["w"], c["aw"], c["df"], c["rep"], exp, mem)
    assert halted_after(ev, code), ev
    for r in ("rax", "rcx", "rsi", "rdi"):
        assert reg(s, r) == exp[r], (r, hex(reg(s, r)), hex(exp[r]))
    assert s.mem.phys.read_bytes(SRC, BUF) == bytes(mem[SRC + k] for k in range(BUF))
    assert s.mem.phys.read_bytes(DST, BUF) == bytes(mem[DST + k] for k in range(BUF))
    want = fl if fl is not None else {f: bool(c["flags"] >> f & 1) for f in STATUS}
    assert {f: flag(s, f) for f in STATUS} == want
    assert s.undefined == 0
    assert flag(s, F.DF) == c["df"]  # DF is never changed by string instructions
    # One CPU step per iteration (a zero count or no prefix: one step), plus the HLT.
    assert s.icount == max(its, 1) + 1


@given(cases("movs"))
def test_movs_matches_reference(c: dict) -> None:
    check_against_reference("movs", c)


@given(cases("stos"))
def test_stos_matches_reference(c: dict) -> None:
    check_against_reference("stos", c)


@given(cases("lods"))
def test_lods_matches_reference(c: dict) -> None:
    check_against_reference("lods", c)


@given(cases("cmps"))
def test_cmps_matches_reference(c: dict) -> None:
    check_against_reference("cmps", c)


@given(cases("scas"))
def test_scas_matches_reference(c: dict) -> None:
    check_against_reference("scas", c)


# -- stepwise repetition (SDM Vol. 2B REP: interruptible, restartable) ------------------------
@pytest.mark.parametrize("mode", MODES)
def test_rep_movs_one_iteration_per_step(mode: str) -> None:
    """After one step of REP MOVSB with count 3: RIP still at the instruction, RCX = 2, one byte moved."""
    code = bytes.fromhex("f3a4")
    s, cpu = machine(mode, code, rcx=3, rsi=SRC, rdi=DST, mem={SRC: b"xyz"})
    assert cpu.step() is None
    assert s.rip == CODE and reg(s, "rcx") == 2
    assert (reg(s, "rsi"), reg(s, "rdi")) == (SRC + 1, DST + 1)
    assert s.mem.phys.read_bytes(DST, 3) == b"x\0\0"
    assert cpu.step() is None
    assert s.rip == CODE and reg(s, "rcx") == 1
    assert cpu.step() is None
    assert s.rip == CODE + 2 and reg(s, "rcx") == 0
    assert s.mem.phys.read_bytes(DST, 3) == b"xyz"
    ev = cpu.step()
    assert ev is not None and ev.kind == "halted"


@pytest.mark.parametrize("op", ["stos", "movs"])
def test_rep_fault_mid_way_shows_progress_and_restarts(op: str) -> None:
    """A #PF in iteration 3 of 4: RIP at the instruction, rCX/rDI show the two completed iterations;
    after the page is mapped the same instruction resumes and finishes (SDM Vol. 2B REP; Vol. 3A 6.5)."""
    pde = PAGING_BASE + 2 * PAGE + 8  # the PD entry mapping 0x200000..0x3FFFFF (2 MiB page)
    code = encode("long64", op, 8, rep=0xF3)
    s, cpu = machine("long64", code, rax=0x41, rcx=4, rsi=SRC, rdi=0x1FFFFE, mem={SRC: b"ABCD"})
    s.mem.phys.map_page(0x1FF000)
    s.mem.phys.map_page(0x200000)
    saved = s.mem.phys.read(pde, 8)
    s.mem.phys.write(pde, 8, 0)  # not present
    ev = cpu.run(100)
    assert ev.kind == "fault" and ev.vector == 14 and ev.rip == CODE and ev.cr2 == 0x200000
    assert ev.error_code == 2  # a write to a not-present page, supervisor (SDM Vol. 3A 4.7)
    assert s.rip == CODE and reg(s, "rcx") == 2 and reg(s, "rdi") == 0x200000
    want = b"AA" if op == "stos" else b"AB"
    assert s.mem.phys.read_bytes(0x1FFFFE, 2) == want and s.icount == 2
    s.mem.phys.write(pde, 8, saved)
    ev = cpu.run(100)
    assert halted_after(ev, code) and reg(s, "rcx") == 0
    assert s.mem.phys.read_bytes(0x1FFFFE, 4) == (b"AAAA" if op == "stos" else b"ABCD")


@pytest.mark.parametrize("mode", MODES)
def test_repe_cmps_steps_until_mismatch(mode: str) -> None:
    """REPE CMPSB "hello"/"help!" with count 10: four steps, stops on the mismatch (ZF=0), RCX = 6."""
    code = bytes.fromhex("f3a6")
    s, cpu = machine(mode, code, rcx=10, rsi=SRC, rdi=DST, mem={SRC: b"hello", DST: b"help!"})
    for k in range(3):
        assert cpu.step() is None
        assert s.rip == CODE and reg(s, "rcx") == 9 - k and flag(s, F.ZF)
    assert cpu.step() is None
    assert s.rip == CODE + 2 and reg(s, "rcx") == 6
    assert (reg(s, "rsi"), reg(s, "rdi")) == (SRC + 4, DST + 4)
    assert not flag(s, F.ZF) and flag(s, F.CF)  # 'l' - 'p' borrows


@pytest.mark.parametrize("mode", MODES)
def test_repne_scasb_finds_terminator(mode: str) -> None:
    """The strlen idiom: AL=0, rCX = all ones, REPNE SCASB over "abc\\0" stops after 4 bytes with ZF=1."""
    code = bytes.fromhex("f2ae")
    aw = BITS[mode]
    ones = (1 << aw) - 1
    s, ev = run(mode, code, rax=0x1234_5600, rcx=ones, rdi=DST, mem={DST: b"abc\0zzzz"})
    assert halted_after(ev, code)
    assert reg(s, "rcx") == ones - 4 and reg(s, "rdi") == DST + 4
    assert flag(s, F.ZF) and not flag(s, F.CF)
    assert s.icount == 5


@pytest.mark.parametrize("mode", MODES)
def test_repe_scas_stops_on_count(mode: str) -> None:
    """REPE SCASW over equal words ends when the count runs out, with ZF=1 from the last compare."""
    code = encode(mode, "scas", 16, rep=0xF3)
    s, ev = run(mode, code, rax=0xBEEF, rcx=3, rdi=DST, mem={DST: bytes.fromhex("efbe" * 3 + "0000")})
    assert halted_after(ev, code)
    assert reg(s, "rcx") == 0 and reg(s, "rdi") == DST + 6 and flag(s, F.ZF)


@pytest.mark.parametrize("mode", MODES)
def test_repne_cmps_stops_on_equal(mode: str) -> None:
    """REPNE CMPSB stops after the first equal pair (ZF=1)."""
    code = bytes.fromhex("f2a6")
    s, ev = run(mode, code, rcx=8, rsi=SRC, rdi=DST, mem={SRC: b"abcdef", DST: b"xyzdef"})
    assert halted_after(ev, code)
    assert reg(s, "rcx") == 4 and reg(s, "rsi") == SRC + 4 and flag(s, F.ZF)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rep", [0xF3, 0xF2])
def test_f2_and_f3_both_repeat_movs_stos_lods(mode: str, rep: int) -> None:
    """F2 on MOVS/STOS/LODS repeats like F3 (SDM Vol. 2B REP: the repeat prefixes apply to all three)."""
    code = bytes([rep, 0xA4, rep, 0xAA, rep, 0xAC])
    s, ev = run(mode, code, rax=0x77, rcx=2, rsi=SRC, rdi=DST, mem={SRC: b"\x01\x02\x03\x04"})
    assert halted_after(ev, code)
    # MOVSB copied 2 bytes (RCX -> 0); STOSB and LODSB then saw count 0 and did nothing.
    assert s.mem.phys.read_bytes(DST, 3) == b"\x01\x02\x00"
    assert reg(s, "rax") == 0x77 and reg(s, "rsi") == SRC + 2 and reg(s, "rdi") == DST + 2


# -- count 0: no memory access, no flag change (SDM Vol. 2B REP "Operation") ---------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(OPCODE))
@pytest.mark.parametrize("rep", [0xF3, 0xF2])
def test_rep_count_zero_does_nothing(mode: str, op: str, rep: int) -> None:
    """Count 0 (in the address-size counter; higher RCX bits set): no access, no register or flag change."""
    code = encode(mode, op, 8, rep=rep)
    flags_in = (1 << F.CF) | (1 << F.PF) | (1 << F.SF)
    high = {16: 0x7FFF_0001_0000, 32: 0xABCD_0000_0000, 64: 0}[BITS[mode]]
    regs = {"rax": 0x1111_2222_3333_4455, "rcx": high,
            "rsi": 0x9000, "rdi": 0x9800}  # no RAM at 0x9000..0x9FFF: the bus sees any access
    for count in (0, 1):
        r = {**regs, "rcx": high | count}
        s, cpu = machine(mode, code, flags=flags_in, **r)
        bus = RecordingBus()
        s.mem.phys.bus = bus
        before = s.read_rflags()
        ev = cpu.run(100)
        assert halted_after(ev, code)
        assert bool(bus.log) == bool(count), bus.log  # count 1: the sanity check that accesses are seen
        if count == 0:
            assert s.read_rflags() == before and s.undefined == 0
            assert [reg(s, n) for n in r] == list(r.values())
            assert s.icount == 2


# -- address size (SDM Vol. 2A 3.1.1.3: rSI/rDI/rCX follow the address-size attribute) -------------
def test_real_mode_counter_follows_address_size() -> None:
    """RCX = 0x10003: without 67 the count is CX = 3 (done after 3 steps); with 67 it is ECX."""
    for a67 in (False, True):
        code = (b"\x67" if a67 else b"") + bytes.fromhex("f3aa")
        s, cpu = machine("real", code, rax=0x41, rcx=0x1_0003, rdi=DST)
        for _ in range(3):
            assert cpu.step() is None
        assert reg(s, "rcx") == 0x10000  # CX 3 -> 0 (bit 16 kept), or ECX 0x10003 -> 0x10000
        assert s.rip == (CODE if a67 else CODE + len(code))  # ECX is not 0 yet: still repeating


def test_real_mode_index_registers_wrap_at_64k() -> None:
    """16-bit addressing: SI/DI wrap 0xFFFF -> 0 (DF=0) and 0 -> 0xFFFF (DF=1); bits 63:16 are kept."""
    hi = 0xABCD_0000_0000_0000
    bases = {DS: 0x10000, ES: 0x10000}
    s, _ = run("real", bytes.fromhex("a4"), bases=bases, rsi=hi | 0xFFFF, rdi=hi | 0x1234,
                mem={0x1FFFF: b"\x99"})
    assert reg(s, "rsi") == hi and reg(s, "rdi") == hi | 0x1235
    assert s.mem.phys.read_bytes(0x11234, 1) == b"\x99"
    s, _ = run("real", bytes.fromhex("aa"), bases=bases, rax=0x5A, rdi=hi, flags=1 << F.DF)
    assert reg(s, "rdi") == hi | 0xFFFF and s.mem.phys.read_bytes(0x10000, 1) == b"\x5a"
    # LODSW at SI=0xFFFE reads 0xFFFE..0xFFFF and leaves SI = 0.
    s, _ = run("real", bytes.fromhex("ad"), bases=bases, rsi=0xFFFE, mem={0x1FFFE: b"\x34\x12"})
    assert reg(s, "rax") & 0xFFFF == 0x1234 and reg(s, "rsi") == 0
    # With 67 (32-bit addressing) ESI does not wrap.
    s, _ = run("real", bytes.fromhex("67a4"), bases=bases, rsi=0xFFFF, rdi=0x10, mem={0x1FFFF: b"\x77"})
    assert reg(s, "rsi") == 0x10000 and s.mem.phys.read_bytes(0x10010, 1) == b"\x77"


def test_prot32_address_size_16() -> None:
    """67 in 32-bit code: SI/DI/CX (upper halves ignored and preserved)."""
    code = bytes.fromhex("67f3a5")  # rep movsd dword ptr es:[di], dword ptr [si]
    s, ev = run("prot32", code, rsi=0x5A5A_0000 | SRC, rdi=0xA5A5_0000 | DST, rcx=0x7777_0002,
                mem={SRC: bytes(range(1, 9))})
    assert halted_after(ev, code)
    assert s.mem.phys.read_bytes(DST, 8) == bytes(range(1, 9))
    assert (reg(s, "rsi"), reg(s, "rdi"), reg(s, "rcx")) == (0x5A5A_0000 | SRC + 8, 0xA5A5_0000 | DST + 8, 0x7777_0000)


def test_long64_address_size_32() -> None:
    """67 in 64-bit mode: ESI/EDI/ECX; their 32-bit updates zero-extend (SDM Vol. 1 3.4.1.1)."""
    code = bytes.fromhex("67f348a5")  # rep movsq qword ptr [edi], qword ptr [esi]
    s, ev = run("long64", code, rsi=0xFFFF_FFFF_0000_0000 | SRC, rdi=0x1_0000_0000 | DST,
                rcx=0x8000_0000_0000_0001, mem={SRC: bytes(range(1, 9))})
    assert halted_after(ev, code)
    assert s.mem.phys.read_bytes(DST, 8) == bytes(range(1, 9))
    assert (reg(s, "rsi"), reg(s, "rdi"), reg(s, "rcx")) == (SRC + 8, DST + 8, 0)


def test_long64_address_size_64_uses_full_registers() -> None:
    """Without 67 in 64-bit mode the full RSI/RDI are addresses (DF=1: they move down)."""
    code = bytes.fromhex("48a5")
    s, _ = run("long64", code, rsi=0x10008, rdi=0x10100, flags=1 << F.DF, mem={0x10008: b"ABCDEFGH"})
    assert s.mem.phys.read_bytes(0x10100, 8) == b"ABCDEFGH"
    assert (reg(s, "rsi"), reg(s, "rdi")) == (0x10000, 0x100F8)


# -- segments (SDM Vol. 1 7.3.9.1: DS:rSI may be overridden, ES:rDI may not) -------------------------
SEG_CASES = {
    "real": {DS: 0x10000, ES: 0x14000, FS: 0x18000},
    "prot32": {DS: 0x10000, ES: 0x14000, FS: 0x18000},
    "long64": {DS: 0x10000, ES: 0x14000, FS: 0x18000},  # DS/ES bases are ignored in 64-bit mode
}


def _src_base(mode: str, seg: int | None) -> int:
    seg = DS if seg is None else seg
    if mode == "long64" and seg not in (FS, GS):
        return 0
    return SEG_CASES[mode][seg]


def _es_base(mode: str) -> int:
    return 0 if mode == "long64" else SEG_CASES[mode][ES]


@pytest.mark.parametrize("mode", list(SEG_CASES))
@pytest.mark.parametrize("seg", [None, ES, FS, DS, SS])
def test_movs_source_segment_override(mode: str, seg: int | None) -> None:
    """The source of MOVS is DS:rSI or the prefix's segment (only FS/GS bases count in 64-bit mode)."""
    bases = {**SEG_CASES[mode], SS: 0x1C000}
    code = encode(mode, "movs", 8, seg=seg)
    marker = {0: 0xEE, 0x10000: 1, 0x14000: 2, 0x18000: 3, 0x1C000: 4}  # a distinct byte at base + 0x100
    mem = {b + 0x100: bytes([m]) for b, m in marker.items()}
    s, ev = run(mode, code, bases=bases, rsi=0x100, rdi=0x200, mem=mem)
    assert halted_after(ev, code)
    base = bases[DS if seg is None else seg]
    if mode == "long64" and seg not in (FS, GS):
        base = 0
    assert s.mem.phys.read_bytes(_es_base(mode) + 0x200, 1) == bytes([marker[base]])


@pytest.mark.parametrize("mode", list(SEG_CASES))
@pytest.mark.parametrize("op", ["stos", "scas", "cmps"])
def test_destination_is_always_es(mode: str, op: str) -> None:
    """A segment prefix never redirects the ES:rDI operand (STOS writes, SCAS/CMPS read it)."""
    bases = SEG_CASES[mode]
    code = encode(mode, op, 8, seg=FS)
    es, fs = _es_base(mode), bases[FS]
    mem = {es + 0x200: b"\x42", fs + 0x200: b"\x43", fs + 0x100: b"\x42", bases[DS] + 0x100: b"\x40"}
    s, ev = run(mode, code, bases=bases, rax=0x42, rsi=0x100, rdi=0x200, mem=mem)
    assert halted_after(ev, code)
    if op == "stos":
        assert s.mem.phys.read_bytes(es + 0x200, 1) == b"\x42"
        assert s.mem.phys.read_bytes(fs + 0x200, 1) == b"\x43"  # untouched
    else:
        assert flag(s, F.ZF)  # 0x42 (AL, or FS:[SI]) == ES:[DI]


@pytest.mark.parametrize("mode", list(SEG_CASES))
def test_lods_and_cmps_source_override(mode: str) -> None:
    bases = SEG_CASES[mode]
    fs = bases[FS]
    s, _ = run(mode, encode(mode, "lods", 8, seg=FS), bases=bases, rsi=0x100, mem={fs + 0x100: b"\x9c"})
    assert reg(s, "rax") & 0xFF == 0x9C
    code = encode(mode, "cmps", 8, seg=FS)
    s, _ = run(mode, code, bases=bases, rsi=0x100, rdi=0x200,
                mem={fs + 0x100: b"\x05", _es_base(mode) + 0x200: b"\x07", _src_base(mode, None) + 0x100: b"\x07"})
    assert not flag(s, F.ZF) and flag(s, F.CF)  # FS:[SI] = 5 < ES:[DI] = 7


# -- accumulator sizes (SDM Vol. 2A LODS, Vol. 2B STOS; Vol. 1 3.4.1.1) ------------------------------
RAX0 = 0x1122_3344_5566_7788
DATA = bytes.fromhex("a1a2a3a4a5a6a7a8")
MODE_WIDTHS = [(m, w) for m in MODES for w in (8, 16, 32, 64) if w < 64 or m == "long64"]  # REX.W: 64-bit only


@pytest.mark.parametrize("mode,w", MODE_WIDTHS)
def test_lods_accumulator(mode: str, w: int) -> None:
    code = encode(mode, "lods", w)
    s, _ = run(mode, code, rax=RAX0, rsi=SRC, mem={SRC: DATA})
    v = int.from_bytes(DATA[: w // 8], "little")
    want = {8: RAX0 & ~0xFF | v, 16: RAX0 & ~0xFFFF | v, 32: v, 64: v}[w]  # EAX writes zero-extend
    assert reg(s, "rax") == want & M64
    assert reg(s, "rsi") == SRC + w // 8


@pytest.mark.parametrize("mode,w", MODE_WIDTHS)
def test_stos_accumulator(mode: str, w: int) -> None:
    code = encode(mode, "stos", w)
    s, _ = run(mode, code, rax=RAX0, rdi=DST, mem={DST: b"\xff" * 10})
    n = w // 8
    assert s.mem.phys.read_bytes(DST, 10) == RAX0.to_bytes(8, "little")[:n] + b"\xff" * (10 - n)
    assert reg(s, "rdi") == DST + n and reg(s, "rax") == RAX0


# -- operand order of the compares ------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_cmps_subtracts_destination_from_source(mode: str) -> None:
    """CMPS computes [rSI] - [rDI] (SDM Vol. 2A CMPS: SRC1 = DS:rSI is the minuend)."""
    s, _ = run(mode, bytes.fromhex("a6"), rsi=SRC, rdi=DST, mem={SRC: b"\x01", DST: b"\x02"})
    assert flag(s, F.CF) and flag(s, F.SF) and not flag(s, F.ZF)
    s, _ = run(mode, bytes.fromhex("a6"), rsi=SRC, rdi=DST, mem={SRC: b"\x02", DST: b"\x01"})
    assert not flag(s, F.CF) and not flag(s, F.SF) and not flag(s, F.ZF)
    s, _ = run(mode, bytes.fromhex("a6"), rsi=SRC, rdi=DST, mem={SRC: b"\x80", DST: b"\x01"})
    assert flag(s, F.OF) and not flag(s, F.CF)  # -128 - 1 overflows


@pytest.mark.parametrize("mode", MODES)
def test_scas_subtracts_memory_from_accumulator(mode: str) -> None:
    """SCAS computes AL/rAX - ES:[rDI] (SDM Vol. 2B SCAS)."""
    s, _ = run(mode, bytes.fromhex("ae"), rax=0x01, rdi=DST, mem={DST: b"\x02"})
    assert flag(s, F.CF) and flag(s, F.AF) and not flag(s, F.ZF)
    s, _ = run(mode, bytes.fromhex("ae"), rax=0x0302, rdi=DST, mem={DST: b"\x02"})
    assert flag(s, F.ZF) and not flag(s, F.CF)  # only AL takes part


# -- runs via the shared helper too (the conftest path) --------------------------------------------
def test_run_code_rep_stosd_long64() -> None:
    s, ev = run_code("long64", "f3ab", rax=0xDEADBEEF, rcx=4, rdi=0x10000)
    assert ev.kind == "halted"
    assert s.mem.phys.read_bytes(0x10000, 16) == bytes.fromhex("efbeadde") * 4
    assert reg(s, "rcx") == 0 and reg(s, "rdi") == 0x10010
