"""The seeded case generator of differential-testing campaigns.

``generate_case(seed, index)`` draws one :class:`~difftest.case.Case`: an
environment (mode, paging, page size, CPL) from
:data:`difftest.layout.ENVIRONMENTS`, a body of instructions and the initial
registers and data that make them meaningful, built by
:func:`difftest.builders.build`.  The case is a pure function of ``(seed,
index, envs, length)``.

Instructions are built from the typed parts of the spec's opcode table
(:data:`spec.decode.opcodes.ROWS`): a row valid in the mode, then legacy
prefixes, REX, ModRM, SIB, displacement and immediates, encoded by
:func:`spec.decode.encode.build`.  Every choice goes through a
:class:`~spec.decode.encode.Picker` whose small answers are the simple ones,
so the hypothesis strategies of :mod:`difftest.strategies` drive the same
code and shrink towards simple cases.

What makes a random instruction sequence a useful differential test:

* **Edge values.**  Registers, immediates and data start at 0, 1, -1, sign
  boundaries (0x7F.., 0x80..) more often than at random values; shift and
  rotate counts are 0, 1, width-1, width, above (SDM Vol. 2B SAL/SAR/SHL/SHR:
  the count is masked to 5 or 6 bits); DIV/IDIV get normal, overflowing and
  zero divisors (SDM Vol. 2A DIV/IDIV: #DE on both).
* **Memory operands land in mapped data pages.**  The generator tracks, per
  general-purpose register, whether its value is still the initial one;
  address registers get initial values (or a ``MOV reg, imm`` in front) that
  put the effective address -- base + index * scale + displacement, in the
  address size, plus the segment base (SDM Vol. 1 3.7.5, Vol. 3A 3.4) -- into
  :attr:`Layout.data`.  In about a third of the cases one operand goes
  elsewhere on purpose: the unmapped page, across the end of the data pages,
  or a non-canonical address in 64-bit mode (SDM Vol. 3A 3.3.7.1: #GP/#SS).
  Pointers that transfers and descriptor-table loads read live in reserved
  slots of the last data page that no other operand targets.
* **Units.**  Each generated instruction forms a unit with the set-up
  instructions it needs (``MOV reg, imm`` in front when a register's initial
  value cannot be chosen any more, the pushes a return pops, ``MOV rsp, imm``
  after an instruction that writes RSP).  Jumps land only on unit
  boundaries, so a skipped unit is skipped whole; register, stack-pointer and
  segment-base knowledge after a unit that may be skipped is the merge of
  both paths.
* **Control flow stays inside the code.**  Jumps and calls only go forward
  to an instruction boundary of a later unit (or the final HLT); returns,
  indirect and far transfers come with the pushes / pointers / register
  values that send them there.  Loops are impossible, so a case always
  ends.  Instructions that always stop a case (INT n, privileged
  instructions at CPL 3, #UD encodings, ...) appear only last.
* **Paging corruptions** ("corrupt one field", SDM Vol. 3A 4.7): the leaf
  entry of a data page loses P, R/W or U/S, gains XD or a reserved bit --
  either in the initial page tables, or written by the case's own CPL-0
  code followed by the flush the architecture requires (INVLPG or a CR3
  reload, SDM Vol. 3A 4.10.4.1) -- and the following instructions access
  that page.

Excluded from campaign cases (they are not comparable or need a device):
RDTSC/RDTSCP/RDPMC/CPUID (values depend on the machine and time; allowed and
tagged ``nondeterministic`` on request), IN/OUT/INS/OUTS (devices), and rows
the spec has no semantics for.  Jumps with an operand-size prefix in 64-bit
mode and REX.W on far pointers are avoided: Intel and AMD decode them
differently (APM Vol. 3 1.2.5; SDM Vol. 2A JMP); so is BSWAP r16 (undefined).
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

from difftest.builders import build as build_case
from difftest.builders import template
from difftest.case import Case, Environment, Provenance
from difftest.layout import ENVIRONMENTS, Layout, layout
from spec.decode.decoder import decode
from spec.decode.encode import (
    ADDRSIZE,
    LOCK,
    MAX_LENGTH,
    OPSIZE,
    REP,
    REPNE,
    SEGMENT_OVERRIDES,
    EncodeError,
    Picker,
    address_size,
    build,
    disp_size,
    encodable,
    generate,
    imm_fields,
    mode_valid,
    operand_kind,
    operand_size,
)
from spec.decode.opcodes import ROWS, Row
from spec.isa import SEMANTICS
from spec.memory import PAGE

GENERATOR = "difftest.generate"
VENDOR = "amd"  # the spec's CPU model; encodings are chosen the same on both vendors where it matters
M64 = (1 << 64) - 1
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
ES, CS, SS, DS, FS, GS = range(6)
_OVERRIDE_SEG = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}

# -- instruction classes -----------------------------------------------------------------------

NONDETERMINISTIC = frozenset({"RDTSC", "RDTSCP", "RDPMC", "CPUID"})
"""Results depend on the machine or on time (CPUID vendor leaves, counters): not comparable across backends."""
DEVICE = frozenset({"IN", "OUT", "INS", "OUTS"})
"""Need a device behind the port."""
ALWAYS_LAST = frozenset({"INT", "INT3", "INT1", "HLT", "SYSCALL", "SYSRET", "SYSENTER", "SYSEXIT", "LTR", "RSM",
                         "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "INVLPGA"})
"""Always end the case (an event, or a fault in these environments: EFER.SCE = 0, SYSENTER_CS = 0, TR busy,
EFER.SVME = 0), so they are generated only as the last instruction."""
PRIVILEGED = frozenset({"LGDT", "LIDT", "LLDT", "LMSW", "CLTS", "INVD", "WBINVD", "WBNOINVD", "INVLPG", "RDMSR",
                        "WRMSR", "SWAPGS", "CLI", "STI"})
"""#GP(0) at CPL 3 (IOPL 0 for CLI/STI; SDM Vol. 3A 5.9), like MOV CR/DR: last instruction only there."""
REAL_MODE_UD = frozenset({"LLDT", "LTR", "VERR", "VERW", "LAR", "LSL", "SLDT", "STR", "ARPL"})
"""#UD in real mode (SDM Vol. 2A/2B, "Real-Address Mode Exceptions")."""
NO_WRITE = frozenset({
    "CMP", "TEST", "BT", "PUSH", "JCC", "JMP", "CALL", "LOOP", "LOOPE", "LOOPNE", "JCXZ", "OUT", "OUTS", "INT",
    "RET", "RETF", "BOUND", "VERR", "VERW", "LLDT", "LTR", "LMSW", "LGDT", "LIDT", "INVLPG", "PREFETCH",
    "PREFETCHNTA", "PREFETCHT0", "PREFETCHT1", "PREFETCHT2", "NOP", "CALLF", "JMPF", "SGDT", "SIDT", "CMPXCHG8B",
    "CMPXCHG16B", "MUL", "DIV", "IDIV", "ENTER", "AAM", "AAD", "MOVS", "CMPS", "STOS", "LODS", "SCAS"})
"""Mnemonics whose first operand is not written (or not a general-purpose register)."""
IMPLICIT_WRITES: dict[str, tuple[int, ...]] = {
    "MUL": (RAX, RDX), "DIV": (RAX, RDX), "IDIV": (RAX, RDX), "CBW": (RAX,), "CWD": (RDX,),
    "MOVS": (RSI, RDI), "CMPS": (RSI, RDI), "STOS": (RDI,), "LODS": (RAX, RSI), "SCAS": (RDI,),
    "LOOP": (RCX,), "LOOPE": (RCX,), "LOOPNE": (RCX,), "CPUID": (RAX, RCX, RDX, RBX), "RDTSC": (RAX, RDX),
    "RDTSCP": (RAX, RCX, RDX), "RDMSR": (RAX, RDX), "RDPMC": (RAX, RDX), "XLAT": (RAX,), "LAHF": (RAX,),
    "SALC": (RAX,), "AAA": (RAX,), "AAS": (RAX,), "DAA": (RAX,), "DAS": (RAX,), "AAM": (RAX,), "AAD": (RAX,),
    "CMPXCHG": (RAX,), "CMPXCHG8B": (RAX, RDX), "CMPXCHG16B": (RAX, RDX), "SYSCALL": (RCX, 11),
    "POPA": (RAX, RCX, RDX, RBX, RBP, RSI, RDI), "ENTER": (RBP,), "LEAVE": (RBP,)}

SAFE_FLAGS = 0x8D5 | 0x400  # CF PF AF ZF SF OF, DF: what POPF/IRET values may set (never TF, NT, VM, AC, RF)
IF_FLAG, ID_FLAG = 0x200, 1 << 21


def _has_semantics(row: Row) -> bool:
    return row.mnemonic in SEMANTICS


def _privileged(row: Row) -> bool:
    return row.mnemonic in PRIVILEGED or (row.mnemonic == "MOV" and any(o[0] in "CD" for o in row.operands))


@dataclass(frozen=True)
class Pools:
    """The rows the generator uses in one environment: anywhere in the body, or only as the last instruction."""

    body: tuple[Row, ...]
    last: tuple[Row, ...]  # always end the case (valid rows)
    invalid: tuple[Row, ...]  # encodable but #UD in this mode (ud rows, i64 rows in 64-bit mode)
    excluded: dict[str, str]  # row key -> why the campaign never generates it


@cache
def _pools(mode: str, cpl: int, nondeterministic: bool) -> Pools:
    bits = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}[mode]
    body, last, invalid, excluded = [], [], [], {}
    for row in ROWS:
        if not encodable(row, bits):
            continue
        if not mode_valid(row, bits):
            invalid.append(row)  # #UD at decode: no semantics needed
        elif not _has_semantics(row):
            excluded[row.key] = "the spec has no semantics for it"
        elif row.mnemonic in DEVICE:
            excluded[row.key] = "needs a device"
        elif row.mnemonic in NONDETERMINISTIC and not nondeterministic:
            excluded[row.key] = "result depends on the machine or on time"
        elif (row.mnemonic in ALWAYS_LAST or (cpl == 3 and _privileged(row))
              or (mode == "real" and row.mnemonic in REAL_MODE_UD)):
            last.append(row)
        else:
            body.append(row)
    return Pools(tuple(body), tuple(last), tuple(invalid), excluded)


def pools(env: Environment, *, nondeterministic: bool = False) -> Pools:
    """The row pools of ``env`` (cached)."""
    return _pools(env.mode, env.cpl, nondeterministic)


def generable_rows(mode: str, envs: Sequence[Environment] | None = None) -> set[str]:
    """Keys of the rows valid in ``mode`` that campaign cases can contain (over ``envs`` of that mode)."""
    out: set[str] = set()
    for env in envs or ENVIRONMENTS:
        if env.mode == mode:
            p = pools(env)
            out.update(r.key for r in (*p.body, *p.last))
    return out


# -- choices -----------------------------------------------------------------------------------

class FastPicker:
    """A :class:`~spec.decode.encode.Picker` over a seeded :class:`random.Random` (faster than ``randint``)."""

    __slots__ = ("_bits", "_random")

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random
        self._bits = rng.getrandbits

    def int(self, lo: int, hi: int) -> int:
        n = hi - lo + 1
        if n < 1 << 50:
            return lo + int(self._random() * n)
        return lo + self._bits(n.bit_length() + 8) % n


def _chance(pick: Picker, percent: int) -> bool:
    """True with ``percent`` % probability; the simple answer (False) is the small draw."""
    return pick.int(0, 99) >= 100 - percent


def _choice(pick: Picker, seq: Sequence):  # type: ignore[no-untyped-def]
    return seq[pick.int(0, len(seq) - 1)]


def edge_value(pick: Picker, bits: int) -> int:
    """A ``bits``-wide value, mostly from the edges: 0, 1, -1, sign boundaries, byte/word boundaries, small."""
    m = (1 << bits) - 1
    k = pick.int(0, 15)
    if k == 0:
        return 0
    if k == 1:
        return 1
    if k == 2:
        return m
    if k == 3:
        return 1 << (bits - 1)
    if k == 4:
        return (1 << (bits - 1)) - 1
    if k == 5:
        return _choice(pick, (0x7F, 0x80, 0xFF, 0x100)) & m
    if k == 6:
        return _choice(pick, (0x7FFF, 0x8000, 0xFFFF, 0x10000)) & m
    if k == 7:
        return _choice(pick, (0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000)) & m
    if k == 8:
        return pick.int(2, 16)
    if k == 9:
        return (-pick.int(2, 16)) & m
    return pick.int(0, m)


def shift_count(pick: Picker, width: int, through_carry: bool = False) -> int:
    """A shift/rotate count: 0, 1, width-1, width, width+1, the 5/6-bit mask boundaries, or random (8 bits)."""
    counts = [0, 1, width - 1, width, width + 1, 31, 32, 33, 63, 64, 255]
    if through_carry and width < 32:
        counts += [width + 1, 9, 17]  # RCL/RCR on 8/16 bits rotate modulo 9/17 (SDM Vol. 2B RCL/RCR)
    if _chance(pick, 20):
        return pick.int(0, 255)
    return _choice(pick, counts) & 0xFF


# -- the case under construction -----------------------------------------------------------------

FREE, PINNED, LOCAL, CLOBBERED = range(4)
"""Register knowledge: initial value not chosen yet / initial value chosen and not overwritten / set by an
instruction of the current unit / unknown."""

SLOT_BASE, SLOT_SPAN = 0x800, 0x100  # pointer slots in the last data page, never the target of other operands
DEFAULT_EXTENT = 16  # bytes an ordinary memory operand may touch (10-byte SGDT, 16-byte CMPXCHG16B)


@dataclass(slots=True)
class Item:
    """One instruction: its row, its parts (:func:`spec.decode.encode.build` keywords) and its bytes."""

    row: Row
    kw: dict
    code: bytes = b""
    fix: Callable[[int, int], dict] | None = None  # (own address, unit target) -> parts to change
    steps: int = 1  # instructions the spec counts (REP iterations)


@dataclass(slots=True)
class Unit:
    """Instructions that always run together: jumps land only on unit boundaries."""

    items: list[Item] = field(default_factory=list)
    branch: Item | None = None  # the jump whose reach limits the target
    reach: int = 1 << 30  # maximum forward distance of the jump, from the end of the branch item
    needs_target: bool = False  # a transfer (jump, call, return, far) that lands on a later boundary
    data_fixes: list[Callable[[int], tuple[int, bytes]]] = field(default_factory=list)


@dataclass(slots=True)
class MemPlan:
    target: int  # the linear address meant
    inside: bool  # in the data pages (known segment base, mapped)


@dataclass(slots=True)
class Ctx:
    """The parts of the instruction being built."""

    row: Row
    prefixes: list[int]
    rex: int | None
    opsize: int
    asize: int
    reg: int | None = None  # ModRM.reg field
    mem: bool = False
    modrm: int | None = None
    sib: int | None = None
    disp: int = 0
    imm: list[int] | None = None
    plan: MemPlan | None = None
    rip_target: int | None = None
    reserved: set[int] = field(default_factory=set)

    @property
    def rex_bits(self) -> int:
        return self.rex or 0

    def e_reg(self) -> int | None:
        """The register of a register-form r/m operand (AH..BH as 4..7 without REX: see :meth:`high8`)."""
        if self.modrm is None or self.modrm >> 6 != 3:
            return None
        return (self.modrm & 7) | (self.rex_bits & 1) << 3

    def g_reg(self) -> int:
        return (self.reg or 0) | ((self.rex_bits >> 2) & 1) << 3


@dataclass(frozen=True)
class Form:
    """What the generator needs to know about a row in one mode (computed once)."""

    row: Row
    kinds: tuple[str, ...]
    sizes: tuple[str, ...]
    free_digits: tuple[int, ...]
    exact: frozenset[int]
    pool: tuple[int, ...]  # legacy prefixes that keep the row
    rep: tuple[int, ...]  # F2/F3 meaning REP/REPE/REPNE (string rows)
    memory: bool  # the r/m operand can address memory
    must_memory: bool
    mem_size: str  # operand size code of the r/m operand
    has_imm: bool  # immediate, relative, moffs or far-pointer fields
    reg_only: bool  # an R operand: no memory form, no displacement
    implicit: frozenset[int]  # registers written without being named
    written: tuple[str, ...]  # the operands written (that may name a register)
    rex_rules: bool  # REX bits forced or forbidden (rexw, norexw, amd32, 90 family, debug registers)
    lockable: bool  # LOCK allowed with a memory destination


_FORMS: dict[tuple[int, int], Form] = {}


def _form(row: Row, bits: int) -> Form:
    got = _FORMS.get((id(row), bits))
    if got is not None:
        return got
    kinds = tuple(operand_kind(o) for o in row.operands)
    sizes = tuple(o[1:] if operand_kind(o) else "" for o in row.operands)
    same = [r for r in ROWS if r.opcode == row.opcode]
    sibs = [r for r in same if r.mandatory == row.mandatory]
    taken_digits = {r.digit for r in sibs if r.digit is not None and r is not row}
    taken_mandatory = {r.mandatory for r in same if r.mandatory is not None}
    exact = frozenset(r.modrm_exact for r in sibs if r.modrm_exact is not None and r is not row)
    free = [g for g in range(8) if g not in taken_digits]
    if "S" in kinds:
        free = [g for g in free if g <= 5]
    pool: list[int] = [*SEGMENT_OVERRIDES, ADDRSIZE]
    nop90 = row.opcode == (0x90,)
    if not ((bits == 64 and "f64" in row.attrs) or row.mnemonic == "BSWAP"):
        pool += [OPSIZE, OPSIZE]  # BSWAP r16 is undefined; 66 on near branches differs by vendor in 64-bit mode
    rep: tuple[int, ...] = ()
    if row.attrs & {"rep", "repe"}:
        rep = (REP,) if "rep" in row.attrs else (REP, REPNE)
    elif row.mandatory is None and not nop90:
        pool += [p for p in (REPNE, REP) if p not in taken_mandatory]
    elif row.mandatory is not None or row.mnemonic != "NOP":
        pool += [REPNE, REP]
    else:
        pool += [REPNE]
    memory = row.has_modrm and row.modrm_exact is None and any(k in ("E", "M") for k in kinds)
    must = "M" in kinds or ("vex" in row.attrs and bits != 64)
    mem_size = next((sz for k, sz in zip(kinds, sizes, strict=True) if k in ("E", "M")), "")
    m, one = row.mnemonic, len(row.operands) == 1
    implicit = set(IMPLICIT_WRITES.get(m, ()))
    if m == "IMUL" and one:
        implicit |= {RAX, RDX}
    if m in ("MUL", "DIV", "IDIV", "IMUL") and one and row.operands[0].endswith("b"):
        implicit.discard(RDX)
    written: tuple[str, ...] = ()
    if m in ("STOS", "LODS", "MOVS", "CMPS", "SCAS", "XLAT"):
        written = ()
    elif m in ("XCHG", "XADD"):
        written = row.operands[:2]
    elif m not in NO_WRITE and not (m == "IMUL" and one):
        written = row.operands[:1]
    got = _FORMS[(id(row), bits)] = Form(row, kinds, sizes, tuple(free), exact, tuple(pool), rep, memory or must,
                                         must, mem_size, any(k in "IJOA" for k in kinds if k), "R" in kinds,
                                         frozenset(implicit), written,
                                         bool(row.attrs & {"rexw", "norexw", "amd32"}) or nop90 or "D" in kinds,
                                         "lock" in row.attrs and bool(kinds) and kinds[0] in ("E", "M"))
    return got


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _mem_bytes(size: str, opsize: int) -> int:
    return {"b": 1, "w": 2, "d": 4, "q": 8, "dq": 16, "v": opsize // 8, "z": min(opsize, 32) // 8,
            "y": max(opsize, 32) // 8, "vw": 2, "p": opsize // 8 + 2, "a": opsize // 4, "s": 10,
            "bs": 1}.get(size, 0)


class Generator:
    """Builds one case for ``env`` from the choices of ``pick`` (see the module docstring)."""

    def __init__(self, env: Environment, pick: Picker, *, nondeterministic: bool = False) -> None:
        self.env, self.pick = env, pick
        self.lay: Layout = layout(env)
        snap = template(env).snapshot
        self.snap = snap
        self.bits = env.bits
        self.long = env.mode == "long64"
        self.real = env.mode == "real"
        self.pools = pools(env, nondeterministic=nondeterministic)
        self.nregs = 16 if self.long else 8
        self.width = 64 if self.long else 32
        self.rmask = (1 << self.width) - 1
        self.rs = [FREE] * self.nregs
        self.rv = [0] * self.nregs  # the value a PINNED or LOCAL register holds now
        self.init: dict[int, int] = {}  # initial values chosen so far
        segs = snap.segments
        names = ("es", "cs", "ss", "ds", "fs", "gs")
        self.segsel = [getattr(segs, n).selector for n in names]
        bases = [getattr(segs, n).base for n in names]
        if self.long:
            bases = [0, 0, 0, 0, bases[FS], bases[GS]]
        self.segbase: list[int | None] = list(bases)
        self.cs_base = bases[CS]
        self.stack_bits = self.width if (self.long or segs.ss.db) else 16
        self.stack_page = self.lay.stack_top - PAGE
        self.sp0 = self.lay.stack_top - 0x400
        self.rs[RSP], self.rv[RSP] = PINNED, self.sp0
        self.sp_lo = self.sp_hi = self.sp0
        self.branched = False
        self.units: list[Unit] = []
        self.pages: dict[int, bytearray] = {}
        self.pte_edits: dict[int, int] = {}
        self.tags: list[str] = []
        self.focus: int | None = None  # the data page whose entry is corrupted
        self.force_focus = False
        self.slot_next = 0
        self.mem_inside = self.mem_total = 0
        self.outside = 1 if pick.int(0, 99) >= 65 else 0  # memory operands still to send outside the data
        self.code_bytes = 0
        self.cur = Unit()
        self.unit_writes: set[int] = set()
        self.unit_segs: set[int] = set()
        self.unit_sp: tuple[int, int] | None = None

    # == registers ====================================================================================
    def known(self, reg: int) -> int | None:
        if reg == RSP:
            return self.sp_exact()
        return self.rv[reg] if self.rs[reg] in (PINNED, LOCAL) else None

    def want(self, reg: int, value: int, mask: int | None = None) -> None:
        """Make ``reg`` hold ``value`` in the bits of ``mask`` when the next instruction of the unit runs:
        choose its initial value if nothing relied on it yet, else put a ``MOV reg, imm`` in front."""
        full_mask = self.rmask if mask is None else mask & self.rmask
        value &= full_mask
        if reg == RSP or reg >= self.nregs:
            return
        st = self.rs[reg]
        if st == FREE:
            self.rs[reg] = PINNED
            self.rv[reg] = self.init[reg] = (edge_value(self.pick, self.width) & ~full_mask) | value
            return
        if st in (PINNED, LOCAL) and (self.rv[reg] & full_mask) == value:
            return
        old = self.rv[reg] if st in (PINNED, LOCAL) else edge_value(self.pick, self.width)
        full = ((old & ~full_mask) | value) & self.rmask
        self.cur.items.append(self.mov_imm(reg, full))
        self.rs[reg], self.rv[reg] = LOCAL, full

    def mov_imm(self, reg: int, value: int, fix: Callable[[int, int], dict] | None = None,
                wide: bool = False) -> Item:
        """``MOV reg, imm`` (B8+r; operand size 32, or 64 with REX.W when the value -- or ``wide`` -- needs it)."""
        prefixes: tuple[int, ...] = ()
        rex = None
        if self.long:
            wide = wide or value >= 1 << 32
            if wide or reg >= 8:
                rex = 0x40 | (8 if wide else 0) | (reg >> 3)
        elif self.bits == 16:
            prefixes = (OPSIZE,)
        it = self.item(_ROW_MOV_IMM[reg & 7], prefixes=prefixes, rex=rex, imm=(value,))
        it.fix = fix
        return it

    def item(self, row: Row, **kw: object) -> Item:
        kw.setdefault("prefixes", ())
        kw.setdefault("rex", None)
        it = Item(row=row, kw=kw)
        it.code = _encode(row, self.bits, kw)
        return it

    def scratch(self, avoid: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """A register (not RSP) to hold a value for the next instruction; it is clobbered afterwards."""
        regs = [r for r in range(self.nregs) if r != RSP and r not in avoid]
        free = [r for r in regs if self.rs[r] in (FREE, CLOBBERED)]
        reg = _choice(self.pick, free or regs)
        self.unit_writes.add(reg)
        self.rs[reg] = CLOBBERED
        return reg

    # == stack =========================================================================================
    def sp_range(self) -> tuple[int, int]:
        return self.unit_sp if self.unit_sp is not None else (self.sp_lo, self.sp_hi)

    def sp_exact(self) -> int | None:
        lo, hi = self.sp_range()
        return lo if lo == hi else None

    def stack_need(self, push_bytes: int) -> None:
        """Before pushing up to ``push_bytes``: put RSP back in this unit if it may have left the stack page."""
        lo, hi = self.sp_range()
        if lo - push_bytes < self.stack_page + 0x40 or hi > self.lay.stack_top + 0x200:
            self.reset_sp()

    def reset_sp(self) -> None:
        self.cur.items.append(self.mov_imm(RSP, self.sp0))
        self.unit_sp = (self.sp0, self.sp0)

    def sp_move(self, delta_lo: int, delta_hi: int | None = None) -> None:
        lo, hi = self.sp_range()
        self.unit_sp = (lo + delta_lo, hi + (delta_lo if delta_hi is None else delta_hi))

    # == units ==========================================================================================
    def add(self, it: Item, writes: set[int] | None = None) -> Item:
        """Append the unit's next instruction; what it writes becomes unknown after the unit."""
        self.cur.items.append(it)
        w = self.writes(it) if writes is None else writes
        self.unit_writes |= w
        for reg in w:
            if reg < self.nregs and self.rs[reg] == LOCAL:
                self.rs[reg] = CLOBBERED
        if RSP in w:
            self.reset_sp()  # an arbitrary RSP: put the stack back before anything uses it
        return it

    def commit(self) -> None:
        """Close the current unit and apply what it did to the register / stack / segment knowledge.

        Jumps only go forward, so a unit after the first jump may be skipped: its effects are merged
        with the state before it (a register it writes is unknown either way)."""
        unit = self.cur
        if unit.items:
            rs = self.rs
            for reg in self.unit_writes:
                if reg < self.nregs and reg != RSP:
                    rs[reg] = CLOBBERED
            if LOCAL in rs:
                for reg in range(self.nregs):
                    if rs[reg] == LOCAL:
                        rs[reg] = CLOBBERED
            if self.unit_sp is not None:
                lo, hi = self.unit_sp
                if self.branched:
                    lo, hi = min(lo, self.sp_lo), max(hi, self.sp_hi)
                self.sp_lo, self.sp_hi = lo, hi
            for s in self.unit_segs:
                self.segbase[s] = None
            self.units.append(unit)
            self.code_bytes += sum(len(it.code) for it in unit.items)
            if unit.needs_target:
                self.branched = True
        self.cur = Unit()
        self.unit_writes = set()
        self.unit_segs = set()
        self.unit_sp = None

    # == data ===========================================================================================
    def put(self, addr: int, raw: bytes) -> None:
        """Initial bytes at a linear address (only what lies in the data pages)."""
        lo, hi = self.lay.data[0], self.lay.data_end
        end = addr + len(raw)
        if end <= lo or addr >= hi:
            return
        if addr < lo:
            raw, addr = raw[lo - addr:], lo
        if end > hi:
            raw = raw[:hi - addr]
        while raw:
            base, off = addr & ~(PAGE - 1), addr & (PAGE - 1)
            page = self.pages.get(base)
            if page is None:
                page = self.pages[base] = bytearray(PAGE)
            take = min(len(raw), PAGE - off)
            page[off:off + take] = raw[:take]
            raw, addr = raw[take:], addr + take

    def slot(self, size: int) -> int:
        """A pointer slot in the last data page (other memory operands never target the slots)."""
        addr = self.lay.data[-1] + SLOT_BASE + self.slot_next
        self.slot_next = (self.slot_next + ((size + 15) & ~15)) % SLOT_SPAN
        return addr

    def edge_bytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            k = min(8, n - len(out))
            out += edge_value(self.pick, 8 * k).to_bytes(k, "little")
        return out

    # == register writes ================================================================================
    def writes(self, it: Item) -> set[int]:
        """The general-purpose registers ``it`` may write (a superset; RSP only when named as an operand)."""
        row, kw = it.row, it.kw
        form = _form(row, self.bits)
        out = set(form.implicit)
        if form.rep and (REP in kw["prefixes"] or REPNE in kw["prefixes"]):
            out.add(RCX)
        if form.written:
            rex = kw["rex"] or 0
            for spec in form.written:
                reg = _operand_reg(row, spec, kw, rex)
                if reg is not None:
                    out.add(reg)
        return out

    # == the parts of one instruction ===================================================================
    def start(self, row: Row, *, mem: bool | None = None, prefixes: bool = True) -> Ctx:
        """Prefixes, REX, operand/address size and the ModRM reg field of ``row``; the memory form is chosen
        (``mem``) but not planned yet."""
        rnd = self.pick.int
        form = _form(row, self.bits)
        pf: list[int] = []
        if prefixes and rnd(0, 99) >= 75:
            pool = form.pool
            for _ in range(rnd(1, 3)):
                pf.append(pool[rnd(0, len(pool) - 1)])
        if form.rep and rnd(0, 99) >= 50:
            pf.append(form.rep[rnd(0, len(form.rep) - 1)])
        rex: int | None = None
        if self.long:
            if rnd(0, 99) >= 50:
                rex = 0x40 | rnd(0, 15)
            if form.rex_rules:
                a = row.attrs
                if "rexw" in a:
                    rex = (rex or 0x40) | 8
                if rex is not None and ("norexw" in a or "amd32" in a):
                    rex &= ~8  # AMD reads m16:32 for REX.W far pointers, Intel m16:64: avoid the vendor split
                if row.opcode == (0x90,):
                    if row.mnemonic == "XCHG":
                        rex = (rex or 0x40) | 1
                    elif rex is not None:
                        rex &= ~1
                if rex is not None and "D" in form.kinds:
                    rex &= ~4
        opsize = operand_size(row, self.bits, p66=OPSIZE in pf, rex_w=bool((rex or 0) & 8), vendor=VENDOR)
        asize = address_size(self.bits, p67=ADDRSIZE in pf)
        ctx = Ctx(row=row, prefixes=pf, rex=rex, opsize=opsize, asize=asize)
        if not row.has_modrm:
            return ctx
        if row.modrm_exact is not None:
            ctx.modrm = row.modrm_exact
            return ctx
        kinds = form.kinds
        pick = self.pick
        if row.digit is not None:
            reg = row.digit
        elif "C" in kinds:
            num = _choice(pick, (0, 2, 3, 4, 8) if self.long else (0, 2, 3, 4))
            reg = num & 7
            if num >= 8:
                ctx.rex = (ctx.rex or 0x40) | 4
            elif ctx.rex is not None:
                ctx.rex &= ~4
        else:
            free = form.free_digits
            reg = free[rnd(0, len(free) - 1)]
        ctx.reg = reg
        if form.must_memory:
            ctx.mem = True
        elif not form.memory:
            ctx.mem = False
        else:
            ctx.mem = rnd(0, 1) == 1 if mem is None else mem
        if not ctx.mem:
            modrm = 0xC0 | reg << 3 | rnd(0, 7)
            while modrm in form.exact:
                modrm = 0xC0 | reg << 3 | ((modrm + 1) & 7)
            if form.reg_only and rnd(0, 99) >= 90:
                modrm = rnd(0, 2) << 6 | (modrm & 0x3F)  # R: the mod field is ignored
            ctx.modrm = modrm
        elif form.lockable and rnd(0, 99) >= 85:
            ctx.prefixes.insert(rnd(0, len(ctx.prefixes)), LOCK)
        return ctx

    def avoid_reg_field(self, ctx: Ctx, regs: set[int]) -> None:
        """Re-pick a ModRM.reg operand register that must not be one of ``regs`` (e.g. RSP)."""
        form = _form(ctx.row, self.bits)
        if ctx.row.digit is not None or ctx.reg is None:
            return
        for _ in range(8):
            if ctx.g_reg() not in regs:
                return
            ctx.reg = _choice(self.pick, form.free_digits)

    def avoid_rm_reg(self, ctx: Ctx, regs: set[int]) -> None:
        """Re-pick a register-form r/m register that must not be one of ``regs``."""
        if ctx.modrm is None or ctx.mem or ctx.row.modrm_exact is not None:
            return
        form = _form(ctx.row, self.bits)
        for _ in range(8):
            r = (ctx.modrm & 7) | (ctx.rex_bits & 1) << 3
            if r not in regs and ctx.modrm not in form.exact:
                return
            ctx.modrm = (ctx.modrm & 0xF8) | self.pick.int(0, 7)

    def reg_value(self, ctx: Ctx, reg: int, size: str, value: int) -> None:
        """Give the register operand ``reg`` (ModRM numbering; ``size`` its operand size code) ``value``."""
        if size == "b" and not ctx.rex and 4 <= reg <= 7:
            self.want(reg - 4, value << 8, 0xFF00)
        elif size == "b":
            self.want(reg, value, 0xFF)
        else:
            bits = {"w": 16, "d": 32, "q": 64}.get(size, ctx.opsize)
            self.want(reg, value, (1 << bits) - 1)
        ctx.reserved.add(reg - 4 if size == "b" and not ctx.rex and 4 <= reg <= 7 else reg)

    def e_value(self, ctx: Ctx, size: str, value: int, nbytes: int) -> None:
        """Give the r/m operand ``value``: its register, or the initial data at its target."""
        if ctx.mem:
            if ctx.plan is None:
                self.plan(ctx)
            self.put(ctx.plan.target, (value & ((1 << (8 * nbytes)) - 1)).to_bytes(nbytes, "little"))  # type: ignore
        else:
            r = ctx.e_reg()
            if r is not None and r != RSP:
                self.reg_value(ctx, r, size, value)

    # == memory operands =================================================================================
    def segment(self, ctx: Ctx, default: int) -> int:
        seg = default
        for p in ctx.prefixes:
            if p in _OVERRIDE_SEG:
                seg = _OVERRIDE_SEG[p]
        if self.long and seg not in (FS, GS):
            return DS
        return seg

    def pick_target(self, asize: int, extent: int, align: int = 1, low: int = 0) -> tuple[int, bool]:
        """A linear address for an operand touching ``extent`` bytes (and ``low`` bytes below it): in the
        data pages, or -- for one operand in about a third of the cases -- the unmapped page, a page
        crossing out of the data pages, or a non-canonical address (64-bit addressing)."""
        pick, lay = self.pick, self.lay
        if asize == 16 and lay.data[0] >= 0x10000:  # large pages: the data lie beyond 16-bit offsets
            return self.stack_page + (pick.int(0, 0x300) & ~(align - 1)), False
        if self.outside and not self.force_focus and pick.int(0, 99) >= 80:
            self.outside -= 1
            r = pick.int(0, 2)
            if r == 0:
                return lay.unmapped + (pick.int(0, PAGE - extent) & ~(align - 1)), False
            if r == 1 or asize != 64:
                return lay.data[-1] + PAGE - pick.int(1, max(1, min(extent, 15))), False
            if pick.int(0, 1):
                return (1 << 47) + (pick.int(0, 1 << 20) & ~(align - 1)), False  # non-canonical
            return (M64 - (1 << 47) + 1 - pick.int(1, 64)) & M64, False  # just below the upper canonical half
        data = lay.data
        if self.force_focus and self.focus is not None:
            self.force_focus = False
            page = self.focus
        elif self.focus is not None and pick.int(0, 99) >= 30:
            page = self.focus
        else:
            page = data[pick.int(0, len(data) - 1)]
        hi = PAGE - extent
        k = pick.int(0, 7)
        if k == 0:
            off = low
        elif k == 1:
            off = hi
        elif k == 2 and page == lay.data[0]:
            off = PAGE - pick.int(1, max(1, min(extent, 15)))  # across into the next data page
        else:
            off = pick.int(low, hi)
        off = max(low, off & ~(align - 1))
        if page == lay.data[-1] and off + extent > SLOT_BASE and off - low < SLOT_BASE + SLOT_SPAN:
            off = (SLOT_BASE + SLOT_SPAN + low + align - 1) & ~(align - 1)
        return page + off, True

    def plan(self, ctx: Ctx, *, extent: int = DEFAULT_EXTENT, align: int = 1, low: int = 0,
             target: int | None = None, allow_rsp: bool = True) -> None:
        """Choose the ModRM/SIB/displacement of a memory operand and the register values that put its
        linear address on a target (random, or ``target``)."""
        if target is None:
            t, inside = self.pick_target(ctx.asize, extent, align, low)
        else:
            t, inside = target, True
        for _ in range(4):
            if (self._plan16 if ctx.asize == 16 else self._plan32)(ctx, t, inside, allow_rsp):
                break
        else:
            self._plan_fallback(ctx, t, inside)
        self.mem_total += 1
        self.mem_inside += bool(ctx.plan and ctx.plan.inside)

    def _ea(self, ctx: Ctx, t: int, inside: bool, seg: int) -> tuple[int, bool]:
        base = self.segbase[seg]
        amask = (1 << ctx.asize) - 1
        if base is None:
            return t & amask, False
        ea = (t - base) & amask
        if ctx.asize < 64 and t - base != ea:
            inside = False  # beyond the reach of the address size from this segment base
        return ea, inside

    def _disp(self, width: int) -> int:
        pick = self.pick
        if width == 0:
            return 0
        if width == 1:
            return _choice(pick, (0, 1, -1, 8, -8, 127, -128, pick.int(-128, 127)))
        k = pick.int(0, 4)
        if k == 0:
            return 0
        if k == 1:
            return pick.int(-64, 64)
        if k == 2:
            return _choice(pick, (0x7FFF_FFFF, -0x8000_0000, 0x7FFF, -0x8000)) if width == 4 else -1
        return _signed(pick.int(0, (1 << (8 * width)) - 1), 8 * width)

    def _solve(self, ctx: Ctx, comps: dict[int, int], ea: int, dwidth: int) -> int | None:
        """The displacement that, with register values chosen now, gives ``ea``; None if impossible."""
        amask = (1 << ctx.asize) - 1
        disp = self._disp(dwidth)
        total = 0
        unknown = []
        for reg, f in comps.items():
            v = self.known(reg)
            if v is None:
                if reg == RSP or reg in ctx.reserved:
                    return None
                unknown.append(reg)
            else:
                total += (v & amask) * f
        if unknown:
            solver = next((r for r in unknown if comps[r] == 1), unknown[0])
            for r in unknown:
                if r != solver:
                    v = _choice(self.pick, (0, 1, 2, self.pick.int(0, 0x1000)))
                    self.want(r, v, amask)
                    total += v * comps[r]
            f = comps[solver]
            need = (ea - disp - total) & amask
            need -= need % f  # lands up to 8 bytes lower: the margins allow it
            self.want(solver, need // f, amask)
            return disp
        need = _signed(ea - total, ctx.asize) if ctx.asize == 64 else (ea - total) & amask
        if dwidth == 4 and (ctx.asize != 64 or -(1 << 31) <= need < (1 << 31)):
            return _signed(need, 32)
        if dwidth == 2:
            return _signed(need, 16)
        if dwidth == 1 and -128 <= _signed(need, ctx.asize) <= 127:
            return _signed(need, ctx.asize)
        if dwidth == 0 and need & amask == 0:
            return 0
        return None

    def _plan32(self, ctx: Ctx, t: int, inside: bool, allow_rsp: bool) -> bool:
        pick = self.pick
        rex = ctx.rex_bits
        b_bit, x_bit = rex & 1, (rex >> 1) & 1
        mod = pick.int(0, 2)
        k = pick.int(0, 11)
        rm = k if k < 8 else (4, 5)[k & 1]
        sib = None
        base: int | None = None
        index: int | None = None
        scale = 0
        if rm == 4:
            scale = pick.int(0, 3)
            i, b = pick.int(0, 9), pick.int(0, 9)
            i, b = (4 if i > 7 else i), (5 if b > 7 else b)
            sib = scale << 6 | i << 3 | b
            index = None if (i == 4 and not x_bit) else i | x_bit << 3
            base = None if (b == 5 and mod == 0) else b | b_bit << 3
            dwidth = 4 if (b == 5 and mod == 0) else (0, 1, 4)[mod]
        elif rm == 5 and mod == 0:
            dwidth = 4
        else:
            base = rm | b_bit << 3
            dwidth = (0, 1, 4)[mod]
        if base == RSP:
            if not allow_rsp:
                return False
            if self.sp_exact() is None:
                self.reset_sp()
        seg = self.segment(ctx, SS if base in (RSP, RBP) else DS)
        ea, inside = self._ea(ctx, t, inside, seg)
        modrm = mod << 6 | (ctx.reg or 0) << 3 | rm
        if rm == 5 and mod == 0 and self.long:  # RIP-relative: the displacement is fixed at layout
            ctx.modrm, ctx.sib, ctx.disp, ctx.rip_target = modrm, None, 0, ea
            ctx.plan = MemPlan(t, inside)
            return True
        comps: dict[int, int] = {}
        if base is not None:
            comps[base] = 1
        if index is not None:
            comps[index] = comps.get(index, 0) + (1 << scale)
        disp = self._solve(ctx, comps, ea, dwidth)
        if disp is None:
            return False
        ctx.modrm, ctx.sib, ctx.disp = modrm, sib, disp
        ctx.plan = MemPlan(t, inside)
        return True

    def _plan16(self, ctx: Ctx, t: int, inside: bool, allow_rsp: bool) -> bool:
        pick = self.pick
        mod, rm = pick.int(0, 2), pick.int(0, 7)
        regs = _REGS16[rm]
        dwidth = (0, 1, 2)[mod]
        if mod == 0 and rm == 6:
            regs, dwidth = (), 2
        seg = self.segment(ctx, SS if RBP in regs else DS)
        ea, inside = self._ea(ctx, t, inside, seg)
        disp = self._solve(ctx, {r: 1 for r in regs}, ea, dwidth)
        if disp is None:
            return False
        ctx.modrm, ctx.sib, ctx.disp = mod << 6 | (ctx.reg or 0) << 3 | rm, None, disp
        ctx.plan = MemPlan(t, inside)
        return True

    def _plan_fallback(self, ctx: Ctx, t: int, inside: bool) -> None:
        """``[reg]`` with a register set in front (always possible)."""
        rex = ctx.rex_bits
        choices = (7, 4, 5) if ctx.asize == 16 else (0, 1, 2, 3, 6, 7)
        for rm in choices:
            reg = _REGS16[rm][0] if ctx.asize == 16 else rm | (rex & 1) << 3
            if reg not in ctx.reserved and reg != RSP:
                break
        seg = self.segment(ctx, DS)
        ea, inside = self._ea(ctx, t, inside, seg)
        self.want(reg, ea, (1 << ctx.asize) - 1)
        ctx.modrm, ctx.sib, ctx.disp = (ctx.reg or 0) << 3 | rm, None, 0
        ctx.plan = MemPlan(t, inside)

    # == finishing an instruction ======================================================================
    def finish(self, ctx: Ctx, *, fill: bool = True, writes: set[int] | None = None, steps: int = 1,
               **plan_kw: object) -> Item:
        """Plan the memory operand (if not done), fill immediates and initial data, encode, append."""
        row = ctx.row
        form = _form(row, self.bits)
        if (ctx.mem and 0x2E in ctx.prefixes and not self.real and not self.long and form.written
                and self.pick.int(0, 99) < 90):
            # A write through CS is #GP (code segments are not writable, SDM Vol. 3A 3.4.5.1): keep it rare,
            # or most protected-mode cases would end at their first store.
            ctx.prefixes = [0x3E if p == 0x2E else p for p in ctx.prefixes]
        if ctx.mem and ctx.plan is None:
            self.plan(ctx, **plan_kw)  # type: ignore[arg-type]
        if ctx.mem and fill and ctx.plan is not None:
            n = _mem_bytes(form.mem_size, ctx.opsize)
            if n:
                self.put(ctx.plan.target, self.edge_bytes(n))
        imm = ctx.imm
        branch = False
        if imm is None and not form.has_imm:
            imm = []
        elif imm is None:
            imm = []
            widths = iter(imm_fields(row, ctx.opsize, ctx.asize))
            for kind, size in zip(form.kinds, form.sizes, strict=True):
                if kind == "I":
                    imm.append(edge_value(self.pick, 8 * next(widths)))
                elif kind == "J":
                    next(widths)
                    imm.append(0)
                    branch = True
                elif kind == "O":
                    w = next(widths)
                    t, inside = self.pick_target(ctx.asize, DEFAULT_EXTENT)
                    ea, inside = self._ea(ctx, t, inside, self.segment(ctx, DS))
                    imm.append(ea & ((1 << (8 * w)) - 1))
                    self.put(t, self.edge_bytes(_mem_bytes(size, ctx.opsize)))
                    self.mem_total += 1
                    self.mem_inside += inside
                elif kind == "A":
                    next(widths)
                    next(widths)
                    imm += [0, 0]
        kw: dict = {"prefixes": tuple(ctx.prefixes), "rex": ctx.rex, "imm": tuple(imm)}
        if row.has_modrm:
            kw.update(modrm=ctx.modrm, sib=ctx.sib, disp=ctx.disp)
        it = self.item(row, **kw)
        while len(it.code) > MAX_LENGTH:  # past 15 bytes is #GP(0) (SDM Vol. 2A 2.3.11): drop idle prefixes
            k = self.droppable(ctx)
            if k is None:
                break
            del ctx.prefixes[k]
            kw["prefixes"] = tuple(ctx.prefixes)
            it.code = _encode(row, self.bits, kw)
        it.steps = steps
        if ctx.rip_target is not None:
            target = ctx.rip_target

            def rip_fix(addr: int, _t: int, it: Item = it, target: int = target) -> dict:
                return {"disp": _signed(target - (addr + len(it.code)), 32)}

            it.fix = rip_fix
        if branch:
            reach = 127 if any(o == "Jb" for o in row.operands) else 1 << 30

            def jump_fix(addr: int, target: int, it: Item = it) -> dict:
                return {"imm": (target - (addr + len(it.code)),)}

            it.fix = jump_fix
            self.cur.branch, self.cur.reach, self.cur.needs_target = it, reach, True
        self.add(it, writes)
        return it

    def droppable(self, ctx: Ctx) -> int | None:
        """A prefix that can go without changing the instruction: an override followed by another one, a
        repeated 66/67/F0, an F2/F3 that is not the effective REP, the override of an operand-less form."""
        pf = ctx.prefixes
        overrides = [k for k, p in enumerate(pf) if p in _OVERRIDE_SEG]
        if len(overrides) > 1:
            return overrides[0]
        seen: set[int] = set()
        for k, p in enumerate(pf):
            if p in (OPSIZE, ADDRSIZE, LOCK):
                if p in seen:
                    return k
                seen.add(p)
        reps = [k for k, p in enumerate(pf) if p in (REP, REPNE)]
        if _form(ctx.row, self.bits).rep:
            reps = reps[:-1]
        if reps:
            return reps[0]
        if overrides and not ctx.mem:
            return overrides[0]
        return None

    def generic(self, row: Row, **kw: object) -> Item:
        return self.finish(self.start(row), **kw)  # type: ignore[arg-type]

    # == instruction handlers ==========================================================================
    def h_shift(self, row: Row) -> None:
        ctx = self.start(row)
        width = 8 if row.operands[0] == "Eb" else ctx.opsize
        count = shift_count(self.pick, width, row.mnemonic in ("RCL", "RCR"))
        if "CL" in row.operands:
            self.want(RCX, count, 0xFF)
            ctx.reserved.add(RCX)
            self.avoid_rm_reg(ctx, {RCX})
        elif "Ib" in row.operands:
            ctx.imm = [count]
        self.finish(ctx)

    def h_divide(self, row: Row) -> None:
        """DIV/IDIV with a normal, overflowing (#DE) or zero (#DE) divisor (SDM Vol. 2A DIV, IDIV)."""
        ctx = self.start(row)
        w = 8 if row.operands[0] == "Eb" else ctx.opsize
        dividend, divisor = _division(self.pick, w, row.mnemonic == "IDIV")
        ctx.reserved |= {RAX, RDX}
        if w == 8:
            self.want(RAX, dividend, 0xFFFF)
        else:
            m = (1 << w) - 1
            self.want(RAX, dividend & m, m)
            self.want(RDX, dividend >> w, m)
        if not ctx.mem:
            r = ctx.e_reg()
            target = (r - 4) if (w == 8 and not ctx.rex and r is not None and 4 <= r <= 7) else r
            if target not in (RAX, RDX, RSP, None):
                self.reg_value(ctx, r, "b" if w == 8 else "v", divisor)  # type: ignore[arg-type]
            self.finish(ctx)
        else:
            self.plan(ctx)
            self.finish(ctx, fill=False)
            self.put(ctx.plan.target, divisor.to_bytes(w // 8, "little"))  # type: ignore[union-attr]

    def h_bittest(self, row: Row) -> None:
        """BT/BTS/BTR/BTC: with a register bit offset and memory, the offset reaches beyond the operand
        (SDM Vol. 2A BT): keep it small so that the bit stays in the data page."""
        ctx = self.start(row)
        if "Gv" in row.operands and ctx.mem:
            self.avoid_reg_field(ctx, {RSP})
            w = ctx.opsize
            off = _choice(self.pick, (0, 1, 7, 8, w - 1, w, w + 1, -1, -w, self.pick.int(-256, 256)))
            self.reg_value(ctx, ctx.g_reg(), "v", off)
            self.finish(ctx, extent=64, low=48)
        else:
            if "Ib" in row.operands:
                ctx.imm = [_choice(self.pick, (0, 1, 7, 8, 15, 16, 31, 32, 63, 64, self.pick.int(0, 255)))]
            self.finish(ctx)

    def h_cmpxchg(self, row: Row) -> None:
        ctx = self.start(row)
        w = 8 if row.operands[0] == "Eb" else ctx.opsize
        v = edge_value(self.pick, w)
        if _chance(self.pick, 50):  # equal: the exchange happens
            self.want(RAX, v, (1 << w) - 1)
            ctx.reserved.add(RAX)
            if ctx.mem:
                self.plan(ctx)
                self.finish(ctx, fill=False)
                self.put(ctx.plan.target, v.to_bytes(w // 8, "little"))  # type: ignore[union-attr]
                return
            r = ctx.e_reg()
            if r is not None and r not in (RAX, RSP) and not (w == 8 and not ctx.rex and 4 <= r <= 7):
                self.reg_value(ctx, r, "b" if w == 8 else "v", v)
        self.finish(ctx)

    def h_cmpxchg8b(self, row: Row) -> None:
        ctx = self.start(row)
        n = 16 if row.mnemonic == "CMPXCHG16B" else 8
        w = 4 * n  # bits of each of EDX:EAX / RDX:RAX
        align = n if (n == 8 or not _chance(self.pick, 10)) else 1  # CMPXCHG16B: #GP unless 16-aligned
        lo, hi = edge_value(self.pick, w), edge_value(self.pick, w)
        ctx.reserved |= {RAX, RDX}
        self.want(RAX, lo, (1 << w) - 1)
        self.want(RDX, hi, (1 << w) - 1)
        self.plan(ctx, align=align)
        self.finish(ctx, fill=False)
        if _chance(self.pick, 50):
            data = (lo | hi << w).to_bytes(n, "little")
        else:
            data = self.edge_bytes(n)
        self.put(ctx.plan.target, data)  # type: ignore[union-attr]

    def h_string(self, row: Row) -> None:
        """MOVS/CMPS/STOS/LODS/SCAS: rSI/rDI in the data pages, a small rCX for REP (SDM Vol. 2B REP)."""
        ctx = self.start(row)
        size = 1 if any(o.endswith("b") or o == "AL" for o in row.operands) else ctx.opsize // 8
        rep = any(p in (REP, REPNE) for p in ctx.prefixes)
        count = _choice(self.pick, (0, 1, 2, 3, 4, 7, 8, 16)) if rep else 1
        amask = (1 << ctx.asize) - 1
        span = count * size + 8
        if rep:
            self.want(RCX, count, amask)
        uses = {"MOVS": "XY", "CMPS": "XY", "STOS": "Y", "LODS": "X", "SCAS": "Y"}[row.mnemonic]
        same = _chance(self.pick, 40)
        content = self.edge_bytes(min(span, 64))
        for op in uses:
            seg = self.segment(ctx, DS) if op == "X" else (DS if self.long else ES)
            t, inside = self.pick_target(ctx.asize, span, 1, min(span, 160))
            ea, inside = self._ea(ctx, t, inside, seg)
            self.want(RSI if op == "X" else RDI, ea, amask)
            self.put(t, content if same else self.edge_bytes(min(span, 64)))
            self.mem_total += 1
            self.mem_inside += inside
        self.finish(ctx, steps=max(1, count))

    def h_xlat(self, row: Row) -> None:
        ctx = self.start(row)
        t, inside = self.pick_target(ctx.asize, 256 + 8)
        ea, inside = self._ea(ctx, t, inside, self.segment(ctx, DS))
        self.want(RBX, ea, (1 << ctx.asize) - 1)
        self.put(t, self.edge_bytes(32))
        self.mem_total += 1
        self.mem_inside += inside
        self.finish(ctx)

    def h_bound(self, row: Row) -> None:
        ctx = self.start(row)
        w = ctx.opsize
        self.avoid_reg_field(ctx, {RSP})
        lo, hi = sorted((_signed(edge_value(self.pick, w), w), _signed(edge_value(self.pick, w), w)))
        idx = _choice(self.pick, (lo, hi, lo - 1, hi + 1, (lo + hi) // 2, edge_value(self.pick, w)))
        self.reg_value(ctx, ctx.g_reg(), "v", idx)
        self.plan(ctx)
        self.finish(ctx, fill=False)
        n = w // 8
        self.put(ctx.plan.target, (lo & ((1 << w) - 1)).to_bytes(n, "little")  # type: ignore[union-attr]
                 + (hi & ((1 << w) - 1)).to_bytes(n, "little"))

    def selector(self, sreg: int | None = None) -> int:
        """A selector: mostly one the segment register already holds (or another valid one), sometimes null
        or random (a #GP / #SS / #NP when loaded)."""
        pick = self.pick
        k = pick.int(0, 19)
        cur = self.segsel[sreg if sreg is not None else DS]
        if k < 13 or (self.real and sreg == SS):
            return cur
        if k < 15:
            return _choice(pick, (self.segsel[DS], self.segsel[SS], self.segsel[CS]))
        if k < 17:
            return pick.int(0, 3)  # null selector, any RPL
        return pick.int(0, 0xFFFF)

    def seg_loaded(self, sreg: int, value: int) -> None:
        if value != self.segsel[sreg]:
            self.unit_segs.add(sreg)

    def h_mov_sreg(self, row: Row) -> None:
        ctx = self.start(row)
        if row.operands[0] == "Sw":  # MOV Sreg, r/m16
            sreg = ctx.reg or 0
            value = self.selector(sreg)
            self.e_value(ctx, "w", value, 2)
            self.seg_loaded(sreg, value)
        self.finish(ctx, fill=row.operands[0] != "Sw")

    def h_load_far(self, row: Row) -> None:
        """LDS/LES/LSS/LFS/LGS: a far pointer in a slot (offset, then selector; SDM Vol. 2A LDS/LES/...)."""
        ctx = self.start(row)
        sreg = {"LDS": DS, "LES": ES, "LSS": SS, "LFS": FS, "LGS": GS}[row.mnemonic]
        n = ctx.opsize // 8
        value = self.selector(sreg)
        addr = self.slot(n + 2)
        self.plan(ctx, target=addr)
        self.finish(ctx, fill=False)
        self.put(addr, edge_value(self.pick, ctx.opsize).to_bytes(n, "little") + value.to_bytes(2, "little"))
        self.seg_loaded(sreg, value)

    def h_selector_op(self, row: Row) -> None:
        """LAR/LSL/VERR/VERW/LLDT: selectors of the GDT (valid, system, null) or random ones."""
        ctx = self.start(row)
        pick = self.pick
        value = _choice(pick, (0, self.segsel[CS], self.segsel[DS], 0x08, 0x10, 0x1B, 0x23, 0x28, 0x30,
                               pick.int(0, 0xFFFF)))
        if row.mnemonic == "LLDT" and _chance(pick, 60):
            value = 0  # a null LDT selector is valid
        which = 1 if row.mnemonic in ("LAR", "LSL") else 0
        size = row.operands[which][1:]
        if which == 1:
            self.avoid_reg_field(ctx, {RSP})
        self.e_value(ctx, size, value, 2)
        self.finish(ctx, fill=False)

    def h_lmsw(self, row: Row) -> None:
        ctx = self.start(row)
        cr0 = self.snap.control.cr0
        value = (cr0 ^ (self.pick.int(0, 7) << 1)) & 0xFFFF  # toggle MP, EM, TS; PE stays
        self.e_value(ctx, "w", value, 2)
        self.finish(ctx, fill=False)

    def h_descriptor_table(self, row: Row) -> None:
        """LGDT/LIDT reload the table the machine already has (another one would break exception delivery)."""
        ctx = self.start(row)
        reg = self.snap.gdtr if row.mnemonic == "LGDT" else self.snap.idtr
        n = 8 if self.long else 4
        addr = self.slot(2 + n)
        self.plan(ctx, target=addr)
        self.finish(ctx, fill=False)
        self.put(addr, reg.limit.to_bytes(2, "little") + reg.base.to_bytes(n, "little"))

    def h_mov_cr(self, row: Row) -> None:
        """MOV to/from CR0, CR2, CR3, CR4, CR8 with values that keep the machine running (SDM Vol. 3A 2.5)."""
        ctx = self.start(row)
        if row.operands[0] == "Cy":  # MOV CRn, reg
            self.avoid_rm_reg(ctx, {RSP})
            num = (ctx.reg or 0) | ((ctx.rex_bits >> 2) & 1) << 3
            value = self.cr_value(num)
            r = (ctx.modrm & 7) | (ctx.rex_bits & 1) << 3  # type: ignore[operator]
            self.want(r, value)
            ctx.reserved.add(r)
        self.finish(ctx)

    def cr_value(self, num: int) -> int:
        pick = self.pick
        c = self.snap.control
        if num == 0:  # MP, EM, TS, NE, WP, AM (never PE, PG, CD, NW)
            toggles = (1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 16, 1 << 18)
            v = c.cr0
            for bit in toggles:
                if _chance(pick, 20):
                    v ^= bit
            return v
        if num == 2:
            return edge_value(pick, self.width)
        if num == 3:
            return c.cr3 | (pick.int(0, 3) << 3 if _chance(pick, 30) else 0)  # PWT, PCD
        if num == 4:  # TSD, DE, PGE, PCE, OSFXSR, OSXMMEXCPT (never the paging-mode bits)
            v = c.cr4
            for bit in (1 << 2, 1 << 3, 1 << 7, 1 << 8, 1 << 9, 1 << 10):
                if _chance(pick, 20):
                    v ^= bit
            return v
        return pick.int(0, 15) if not _chance(pick, 5) else edge_value(pick, 64)  # CR8: TPR (high bits: #GP)

    def h_mov_dr(self, row: Row) -> None:
        """MOV to/from DR0-DR7; DR7 never enables a breakpoint (the spec does not model them)."""
        ctx = self.start(row)
        if row.operands[0] == "Dy":
            self.avoid_rm_reg(ctx, {RSP})
            num = ctx.reg or 0
            pick = self.pick
            if num < 4:
                value = edge_value(pick, 32) if not self.long else _canonical(edge_value(pick, 64))
            elif num in (4, 6):
                value = edge_value(pick, 32)
            else:
                value = 0x400 | (pick.int(0, 0xFFFF) << 16) | (pick.int(0, 3) << 8)
            r = (ctx.modrm & 7) | (ctx.rex_bits & 1) << 3  # type: ignore[operator]
            self.want(r, value)
            ctx.reserved.add(r)
        self.finish(ctx)

    def h_msr(self, row: Row) -> None:
        """RDMSR/WRMSR of architectural MSRs with valid values, and now and then an unknown index (#GP)."""
        ctx = self.start(row)
        pick = self.pick
        ctx.reserved |= {RCX, RAX, RDX}
        if row.mnemonic == "RDMSR":
            msr = _choice(pick, (*_MSR_READ, pick.int(0, 0xFFFF_FFFF)))
            self.want(RCX, msr, 0xFFFF_FFFF)
        else:
            msr, value = self.msr_write()
            self.want(RCX, msr, 0xFFFF_FFFF)
            self.want(RAX, value & 0xFFFF_FFFF, 0xFFFF_FFFF)
            self.want(RDX, value >> 32, 0xFFFF_FFFF)
            if msr in (0xC000_0100, 0xC000_0101, 0xC000_0102):
                self.unit_segs |= {FS, GS}
        self.finish(ctx)

    def msr_write(self) -> tuple[int, int]:
        pick = self.pick
        k = pick.int(0, 9)
        if k == 0:
            return pick.int(0, 0xFFFF_FFFF), edge_value(pick, 64)
        msr = _choice(pick, _MSR_WRITE)
        if msr == 0x277:  # PAT: each byte a valid memory type (SDM Vol. 3A 11.12.2), sometimes not
            types = (0, 1, 4, 5, 6, 7)
            value = sum(_choice(pick, types) << (8 * i) for i in range(8))
            return msr, value if not _chance(pick, 10) else value | 2
        if msr in (0xC000_0100, 0xC000_0101, 0xC000_0102):  # FS/GS bases: 0 or the data page
            return msr, _choice(pick, (0, self.lay.data[0]))
        if msr in (0xC000_0084, 0xC000_0103):
            return msr, edge_value(pick, 32)
        v = edge_value(pick, 64)
        return msr, _canonical(v) if not _chance(pick, 10) else v

    def h_swapgs(self, row: Row) -> None:
        self.unit_segs.add(GS)
        self.generic(row)

    # -- stack ---------------------------------------------------------------------------------------
    def stack_size(self, ctx: Ctx) -> int:
        return ctx.opsize // 8

    def h_push(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        self.stack_need(n)
        self.finish(ctx)
        self.sp_move(-n)

    def h_pop(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        sreg = {"ES": ES, "SS": SS, "DS": DS, "FS": FS, "GS": GS}.get(row.operands[0])
        if sreg is not None:  # POP Sreg: push the selector first
            value = self.selector(sreg)
            self.stack_need(n)
            self.push_value(value, ctx.prefixes)
            self.seg_loaded(sreg, value)
        self.sp_move(n)  # before: a POP into RSP resets the stack right after it
        self.finish(ctx, allow_rsp=False)

    def push_value(self, value: int, prefixes: Sequence[int] = (), fix: Callable[[int, int], dict] | None = None,
                   wide: bool = False) -> None:
        """PUSH an immediate with the operand size the prefixes give (``wide``: a full 64-bit value, pushed
        through a register)."""
        pf = tuple(p for p in prefixes if p == OPSIZE)[:1]
        size = 8 if wide else (2 if pf and self.bits != 16 else (4 if pf else (8 if self.long else self.bits // 8)))
        if wide:
            reg = self.scratch()
            self.cur.items.append(self.mov_imm(reg, value, fix, wide=True))
            rex = 0x41 if reg >= 8 else None
            self.cur.items.append(self.item(_ROW_PUSH_REG[reg & 7], rex=rex))
        else:
            value &= (1 << (8 * min(size, 4))) - 1  # the immediate is at most 32 bits (sign-extended to 64)
            it = self.item(ROW_PUSH_IMM, prefixes=pf, imm=(value,))
            it.fix = fix
            self.cur.items.append(it)
        self.sp_move(-size)

    def flags_value(self) -> int:
        pick = self.pick
        v = 0x2 | (pick.int(0, 0xFFF) & SAFE_FLAGS)
        if _chance(pick, 30):
            v |= IF_FLAG
        if _chance(pick, 20):
            v |= ID_FLAG
        if self.env.cpl == 0 and _chance(pick, 10):
            v |= pick.int(0, 3) << 12
        return v

    def h_pushf(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        self.stack_need(n)
        self.finish(ctx)
        self.sp_move(-n)

    def h_popf(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        self.stack_need(n)
        self.push_value(self.flags_value(), ctx.prefixes)
        self.finish(ctx)
        self.sp_move(n)

    def h_pusha(self, row: Row) -> None:
        ctx = self.start(row)
        n = 8 * self.stack_size(ctx)
        if row.mnemonic == "PUSHA":
            self.stack_need(n)
            self.finish(ctx)
            self.sp_move(-n)
        else:
            self.stack_need(0)
            self.sp_move(n)
            self.finish(ctx)

    def h_enter(self, row: Row) -> None:
        """ENTER: the nesting level copies frame pointers from [rBP - k * size] (SDM Vol. 2A ENTER)."""
        ctx = self.start(row)
        pick = self.pick
        size = _choice(pick, (0, 1, 2, 8, 16, 0x100))
        level = _choice(pick, (0, 0, 1, 2, 3, 31, 32 + pick.int(0, 5)))
        n = self.stack_size(ctx)
        push = n * (1 + (level & 31)) + size
        self.stack_need(push)
        if level & 31:
            self.want(RBP, self.sp0 + 0x80, (1 << self.stack_bits) - 1)
        ctx.imm = [size, level]
        self.finish(ctx)
        self.sp_move(-push)

    def h_leave(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        frame = self.sp0 - 8 * self.pick.int(0, 16)
        self.want(RBP, frame, (1 << self.stack_bits) - 1)
        self.finish(ctx)
        self.unit_sp = (frame + n, frame + n)

    # -- control transfers ------------------------------------------------------------------------------
    def ip_of(self, linear: int, opsize: int) -> int:
        return (linear - self.cs_base) & ((1 << opsize) - 1)

    def h_branch(self, row: Row) -> None:
        """Jcc/JMP/LOOPcc/JCXZ: forward to a later unit boundary; LOOP with a small rCX."""
        ctx = self.start(row)
        if row.mnemonic in ("LOOP", "LOOPE", "LOOPNE", "JCXZ"):
            self.want(RCX, _choice(self.pick, (0, 1, 2, edge_value(self.pick, ctx.asize))), (1 << ctx.asize) - 1)
        self.finish(ctx)

    def h_call_rel(self, row: Row) -> None:
        ctx = self.start(row)
        n = self.stack_size(ctx)
        self.stack_need(n)
        self.finish(ctx)
        self.sp_move(-n)

    def h_indirect(self, row: Row) -> None:
        """CALL/JMP r/m: the register or the pointer in memory holds a later boundary's address."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        if row.mnemonic == "CALL":
            self.stack_need(n)
        self.cur.needs_target = True
        if ctx.mem:
            addr = self.slot(n)
            self.plan(ctx, target=addr)
            self.cur.data_fixes.append(lambda t, a=addr, n=n: (a, self.ip_of(t, 8 * n).to_bytes(n, "little")))
            self.finish(ctx, fill=False)
        else:
            self.avoid_rm_reg(ctx, {RSP})
            r = ctx.e_reg()
            assert r is not None
            it = self.mov_imm(r, 0, lambda _a, t, w=ctx.opsize: {"imm": (self.ip_of(t, w),)})
            self.cur.items.append(it)
            self.unit_writes.add(r)
            ctx.reserved.add(r)
            self.finish(ctx)
        if row.mnemonic == "CALL":
            self.sp_move(-n)

    def h_ret(self, row: Row) -> None:
        """RET (Iw): PUSH the address of a later boundary, then return to it."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        self.stack_need(n)
        self.cur.needs_target = True
        self.push_value(0, ctx.prefixes, lambda _a, t, w=ctx.opsize: {"imm": (self.ip_of(t, w),)})
        release = 0
        if row.operands:
            release = _choice(self.pick, (0, 2, 4, 8, 16, 32))
            ctx.imm = [release]
        self.finish(ctx)
        self.sp_move(n + release)

    def far_frame(self, ctx: Ctx, values: list[tuple[int, bool]]) -> None:
        """Push ``values`` (first pushed first; True marks the return offset, fixed at layout) with the
        operand size of the far return ``ctx``."""
        n = ctx.opsize // 8

        def offset_fix(_a: int, t: int, w: int = ctx.opsize) -> dict:
            return {"imm": (self.ip_of(t, w),)}

        if not self.long or n == 8 or n == 2:
            pf = ctx.prefixes if not self.long else ([OPSIZE] if n == 2 else [])
            for value, is_ip in values:
                self.push_value(value if not is_ip else 0, pf, offset_fix if is_ip else None)
            return
        # 64-bit mode, 32-bit operand size: pairs of 4-byte items packed into 8-byte pushes
        items = list(values)
        if len(items) % 2:
            items.insert(0, (0, False))
        for hi_item, lo_item in zip(items[0::2], items[1::2], strict=True):
            (hv, hi_ip), (lv, lo_ip) = hi_item, lo_item

            def pair_fix(_a: int, t: int, hv: int = hv, lv: int = lv, hi_ip: bool = hi_ip,
                         lo_ip: bool = lo_ip) -> dict:
                hi = self.ip_of(t, 32) if hi_ip else hv
                lo = self.ip_of(t, 32) if lo_ip else lv
                return {"imm": ((hi << 32 | lo) & M64,)}

            self.push_value(0, (), pair_fix, wide=True)

    def h_retf(self, row: Row) -> None:
        """RETF (Iw) to the same privilege level: push CS and a later boundary's offset first."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        self.stack_need(2 * max(n, 4) + 8)
        self.cur.needs_target = True
        self.far_frame(ctx, [(self.segsel[CS], False), (0, True)])
        release = 0
        if row.operands:
            release = _choice(self.pick, (0, 2, 4, 8, 16))
            ctx.imm = [release]
        self.finish(ctx)
        self.sp_move(2 * n + release)

    def h_iret(self, row: Row) -> None:
        """IRET to the same privilege level: push (SS, RSP in 64-bit mode,) flags, CS and a later offset."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        self.stack_need(5 * 8)
        self.cur.needs_target = True
        flags = self.flags_value()
        frame: list[tuple[int, bool]] = [(flags, False), (self.segsel[CS], False), (0, True)]
        after = None
        if self.long:  # IRET pops SS:RSP in 64-bit mode (SDM Vol. 2A IRET)
            after = self.sp0 - 0x40
            frame = [(self.segsel[SS], False), (after, False), *frame]
        self.far_frame(ctx, frame)
        self.finish(ctx)
        if after is not None:
            self.unit_sp = (after, after)
        else:
            self.sp_move(3 * n)

    def h_far_direct(self, row: Row) -> None:
        """JMPF/CALLF ptr16:16/32 to the current CS and a later boundary (not in 64-bit mode)."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        if row.mnemonic == "CALLF":
            self.stack_need(2 * n)
        self.cur.needs_target = True
        ctx.imm = [0, self.segsel[CS]]
        it = self.finish(ctx)
        cs = self.segsel[CS]
        it.fix = lambda _a, t, w=ctx.opsize: {"imm": (self.ip_of(t, w), cs)}
        if row.mnemonic == "CALLF":
            self.sp_move(-2 * n)

    def h_far_indirect(self, row: Row) -> None:
        """JMPF/CALLF m16:16/32: the far pointer in a slot."""
        ctx = self.start(row)
        n = ctx.opsize // 8
        if row.mnemonic == "CALLF":
            self.stack_need(2 * n + 8)
        self.cur.needs_target = True
        addr = self.slot(n + 2)
        self.plan(ctx, target=addr)
        cs = self.segsel[CS]
        self.cur.data_fixes.append(
            lambda t, a=addr, n=n: (a, self.ip_of(t, 8 * n).to_bytes(n, "little") + cs.to_bytes(2, "little")))
        self.finish(ctx, fill=False)
        if row.mnemonic == "CALLF":
            self.sp_move(-2 * n)

    # -- paging corruption ---------------------------------------------------------------------------
    def corruption(self, variant: str) -> tuple[str, int, int, int]:
        """(kind, entry address, corrupted value, page) of one "corrupt one field" edit of a leaf entry
        (SDM Vol. 3A 4.7; APM Vol. 2 5.3).  Only data pages are corrupted: an edit of the code page's entry
        would make the fetch of the flush itself depend on whether a TLB still holds the old translation
        (SDM Vol. 3A 4.10.4.2), so backends could legally differ.  XD on a data page must not affect data
        accesses (SDM Vol. 3A 4.6), which the case then checks."""
        lay, pick = self.lay, self.pick
        eb = lay.entry_bytes
        kinds = ["clear-P", "clear-P", "clear-RW", "clear-RW"]
        if self.env.cpl == 3:  # the data pages are user pages only at CPL 3
            kinds += ["clear-US"] * 3
        if eb == 8:
            kinds += ["set-XD", "reserved", "reserved"]
        kind = _choice(pick, kinds)
        page = _choice(pick, lay.data)
        entry = lay.leaf_entry(page)
        v0 = lay.entry_value(entry)
        if kind == "clear-P":
            v = v0 & ~1
        elif kind == "clear-RW":
            v = v0 & ~2
        elif kind == "clear-US":
            v = v0 & ~4
        elif kind == "set-XD":
            v = v0 | 1 << 63
        else:
            size = self.env.page_size
            if size == PAGE:
                bit = 51  # above MAXPHYADDR (48 here, 40 in QEMU's default model)
            else:
                bit = pick.int(13, 20 if size == 1 << 21 else 29)  # reserved in large-page entries
            v = v0 | 1 << bit
        return kind, entry, v, page

    def corruption_unit(self, kind: str, entry: int, value: int, page: int) -> None:
        """CPL-0 code that writes the corrupted entry, then INVLPG or a CR3 reload (SDM Vol. 3A 4.10.4.1)."""
        pick = self.pick
        v0 = self.lay.entry_value(entry)
        changed = v0 ^ value
        addr, dword = (entry, value & 0xFFFF_FFFF) if changed & 0xFFFF_FFFF else (entry + 4, value >> 32)
        if self.long:
            it = self.item(ROW_MOV_EV_IZ, modrm=0x04, sib=0x25, disp=addr, imm=(dword,))
        else:
            it = self.item(ROW_MOV_EV_IZ, modrm=0x05, disp=addr, imm=(dword,))
        self.cur.items.append(it)
        flush = "invlpg" if _chance(pick, 60) else "cr3"
        if flush == "invlpg":
            modrm, sib = (0x3C, 0x25) if self.long else (0x3D, None)
            self.cur.items.append(self.item(ROW_INVLPG, modrm=modrm, sib=sib, disp=page))
        else:
            reg = self.scratch()
            rex = 0x41 if reg >= 8 else None
            self.cur.items.append(self.item(ROW_MOV_FROM_CR, rex=rex, modrm=0xD8 | (reg & 7)))
            self.cur.items.append(self.item(ROW_MOV_TO_CR, rex=rex, modrm=0xD8 | (reg & 7)))
        self.tags.append(f"corrupt:{kind}:guest:{flush}")
        self.commit()

    # == the case ========================================================================================
    def body(self, row: Row) -> None:
        _handler(row)(self, row)
        self.commit()

    def terminal(self) -> None:
        """The last instruction: one that always ends the case (an event, a fault, #UD)."""
        pick, p = self.pick, self.pools
        if p.invalid and (not p.last or _chance(pick, 40)):
            for _ in range(6):
                row = _choice(pick, p.invalid)
                try:
                    enc = generate(row, self.bits, pick, vendor=VENDOR, valid=False)
                except EncodeError:
                    continue
                kw = {"prefixes": enc.prefixes, "rex": enc.rex, "imm": enc.imm}
                if row.has_modrm:
                    kw.update(modrm=enc.modrm, sib=enc.sib, disp=enc.disp)
                self.cur.items.append(Item(row=row, kw=kw, code=enc.code))
                self.tags.append("last:invalid")
                self.commit()
                return
        if p.last:
            row = _choice(pick, p.last)
            self.generic(row)
            self.tags.append(f"last:{row.mnemonic.lower()}")
            self.commit()

    def run(self, length: int, *, corruption: str | None = None) -> None:
        """Generate ``length`` units (``corruption``: force "initial"/"guest", or "none"; default random)."""
        pick = self.pick
        guest_at = None
        plan = None
        if self.lay.paging and corruption != "none" and (corruption is not None or _chance(pick, 25)):
            variant = corruption if corruption in ("initial", "guest") else (
                "guest" if self.env.cpl == 0 and _chance(pick, 60) else "initial")
            if self.env.cpl != 0:
                variant = "initial"  # only CPL 0 may write the paging structures
            plan = self.corruption(variant)
            kind, entry, value, page = plan
            if page in self.lay.data:
                self.focus = page
            if variant == "initial":
                self.pte_edits[entry] = value
                self.tags.append(f"corrupt:{kind}:initial")
            else:
                guest_at = pick.int(0, max(0, length // 3))
        for u in range(length):
            if self.code_bytes > self.lay.code_end - self.lay.code - 0x200:
                break
            if u == guest_at and plan is not None:
                self.corruption_unit(*plan)
                if self.focus is not None:
                    self.access_focus()
                continue
            if u == length - 1 and u and _chance(pick, 12):
                self.terminal()
                continue
            self.body(_choice(pick, self.pools.body))

    def access_focus(self) -> None:
        """A read or write of the corrupted page right after the flush."""
        row = _choice(self.pick, (ROW_MOV_STORE, ROW_MOV_LOAD, ROW_ADD_STORE))
        self.force_focus = True
        ctx = self.start(row, mem=True)
        self.finish(ctx)
        self.commit()

    def layout_code(self) -> list[bytes]:
        """Place the units, fix jump targets, return addresses and pointers; the instructions' bytes."""
        addr = self.lay.code
        starts = []
        for unit in self.units:
            starts.append(addr)
            for it in unit.items:
                addr += len(it.code)
        end = addr
        addrs: dict[int, int] = {}
        for k, unit in enumerate(self.units):
            a = starts[k]
            for it in unit.items:
                addrs[id(it)] = a
                a += len(it.code)
            target = 0
            if unit.needs_target:
                later = [*starts[k + 1:], end]
                if unit.branch is not None:
                    limit = addrs[id(unit.branch)] + len(unit.branch.code) + unit.reach
                    later = [t for t in later if t <= limit] or later[:1]
                target = later[0] if len(later) == 1 or not _chance(self.pick, 50) else _choice(self.pick, later)
            for it in unit.items:
                if it.fix is not None:
                    it.kw.update(it.fix(addrs[id(it)], target))
                    code = _encode(it.row, self.bits, it.kw)
                    if len(code) != len(it.code):
                        raise AssertionError(f"fix-up changed the length of {it.row.key}")
                    it.code = code
            for fix in unit.data_fixes:
                a, raw = fix(target)
                self.put(a, raw)
        return [it.code for unit in self.units for it in unit.items]

    def registers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in range(self.nregs):
            if r == RSP:
                out["rsp"] = self.sp0
            elif r in self.init:
                out[_GPR[r]] = self.init[r] & self.rmask
            else:
                out[_GPR[r]] = edge_value(self.pick, self.width)
        return out

    def initial_flags(self) -> int:
        pick = self.pick
        v = 0x2 | (pick.int(0, 0xFFF) & 0x8D5)
        if _chance(pick, 10):
            v |= 0x400  # DF: string instructions go down
        return v

    def case(self, name: str, provenance: Provenance) -> Case:
        insns = self.layout_code()
        regs = self.registers()
        flags = self.initial_flags()
        steps = sum(it.steps for unit in self.units for it in unit.items)
        data = {a: bytes(p) for a, p in self.pages.items()}
        return build_case(self.env, insns, regs=regs, rflags=flags, data=data, pte_edits=self.pte_edits or None,
                          name=name, budget=2 * steps + 16, tags=sorted(set(self.tags)), provenance=provenance)


_SHAPES: dict[tuple, tuple[bytes, int, tuple[int, ...]]] = {}


def _encode(row: Row, bits: int, kw: dict) -> bytes:
    """The bytes of ``row`` from its parts, laid out as :func:`spec.decode.encode.build` does (SDM Vol. 2A
    2.1: prefixes, mandatory prefix, REX, opcode, ModRM, SIB, displacement, immediates) with the field widths
    of its :func:`~spec.decode.encode.disp_size` and :func:`~spec.decode.encode.imm_fields`.  ``build``
    itself (which also checks the parts) is several times slower; the tests check that both agree.
    The fixed part and the field widths are cached by shape (row, prefixes, REX, ModRM, SIB)."""
    prefixes, rex, modrm, sib = kw["prefixes"], kw["rex"], kw.get("modrm"), kw.get("sib")
    key = (id(row), bits, prefixes, rex, modrm, sib)
    shape = _SHAPES.get(key)
    if shape is None:
        out = bytearray(prefixes)
        if row.mandatory is not None:
            out.append(row.mandatory)
        if rex is not None:
            out.append(rex)
        out += bytes(row.opcode)
        asize = address_size(bits, p67=ADDRSIZE in prefixes)
        dsize = 0
        if row.has_modrm:
            m = row.modrm_exact if modrm is None else modrm
            out.append(m)
            if sib is not None:
                out.append(sib)
            if m >> 6 != 3 and row.modrm_exact is None and not _form(row, bits).reg_only:
                dsize = disp_size(asize, m, sib)
        opsize = operand_size(row, bits, p66=OPSIZE in prefixes, rex_w=bool((rex or 0) & 8), vendor=VENDOR)
        if len(_SHAPES) > 200_000:
            _SHAPES.clear()
        shape = _SHAPES[key] = (bytes(out), dsize, imm_fields(row, opsize, asize))
    head, dsize, widths = shape
    if not dsize and not widths:
        return head
    out = bytearray(head)
    if dsize:
        out += (kw.get("disp", 0) & ((1 << (8 * dsize)) - 1)).to_bytes(dsize, "little")
    for width, value in zip(widths, kw.get("imm", ()), strict=True):
        out += (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


def encode_checked(row: Row, bits: int, kw: dict, *, strict: bool = True) -> bytes:
    """:func:`spec.decode.encode.build` of the same parts (raises EncodeError for invalid parts)."""
    return build(row, bits, vendor=VENDOR, strict=strict, **kw).code


def _operand_reg(row: Row, spec: str, kw: dict, rex: int) -> int | None:
    """The GPR number an operand names (AH..BH count as their full register), or None."""
    k = operand_kind(spec)
    byte = spec.endswith("b") and k in ("E", "G", "Z")
    modrm = kw.get("modrm")
    if spec in ("AL", "rAX", "eAX"):
        return RAX
    if k == "G":
        num = ((modrm or 0) >> 3 & 7) | ((rex >> 2) & 1) << 3
    elif k in ("E", "R"):
        if modrm is None or (modrm >> 6 != 3 and k == "E"):
            return None
        num = (modrm & 7) | (rex & 1) << 3
    elif k == "Z":
        num = (row.reg_in_opcode or 0) | (rex & 1) << 3
    else:
        return None
    if byte and not rex and 4 <= num <= 7:
        return num - 4
    return num


def _canonical(v: int) -> int:
    return (v & ((1 << 47) - 1)) | (M64 & ~((1 << 47) - 1) if v >> 47 & 1 else 0)


def _division(pick: Picker, w: int, signed: bool) -> tuple[int, int]:
    """(dividend of 2w bits, divisor of w bits): normal (60 %), quotient overflow (20 %), zero divisor (20 %)."""
    m, m2 = (1 << w) - 1, (1 << (2 * w)) - 1
    k = pick.int(0, 9)
    if k < 2:
        return edge_value(pick, 2 * w), 0
    if k < 4:
        if signed:
            if w != 32 and _chance(pick, 50):
                # most negative / -1.  Not with 32 bits: Unicorn 2.1.4 divides EDX:EAX by -1 with the host's
                # 64-bit IDIV, which traps and kills the process (SIGFPE).
                return (1 << (2 * w - 1)) & m2, m
            d = pick.int(1, 1 << (w - 2))
            return (d << (w - 1)) & m2, d  # quotient 2^(w-1): one too big
        d = edge_value(pick, w) or 1
        return ((d + pick.int(0, 3)) << w | edge_value(pick, w)) & m2, d  # high half >= divisor
    d = edge_value(pick, w) or 1
    if signed:
        ds = _signed(d, w)
        q = _choice(pick, (0, 1, -1, (1 << (w - 1)) - 1, -(1 << (w - 1)), _signed(edge_value(pick, w), w)))
        r = pick.int(0, abs(ds) - 1) if abs(ds) > 1 else 0
        n = q * ds
        n = n + (r if n >= 0 else -r)
        if not -(1 << (2 * w - 1)) <= n < (1 << (2 * w - 1)):
            n = ds
        return n & m2, d
    q = _choice(pick, (0, 1, m, edge_value(pick, w)))
    return (q * d + pick.int(0, d - 1)) & m2, d


_REGS16 = {0: (RBX, RSI), 1: (RBX, RDI), 2: (RBP, RSI), 3: (RBP, RDI), 4: (RSI,), 5: (RDI,), 6: (RBP,), 7: (RBX,)}
_GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_MSR_READ = (0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0100, 0xC000_0101,
             0xC000_0102, 0x174, 0x175, 0x176, 0x277)
_MSR_WRITE = (0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0100, 0xC000_0101, 0xC000_0102,
              0x175, 0x176, 0x277, 0xC000_0103)
"""MSRs whose values are architectural (EFER, STAR, LSTAR, CSTAR, SFMASK, FS/GS/KernelGS base, SYSENTER_*,
PAT); SYSENTER_CS and EFER are never written, so SYSENTER/SYSCALL keep faulting (they are last-only)."""

_ROW_MOV_IMM = {r.reg_in_opcode: r for r in ROWS if len(r.opcode) == 1 and 0xB8 <= r.opcode[0] <= 0xBF}
_ROW_PUSH_REG = {r.reg_in_opcode: r for r in ROWS if len(r.opcode) == 1 and 0x50 <= r.opcode[0] <= 0x57}


def _row(key: str) -> Row:
    for r in ROWS:
        if r.key == key:
            return r
    raise KeyError(key)


HLT_KEY = _row("F4 HLT").key
ROW_PUSH_IMM = _row("68 PUSH Iz")
ROW_MOV_EV_IZ = _row("C7 /0 MOV Ev,Iz")
ROW_INVLPG = _row("0F 01 /7 INVLPG M")
ROW_MOV_FROM_CR = _row("0F 20 MOV Ry,Cy")
ROW_MOV_TO_CR = _row("0F 22 MOV Cy,Ry")
ROW_MOV_STORE = _row("89 MOV Ev,Gv")
ROW_MOV_LOAD = _row("8B MOV Gv,Ev")
ROW_ADD_STORE = _row("01 ADD Ev,Gv")

_H = Generator
_HANDLERS: dict[str, Callable[[Generator, Row], None]] = {
    **{m: _H.h_shift for m in ("ROL", "ROR", "RCL", "RCR", "SHL", "SHR", "SAL", "SAR", "SHLD", "SHRD")},
    "DIV": _H.h_divide, "IDIV": _H.h_divide,
    **{m: _H.h_bittest for m in ("BT", "BTS", "BTR", "BTC")},
    "CMPXCHG": _H.h_cmpxchg, "CMPXCHG8B": _H.h_cmpxchg8b, "CMPXCHG16B": _H.h_cmpxchg8b,
    **{m: _H.h_string for m in ("MOVS", "CMPS", "STOS", "LODS", "SCAS")},
    "XLAT": _H.h_xlat, "BOUND": _H.h_bound,
    **{m: _H.h_load_far for m in ("LDS", "LES", "LSS", "LFS", "LGS")},
    **{m: _H.h_selector_op for m in ("LAR", "LSL", "VERR", "VERW", "LLDT")},
    "LMSW": _H.h_lmsw, "LGDT": _H.h_descriptor_table, "LIDT": _H.h_descriptor_table,
    "RDMSR": _H.h_msr, "WRMSR": _H.h_msr, "SWAPGS": _H.h_swapgs,
    "PUSH": _H.h_push, "POP": _H.h_pop, "PUSHF": _H.h_pushf, "POPF": _H.h_popf, "PUSHA": _H.h_pusha,
    "POPA": _H.h_pusha, "ENTER": _H.h_enter, "LEAVE": _H.h_leave,
    **{m: _H.h_branch for m in ("JCC", "LOOP", "LOOPE", "LOOPNE", "JCXZ")},
    "RET": _H.h_ret, "RETF": _H.h_retf, "IRET": _H.h_iret,
}
_BY_KEY: dict[str, Callable[[Generator, Row], None]] = {
    "E8 CALL Jz": _H.h_call_rel, "E9 JMP Jz": _H.h_branch, "EB JMP Jb": _H.h_branch,
    "FF /2 CALL Ev": _H.h_indirect, "FF /4 JMP Ev": _H.h_indirect,
    "9A CALLF Ap i64": _H.h_far_direct, "EA JMPF Ap i64": _H.h_far_direct,
    "FF /3 CALLF Mp": _H.h_far_indirect, "FF /5 JMPF Mp": _H.h_far_indirect,
}


_HANDLER_OF: dict[int, Callable[[Generator, Row], object]] = {}


def _handler(row: Row) -> Callable[[Generator, Row], object]:
    """The handler that builds ``row``'s unit (cached by row)."""
    got = _HANDLER_OF.get(id(row))
    if got is None:
        got = _HANDLERS.get(row.mnemonic) or _BY_KEY.get(row.key)
        if got is None and row.mnemonic == "MOV":
            kinds = {o[0] for o in row.operands}
            got = (Generator.h_mov_cr if "C" in kinds else Generator.h_mov_dr if "D" in kinds
                   else Generator.h_mov_sreg if "S" in kinds else None)
        got = _HANDLER_OF[id(row)] = got or Generator.generic
    return got


# == the public entry points ================================================================================

def _rng(seed: int, index: int, envs: Sequence[Environment], length: int) -> random.Random:
    labels = ",".join(e.label() + ("" if e.idt else "/noidt") for e in envs)
    return random.Random(f"{GENERATOR}:{seed}:{index}:{length}:{labels}")


def generate_case(seed: int, index: int, *, envs: Sequence[Environment] | None = None, length: int = 20,
                  campaign: str | None = None, nondeterministic: bool = False) -> Case:
    """Case ``index`` of the stream ``seed``: deterministic in (seed, index, envs, length).

    ``length`` counts the generated instructions that carry the case (the set-up instructions in front
    of them -- ``MOV reg, imm``, pushes of return addresses -- come on top).  ``nondeterministic`` also
    allows RDTSC/RDTSCP/RDPMC/CPUID (such cases are tagged ``nondeterministic``)."""
    envs = list(envs) if envs else ENVIRONMENTS
    if length < 1:
        raise ValueError(f"length must be at least 1, not {length}")
    rng = _rng(seed, index, envs, length)
    pick = FastPicker(rng)
    env = envs[pick.int(0, len(envs) - 1)]
    return generate_for(env, pick, length=length, name=_name(campaign, seed, index),
                        provenance=Provenance(generator=GENERATOR, seed=seed, campaign=campaign, index=index),
                        nondeterministic=nondeterministic)


def generate_for(env: Environment, pick: Picker | int, *, length: int = 20, name: str = "generated",
                 provenance: Provenance | None = None, corruption: str | None = None,
                 nondeterministic: bool = False) -> Case:
    """A case for ``env`` from the choices of ``pick`` (a :class:`Picker`, or a seed).

    ``corruption``: ``"initial"`` / ``"guest"`` force a paging corruption of that kind (paging
    environments), ``"none"`` forbids one; by default one case in four with paging has one."""
    if isinstance(pick, int):
        pick = FastPicker(random.Random(pick))
    gen = Generator(env, pick, nondeterministic=nondeterministic)
    gen.run(length, corruption=corruption)
    if nondeterministic and any(it.row.mnemonic in NONDETERMINISTIC for u in gen.units for it in u.items):
        gen.tags.append("nondeterministic")
    case = gen.case(name, provenance or Provenance(generator=GENERATOR))
    bits = env.bits
    _remember_rows(case, frozenset({HLT_KEY, *(it.row.key for u in gen.units for it in u.items
                                               if mode_valid(it.row, bits))}))
    return case


def _name(campaign: str | None, seed: int, index: int) -> str:
    prefix = "".join(c if c.isalnum() or c in "_.+-" else "-" for c in campaign) if campaign else "gen"
    return f"{prefix}-s{seed}-i{index}"


_ROW_OF_BYTES: dict[tuple[bytes, int, bool], str | None] = {}


def row_key_of(raw: bytes, bits: int, real: bool = False) -> str | None:
    """The key of the opcode-table row ``raw`` encodes (exactly, valid in the mode), or None (cached)."""
    key = (raw, bits, real)
    got = _ROW_OF_BYTES.get(key, False)
    if got is False:
        try:
            insn = decode(raw, bits, vendor=VENDOR, real=real)
            got = insn.row.key if insn.length == len(raw) and mode_valid(insn.row, bits) else None
        except Exception:  # #UD/#GP at decode: not a valid form here
            got = None
        if len(_ROW_OF_BYTES) > 200_000:
            _ROW_OF_BYTES.clear()
        _ROW_OF_BYTES[key] = got
    return got  # type: ignore[return-value]


_KNOWN_ROWS: dict[int, tuple[str, frozenset[str]]] = {}  # id(case) -> (its code, row keys) while it lives


def _remember_rows(case: Case, keys: frozenset[str]) -> None:
    _KNOWN_ROWS[id(case)] = (case.code, keys)
    weakref.finalize(case, _KNOWN_ROWS.pop, id(case), None)


def rows_covered(case: Case) -> set[tuple[str, str]]:
    """(opcode-table row key, mode) of every instruction of ``case`` (the final HLT included) that decodes
    as a valid row of the map.  For a case this module generated (and nobody changed) the rows it was
    built from are remembered, so no decoding is needed."""
    bits, mode = case.env.bits, case.env.mode
    known = _KNOWN_ROWS.get(id(case))
    if known is not None and known[0] == case.code:
        return {(k, mode) for k in known[1]}
    real = mode == "real"
    out = {(HLT_KEY, mode)}
    for raw in case.instructions():
        key = row_key_of(raw, bits, real)
        if key is not None:
            out.add((key, mode))
    return out


__all__ = ["ENVIRONMENTS", "FastPicker", "Generator", "Pools", "edge_value", "generable_rows", "generate_case",
           "generate_for", "pools", "row_key_of", "rows_covered", "shift_count"]
