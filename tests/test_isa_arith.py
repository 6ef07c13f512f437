"""Integer arithmetic and logic (spec/isa/arith.py) against an independent plain-int reference.

Every instruction of the family (ADD ADC SUB SBB CMP AND OR XOR TEST INC DEC NEG NOT) is run
in every mode (real, prot16, prot32, long64), at every operand size the mode can encode
(8/16/32, and 64 with REX.W in 64-bit mode), in every operand form of the opcode map
(E,G  G,E  AL/rAX,I  80/81 Ib/Iz  82 (not in 64-bit mode)  83 Ibs  unary E  40+r/48+r),
with the E operand a register or a memory operand in the data page (0x10000).  The
expected result, the six status flags and the undefined-flag mask are computed here with
plain Python ints (no spec code), following SDM Vol. 1 3.4.3.1 / Appendix A and the
instruction pages of SDM Vol. 2.

Every generated encoding is cross-checked with capstone (mnemonic, length and operands), so
the encoder in this file cannot silently test something else than it claims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import capstone
import pytest
from capstone import x86 as cs86
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.machine import CODE, DATA, flat_machine
from spec.memory import PAGE
from spec.state import MachineState, Segment

MODES = ("real", "prot16", "prot32", "long64")
BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}
M64 = (1 << 64) - 1
DS = 3

# Row index in the one-byte ALU block and in the 80/81/82/83 groups (SDM Vol. 2D Table ).
ALU = {"ADD": 0, "OR": 1, "ADC": 2, "SBB": 3, "AND": 4, "SUB": 5, "XOR": 6, "CMP": 7}
# Unary group rows: opcode for 8-bit (the v form is +1) and ModRM digit (Table A-6, groups 3, 4, 5).
UNARY = {"NOT": (0xF6, 2), "NEG": (0xF6, 3), "INC": (0xFE, 0), "DEC": (0xFE, 1)}
ALL = (*ALU, "TEST", *UNARY)
LOGIC = frozenset({"AND", "OR", "XOR", "TEST"})
NO_WRITE = frozenset({"CMP", "TEST"})
LOCKABLE = frozenset({"ADD", "OR", "ADC", "SBB", "AND", "SUB", "XOR", "NOT", "NEG", "INC", "DEC"})
STATUS = (F.CF, F.PF, F.AF, F.ZF, F.SF, F.OF)


def mask(w: int) -> int:
    return (1 << w) - 1


# ----------------------------------------------------------------------------------------------
# The reference: plain ints only (SDM Vol. 1 3.4.3.1; Vol. 2 instruction pages)
# ----------------------------------------------------------------------------------------------

def signed(w: int, v: int) -> int:
    return v - (1 << w) if v >> (w - 1) & 1 else v


def fits_signed(w: int, v: int) -> bool:
    return -(1 << (w - 1)) <= v < (1 << (w - 1))


def reference(mnem: str, w: int, a: int, b: int, cf_in: bool) -> tuple[int | None, dict[int, bool | None], int]:
    """(result or None if nothing is written, flag -> value (None: unchanged), undefined mask).

    ``a`` is the destination operand (the only one for unary instructions), ``b`` the source.
    """
    m = mask(w)
    c = int(cf_in)
    fl: dict[int, bool | None] = {}
    undefined = 0
    if mnem in ("ADD", "ADC", "INC"):
        if mnem == "INC":
            b, c = 1, 0
        elif mnem == "ADD":
            c = 0
        total = a + b + c
        r = total & m
        fl[F.CF] = None if mnem == "INC" else total > m  # INC: CF not affected
        fl[F.OF] = not fits_signed(w, signed(w, a) + signed(w, b) + c)
        fl[F.AF] = (a & 0xF) + (b & 0xF) + c > 0xF
    elif mnem in ("SUB", "SBB", "CMP", "DEC", "NEG"):
        if mnem == "DEC":
            b, c = 1, 0
        elif mnem == "NEG":
            a, b, c = 0, a, 0  # NEG is 0 - dest
        elif mnem != "SBB":
            c = 0
        total = a - b - c
        r = total & m
        fl[F.CF] = None if mnem == "DEC" else a < b + c  # DEC: CF not affected
        fl[F.OF] = not fits_signed(w, signed(w, a) - signed(w, b) - c)
        fl[F.AF] = (a & 0xF) < (b & 0xF) + c
        if mnem == "NEG":
            assert fl[F.CF] == (b != 0)  # SDM Vol. 2B NEG: CF = 0 iff the source is 0
    elif mnem in LOGIC:
        r = {"AND": a & b, "TEST": a & b, "OR": a | b, "XOR": a ^ b}[mnem]
        fl[F.CF] = fl[F.OF] = False
        fl[F.AF] = None
        undefined = 1 << F.AF  # SDM Vol. 2A AND etc.: "The state of the AF flag is undefined."
    elif mnem == "NOT":
        return ~a & m, {f: None for f in STATUS}, 0  # SDM Vol. 2B NOT: no flags affected
    else:  # pragma: no cover
        raise AssertionError(mnem)
    fl[F.ZF] = r == 0
    fl[F.SF] = bool(r >> (w - 1) & 1)
    fl[F.PF] = bin(r & 0xFF).count("1") % 2 == 0
    return (None if mnem in NO_WRITE else r), fl, undefined


def test_reference_sanity() -> None:
    """A few textbook values, so the reference itself is anchored."""
    r, fl, _ = reference("ADD", 8, 0xFF, 0x01, False)
    assert r == 0 and fl[F.CF] and fl[F.ZF] and fl[F.AF] and not fl[F.OF] and fl[F.PF]
    r, fl, _ = reference("ADD", 8, 0x7F, 0x01, False)
    assert r == 0x80 and fl[F.OF] and fl[F.SF] and not fl[F.CF]
    r, fl, _ = reference("SUB", 16, 0, 1, False)
    assert r == 0xFFFF and fl[F.CF] and fl[F.SF] and not fl[F.OF] and fl[F.AF]
    r, fl, _ = reference("SBB", 32, 5, 5, True)
    assert r == M64 >> 32 and fl[F.CF]
    r, fl, _ = reference("ADC", 64, M64, 0, True)
    assert r == 0 and fl[F.CF] and fl[F.ZF]
    r, fl, _ = reference("NEG", 8, 0x80, 0, False)
    assert r == 0x80 and fl[F.OF] and fl[F.CF]
    r, fl, _ = reference("DEC", 8, 0x80, 0, True)
    assert r == 0x7F and fl[F.OF] and fl[F.CF] is None


# ----------------------------------------------------------------------------------------------
# Register file (plain ints; SDM Vol. 1 3.4.1.1 and Vol. 2A 3.7.2.1 for AH..BH vs SPL..DIL)
# ----------------------------------------------------------------------------------------------

def resolve(enc: int, size: int, rex: bool) -> tuple[int, bool]:
    """Register number and high-byte flag of a ModRM/opcode register encoding."""
    if size == 8 and not rex and 4 <= enc <= 7:
        return enc - 4, True
    return enc, False


def reg_read(regs: list[int], enc: int, size: int, rex: bool) -> int:
    r, high = resolve(enc, size, rex)
    if high:
        return regs[r] >> 8 & 0xFF
    return regs[r] & mask(size)


def reg_write(regs: list[int], enc: int, size: int, rex: bool, v: int) -> None:
    r, high = resolve(enc, size, rex)
    if high:
        regs[r] = regs[r] & ~0xFF00 & M64 | v << 8
    elif size >= 32:
        regs[r] = v  # 32-bit writes zero-extend (in 64-bit mode; invisible elsewhere)
    else:
        regs[r] = regs[r] & ~mask(size) & M64 | v


_N64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")


def reg_text(enc: int, size: int, rex: bool) -> str:
    """The register's assembler name as capstone prints it."""
    r, high = resolve(enc, size, rex)
    if high:
        return ("ah", "ch", "dh", "bh")[r]
    if r >= 8:
        return f"r{r}" + {8: "b", 16: "w", 32: "d", 64: ""}[size]
    if size == 64:
        return _N64[r]
    if size == 32:
        return "e" + _N64[r][1:]
    if size == 16:
        return _N64[r][1:]
    return ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil")[r]


# ----------------------------------------------------------------------------------------------
# Cases and their encoding
# ----------------------------------------------------------------------------------------------

FORMS = ("EG", "GE", "AI", "EI", "EI82", "EIs", "E", "Z")
"""E,G / G,E / AL|rAX,imm / 80|81|F6|F7 imm / 82 imm / 83 imm8s / unary E / INC|DEC 40+r|48+r."""


def forms_for(mnem: str, mode: str) -> list[str]:
    if mnem in ALU:
        fs = ["EG", "GE", "AI", "EI", "EIs"]
        if mode != "long64":
            fs.append("EI82")  # 82 is invalid in 64-bit mode (Table A-2, i64)
        return fs
    if mnem == "TEST":
        return ["EG", "AI", "EI"]
    if mnem in ("INC", "DEC") and mode != "long64":
        return ["E", "Z"]  # 40-4F are REX prefixes in 64-bit mode
    return ["E"]


def sizes_for(form: str, mode: str) -> list[int]:
    if form == "EI82":
        return [8]
    if form in ("EIs", "Z"):
        return [16, 32] if mode != "long64" else [16, 32, 64]
    return [8, 16, 32] if mode != "long64" else [8, 16, 32, 64]


def has_e(form: str) -> bool:
    return form in ("EG", "GE", "EI", "EI82", "EIs", "E")


@dataclass
class Case:
    mode: str
    mnem: str
    form: str
    size: int
    mem: bool  # the E operand is the memory operand at DATA + off
    e: int  # E register encoding (when not mem) / Z register
    g: int  # G register encoding
    rex: bool  # emit a REX prefix (always when needed; for 8-bit it selects SPL..DIL over AH..BH)
    imm: int  # immediate as encoded (unsigned, its encoded width)
    off: int
    lock: bool
    regs: list[int]
    rflags: int
    memval: int
    undef_in: int = 0  # status flags already undefined before the instruction (RFLAGS bit mask)

    # -- derived --------------------------------------------------------------------------
    @property
    def imm_bytes(self) -> int:
        if self.form in ("EIs", "EI82"):
            return 1
        if self.form in ("AI", "EI"):
            return 1 if self.size == 8 else 2 if self.size == 16 else 4
        return 0

    def imm_value(self) -> int:
        """The immediate as an operand-size value (Ibs and Iz sign-extended, SDM Vol. 2A 2.2.1.5)."""
        n = 8 * self.imm_bytes
        v = self.imm
        if v >> (n - 1) & 1:
            v |= mask(self.size) ^ mask(n)
        return v

    def rex_byte(self) -> int | None:
        w = self.size == 64
        r = self.form in ("EG", "GE") and self.g >= 8
        b = has_e(self.form) and not self.mem and self.e >= 8
        if not (self.rex or w or r or b):
            return None
        return 0x40 | w << 3 | r << 2 | b

    def uses_rex(self) -> bool:
        return self.rex_byte() is not None

    def encode(self) -> bytes:
        bits = BITS[self.mode]
        out = bytearray()
        if self.lock:
            out.append(0xF0)
        if (self.size == 16 and bits != 16) or (self.size == 32 and bits == 16):
            out.append(0x66)
        if self.mem and self.mode == "prot16":
            out.append(0x67)  # 32-bit addressing reaches the data page above 64 KiB
        rex = self.rex_byte()
        if rex is not None:
            out.append(rex)
        v = 0 if self.size == 8 else 1
        digit = 0
        m, f = self.mnem, self.form
        if f == "EG":
            out.append(0x84 + v if m == "TEST" else ALU[m] * 8 + v)
        elif f == "GE":
            out.append(ALU[m] * 8 + 2 + v)
        elif f == "AI":
            out.append(0xA8 + v if m == "TEST" else ALU[m] * 8 + 4 + v)
        elif f == "EI":
            out.append(0xF6 + v if m == "TEST" else 0x80 + v)
            digit = 0 if m == "TEST" else ALU[m]
        elif f == "EI82":
            out.append(0x82)
            digit = ALU[m]
        elif f == "EIs":
            out.append(0x83)
            digit = ALU[m]
        elif f == "E":
            op, digit = UNARY[m]
            out.append(op + v)
        elif f == "Z":
            out.append((0x40 if m == "INC" else 0x48) + self.e)
        if has_e(f):
            reg_field = (self.g & 7) if f in ("EG", "GE") else digit
            if not self.mem:
                out.append(0xC0 | reg_field << 3 | (self.e & 7))
            elif self.mode == "real":
                out += bytes([reg_field << 3 | 6]) + self.off.to_bytes(2, "little")  # [disp16], DS base 0x10000
            elif self.mode == "long64":
                out += bytes([reg_field << 3 | 4, 0x25]) + (DATA + self.off).to_bytes(4, "little")  # SIB disp32
            else:
                out += bytes([reg_field << 3 | 5]) + (DATA + self.off).to_bytes(4, "little")  # [disp32]
        out += self.imm.to_bytes(self.imm_bytes, "little")
        return bytes(out)

    # -- operands as (kind, detail) in the instruction's operand order ----------------------
    def dst_src(self) -> tuple[tuple[str, int], tuple[str, int] | None]:
        e = ("mem", 0) if self.mem else ("reg", self.e)
        f = self.form
        if f == "EG":
            return e, ("reg", self.g)
        if f == "GE":
            return ("reg", self.g), e
        if f == "AI":
            return ("reg", 0), ("imm", 0)
        if f in ("EI", "EI82", "EIs"):
            return e, ("imm", 0)
        if f == "Z":
            return ("reg", self.e), None
        return e, None


_TEMPLATES: dict[str, MachineState] = {}


def execute(case: Case, code: bytes) -> tuple[MachineState, StopEvent]:
    tpl = _TEMPLATES.get(case.mode)
    if tpl is None:
        tpl = _TEMPLATES[case.mode] = flat_machine(case.mode)  # type: ignore[arg-type]
        if case.mode == "real":
            # DS = 0x1000, so [disp16] addresses the data page (SDM Vol. 3A 20.1.1: base = selector * 16).
            tpl.seg[DS] = Segment(selector=DATA >> 4, base=DATA, limit=0xFFFF, type=0x3)
    st = tpl.copy()
    st.mem.phys.write_bytes(CODE, code + b"\xf4")
    st.gpr = list(case.regs)
    st.write_rflags(case.rflags)
    st.undefined = case.undef_in
    st.mem.phys.write_bytes(DATA + case.off, case.memval.to_bytes(case.size // 8, "little"))
    ev = SpecCPU(st).run(4)
    return st, ev


_CS: dict[str, capstone.Cs] = {}


def disasm(mode: str, code: bytes):
    md = _CS.get(mode)
    if md is None:
        md = capstone.Cs(capstone.CS_ARCH_X86, {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32,
                                                64: capstone.CS_MODE_64}[BITS[mode]])
        md.detail = True
        _CS[mode] = md
    return list(md.disasm(code, CODE))


def check_encoding(case: Case, code: bytes) -> None:
    """capstone reads ``code`` as the instruction, operands and size the case claims."""
    insns = disasm(case.mode, code)
    assert len(insns) == 1 and insns[0].size == len(code), (code.hex(), insns)
    ins = insns[0]
    want = ("lock " if case.lock else "") + case.mnem.lower()
    assert ins.mnemonic == want, (code.hex(), ins.mnemonic, ins.op_str)
    ops: list = []
    for op in case.dst_src():
        if op is None:
            continue
        kind, enc = op
        if kind == "reg":
            ops.append(reg_text(enc, case.size, case.uses_rex()))
        elif kind == "mem":
            ops.append(("mem", (case.off if case.mode == "real" else DATA + case.off), case.size // 8))
        else:
            ops.append(("imm", case.imm_value()))
    got = []
    for o in ins.operands:
        if o.type == cs86.X86_OP_REG:
            got.append(ins.reg_name(o.reg))
        elif o.type == cs86.X86_OP_MEM:
            got.append(("mem", o.mem.disp & M64, o.size))
        else:
            got.append(("imm", o.imm & mask(case.size)))
    assert got == ops, (code.hex(), ins.mnemonic, ins.op_str)


def check(case: Case) -> None:
    code = case.encode()
    check_encoding(case, code)
    st, ev = execute(case, code)
    assert ev.kind == "halted", (code.hex(), ev.describe())
    assert ev.rip == CODE + len(code) + 1

    w, rex = case.size, case.uses_rex()
    regs = list(case.regs)

    def value(op: tuple[str, int]) -> int:
        kind, enc = op
        if kind == "reg":
            return reg_read(regs, enc, w, rex)
        if kind == "mem":
            return case.memval
        return case.imm_value()

    dst, src = case.dst_src()
    a = value(dst)
    b = value(src) if src is not None else 0
    cf_in = bool(case.rflags & 1)
    r, fl, undefined = reference(case.mnem, w, a, b, cf_in)

    exp_mem = case.memval
    if r is not None:
        if dst[0] == "reg":
            reg_write(regs, dst[1], w, rex, r)
        else:
            exp_mem = r
    what = f"{case.mnem} {case.form} w={w} {case.mode} a={a:#x} b={b:#x} cf={cf_in:d} code={code.hex()}"
    visible = M64 if case.mode == "long64" else mask(32)
    got_regs = [st.D.concrete(v) & visible for v in st.gpr]
    assert got_regs == [v & visible for v in regs], what
    got_mem = st.mem.phys.read(DATA + case.off, w // 8)
    assert got_mem == exp_mem, what
    for f in STATUS:
        want = fl[f]
        if want is None:
            if undefined >> f & 1:
                continue  # architecturally undefined: the value is not pinned here
            want = bool(case.rflags >> f & 1)  # not affected
        assert bool(st.get_flag(f)) == want, f"{F.NAMES[f]}: {what}"
    # Newly undefined flags are added; defined ones leave the set; unaffected ones keep their mark.
    unaffected = sum(1 << f for f in STATUS if fl[f] is None and not undefined >> f & 1)
    assert st.undefined == undefined | (case.undef_in & unaffected), what
    rf = st.D.concrete(st.read_rflags())
    assert rf & ~F.STATUS_MASK == case.rflags & ~F.STATUS_MASK, what


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------

@functools.cache
def u(w: int) -> st.SearchStrategy[int]:
    """Values of width ``w``, with the carry/overflow boundaries well represented."""
    m = mask(w)
    edges = [0, 1, 2, 0xF, 0x10, m, m - 1, m >> 1, (m >> 1) + 1, (m >> 1) - 1]
    return st.one_of(st.sampled_from([e & m for e in edges]), st.integers(0, m))


STATUS_BITS = [1 << f for f in STATUS]


def rflags_from(bits: int) -> int:
    """RFLAGS with the status flags and DF taken from the low 7 bits of ``bits``."""
    v = 2
    for k, bit in enumerate([*STATUS_BITS, 1 << F.DF]):
        if bits >> k & 1:
            v |= bit
    return v


def place(case: Case, a: int, b: int) -> bool:
    """Put ``a`` into the destination and ``b`` into the source operand; False if they alias."""
    size, rex = case.size, case.uses_rex()
    dst, src = case.dst_src()
    if dst[0] == "reg":
        if src is not None and src[0] == "reg" and resolve(src[1], size, rex)[0] == resolve(dst[1], size, rex)[0]:
            return False
        reg_write(case.regs, dst[1], size, rex, a)
    else:
        case.memval = a
    if src is not None:
        if src[0] == "reg":
            reg_write(case.regs, src[1], size, rex, b)
        elif src[0] == "mem":
            case.memval = b
        else:
            case.imm = b & mask(8 * case.imm_bytes)
    return True


@st.composite
def cases(draw: st.DrawFn, mode: str, mnem: str) -> Case:
    form = draw(st.sampled_from(forms_for(mnem, mode)))
    size = draw(st.sampled_from(sizes_for(form, mode)))
    long = mode == "long64"
    mem = has_e(form) and form != "Z" and draw(st.booleans())
    rex = long and draw(st.booleans()) if size == 8 else False
    nregs = 16 if (long and (size != 8 or rex)) else 8
    e = draw(st.integers(0, 7 if form == "Z" else nregs - 1))
    g = draw(st.integers(0, nregs - 1))
    off = draw(st.integers(0, PAGE - size // 8))
    lock = mem and mnem in LOCKABLE and form != "GE" and draw(st.booleans())
    raw = draw(st.binary(min_size=128, max_size=128))  # the 16 registers' other bits
    regs = [int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(16)]
    case = Case(mode, mnem, form, size, mem, e, g, rex, 0, off, lock, regs,
                rflags_from(draw(st.integers(0, 127))), draw(u(size)),
                undef_in=rflags_from(draw(st.integers(0, 63))) & F.STATUS_MASK)
    a, b = draw(u(size)), draw(u(size))
    if not place(case, a, b):  # aliased registers (ADD AL, AL; ADD AL, AH reads one register): only a
        reg_write(case.regs, case.dst_src()[0][1], size, case.uses_rex(), a)
    return case


@pytest.mark.parametrize("mnem", ALL)
@settings(max_examples=40)
@given(data=st.data())
def test_alu_property(mnem: str, data: st.DataObject) -> None:
    """Result, all six status flags, the undefined mask, other registers and memory match the reference."""
    mode = data.draw(st.sampled_from(MODES))
    check(data.draw(cases(mode, mnem)))


# Boundary operand pairs (a, b): carries out of bit 3 and bit w-1, signed overflow both ways, zero.
def _edge_pairs(w: int) -> list[tuple[int, int]]:
    m = mask(w)
    smax, smin = m >> 1, (m >> 1) + 1
    return [(0, 0), (m, 1), (smax, 1), (smin, 1), (smin, smax), (0xF & m, 1), (0x10 & m, 1), (m, m),
            (1, m), (smin, smin)]


def _all_shapes(mode: str, mnem: str):
    long = mode == "long64"
    for form in forms_for(mnem, mode):
        for size in sizes_for(form, mode):
            for mem in ([False, True] if has_e(form) and form != "Z" else [False]):
                for rex in ([False, True] if long and size == 8 else [False]):
                    yield form, size, mem, rex


@pytest.mark.parametrize("mnem", ALL)
@pytest.mark.parametrize("mode", MODES)
def test_alu_every_form(mode: str, mnem: str) -> None:
    """Every operand form x size x (reg|mem) x (REX or not), with boundary operand pairs and carry-ins."""
    long = mode == "long64"
    k = 0
    for form, size, mem, rex in _all_shapes(mode, mnem):
        pairs = _edge_pairs(size)
        for _ in range(3):  # three boundary pairs per shape, cycling so every pair is used
            a, b = pairs[k % len(pairs)]
            k += 1
            # Deterministic register choice that sweeps high registers and AH..BH / SPL..DIL.
            nregs = 16 if (long and (size != 8 or rex)) else 8
            e = (3 * k + 1) % nregs if form != "Z" else k % 8
            g = (5 * k + 2) % nregs
            if form in ("EG", "GE") and g == e:
                g = (g + 1) % nregs
            regs = [(0x0123_4567_89AB_CDEF * (i + 1)) & M64 for i in range(16)]
            lock = mnem in LOCKABLE and mem and form != "GE" and k % 2 == 0
            case = Case(mode, mnem, form, size, mem, e, g, rex, 0, (k * 37) % (PAGE - 8), lock, regs,
                        rflags_from(k), 0, undef_in=rflags_from(k * 7) & F.STATUS_MASK)
            if not place(case, a, b):
                continue
            check(case)


# ----------------------------------------------------------------------------------------------
# Named edge cases
# ----------------------------------------------------------------------------------------------

def run(mode: str, code: str, *, rflags: int = 2, **regs: int) -> tuple[MachineState, StopEvent]:
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
    values = [0] * 16
    values[4] = 0x8000
    for n, v in regs.items():
        values[names.index(n)] = v
    raw = bytes.fromhex(code.replace(" ", ""))
    case = Case(mode, "NOP", "E", 8, False, 0, 0, False, 0, 0, False, values, rflags, 0)
    return execute(case, raw)


def dis(mode: str, code: str) -> str:
    (i,) = disasm(mode, bytes.fromhex(code.replace(" ", "")))
    return f"{i.mnemonic} {i.op_str}"


def test_32bit_write_zero_extends_in_64bit_mode() -> None:
    """SDM Vol. 1 3.4.1.1: 32-bit results are zero-extended into the 64-bit register."""
    assert dis("long64", "01d8") == "add eax, ebx"
    st, _ = run("long64", "01d8", rax=0xFFFF_FFFF_0000_0001, rbx=1)
    assert st.gpr[0] == 2
    # XOR r32, r32, the zeroing idiom, clears all 64 bits.
    assert dis("long64", "31c0") == "xor eax, eax"
    st, _ = run("long64", "31c0", rax=M64)
    assert st.gpr[0] == 0 and st.get_flag(F.ZF) and st.get_flag(F.PF)


def test_32bit_cmp_and_test_do_not_write() -> None:
    """CMP/TEST write no destination, so the upper half of the 64-bit register stays."""
    assert dis("long64", "39d8") == "cmp eax, ebx"
    assert dis("long64", "85c0") == "test eax, eax"
    for code in ("39d8", "85c0"):
        st, _ = run("long64", code, rax=0xDEAD_BEEF_0000_0001, rbx=1)
        assert st.gpr[0] == 0xDEAD_BEEF_0000_0001


def test_8_and_16bit_writes_preserve_the_rest() -> None:
    """SDM Vol. 1 3.4.1.1: 8- and 16-bit results leave the other register bits unchanged."""
    assert dis("long64", "00e0") == "add al, ah"
    st, _ = run("long64", "00e0", rax=0x1111_2222_3333_0102)  # al = 0x02 + 0x01
    assert st.gpr[0] == 0x1111_2222_3333_0103
    assert dis("long64", "00c4") == "add ah, al"
    st, _ = run("long64", "00c4", rax=0x1111_2222_3333_0102)
    assert st.gpr[0] == 0x1111_2222_3333_0302
    assert dis("long64", "6601d8") == "add ax, bx"
    st, _ = run("long64", "6601d8", rax=0x1111_2222_3333_FFFF, rbx=2)
    assert st.gpr[0] == 0x1111_2222_3333_0001 and st.get_flag(F.CF)


def test_rex_selects_spl_instead_of_ah() -> None:
    """SDM Vol. 2A 3.7.2.1: with any REX prefix, encodings 4-7 name SPL/BPL/SIL/DIL, not AH..BH."""
    assert dis("long64", "00e0") == "add al, ah"
    assert dis("long64", "4000e0") == "add al, spl"
    st, _ = run("long64", "4000e0", rax=0x0505, rsp=0x7003)
    assert st.gpr[0] == 0x0508 and st.gpr[4] == 0x7003
    assert dis("long64", "4000c4") == "add spl, al"
    st, _ = run("long64", "4000c4", rax=0x0505, rsp=0x7003)
    assert st.gpr[4] == 0x7008 and st.gpr[0] == 0x0505


def test_inc_dec_preserve_cf() -> None:
    """SDM Vol. 2A INC/DEC: "The CF flag is not affected." (the other five are set by the result)."""
    for cf in (0, 1):
        for mode, code in (("real", "40"), ("prot32", "48"), ("long64", "48ffc0"), ("long64", "48ffc8")):
            st, _ = run(mode, code, rflags=2 | cf, rax=M64)
            assert bool(st.get_flag(F.CF)) == bool(cf), (mode, code)
    st, _ = run("prot32", "40", rflags=2, rax=0x7FFF_FFFF)  # inc eax overflows
    assert st.get_flag(F.OF) and st.get_flag(F.SF) and not st.get_flag(F.CF) and st.get_flag(F.AF)


def test_inc_dec_opcodes_are_rex_in_64bit_mode() -> None:
    """SDM Vol. 2A 2.2.1: 40-4F are REX prefixes in 64-bit mode; INC/DEC use FF /0, FF /1."""
    assert dis("prot32", "40") == "inc eax"
    assert dis("long64", "48ffc8") == "dec rax"
    st, _ = run("long64", "48ffc8", rax=0)
    assert st.gpr[0] == M64 and st.get_flag(F.SF)


def test_adc_sbb_carry_in() -> None:
    """SDM Vol. 2A ADC: dest + src + CF; Vol. 2B SBB: dest - (src + CF)."""
    assert dis("prot32", "11d8") == "adc eax, ebx"
    st, _ = run("prot32", "11d8", rflags=3, rax=0xFFFF_FFFF, rbx=0)
    assert st.gpr[0] == 0 and st.get_flag(F.CF) and st.get_flag(F.ZF)
    assert dis("prot32", "19c0") == "sbb eax, eax"
    st, _ = run("prot32", "19c0", rflags=3, rax=1234)  # SBB r, r = -CF
    assert st.gpr[0] == 0xFFFF_FFFF and st.get_flag(F.CF)
    st, _ = run("prot32", "19c0", rflags=2, rax=1234)
    assert st.gpr[0] == 0 and not st.get_flag(F.CF)


def test_neg_edges() -> None:
    """SDM Vol. 2B NEG: CF = 0 iff the operand is 0; NEG of the most negative value overflows."""
    assert dis("prot32", "f7d8") == "neg eax"
    st, _ = run("prot32", "f7d8", rflags=3, rax=0)
    assert st.gpr[0] == 0 and not st.get_flag(F.CF) and st.get_flag(F.ZF)
    st, _ = run("prot32", "f7d8", rax=0x8000_0000)
    assert st.gpr[0] == 0x8000_0000 and st.get_flag(F.OF) and st.get_flag(F.CF)


def test_not_affects_no_flags() -> None:
    """SDM Vol. 2B NOT: "Flags Affected: None" -- values and the undefined mask are untouched."""
    assert dis("long64", "48f7d0") == "not rax"
    for rf in (2, 2 | F.STATUS_MASK):
        st, _ = run("long64", "48f7d0", rflags=rf, rax=0x0F)
        assert st.gpr[0] == M64 ^ 0x0F
        assert st.D.concrete(st.read_rflags()) == rf
    # An AF left undefined by AND stays undefined across NOT.
    assert dis("long64", "21d8") == "and eax, ebx"
    st, _ = run("long64", "21d8 48f7d0", rax=1, rbx=1)
    assert st.undefined == 1 << F.AF


def test_logic_clears_cf_of_and_undefines_af() -> None:
    """SDM Vol. 2A AND, Vol. 2B OR/XOR/TEST: OF = CF = 0; SF, ZF, PF by the result; AF undefined."""
    for code, asm in (("21d8", "and eax, ebx"), ("09d8", "or eax, ebx"), ("31d8", "xor eax, ebx"),
                      ("85d8", "test eax, ebx")):
        assert dis("prot32", code) == asm
        st, _ = run("prot32", code, rflags=2 | F.STATUS_MASK, rax=0x8000_0001, rbx=0x8000_0000)
        assert not st.get_flag(F.CF) and not st.get_flag(F.OF), asm
        assert st.undefined == 1 << F.AF, asm


def test_defining_instruction_clears_undefined_mark() -> None:
    """Any later definition of AF (ADD, INC, ...) removes it from the undefined set."""
    for follow in ("01d8", "29d8", "39d8", "40", "48", "f7d8", "11d8", "19d8"):
        st, _ = run("prot32", "21d8" + follow, rax=3, rbx=5)
        assert st.undefined == 0, follow
    st, _ = run("prot32", "21d8 21d8", rax=3, rbx=5)
    assert st.undefined == 1 << F.AF


def test_lock_with_memory_destination() -> None:
    """SDM Vol. 2A LOCK: accepted on ADD..XOR/INC/DEC/NEG/NOT with a memory destination."""
    assert dis("long64", "f0 48 01 1c 25 00 00 01 00") == "lock add qword ptr [0x10000], rbx"
    st, ev = run("long64", "f0 48 01 1c 25 00 00 01 00", rbx=5)
    assert ev.kind == "halted" and st.mem.phys.read(DATA, 8) == 5


def test_lock_without_memory_destination_is_ud() -> None:
    """SDM Vol. 2A LOCK: #UD with a register destination or an instruction outside the list (CMP, TEST)."""
    for mode, code in (("long64", "f0 01 d8"), ("prot32", "f0 39 05 00 00 01 00"),
                       ("prot32", "f0 85 05 00 00 01 00"), ("prot32", "f0 03 05 00 00 01 00")):
        st, ev = run(mode, code, rax=7)
        assert ev.kind == "fault" and ev.vector == 6 and ev.rip == CODE, (mode, code, ev.describe())
        assert st.gpr[0] == 7


def test_82_is_invalid_in_64bit_mode() -> None:
    """SDM Vol. 2D Table A-2: opcode 82 (alias of 80) is invalid in 64-bit mode."""
    assert dis("prot32", "82c001") == "add al, 1"
    st, ev = run("prot32", "82c001", rax=1)
    assert st.gpr[0] == 2
    st, ev = run("long64", "82c001", rax=1)
    assert ev.kind == "fault" and ev.vector == 6


def test_83_sign_extends_and_iz_sign_extends_to_64() -> None:
    """SDM Vol. 2A ADD: 83 /0 ib adds a sign-extended imm8; REX.W 81 /0 id sign-extends imm32."""
    assert dis("long64", "4883c0ff") == "add rax, -1"
    st, _ = run("long64", "4883c0ff", rax=5)
    assert st.gpr[0] == 4 and st.get_flag(F.CF)
    assert dis("long64", "4805 00000080") == "add rax, -0x80000000"
    st, _ = run("long64", "4805 00000080", rax=0)
    assert st.gpr[0] == 0xFFFF_FFFF_8000_0000
    assert dis("real", "83c0ff") == "add ax, -1"
    st, _ = run("real", "83c0ff", rax=0x1_0001)
    assert st.gpr[0] == 0x1_0000 and st.get_flag(F.CF) and st.get_flag(F.ZF)
