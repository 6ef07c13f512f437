"""Machine state: register parts, RFLAGS with lazy status flags, and the snapshot file format.

* General-purpose register parts (SDM Vol. 1 3.4.1.1, Vol. 2A 3.7.2.1): 8-bit low and high
  (AH..BH) and 16-bit writes merge into the 64-bit register, 32-bit writes zero-extend --
  as hypothesis properties on the concrete domain and as Z3 proofs on the symbolic one.
* RFLAGS (SDM Vol. 1 3.4.3): write/read round trip; the lazy flag record yields the same
  flags as evaluating the definitions eagerly and as a plain-int reference.
* Snapshots (spec/snapshot.py): generated valid snapshots survive
  Snapshot -> MachineState -> Snapshot exactly and JSON -> model -> JSON unchanged;
  malformed ones are rejected with a ValidationError naming the offending field.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.domain.concrete import CONCRETE
from spec.domain.symbolic import SymbolicDomain, prove
from spec.memory import PAGE, LinearMemory, PhysicalMemory
from spec.snapshot import Snapshot
from spec.state import Flags, MachineState

M64 = (1 << 64) - 1
u64 = st.integers(0, M64)


def mask(w: int) -> int:
    return (1 << w) - 1


# ----------------------------------------------------------------------------------------------
# Register parts
# ----------------------------------------------------------------------------------------------

@settings(max_examples=100)
@given(regs=st.lists(u64, min_size=16, max_size=16), reg=st.integers(0, 15),
       size=st.sampled_from([8, 16, 32, 64]), high8=st.booleans(), value=u64)
def test_register_parts(regs: list[int], reg: int, size: int, high8: bool, value: int) -> None:
    s = MachineState.concrete()
    s.gpr = list(regs)
    high8 = high8 and size == 8 and reg < 4  # AH, CH, DH, BH are bits 15:8 of registers 0-3
    old = regs[reg]
    # Reads.
    want_read = (old >> 8 & 0xFF) if high8 else old & mask(size)
    assert s.read_gpr(reg, size, high8) == want_read
    # Writes.
    v = value & mask(size)
    s.write_gpr(reg, size, v, high8)
    if high8:
        want = old & ~0xFF00 & M64 | v << 8
    elif size == 32:
        want = v  # zero-extended to 64 bits
    elif size == 64:
        want = v
    else:
        want = old & ~mask(size) & M64 | v
    assert s.gpr[reg] == want
    assert s.read_gpr(reg, size, high8) == v
    assert [x for i, x in enumerate(s.gpr) if i != reg] == [x for i, x in enumerate(regs) if i != reg]


@pytest.mark.parametrize(("size", "high8"), [(8, False), (8, True), (16, False), (32, False), (64, False)])
def test_register_parts_symbolic(size: int, high8: bool) -> None:
    """The same rules proved for all register and value contents on the Z3 domain."""
    D = SymbolicDomain()
    s = MachineState(D=D, mem=LinearMemory(D, PhysicalMemory()))
    old = z3.BitVec("old", 64)
    v = z3.BitVec("v", size)
    s.gpr[2] = old
    s.write_gpr(2, size, v, high8)
    new = s.gpr[2]
    if high8:
        want = z3.Concat(z3.Extract(63, 16, old), v, z3.Extract(7, 0, old))
    elif size == 64:
        want = v
    elif size == 32:
        want = z3.ZeroExt(32, v)
    else:
        want = z3.Concat(z3.Extract(63, size, old), v)
    assert prove(new == want) is None
    assert prove(s.read_gpr(2, size, high8) == v) is None


# ----------------------------------------------------------------------------------------------
# RFLAGS and the lazy flag record
# ----------------------------------------------------------------------------------------------

RFLAGS_WRITABLE = mask(22) & ~((1 << 1) | (1 << 3) | (1 << 5) | (1 << 15))
"""Defined RFLAGS bits except the always-one bit 1 (SDM Vol. 1 3.4.3, Figure 3-8)."""


@st.composite
def rflags(draw: st.DrawFn) -> int:
    return draw(st.integers(0, mask(22))) & RFLAGS_WRITABLE | 2


@settings(max_examples=100)
@given(v=rflags())
def test_rflags_round_trip(v: int) -> None:
    s = MachineState.concrete()
    s.undefined = 1 << F.AF
    s.write_rflags(v)
    assert s.read_rflags() == v
    assert s.undefined == 0  # writing RFLAGS defines every status flag
    for f in range(22):
        assert bool(s.get_flag(f)) == bool(v >> f & 1), f
    s.write_rflags(v & ~2)
    assert s.read_rflags() == v  # bit 1 always reads as 1


def _signed(w: int, x: int) -> int:
    return x - (1 << w) if x >> (w - 1) & 1 else x


def plain_flags(kind: str, w: int, a: int, b: int, c: int) -> tuple[int, dict[int, bool]]:
    """The result and six flags of an operation record, from plain ints (SDM Vol. 1 3.4.3.1)."""
    m = mask(w)
    if kind == "add":
        t = a + b + c
        r = t & m
        fl = {F.CF: t > m, F.OF: not -(1 << (w - 1)) <= _signed(w, a) + _signed(w, b) + c < 1 << (w - 1),
              F.AF: (a & 15) + (b & 15) + c > 15}
    elif kind == "sub":
        r = (a - b - c) & m
        fl = {F.CF: a < b + c, F.OF: not -(1 << (w - 1)) <= _signed(w, a) - _signed(w, b) - c < 1 << (w - 1),
              F.AF: (a & 15) < (b & 15) + c}
    else:  # logic / result: CF = OF = AF = 0
        r = a & b
        fl = {F.CF: False, F.OF: False, F.AF: False}
    fl.update({F.ZF: r == 0, F.SF: bool(r >> (w - 1)), F.PF: bin(r & 0xFF).count("1") % 2 == 0})
    return r, fl


KINDS = {"add": F.ADD, "sub": F.SUB, "logic": F.LOGIC, "result": F.RESULT}


@st.composite
def records(draw: st.DrawFn) -> tuple[str, int, int, int, int]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    w = draw(st.sampled_from([8, 16, 32, 64]))
    a, b = draw(st.integers(0, mask(w))), draw(st.integers(0, mask(w)))
    c = draw(st.integers(0, 1)) if kind in ("add", "sub") else 0
    return kind, w, a, b, c


@settings(max_examples=150)
@given(rec=records(), before=rflags(), keep=st.sets(st.sampled_from(F.STATUS), max_size=2))
def test_lazy_flags_equal_eager(rec: tuple[str, int, int, int, int], before: int, keep: set[int]) -> None:
    """A lazy record reads back as eager evaluation and as the plain-int reference; ``keep`` keeps."""
    kind, w, a, b, c = rec
    r, want = plain_flags(kind, w, a, b, c)
    s = MachineState.concrete()
    s.write_rflags(before)
    k = KINDS[kind]
    s.flags.set_lazy(k, w, a, b, r, bool(c), keep=tuple(keep))  # type: ignore[union-attr]
    for f in F.STATUS:
        eager = k.flag(CONCRETE, f, w, a, b, r, bool(c))
        got = s.get_flag(f)
        if f in keep:
            assert got == bool(before >> f & 1), F.NAMES[f]
        else:
            assert got == eager == want[f], (F.NAMES[f], kind, w, hex(a), hex(b), c)
    # The whole RFLAGS value evaluates the record, and writing it back is a fixed point.
    eager_rf = before & ~F.STATUS_MASK
    for f in F.STATUS:
        eager_rf |= int(s.get_flag(f)) << f
    assert s.read_rflags() == eager_rf
    s2 = MachineState.concrete()
    s2.write_rflags(s.read_rflags())
    assert s2.read_rflags() == eager_rf


@given(rec=records())
@settings(max_examples=30)
def test_lazy_flags_explicit_override_and_copy(rec: tuple[str, int, int, int, int]) -> None:
    kind, w, a, b, c = rec
    r, want = plain_flags(kind, w, a, b, c)
    fl = Flags(CONCRETE)
    fl.set_lazy(KINDS[kind], w, a, b, r, bool(c))
    dup = fl.copy()
    fl.set(F.ZF, not want[F.ZF])  # an explicit write wins over the record ...
    assert fl.get(F.ZF) == (not want[F.ZF])
    assert dup.get(F.ZF) == want[F.ZF]  # ... and does not leak into a copy
    fl.set_lazy(F.ADD, 8, 0xFF, 1, 0, False)  # a new record replaces both
    assert fl.get(F.ZF) and fl.get(F.CF)
    assert dup.get(F.CF) == want[F.CF]


def test_lazy_flags_symbolic_equal_eager() -> None:
    """On the Z3 domain the lazy record is the eager definition term, for all operands."""
    D = SymbolicDomain()
    a, b = z3.BitVecs("a b", 32)
    c = z3.Bool("c")
    r = a + b + z3.If(c, z3.BitVecVal(1, 32), z3.BitVecVal(0, 32))
    fl = Flags(D)
    fl.set_lazy(F.ADD, 32, a, b, r, c)
    for f in F.STATUS:
        assert prove(fl.get(f) == F.ADD.flag(D, f, 32, a, b, r, c)) is None


# ----------------------------------------------------------------------------------------------
# Snapshots
# ----------------------------------------------------------------------------------------------

u32 = st.integers(0, mask(32))


_FORMATS = (lambda v: v, hex, lambda v: f"0x{v:X}", str)


class Bits:
    """Values cut from one drawn byte string (one hypothesis draw instead of hundreds)."""

    def __init__(self, blob: bytes) -> None:
        self.n = int.from_bytes(blob, "little")

    def take(self, bits: int) -> int:
        v = self.n & mask(bits)
        self.n >>= bits
        return v

    def num(self, bits: int) -> Any:
        """An integer of ``bits`` bits as a JSON number, lower/upper-case hex or decimal string."""
        return _FORMATS[self.take(2)](self.take(bits))


def segment(b: Bits) -> dict[str, Any]:
    return {"selector": b.num(16), "base": b.num(64), "limit": b.num(32), "type": b.take(4), "s": b.take(1),
            "dpl": b.take(2), "p": b.take(1), "avl": b.take(1), "l": b.take(1), "db": b.take(1), "g": b.take(1),
            "unusable": bool(b.take(1))}


@st.composite
def page_data(draw: st.DrawFn) -> str:
    n = draw(st.sampled_from([0, 1, 7, 64, PAGE]) | st.integers(0, PAGE))
    data = bytearray(draw(st.binary(min_size=min(n, 64), max_size=min(n, 64))).ljust(n, b"\xA5"))
    zeros = draw(st.integers(0, min(n, 40)))  # trailing zero bytes (the canonical form omits them)
    if zeros:
        data[n - zeros:] = bytes(zeros)
    text = data.hex()
    return text.upper() if draw(st.booleans()) else text


GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@st.composite
def snapshots(draw: st.DrawFn) -> dict[str, Any]:
    """A valid snapshot as the JSON-like dict a file would hold (not in canonical form)."""
    b = Bits(draw(st.binary(min_size=1024, max_size=1024)))
    regs = {name: b.num(64) for name in (*GPRS, "rip")}
    regs["rflags"] = hex(b.take(22) & RFLAGS_WRITABLE | 2)
    segs = {name: segment(b) for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")}
    control = {name: b.num(64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8")}
    msr_idx = draw(st.lists(u32, max_size=4, unique=True))
    msrs = {(f"{i:#x}", f"0x{i:X}", f"{i:x}", f"{i:#x}")[b.take(2)]: b.num(64) for i in msr_idx}
    pnums = draw(st.lists(st.integers(0, (1 << 52) - 1), max_size=4, unique=True))  # in random order
    pages = [{"address": hex(p * PAGE), "data": draw(page_data())} for p in pnums]
    names = ["CF", "PF", "AF", "ZF", "SF", "OF"]
    undefined = [names[b.take(3) % 6] for _ in range(b.take(3))]  # any order, repeats allowed
    return {
        "regs": regs, "segments": segs, "control": control, "efer": b.num(64), "msrs": msrs,
        "dr": [b.num(64) for _ in range(8)],
        "gdtr": {"base": b.num(64), "limit": b.num(16)},
        "idtr": {"base": b.num(64), "limit": b.num(16)},
        "pdptes": [b.num(64) for _ in range(4)], "pkru": b.num(32),
        "a20": bool(b.take(1)), "interrupt_shadow": bool(b.take(1)),
        "undefined_flags": undefined, "halted": bool(b.take(1)), "pages": pages,
    }


@settings(max_examples=60)
@given(raw=snapshots())
def test_snapshot_state_round_trip(raw: dict[str, Any]) -> None:
    snap = Snapshot.model_validate(raw)
    back = Snapshot.from_state(snap.to_state())
    assert back == snap
    assert back.to_json() == snap.to_json()


@settings(max_examples=60)
@given(raw=snapshots())
def test_snapshot_json_round_trip(raw: dict[str, Any]) -> None:
    snap = Snapshot.model_validate(raw)
    text = snap.to_json()
    again = Snapshot.model_validate_json(text)
    assert again == snap
    assert again.to_json() == text
    # The file form is canonical: hex integers, sorted pages without trailing zero bytes.
    doc = json.loads(text)
    assert doc["regs"]["rax"].startswith("0x")
    addrs = [int(p["address"], 16) for p in doc["pages"]]
    assert addrs == sorted(addrs)
    assert all(not p["data"].endswith("00") and p["data"] == p["data"].lower() for p in doc["pages"])


def test_snapshot_state_contents() -> None:
    """to_state puts every part where the machine keeps it (spot checks of the mapping)."""
    snap = Snapshot.model_validate({
        "regs": {"rax": "0x1122334455667788", "r15": 7, "rip": "0x1000", "rflags": "0x893"},
        "segments": {"cs": {"selector": "0x8", "l": 1}}, "control": {"cr3": "0x5000"}, "efer": "0x500",
        "msrs": {"0xC0000081": "0x10"}, "undefined_flags": ["AF"],
        "pages": [{"address": "0x2000", "data": "AB00cd0000"}]})
    s = snap.to_state()
    assert s.gpr[0] == 0x1122334455667788 and s.gpr[15] == 7 and s.rip == 0x1000
    assert s.get_flag(F.CF) and s.get_flag(F.SF) and s.get_flag(F.OF) and not s.get_flag(F.ZF)
    assert s.undefined == 1 << F.AF and s.seg[1].selector == 8 and s.seg[1].l == 1
    assert s.cr3 == 0x5000 and s.efer == 0x500 and s.msrs == {0xC0000081: 0x10}
    assert s.mem.phys.read_bytes(0x2000, 4) == bytes.fromhex("ab00cd00")
    assert snap.pages[0].data == "ab00cd"  # canonical: lower case, trailing zeros dropped


MALFORMED = [
    # (description, document, field the error must name)
    ("bad hex in a register", {"regs": {"rax": "0xZZ"}}, "rax"),
    ("register too wide", {"regs": {"rbx": hex(1 << 64)}}, "rbx"),
    ("boolean as an integer", {"efer": True}, "efer"),
    ("RFLAGS reserved bit 3", {"regs": {"rflags": "0xa"}}, "rflags"),
    ("RFLAGS reserved bit 22", {"regs": {"rflags": hex(2 | 1 << 22)}}, "rflags"),
    ("RFLAGS bit 1 clear", {"regs": {"rflags": "0x0"}}, "rflags"),
    ("unaligned page", {"pages": [{"address": "0x1001", "data": ""}]}, "address"),
    ("page data too long", {"pages": [{"address": "0x1000", "data": "00" * (PAGE + 1)}]}, "data"),
    ("page data not hex", {"pages": [{"address": "0x1000", "data": "0g"}]}, "data"),
    ("page data odd length", {"pages": [{"address": "0x1000", "data": "abc"}]}, "data"),
    ("duplicate page", {"pages": [{"address": "0x1000"}, {"address": "0x1000", "data": "01"}]}, "pages"),
    ("unknown top-level field", {"rgs": {}}, "rgs"),
    ("unknown register", {"regs": {"rzx": 1}}, "rzx"),
    ("unknown segment field", {"segments": {"cs": {"bas": 0}}}, "bas"),
    ("bad MSR index", {"msrs": {"efer": 1}}, "msrs"),
    ("duplicate MSR index", {"msrs": {"0x10": 1, "0X10": 2}}, "msrs"),
    ("unknown flag name", {"undefined_flags": ["XF"]}, "undefined_flags"),
    ("segment DPL out of range", {"segments": {"ss": {"dpl": 4}}}, "dpl"),
    ("wrong number of debug registers", {"dr": [0, 0]}, "dr"),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_snapshot_rejected(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        Snapshot.model_validate(doc)
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert any(field in loc.split(".") for loc in locs), (locs, str(err.value))
    assert field in str(err.value)
    # The same document as JSON text is rejected the same way.
    with pytest.raises(pydantic.ValidationError):
        Snapshot.model_validate_json(json.dumps(doc))
