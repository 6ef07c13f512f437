"""Far JMP, far CALL and RETF (spec/isa/far.py).

Every case builds its own GDT in test memory (:data:`ENTRIES`, descriptor format of SDM Vol. 3A
Figure 3-8, encoded here independently of the spec) and checks the rules of SDM Vol. 2A JMP/CALL
and Vol. 2B RET ("Operation", "Protected Mode Exceptions", "64-Bit Mode Exceptions"), SDM Vol. 3A
5.8 (privilege checks on control transfers) and 20.1 (real mode).  Encodings are checked with
iced-x86 (:func:`tests.conftest.check`); a fault must leave no trace (registers, segment
registers, the stack).  The helpers here are shared with tests/test_isa_iret.py.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.isa.segments import descriptor_cache
from spec.machine import flat_machine
from spec.state import MachineState, Segment
from tests.conftest import check

ES, CS, SS, DS, FS, GS = range(6)
GP, NP, SSF = 13, 11, 12  # vectors #GP, #NP, #SS
GDT = 0x20000
M64 = (1 << 64) - 1


def desc(base: int, limit: int, typ: int, *, s: int = 1, dpl: int = 0, p: int = 1, db: int = 1, g: int = 0,
         l: int = 0) -> int:
    """A segment/gate descriptor (SDM Vol. 3A Figure 3-8), written independently of the spec."""
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = (((base >> 16) & 0xFF) | (typ << 8) | (s << 12) | (dpl << 13) | (p << 15) | (limit & 0xF0000)
          | (l << 21) | (db << 22) | (g << 23) | (base & 0xFF00_0000))
    return lo | (hi << 32)


FLAT = 0xFFFFF
# Code types are 0xA (execute/read, not accessed) and 0xE (conforming), data 0x2 (read/write), so a
# load visibly sets the accessed bit in memory (SDM Vol. 3A 3.4.5.1).
ENTRIES = {
    0x08: desc(0, FLAT, 0xA, g=1),                       # code32 DPL0
    0x10: desc(0, FLAT, 0x2, g=1),                       # data32 DPL0
    0x18: desc(0, FLAT, 0xA, g=1, dpl=3),                # code32 DPL3
    0x20: desc(0, FLAT, 0x2, g=1, dpl=3),                # data32 DPL3
    0x28: desc(0, 0xFFFF, 0xA, db=0),                    # code16 DPL0
    0x30: desc(0, FLAT, 0xE, g=1),                       # conforming code32 DPL0
    0x38: desc(0, FLAT, 0xE, g=1, dpl=3),                # conforming code32 DPL3
    0x40: desc(0, 0x1FFF, 0xA),                          # code32 DPL0, limit 1FFFH
    0x48: desc(0, FLAT, 0xA, g=1, p=0),                  # code32 DPL0 not present
    0x50: desc(0, FLAT, 0x2, g=1, p=0),                  # data DPL0 not present
    0x58: desc(0, FLAT, 0x0, g=1, dpl=3),                # data read-only DPL3
    0x60: desc(0, FLAT, 0xA, g=1, db=0, l=1),            # code64 DPL0
    0x68: desc(0, FLAT, 0xA, g=1, db=0, l=1, dpl=3),     # code64 DPL3
    0x70: desc(0, FLAT, 0xA, g=1, db=1, l=1),            # L = D = 1 (reserved in IA-32e mode)
    0x78: desc(0x2000, 0x0008, 0xC, s=0, dpl=3),         # call gate DPL3 (selector 8, offset 2000H)
    0x80: desc(0x23000, 0x67, 0x9, s=0),                 # 32-bit TSS, available, DPL0
    0x88: desc(0, 0x0080, 0x5, s=0, dpl=3),              # task gate DPL3
    0x90: desc(0x23000, 0x67, 0xB, s=0, dpl=3),          # 32-bit TSS, busy, DPL3
    0x98: desc(0x24000, 0x17, 0x2, s=0),                 # LDT descriptor
    0xA0: desc(0, 0xFFFF, 0xA, db=0, dpl=3),             # code16 DPL3
    0xA8: desc(0, FLAT, 0x2, g=1, dpl=1),                # data32 DPL1
    0xB0: desc(0, 0xFFFF, 0x2, db=0, dpl=3),             # data16 DPL3
    0xB8: desc(0, FLAT, 0xA, g=1, dpl=1),                # code32 DPL1
    0xC0: desc(0, FLAT, 0x2, g=1, dpl=3, p=0),           # data DPL3 not present
    0xC8: desc(0x2000, 0x0008, 0xC, s=0),                # call gate DPL0
    0xD0: desc(0x2000, 0x0008, 0xC, s=0, dpl=3, p=0),    # call gate DPL3 not present
    0xD8: desc(0x3000, 0xFFFF, 0xA),                     # code32 DPL0, base 3000H
    0xE0: desc(0, 0xFF, 0xA, db=0, l=1),                 # code64 DPL0, limit FFH (ignored in 64-bit mode)
    0xE8: desc(0, FLAT, 0xA, g=1, db=0, l=1, dpl=1),     # code64 DPL1
    0xF0: desc(0, 0xFFFF, 0x2, db=0),                    # data16 DPL0
    0xF8: desc(0x23000, 0x2B, 0x1, s=0),                 # 16-bit TSS, available
    0x100: desc(0x2000, 0x0008, 0x4, s=0, dpl=3),        # 16-bit call gate DPL3
    0x108: desc(0, FLAT, 0x2, g=1, dpl=2),               # data32 DPL2
    0x110: desc(0, FLAT, 0xA, g=1, dpl=2),               # code32 DPL2
}
GDT_LIMIT = 0x118 - 1

# (code, stack/data) selectors of the machines by mode and CPL.
SELECTORS = {("prot32", 0): (0x08, 0x10), ("prot32", 3): (0x1B, 0x23),
             ("prot16", 0): (0x28, 0xF0), ("prot16", 3): (0xA3, 0xB3),
             ("long64", 0): (0x60, 0x10), ("long64", 3): (0x6B, 0x23),
             ("compat", 0): (0x08, 0x10), ("compat", 3): (0x1B, 0x23)}


def cache(selector: int) -> Segment:
    """The segment-register contents a load of ``selector`` from :data:`ENTRIES` gives."""
    return descriptor_cache(selector, ENTRIES[selector & ~7] | (1 << 40))


def machine(mode: str, code: bytes | str = b"", *, cpl: int = 0) -> MachineState:
    """A machine in ``mode`` (real, prot16, prot32, long64, or compat: IA-32e mode running 32-bit code)
    with the test GDT loaded and CS/SS/DS/ES/FS/GS from it at ``cpl``; code at 1000H, stack top 8000H."""
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine("long64" if mode == "compat" else mode, code)  # type: ignore[arg-type]
    if mode == "real":
        return s
    s.mem.phys.map_page(GDT)
    for sel, d in ENTRIES.items():
        s.mem.phys.write(GDT + sel, 8, d)
    s.gdtr.base, s.gdtr.limit = GDT, GDT_LIMIT
    code_sel, data_sel = SELECTORS[(mode, cpl)]
    s.seg = [cache(code_sel) if r == CS else cache(data_sel) for r in range(6)]
    return s


def put(s: MachineState, addr: int, data: bytes | str) -> None:
    s.mem.phys.write_bytes(addr, bytes.fromhex(data.replace(" ", "")) if isinstance(data, str) else data)


def push_frame(s: MachineState, slots: list[int], n: int) -> int:
    """Write ``slots`` (first = top of stack) as ``n``-byte values below RSP (SS base 0); return the new RSP."""
    sp = (rsp(s) - n * len(slots)) & M64
    for k, v in enumerate(slots):
        s.mem.phys.write(sp + n * k, n, v & ((1 << (8 * n)) - 1))
    s.gpr[4] = sp
    return sp


def rsp(s: MachineState) -> int:
    return s.D.concrete(s.gpr[4])


def rflags(s: MachineState) -> int:
    return s.D.concrete(s.read_rflags())


def step(s: MachineState, vendor: str = "amd") -> StopEvent | None:
    return SpecCPU(s, vendor=vendor).step()


def snapshot(s: MachineState) -> tuple:
    return (s.rip, [s.D.concrete(v) for v in s.gpr], [g.copy() for g in s.seg], rflags(s),
            s.mem.phys.read(GDT, 8), s.mem.phys.read(0x7F00, 0x100))


def assert_fault(s: MachineState, vector: int, code: int | None, vendor: str = "amd") -> None:
    """One step faults with ``vector(code)`` and leaves no trace (SDM Vol. 3A 6.5: faults are precise)."""
    before = snapshot(s)
    gdt_before = bytes(s.mem.phys.read(GDT + k, 1) for k in range(GDT_LIMIT + 1))
    ev = step(s, vendor)
    assert ev is not None and ev.kind == "fault", ev
    assert (ev.vector, ev.error_code) == (vector, code), ev
    assert snapshot(s) == before
    assert bytes(s.mem.phys.read(GDT + k, 1) for k in range(GDT_LIMIT + 1)) == gdt_before


def le(v: int, n: int) -> str:
    return (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little").hex()


def ptr(opcode: str, sel: int, off: int, n: int) -> str:
    """A direct far pointer instruction: opcode, ``n``-byte offset, selector (SDM Vol. 2A 2.1.4 "ptr16:16/32")."""
    return opcode + le(off, n) + le(sel, 2)


def accessed(s: MachineState, sel: int) -> bool:
    return bool(s.mem.phys.read(GDT + (sel & ~7) + 5, 1) & 1)


# -- encodings ------------------------------------------------------------------------------

ENCODINGS = [
    ("real", "ea34120010", "jmp far 0x1234, 0x1000"),
    ("real", "66ea785634120010", "data32 jmp far 0x12345678, 0x1000"),
    ("prot32", "ea785634120800", "jmp far 0x12345678, 0x0008"),
    ("prot32", "66ea34122800", "data16 jmp far 0x1234, 0x0028"),
    ("real", "9a34120010", "call far 0x1234, 0x1000"),
    ("prot32", "9a785634120800", "call far 0x12345678, 0x0008"),
    ("real", "ff2e0020", "jmp far dword ptr [0x2000]"),
    ("real", "66ff2e0020", "jmp far fword ptr [0x2000]"),
    ("real", "ff1e0020", "call far dword ptr [0x2000]"),
    ("prot32", "ff2d00000100", "jmp far fword ptr [0x10000]"),
    ("prot32", "ff1d00000100", "call far fword ptr [0x10000]"),
    ("long64", "ff2c2500000100", "jmp far fword ptr [0x10000]"),
    ("long64", "48ff2c2500000100", "jmp far tbyte ptr [0x10000]"),
    ("long64", "66ff2c2500000100", "jmp far dword ptr [0x10000]"),
    ("long64", "ff1c2500000100", "call far fword ptr [0x10000]"),
    ("long64", "48ff1c2500000100", "call far tbyte ptr [0x10000]"),
    ("real", "cb", "ret far"), ("real", "ca0800", "ret far 0x8"), ("real", "66cb", "data32 ret far"),
    ("prot32", "cb", "ret far"), ("prot32", "ca0800", "ret far 0x8"), ("prot32", "66cb", "data16 ret far"),
    ("long64", "cb", "ret far"), ("long64", "48cb", "data64 ret far"), ("long64", "48ca1000", "data64 ret far 0x10"),
    ("long64", "66cb", "data16 ret far"),
    ("real", "b83412", "mov ax, 0x1234"), ("prot32", "b878563412", "mov eax, 0x12345678"),
]


@pytest.mark.parametrize(("mode", "code", "text"), ENCODINGS)
def test_encodings(mode: str, code: str, text: str) -> None:
    check(mode, code, text)


@pytest.mark.parametrize(("vendor", "size"), [("amd", 32), ("intel", 64)])
def test_rex_w_far_pointer_size_by_vendor(vendor: str, size: int) -> None:
    """FF /5 with REX.W: m16:64 on Intel, m16:32 on AMD (APM Vol. 3 JMP (Far): no 64-bit offset form)."""
    insn = decode(bytes.fromhex("48ff2c2500000100"), 64, vendor=vendor)
    assert (insn.mnemonic, insn.opsize, insn.operands[0].size) == ("JMPF", size, 16 + size)


# -- real-address and virtual-8086 mode -------------------------------------------------------

@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("form", ["ptr", "mem"])
def test_real_jmpf(form: str, wide: bool) -> None:
    """CS = selector, base = selector << 4, (E)IP = offset (SDM Vol. 2A JMP "Real-Address Mode"; Vol. 3A 20.1.1)."""
    n = 4 if wide else 2
    pfx = "66" if wide else ""
    code = ptr(pfx + "ea", 0x0123, 0x0404, n) if form == "ptr" else pfx + "ff2e0020"
    s = machine("real", code)
    put(s, 0x2000, le(0x0404, n) + le(0x0123, 2))
    ev = step(s)
    assert ev is None
    assert (s.seg[CS].selector, s.seg[CS].base, s.seg[CS].limit, s.rip) == (0x0123, 0x1230, 0xFFFF, 0x0404)
    assert rsp(s) == 0x8000


def test_real_jmpf_beyond_cs_limit() -> None:
    """A 32-bit offset beyond CS.limit is #GP(0) (SDM Vol. 2A JMP "Real-Address Mode Exceptions");
    with a 4-GiB CS limit ("unreal" mode) the same jump is taken."""
    s = machine("real", ptr("66ea", 0x0000, 0x10000, 4))
    assert_fault(s, GP, 0)
    s = machine("real", ptr("66ea", 0x0000, 0x10000, 4))
    big = s.seg[CS].copy()
    big.limit = 0xFFFF_FFFF
    s.seg[CS] = big
    assert step(s) is None and s.rip == 0x10000


@st.composite
def real_targets(draw: st.DrawFn) -> tuple[int, int]:
    """A selector and offset whose linear address lies in 2000H..6FF0H (free mapped memory)."""
    lin = draw(st.integers(0x2000, 0x6FF0))
    sel = draw(st.integers(0, lin >> 4))
    off = lin - (sel << 4)
    assume(off <= 0xFFFF)
    return sel, off


@given(target=real_targets(), wide=st.booleans(), imm=st.sampled_from([None, 0, 6, 0x100]))
@settings(max_examples=60)
def test_real_callf_retf_round_trip(target: tuple[int, int], wide: bool, imm: int | None) -> None:
    """CALLF pushes CS then IP at the operand size; RETF (imm16) pops them back and releases imm16 bytes
    (SDM Vol. 2A CALL, Vol. 2B RET "Real-Address Mode": SP <- SP + (SRC AND FFFFH))."""
    sel, off = target
    n = 4 if wide else 2
    pfx = "66" if wide else ""
    call = ptr(pfx + "9a", sel, off, n)
    s = machine("real", call)
    s.seg[CS] = Segment(selector=0x0100, base=0x1000, limit=0xFFFF, type=0x3)
    s.rip = 0  # linear 1000H through CS = 0100H
    put(s, (sel << 4) + off, pfx + ("cb" if imm is None else "ca" + le(imm, 2)))
    assert step(s) is None
    assert (s.seg[CS].selector, s.seg[CS].base, s.rip) == (sel, sel << 4, off)
    assert rsp(s) == 0x8000 - 2 * n
    assert s.mem.phys.read(0x8000 - n, n) == 0x0100  # old CS, zero-extended to the operand size
    assert s.mem.phys.read(0x8000 - 2 * n, n) == len(call) // 2  # return IP
    assert step(s) is None
    assert (s.seg[CS].selector, s.seg[CS].base, s.rip) == (0x0100, 0x1000, len(call) // 2)
    assert rsp(s) == 0x8000 + (imm or 0)


def test_real_callf_memory_pointer() -> None:
    """CALL m16:16 reads the pointer before pushing (SDM Vol. 2A CALL); the pointer here lies in the stack slot
    the push overwrites."""
    s = machine("real", "ff1e f87f")  # call far [0x7ff8]
    put(s, 0x7FF8, le(0x2000, 2) + le(0x0000, 2))
    s.gpr[4] = 0x7FFC
    put(s, 0x2000, "f4")
    assert step(s) is None
    assert (s.seg[CS].selector, s.rip, rsp(s)) == (0, 0x2000, 0x7FF8)
    assert s.mem.phys.read(0x7FF8, 4) == 0x0000_1004


def test_real_retf_ip_beyond_limit() -> None:
    """RETF popping an IP beyond CS.limit: #GP(0), nothing popped (SDM Vol. 2B RET)."""
    s = machine("real", "66cb")
    push_frame(s, [0x10000, 0x0000], 4)
    assert_fault(s, GP, 0)


def test_real_callf_beyond_limit_faults_without_pushing() -> None:
    s = machine("real", ptr("66 9a", 0, 0x1_0000, 4))
    assert_fault(s, GP, 0)


def v86_machine(code: bytes | str, iopl: int = 3) -> MachineState:
    """Protected mode with EFLAGS.VM = 1: 64-KiB DPL-3 read/write segments, selector 0 (SDM Vol. 3A 20.2.1)."""
    s = machine("prot32", code)
    s.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0x3, dpl=3) for _ in range(6)]
    s.rflags_sys |= (1 << F.VM) | (iopl << F.IOPL_SHIFT)
    return s


def test_v86_far_transfers_use_real_mode_bases() -> None:
    """Virtual-8086 mode: CS = selector << 4 without a descriptor (SDM Vol. 3A 20.2.1)."""
    s = v86_machine(ptr("9a", 0x0200, 0x0010, 2))
    put(s, 0x2010, "cb")
    assert step(s) is None
    assert (s.seg[CS].selector, s.seg[CS].base, s.seg[CS].dpl, s.rip, rsp(s)) == (0x0200, 0x2000, 3, 0x10, 0x7FFC)
    assert s.cpl == 3
    assert step(s) is None
    assert (s.seg[CS].selector, s.seg[CS].base, s.rip, rsp(s)) == (0, 0, 0x1005, 0x8000)


# -- protected mode: JMP/CALL far to code segments ------------------------------------------------

OK = None
UNIMPL = "unimplemented"
# (CPL, target selector, outcome): OK, UNIMPL, or (vector, error code).  SDM Vol. 2A JMP/CALL "Operation".
PROTECTED_CASES = [
    (0, 0x08, OK),             # non-conforming, DPL = CPL
    (0, 0x0B, (GP, 0x08)),     # non-conforming, RPL > CPL
    (0, 0x1B, (GP, 0x18)),     # non-conforming, DPL != CPL
    (0, 0xB8, (GP, 0xB8)),     # non-conforming DPL 1 at CPL 0
    (0, 0x30, OK),             # conforming, DPL = CPL
    (0, 0x33, OK),             # conforming: RPL is not checked, CS.RPL <- CPL
    (0, 0x38, (GP, 0x38)),     # conforming, DPL > CPL
    (0, 0x00, (GP, 0)),        # null selector
    (0, 0x03, (GP, 0)),        # null selector with RPL 3
    (0, 0x10, (GP, 0x10)),     # data segment
    (0, 0x48, (NP, 0x48)),     # not present
    (0, 0x118, (GP, 0x118)),   # beyond the GDT limit
    (0, 0x04, (GP, 0x04)),     # TI = 1 with no LDT
    (0, 0x98, (GP, 0x98)),     # LDT descriptor: not a valid target type
    (0, 0x78, UNIMPL),         # call gate
    (0, 0x100, UNIMPL),        # 16-bit call gate
    (0, 0x80, UNIMPL),         # available TSS
    (0, 0xF8, UNIMPL),         # available 16-bit TSS
    (0, 0x88, UNIMPL),         # task gate
    (0, 0x90, (GP, 0x90)),     # busy TSS
    (0, 0xCB, (GP, 0xC8)),     # call gate DPL 0 < RPL 3
    (0, 0x8B, UNIMPL),         # task gate DPL 3 >= RPL 3
    (3, 0x1B, OK),
    (3, 0x18, OK),             # RPL 0 <= CPL 3: CS.RPL <- 3
    (3, 0x08, (GP, 0x08)),     # more privileged non-conforming code
    (3, 0xB8, (GP, 0xB8)),
    (3, 0x30, OK),             # conforming DPL 0 from CPL 3: allowed, CPL stays 3
    (3, 0x3B, OK),
    (3, 0xC8, (GP, 0xC8)),     # call gate DPL 0 < CPL 3
    (3, 0x7B, UNIMPL),         # call gate DPL 3
    (3, 0xD3, (NP, 0xD0)),     # call gate not present
    (3, 0x80, (GP, 0x80)),     # TSS DPL 0 < CPL 3
    (3, 0x8B, UNIMPL),         # task gate DPL 3
]


def _far_code(kind: str, sel: int, off: int, size: int) -> str:
    n = size // 8
    pfx = "66" if size == 16 else ""
    return ptr(pfx + ("ea" if kind == "jmp" else "9a"), sel, off, n)


@pytest.mark.parametrize("kind", ["jmp", "call"])
@pytest.mark.parametrize(("cpl", "sel", "outcome"), PROTECTED_CASES)
def test_protected_far_to_code(kind: str, cpl: int, sel: int, outcome: tuple[int, int] | str | None) -> None:
    """Privilege rules for code-segment targets (SDM Vol. 3A 5.8.1.1-5.8.1.2; Vol. 2A JMP/CALL exceptions)."""
    code = _far_code(kind, sel, 0x2000, 32)
    s = machine("prot32", code, cpl=cpl)
    put(s, 0x2000, "90")
    if outcome is None:
        ev = step(s)
        assert ev is None
        cs = s.seg[CS]
        assert (cs.selector, cs.dpl, cs.type & 0xE, s.rip, s.cpl) == (
            (sel & ~3) | cpl, (ENTRIES[sel & ~7] >> 45) & 3, (ENTRIES[sel & ~7] >> 40) & 0xE, 0x2000, cpl)
        assert accessed(s, sel)
        if kind == "call":
            assert rsp(s) == 0x8000 - 8
            assert s.mem.phys.read(0x7FF8, 8) == (SELECTORS[("prot32", cpl)][0] << 32) | (0x1000 + len(code) // 2)
        else:
            assert rsp(s) == 0x8000
    elif outcome == UNIMPL:
        before = snapshot(s)
        ev = step(s)
        assert ev is not None and ev.kind == "unimplemented" and "not modelled" in ev.detail, ev
        assert snapshot(s) == before
    else:
        assert_fault(s, *outcome)


@pytest.mark.parametrize("kind", ["jmp", "call"])
@pytest.mark.parametrize(("off", "ok"), [(0x1FFF, True), (0x2000, False)])
def test_protected_target_within_new_limit(kind: str, off: int, ok: bool) -> None:
    """The offset is checked against the *new* CS limit: #GP(0) beyond it (SDM Vol. 2A JMP "tempEIP outside
    code segment limit"); a CALL that faults has pushed nothing."""
    s = machine("prot32", _far_code(kind, 0x40, off, 32))
    if ok:
        assert step(s) is None and s.rip == off and s.seg[CS].limit == 0x1FFF
    else:
        assert_fault(s, GP, 0)


def test_protected_target_with_base() -> None:
    """Execution continues at the new CS base + offset."""
    s = machine("prot32", _far_code("jmp", 0xD8, 0x10, 32))
    put(s, 0x3010, "b8 78563412 f4")
    ev = SpecCPU(s).run(5)
    assert ev.kind == "halted" and s.D.concrete(s.gpr[0]) == 0x12345678 and s.seg[CS].base == 0x3000


@pytest.mark.parametrize("kind", ["jmp", "call"])
def test_16bit_operand_truncates_and_pushes_words(kind: str) -> None:
    """66 EA/9A in 32-bit code: ptr16:16, IP zero-extended; CALL pushes CS and IP as words (SDM Vol. 2A CALL)."""
    code = _far_code(kind, 0x08, 0x2000, 16)
    s = machine("prot32", code)
    put(s, 0x2000, "90")
    assert step(s) is None and s.rip == 0x2000
    if kind == "call":
        assert rsp(s) == 0x7FFC and s.mem.phys.read(0x7FFC, 4) == (0x08 << 16) | (0x1000 + len(code) // 2)


def test_mode_switch_prot32_to_16bit_code_and_back() -> None:
    """A far JMP to a D = 0 code segment switches to 16-bit code, and one to D = 1 back (SDM Vol. 3A 3.4.5)."""
    s = machine("prot32", _far_code("jmp", 0x28, 0x2000, 32))
    # 16-bit code: mov ax, 1234h; jmp dword far 0008:00003000h (66 EA ptr16:32).
    put(s, 0x2000, "b83412" + ptr("66ea", 0x08, 0x3000, 4))
    put(s, 0x3000, "b878563412 f4")
    assert step(s) is None and s.code_bits == 16 and s.seg[CS].selector == 0x28
    assert step(s) is None and s.D.concrete(s.gpr[0]) & 0xFFFF == 0x1234 and s.rip == 0x2003
    assert step(s) is None and s.code_bits == 32 and s.rip == 0x3000
    assert SpecCPU(s).run(5).kind == "halted" and s.D.concrete(s.gpr[0]) == 0x12345678


def test_callf_memory_operand_prot16() -> None:
    """16-bit protected mode: CALL m16:16 through DS (SDM Vol. 2A CALL)."""
    s = machine("prot16", "ff1e 0020")  # call far [0x2000]
    put(s, 0x2000, le(0x3000, 2) + le(0x28, 2))
    assert step(s) is None and (s.seg[CS].selector, s.rip, rsp(s)) == (0x28, 0x3000, 0x7FFC)
    assert s.mem.phys.read(0x7FFC, 4) == (0x28 << 16) | 0x1004


def test_callf_stack_fault_precedes_offset_fault() -> None:
    """SDM Vol. 2A CALL: "stack not large enough for return address" (#SS(0)) is tested before the offset
    (#GP(0)); the spec pushes first, so with both violations #SS(0) is reported."""
    s = machine("prot32", _far_code("call", 0x40, 0x2000, 32))
    tiny = s.seg[SS].copy()
    tiny.limit, tiny.g = 0x7FF0, 0
    s.seg[SS] = tiny
    s.gpr[4] = 0x7FF4  # room for one dword only
    assert_fault(s, SSF, 0)


# -- IA-32e mode ----------------------------------------------------------------------------------

def test_long_mode_64_to_compat_and_back() -> None:
    """JMP m16:32 from 64-bit code to a compatibility-mode segment (L = 0, D = 1), then JMP ptr16:32 to a 64-bit
    segment (L = 1): the new CS selects the mode (SDM Vol. 3A 5.2.1; Vol. 2A JMP IA-32e rules)."""
    s = machine("long64", "ff2c25 00000100")  # jmp far [0x10000]
    put(s, 0x10000, le(0x2000, 4) + le(0x08, 2))
    put(s, 0x2000, "b878563412" + ptr("ea", 0x60, 0x3000, 4))  # compat: mov eax; jmp far 0060:3000
    put(s, 0x3000, "48b8 efcdab8967452301 f4")  # 64-bit: mov rax, imm64
    assert step(s) is None and s.code_bits == 32 and s.long_mode and s.seg[CS].selector == 0x08
    assert step(s) is None and s.D.concrete(s.gpr[0]) == 0x12345678
    assert step(s) is None and s.code_bits == 64 and s.rip == 0x3000
    assert SpecCPU(s).run(5).kind == "halted" and s.D.concrete(s.gpr[0]) == 0x0123456789ABCDEF


def test_long_mode_to_16bit_compat() -> None:
    s = machine("long64", "66ff2c25 00000100")  # jmp far [0x10000], m16:16
    put(s, 0x10000, le(0x2000, 2) + le(0x28, 2))
    assert step(s) is None and s.code_bits == 16 and s.rip == 0x2000


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_long_mode_rex_w_pointer(vendor: str) -> None:
    """REX.W FF /5: Intel reads m16:64, AMD m16:32 (the selector then follows the 4-byte offset)."""
    s = machine("long64", "48ff2c25 00000100")
    put(s, 0x10000, le(0x2000, 4) + le(0x60, 2) + "0000")  # AMD view: 2000H, 0060H
    if vendor == "intel":
        put(s, 0x10000, le(0x3000, 8) + le(0x60, 2))
    ev = step(s, vendor)
    assert ev is None and s.rip == (0x3000 if vendor == "intel" else 0x2000) and s.seg[CS].selector == 0x60


def test_long_mode_non_canonical_target() -> None:
    """Intel m16:64 with a non-canonical offset: #GP(0) (SDM Vol. 2A JMP "IF tempEIP is non-canonical")."""
    s = machine("long64", "48ff2c25 00000100")
    put(s, 0x10000, le(0x0000_8000_0000_0000, 8) + le(0x60, 2))
    assert_fault(s, GP, 0, vendor="intel")


def test_long_mode_limits() -> None:
    """64-bit targets ignore the limit; compatibility-mode targets are limit-checked (SDM Vol. 2A JMP)."""
    s = machine("long64", "ff2c25 00000100")
    put(s, 0x10000, le(0x2000, 4) + le(0xE0, 2))  # 64-bit code, limit FFH
    assert step(s) is None and s.rip == 0x2000
    s = machine("long64", "ff2c25 00000100")
    put(s, 0x10000, le(0x2000, 4) + le(0x40, 2))  # compatibility code, limit 1FFFH
    assert_fault(s, GP, 0)


def test_long_mode_l_and_d_set() -> None:
    """L = 1 with D = 1 is #GP(selector) in IA-32e mode (SDM Vol. 2A JMP); outside it, L is ignored."""
    s = machine("long64", "ff2c25 00000100")
    put(s, 0x10000, le(0x2000, 4) + le(0x70, 2))
    assert_fault(s, GP, 0x70)
    s = machine("prot32", _far_code("jmp", 0x70, 0x2000, 32))
    assert step(s) is None and s.code_bits == 32


@pytest.mark.parametrize(("sel", "outcome"), [(0x80, (GP, 0x80)), (0xF8, (GP, 0xF8)), (0x88, (GP, 0x88)),
                                              (0x100, (GP, 0x100)), (0x78, UNIMPL)])
def test_long_mode_system_targets(sel: int, outcome: tuple[int, int] | str) -> None:
    """IA-32e mode accepts only the 64-bit call gate among system descriptors (SDM Vol. 2A JMP "IF segment type
    is not a conforming or nonconforming code segment, call gate")."""
    s = machine("compat", _far_code("jmp", sel, 0x2000, 32))
    if outcome == UNIMPL:
        ev = step(s)
        assert ev is not None and ev.kind == "unimplemented" and "64-bit call gate" in ev.detail
    else:
        assert_fault(s, *outcome)  # type: ignore[misc]


@pytest.mark.parametrize(("prefix", "n"), [("", 4), ("66", 2), ("48", 8)])
def test_long_mode_callf_slot_sizes(prefix: str, n: int) -> None:
    """CALL m16:16/32/64 in 64-bit mode pushes CS and RIP in operand-size slots (Intel for REX.W)."""
    code = prefix + "ff1c25 00000100"
    s = machine("long64", code)
    put(s, 0x10000, le(0x2000, n) + le(0x60, 2))
    assert step(s, "intel") is None and s.rip == 0x2000
    assert rsp(s) == 0x8000 - 2 * n
    assert s.mem.phys.read(0x8000 - n, n) == 0x60
    assert s.mem.phys.read(0x8000 - 2 * n, n) == 0x1000 + len(code) // 2


# -- RETF: same privilege -----------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "code", "n"), [("prot32", "cb", 4), ("prot32", "66cb", 2), ("prot16", "cb", 2),
                                                 ("prot16", "66cb", 4), ("long64", "48cb", 8),
                                                 ("long64", "cb", 4), ("long64", "66cb", 2)])
@pytest.mark.parametrize("imm", [None, 0x10])
def test_retf_same_privilege(mode: str, code: str, n: int, imm: int | None) -> None:
    """RETF pops (E/R)IP then CS in operand-size slots and releases imm16 bytes (SDM Vol. 2B RET
    "RETURN-TO-SAME-PRIVILEGE-LEVEL")."""
    if imm is not None:
        code = code[:-2] + "ca" + le(imm, 2)
    s = machine(mode, code)
    target_sel = SELECTORS[(mode, 0)][0]
    push_frame(s, [0x2000, 0xFFFF_0000 | target_sel], n)
    put(s, 0x2000, "90")
    sp0 = rsp(s)
    assert step(s) is None
    assert (s.rip, s.seg[CS].selector, rsp(s)) == (0x2000, target_sel, sp0 + 2 * n + (imm or 0))


def test_retf_prot32_to_16bit_code() -> None:
    s = machine("prot32", "cb")
    push_frame(s, [0x2000, 0x28], 4)
    assert step(s) is None and s.code_bits == 16 and accessed(s, 0x28)


def test_retf_long64_to_compat_same_privilege() -> None:
    s = machine("long64", "48cb")
    push_frame(s, [0x2000, 0x08], 8)
    assert step(s) is None and s.code_bits == 32 and s.rip == 0x2000 and rsp(s) == 0x8000


@pytest.mark.parametrize(("mode", "code", "slots", "outcome"), [
    ("prot32", "cb", [0x2000, 0x00], (GP, 0)),              # null CS
    ("prot32", "cb", [0x2000, 0x10], (GP, 0x10)),           # data segment
    ("prot32", "cb", [0x2000, 0x118], (GP, 0x118)),         # beyond the GDT
    ("prot32", "cb", [0x2000, 0x48], (NP, 0x48)),           # not present
    ("prot32", "cb", [0x2000, 0x18], (GP, 0x18)),           # non-conforming DPL 3 != RPL 0
    ("prot32", "cb", [0x2000, 0x38], (GP, 0x38)),           # conforming DPL 3 > RPL 0
    ("prot32", "cb", [0x2000, 0x78], (GP, 0x78)),           # a call gate is not a code segment
    ("prot32", "cb", [0x2000, 0x40], (GP, 0)),              # EIP beyond the 1FFFH limit
    ("long64", "48cb", [0x2000, 0x70], (GP, 0x70)),         # L = D = 1
    ("long64", "48cb", [0x0000_8000_0000_0000, 0x60], (GP, 0)),  # non-canonical RIP
    ("long64", "48cb", [0x1_0000_0000, 0x08], (GP, 0)),     # RIP beyond a compatibility segment's limit
])
def test_retf_faults(mode: str, code: str, slots: list[int], outcome: tuple[int, int]) -> None:
    """RETF return-CS checks and their error codes (SDM Vol. 2B RET "Protected Mode Exceptions")."""
    s = machine(mode, code)
    push_frame(s, slots, 8 if code == "48cb" else 4)
    assert_fault(s, *outcome)


def test_retf_rpl_below_cpl() -> None:
    """Returning to a more privileged level: #GP(selector) (SDM Vol. 2B RET "return code segment selector RPL
    < CPL"); the conforming DPL 0 segment at RPL 3 is a valid same-level return."""
    s = machine("prot32", "cb", cpl=3)
    push_frame(s, [0x2000, 0x08], 4)
    assert_fault(s, GP, 0x08)
    s = machine("prot32", "cb", cpl=3)
    push_frame(s, [0x2000, 0x33], 4)
    assert step(s) is None and s.cpl == 3 and s.seg[CS].selector == 0x33 and s.seg[CS].dpl == 0


# -- RETF: return to an outer privilege level ------------------------------------------------------------

def _outer_machine(code: str = "cb", mode: str = "prot32") -> MachineState:
    """CPL 0 with DS = DPL-0 data, ES = DPL-3 data, FS = conforming DPL-0 code, GS = non-conforming DPL-0 code."""
    s = machine(mode, code)
    s.seg[DS] = cache(0x10)
    s.seg[ES] = cache(0x23)
    s.seg[FS] = cache(0x30)
    s.seg[GS] = cache(0x08)
    return s


@pytest.mark.parametrize("imm", [0, 0x0C])
def test_retf_to_outer_privilege(imm: int) -> None:
    """CPL 0 -> 3: pop EIP, CS, release imm16, pop ESP, SS; switch stacks, release imm16 on the new stack; DS and
    GS (DPL 0 < CPL 3, data / non-conforming code) become null, ES (DPL 3) and FS (conforming) stay
    (SDM Vol. 2B RET "RETURN-TO-OUTER-PRIVILEGE-LEVEL")."""
    code = "cb" if not imm else "ca" + le(imm, 2)
    s = _outer_machine(code)
    push_frame(s, [0x2000, 0x1B] + [0xEEEE_EEEE] * (imm // 4) + [0x6000, 0x23], 4)
    assert step(s) is None
    assert (s.rip, s.cpl, s.seg[CS].selector, s.seg[SS].selector, s.seg[SS].dpl) == (0x2000, 3, 0x1B, 0x23, 3)
    assert rsp(s) == 0x6000 + imm
    assert (s.seg[DS].selector, s.seg[DS].unusable, s.seg[GS].selector, s.seg[GS].unusable) == (0, True, 0, True)
    assert (s.seg[ES].selector, s.seg[FS].selector) == (0x23, 0x30)
    assert accessed(s, 0x18) and accessed(s, 0x20)


def test_retf_outer_16bit_stack_keeps_upper_esp() -> None:
    """A 16-bit SS gets SP only; ESP[31:16] keeps the old value (SS.B selects SP or ESP)."""
    s = _outer_machine("cb")
    s.mem.phys.map_page(0x1_7000)
    s.gpr[4] = 0x1_7F00
    push_frame(s, [0x2000, 0x1B, 0x6000, 0xB3], 4)
    assert step(s) is None
    assert rsp(s) == 0x1_6000 and s.seg[SS].selector == 0xB3 and s.seg[SS].db == 0


def test_retf_outer_16bit_operand() -> None:
    """66 CB in 32-bit code: word slots; ESP <- zero-extended SP on a 32-bit stack."""
    s = _outer_machine("66cb")
    push_frame(s, [0x2000, 0x1B, 0x6000, 0x23], 2)
    assert step(s) is None and rsp(s) == 0x6000 and s.cpl == 3


@pytest.mark.parametrize(("slots", "outcome"), [
    ([0x2000, 0x1B, 0x6000, 0x00], (GP, 0)),        # null SS
    ([0x2000, 0x1B, 0x6000, 0x20], (GP, 0x20)),     # SS RPL 0 != new CPL 3
    ([0x2000, 0x1B, 0x6000, 0x5B], (GP, 0x58)),     # read-only data
    ([0x2000, 0x1B, 0x6000, 0x1B], (GP, 0x18)),     # code segment as SS
    ([0x2000, 0x1B, 0x6000, 0xAB], (GP, 0xA8)),     # DPL 1 != 3
    ([0x2000, 0x1B, 0x6000, 0x11B], (GP, 0x118)),   # beyond the GDT
    ([0x2000, 0x1B, 0x6000, 0xC3], (SSF, 0xC0)),    # not present: #SS(selector)
    ([0x2000, 0xBA, 0x6000, 0xAA], (GP, 0xB8)),     # non-conforming DPL 1 with RPL 2
    ([0x2000, 0xA3, 0x6000, 0x23], OK),             # valid: to 16-bit code
])
def test_retf_outer_faults(slots: list[int], outcome: tuple[int, int] | None) -> None:
    """Checks on the popped SS (SDM Vol. 2B RET "RETURN-TO-OUTER-PRIVILEGE-LEVEL"); nothing changes on a fault."""
    s = _outer_machine("cb")
    push_frame(s, slots, 4)
    if outcome is None:
        assert step(s) is None and s.code_bits == 16 and s.cpl == 3
    else:
        assert_fault(s, *outcome)


def test_retf_outer_ip_checked_after_ss() -> None:
    """An EIP beyond the return CS limit is #GP(0), after the SS checks (SDM Vol. 2B RET order)."""
    s = _outer_machine("cb")
    push_frame(s, [0x1_0000, 0xA3, 0x6000, 0x00], 4)
    assert_fault(s, GP, 0)  # null SS first: also #GP(0)
    s = _outer_machine("cb")
    push_frame(s, [0x1_0000, 0xA3, 0x6000, 0xC3], 4)
    assert_fault(s, SSF, 0xC0)
    s = _outer_machine("cb")
    push_frame(s, [0x1_0000, 0xA3, 0x6000, 0x23], 4)
    assert_fault(s, GP, 0)


@pytest.mark.parametrize(("code", "n", "cs", "ss", "outcome"), [
    ("48cb", 8, 0x6B, 0x23, OK),            # 64-bit CPL 3
    ("cb", 4, 0x1B, 0x23, OK),              # compatibility-mode CPL 3
    ("48cb", 8, 0x6B, 0x03, (GP, 0)),       # null SS to CPL 3
    ("48cb", 8, 0xE9, 0x01, OK),            # null SS to 64-bit CPL 1 with RPL 1 (SDM Vol. 3A 3.4.4)
    ("48cb", 8, 0xE9, 0x00, (GP, 0)),       # null SS RPL 0 != new CPL 1
    ("48ca1000", 8, 0x6B, 0x23, OK),        # imm16 released on both stacks
])
def test_retf_long_mode_outer(code: str, n: int, cs: int, ss: int, outcome: tuple[int, int] | None) -> None:
    """IA-32e mode RETF to an outer level (SDM Vol. 2B RET "IA-32E-MODE-RETURN-TO-OUTER-PRIVILEGE-LEVEL")."""
    s = _outer_machine(code, "long64")
    imm = int.from_bytes(bytes.fromhex(code[4:]), "little") if len(code) > 4 else 0
    push_frame(s, [0x2000, cs] + [0] * (imm // n) + [0x6000, ss], n)
    if outcome is not None:
        assert_fault(s, *outcome)
        return
    assert step(s) is None
    assert (s.rip, s.cpl, s.seg[CS].selector, s.seg[SS].selector) == (0x2000, cs & 3, cs, ss)
    assert rsp(s) == 0x6000 + imm
    assert s.code_bits == (64 if cs in (0x6B, 0xE9) else 32)
    if ss & 0xFFFC == 0:
        assert s.seg[SS].unusable
    assert s.seg[DS].unusable and s.seg[GS].unusable and not s.seg[ES].unusable
