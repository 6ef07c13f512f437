"""Segment-level protection on memory accesses and instruction fetch (spec/segmentation.py).

References: SDM Vol. 3A 3.4.5.1 (Table 3-1, segment types), 5.3 (limit
checking, expand-down segments and the B flag), 5.3.1 (no limit checks in
64-bit mode), 5.4 (type checking), 5.4.1 (null selectors), 6.15 (#SS causes), 22.33.1 (segment
wraparound in real mode; instructions crossing a 4-GiB limit); SDM Vol. 1
3.3.7.1 (canonical addresses; #SS for stack references).

Most tests build segment caches directly in the state (``Segment`` objects)
and either ask :meth:`Exec.linear` for a checked address (no memory touched)
or run a short instruction sequence; a few load a selector from the flat
GDT of :func:`spec.machine.flat_machine` and then access through it.  The
hypothesis property compares the checks with a byte-by-byte reference
written here from the manual's rules.
"""

from __future__ import annotations

import capstone
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Fault, Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE, KERNEL_CS, KERNEL_DS, flat_machine
from spec.memory import PAGE, AccessKind
from spec.segmentation import fetch_window
from spec.state import EFER_LMA, MachineState, Segment
from spec.symexec import symbolic_state

ES, CS, SS, DS, FS, GS = range(6)
READ, WRITE = AccessKind.READ, AccessKind.WRITE
GP0 = (Vector.GP, 0)
SS0 = (Vector.SS, 0)
M32 = 0xFFFF_FFFF
M64 = (1 << 64) - 1
CR4_LA57 = 1 << 12
GPR = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
SIZES = (1, 2, 4, 8)


def data_seg(limit: int, typ: int = 0x3, *, db: int = 1, base: int = 0, unusable: bool = False) -> Segment:
    """A data-segment cache (byte-granular limit already applied, as the state keeps it)."""
    return Segment(selector=0x10, base=base, limit=limit, type=typ, s=1, dpl=0, p=1, db=db, unusable=unusable)


def code_seg(limit: int, typ: int = 0xB, *, db: int = 1, l: int = 0) -> Segment:
    return Segment(selector=0x08, base=0, limit=limit, type=typ, s=1, dpl=0, p=1, db=db, l=l)


def check(st: MachineState, seg: int, off: int, n: int, kind: int = READ, w: int = 32) -> tuple[int, int] | None:
    """The fault (vector, error code) a checked ``n``-byte access at seg:off raises, or None."""
    try:
        Exec(st).linear(seg, off, w, n, kind)
    except Fault as f:
        return f.vector, f.error_code
    return None


def machine(mode: str, code: bytes | str = b"", **regs: int) -> MachineState:
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine(mode, code)  # type: ignore[arg-type]
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & M64
    return s


def run(s: MachineState, budget: int = 20) -> StopEvent:
    return SpecCPU(s).run(budget)


def fault(ev: StopEvent) -> tuple[int | None, int | None]:
    assert ev.kind == "fault", ev
    return ev.vector, ev.error_code


def reg(s: MachineState, name: str) -> int:
    return s.D.concrete(s.gpr[GPR[name]])


def limit_vector(seg: int) -> tuple[int, int]:
    return SS0 if seg == SS else GP0


# -- encodings used below, checked against capstone ----------------------------------------------

ENCODINGS = [
    (32, "8a03", "mov al, byte ptr [ebx]"), (32, "668b03", "mov ax, word ptr [ebx]"),
    (32, "8b03", "mov eax, dword ptr [ebx]"), (32, "8903", "mov dword ptr [ebx], eax"),
    (32, "0103", "add dword ptr [ebx], eax"), (32, "8b4500", "mov eax, dword ptr [ebp]"),
    (32, "368b03", "mov eax, dword ptr ss:[ebx]"), (32, "3e8b4500", "mov eax, dword ptr ds:[ebp]"),
    (32, "2e8b03", "mov eax, dword ptr cs:[ebx]"), (32, "2e8903", "mov dword ptr cs:[ebx], eax"),
    (32, "268b03", "mov eax, dword ptr es:[ebx]"), (32, "648b03", "mov eax, dword ptr fs:[ebx]"),
    (32, "0fc70b", "cmpxchg8b qword ptr [ebx]"), (32, "50", "push eax"), (32, "5b", "pop ebx"),
    (32, "aa", "stosb byte ptr es:[edi], al"), (32, "c9", "leave"), (32, "c8040000", "enter 4, 0"),
    (32, "8ed8", "mov ds, eax"), (32, "8ee0", "mov fs, eax"), (32, "8ec0", "mov es, eax"),
    (32, "b878563412", "mov eax, 0x12345678"), (32, "90", "nop"),
    (16, "8b07", "mov ax, word ptr [bx]"), (16, "8a07", "mov al, byte ptr [bx]"),
    (16, "8b4600", "mov ax, word ptr [bp]"), (16, "668b07", "mov eax, dword ptr [bx]"),
    (16, "678b03", "mov ax, word ptr [ebx]"), (16, "50", "push ax"), (16, "5b", "pop bx"),
    (16, "31c0", "xor ax, ax"), (16, "83c001", "add ax, 1"),
    (64, "8a03", "mov al, byte ptr [rbx]"), (64, "668b03", "mov ax, word ptr [rbx]"),
    (64, "488b03", "mov rax, qword ptr [rbx]"), (64, "66678b4500", "mov ax, word ptr [ebp]"),
    (64, "668b4500", "mov ax, word ptr [rbp]"), (64, "50", "push rax"), (64, "5b", "pop rbx"),
    (64, "648b03", "mov eax, dword ptr fs:[rbx]"), (64, "31c0", "xor eax, eax"),
    (64, "4831c0", "xor rax, rax"), (64, "8903", "mov dword ptr [rbx], eax"),
]


@pytest.mark.parametrize(("bits", "hexcode", "text"), ENCODINGS)
def test_encodings_disassemble(bits: int, hexcode: str, text: str) -> None:
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    code = bytes.fromhex(hexcode)
    (ins,) = capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, 0)
    assert f"{ins.mnemonic} {ins.op_str}".strip() == text and ins.size == len(code)


# -- expand-up limits (SDM Vol. 3A 5.3) -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prot16", "prot32"])
@pytest.mark.parametrize("seg", [ES, SS, DS, FS, GS])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("limit", [0x0, 0xFFF, 0xFFFF, 0x12345, 0xFFFF_FFFE])
def test_expand_up_boundary(mode: str, seg: int, n: int, limit: int) -> None:
    """The last byte may sit at the limit; one byte further faults (#SS(0) through SS, else #GP(0))."""
    s = machine(mode)
    s.seg[seg] = data_seg(limit)
    last_ok = limit - n + 1
    if last_ok >= 0:
        assert check(s, seg, last_ok, n) is None
        assert check(s, seg, last_ok, n, WRITE) is None
    assert check(s, seg, last_ok + 1, n) == limit_vector(seg)
    assert check(s, seg, limit + 1, 1) == limit_vector(seg)
    assert check(s, seg, M32, n) == limit_vector(seg)


@pytest.mark.parametrize("n", SIZES)
def test_four_gib_limit_wraps(n: int) -> None:
    """Limit FFFFFFFFH: an access running past FFFFFFFFH wraps to offset 0 without a fault
    (SDM Vol. 3A 22.33.1, Pentium 4 and later; the spec's documented choice for data)."""
    s = machine("prot32")
    s.seg[DS] = data_seg(M32)
    assert check(s, DS, M32, n) is None
    assert check(s, DS, M32 - n + 1, n) is None
    assert Exec(s).linear(DS, M32, 32, n) == M32


def test_code_segment_limit_for_data_reads() -> None:
    """A readable code segment in DS is expand-up even with type bit 2 set (conforming, not expand-down)."""
    s = machine("prot32")
    s.seg[DS] = code_seg(0xFFF, typ=0xF)  # execute/read, conforming
    assert check(s, DS, 0xFFC, 4) is None
    assert check(s, DS, 0xFFD, 4) == GP0
    assert check(s, DS, 0, 1) is None


# -- expand-down limits and the B flag (SDM Vol. 3A 5.3) ----------------------------------------------

@pytest.mark.parametrize("seg", [SS, DS, ES, GS])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("b", [0, 1])
@pytest.mark.parametrize("typ", [0x6, 0x7, 0x4])  # RW expand-down (and accessed), read-only expand-down
@pytest.mark.parametrize("limit", [0x0, 0x0FFF, 0x7FFF])
def test_expand_down_boundary(seg: int, n: int, b: int, typ: int, limit: int) -> None:
    """Valid offsets: limit+1 .. FFFFH (B = 0) or .. FFFFFFFFH (B = 1); the limit itself faults."""
    s = machine("prot32")
    s.seg[seg] = data_seg(limit, typ, db=b)
    vec = limit_vector(seg)
    assert check(s, seg, limit + 1, n) is None
    assert check(s, seg, limit, n) == vec
    if limit >= n - 1:
        assert check(s, seg, limit - n + 1, n) == vec
    assert check(s, seg, 0, n) == vec
    top = M32 if b else 0xFFFF
    assert check(s, seg, top - n + 1, n) is None
    if b:  # the 4-GiB wrap (module docstring of spec.segmentation)
        if n > 1:
            assert check(s, seg, top - n + 2, n) is None
        assert check(s, seg, 0x1_0000, n) is None
    else:
        assert check(s, seg, top - n + 2, n) == vec
        assert check(s, seg, 0x1_0000, n) == vec  # 32-bit offset above the 64-KiB bound
        assert check(s, seg, M32, n) == vec


def test_expand_down_maximum_size() -> None:
    """Limit FFFFH with B = 0 leaves no valid offset; limit 0 is the maximum size (SDM Vol. 3A 5.3)."""
    s = machine("prot32")
    s.seg[DS] = data_seg(0xFFFF, 0x7, db=0)
    assert all(check(s, DS, off, 1) == GP0 for off in (0, 0x8000, 0xFFFF, 0x10000))
    s.seg[DS] = data_seg(0, 0x7, db=0)
    assert check(s, DS, 0, 1) == GP0 and check(s, DS, 1, 1) is None and check(s, DS, 0xFFFF, 1) is None


# -- type checks (SDM Vol. 3A 3.4.5.1 Table 3-1, 5.4.1) ---------------------------------------------

@pytest.mark.parametrize("typ", range(16))
@pytest.mark.parametrize("seg", [ES, CS, SS, DS, FS, GS])
def test_rights_by_type(typ: int, seg: int) -> None:
    """Reads need a data or readable code type, writes a writable data type; both faults are #GP(0),
    through SS too (SDM Vol. 3A 6.15 lists only limit, not-present and canonical causes for #SS)."""
    code = typ & 8
    readable = not code or typ & 2
    writable = not code and typ & 2
    expand_down = not code and typ & 4
    s = machine("prot32")  # offset 2000H is inside the range: limit FFFFFFFFH, or FFFH when expand-down
    s.seg[seg] = Segment(selector=0x10, base=0, limit=0xFFF if expand_down else M32, type=typ, s=1, db=1)
    assert check(s, seg, 0x2000, 4, READ) == (None if readable else GP0)
    assert check(s, seg, 0x2000, 4, WRITE) == (None if writable else GP0)


def test_type_checked_before_limit() -> None:
    """A write to a read-only segment beyond its limit: the type fault (#GP(0)), even through SS."""
    s = machine("prot32")
    s.seg[SS] = data_seg(0xFFF, 0x1)
    assert check(s, SS, 0x2000, 4, WRITE) == GP0
    assert check(s, SS, 0x2000, 4, READ) == SS0


def test_read_only_data_write_instruction() -> None:
    """MOV to a read-only DS is #GP(0); a read-modify-write reads, then faults with memory untouched."""
    s = machine("prot32", "8903", rbx=0x2000, rax=0x11223344)
    s.seg[DS] = data_seg(M32, 0x1)
    ev = run(s)
    assert fault(ev) == GP0 and ev.rip == CODE
    s = machine("prot32", "0103", rbx=0x2000, rax=1)
    s.mem.phys.write(0x2000, 4, 0x55)
    s.seg[DS] = data_seg(M32, 0x0)
    assert fault(run(s)) == GP0 and s.mem.phys.read(0x2000, 4) == 0x55
    s = machine("prot32", "8b03 f4", rbx=0x2000)  # reading is fine
    s.mem.phys.write(0x2000, 4, 0x55)
    s.seg[DS] = data_seg(M32, 0x0)
    assert run(s).kind == "halted" and reg(s, "rax") == 0x55


@pytest.mark.parametrize("typ", [0x8, 0x9, 0xC, 0xD])
def test_execute_only_code_read_through_cs_override(typ: int) -> None:
    """MOV EAX, CS:[EBX] with an execute-only CS is #GP(0); the fetch itself needs no read right."""
    s = machine("prot32", "2e8b03", rbx=0x2000)
    s.seg[CS] = code_seg(M32, typ)
    ev = run(s)
    assert fault(ev) == GP0 and ev.rip == CODE


@pytest.mark.parametrize("typ", [0xA, 0xB, 0xE, 0xF])
def test_readable_code_read_and_write_through_cs_override(typ: int) -> None:
    """Readable code: CS: reads work, CS: writes are #GP(0) (code segments are never writable)."""
    s = machine("prot32", "2e8b03 f4", rbx=0x2000)
    s.mem.phys.write(0x2000, 4, 0xCAFE)
    s.seg[CS] = code_seg(M32, typ)
    assert run(s).kind == "halted" and reg(s, "rax") == 0xCAFE
    s = machine("prot32", "2e8903", rbx=0x2000, rax=1)
    s.seg[CS] = code_seg(M32, typ)
    assert fault(run(s)) == GP0 and s.mem.phys.read(0x2000, 4) == 0


# -- null (unusable) segments --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prot16", "prot32"])
@pytest.mark.parametrize("seg", [ES, DS, FS, GS, SS])
@pytest.mark.parametrize("kind", [READ, WRITE])
def test_null_segment_access(mode: str, seg: int, kind: int) -> None:
    """Access through a register loaded with a null selector: #GP(0) (SDM Vol. 3A 5.4.1; SS included,
    a null SS being impossible to load outside 64-bit mode -- see spec.segmentation)."""
    s = machine(mode)
    s.seg[seg] = data_seg(M32, unusable=True)
    assert check(s, seg, 0x2000, 1, kind) == GP0


def test_null_segment_load_then_access() -> None:
    """Flat GDT: MOV FS, 0 loads a null selector; MOV EAX, FS:[EBX] then faults #GP(0) at that instruction."""
    s = machine("prot32", "8ee0 648b03", rax=0, rbx=0x2000)
    ev = run(s)
    assert fault(ev) == GP0 and ev.rip == CODE + 2 and s.seg[FS].unusable


def test_stos_with_null_es() -> None:
    s = machine("prot32", "aa", rdi=0x2000, rax=0x41)
    s.seg[ES] = data_seg(M32, unusable=True)
    ev = run(s)
    assert fault(ev) == GP0 and reg(s, "rdi") == 0x2000


def test_gdt_loads_then_access() -> None:
    """Load-then-access through the flat GDT: a kernel data selector works; the readable kernel code
    selector in ES reads but STOSB through it is #GP(0) (code is never writable)."""
    s = machine("prot32", "8ed8 8b03 f4", rax=KERNEL_DS, rbx=0x2000)
    s.mem.phys.write(0x2000, 4, 0x1234)
    assert run(s).kind == "halted" and reg(s, "rax") == 0x1234
    s = machine("prot32", "8ec0 268b03 aa", rax=KERNEL_CS, rbx=0x2000, rdi=0x3000)
    s.mem.phys.write(0x2000, 4, 0x77)
    ev = run(s)
    assert s.seg[ES].type & 8 and reg(s, "rax") == 0x77
    assert fault(ev) == GP0 and ev.rip == CODE + 5


# -- SS vs DS vectors, implicit and explicit stack references (SDM Vol. 3A 6.15) --------------------

def test_stack_references_raise_ss() -> None:
    """[EBP] defaults to SS, an SS: override selects it, a DS: override on [EBP] does not."""
    for code, vec in (("8b4500", SS0), ("368b03", SS0), ("3e8b4500", GP0), ("8b03", GP0)):
        s = machine("prot32", code, rbx=0x2000, rbp=0x2000)
        s.seg[SS] = data_seg(0xFFF)
        s.seg[DS] = data_seg(0xFFF)
        assert fault(run(s)) == vec, code


@pytest.mark.parametrize(("esp", "ok"), [(0x3003, False), (0x3004, True), (0x3005, True)])
def test_push_into_expand_down_stack(esp: int, ok: bool) -> None:
    """Expand-down SS with limit 2FFFH: a push must land at 3000H or above, else #SS(0), ESP unchanged."""
    s = machine("prot32", "50 f4", rsp=esp, rax=0xAB)
    s.seg[SS] = data_seg(0x2FFF, 0x7, db=1)
    ev = run(s)
    if ok:
        assert ev.kind == "halted" and reg(s, "rsp") == esp - 4
    else:
        assert fault(ev) == SS0 and ev.rip == CODE and reg(s, "rsp") == esp


@pytest.mark.parametrize(("esp", "ok"), [(0x1FFC, True), (0x1FFD, False), (0x2000, False)])
def test_pop_beyond_stack_limit(esp: int, ok: bool) -> None:
    s = machine("prot32", "5b f4", rsp=esp)
    s.seg[SS] = data_seg(0x1FFF)
    ev = run(s)
    if ok:
        assert ev.kind == "halted" and reg(s, "rsp") == esp + 4
    else:
        assert fault(ev) == SS0 and reg(s, "rsp") == esp


def test_leave_and_enter_check_the_stack() -> None:
    """LEAVE pops from SS:[EBP]; ENTER pushes EBP: both are stack references (#SS(0))."""
    s = machine("prot32", "c9", rbp=0x2000, rsp=0x100)
    s.seg[SS] = data_seg(0x1FFF)
    assert fault(run(s)) == SS0 and reg(s, "rsp") == 0x100
    s = machine("prot32", "c8040000", rsp=0x1002, rbp=0x5000)
    s.seg[SS] = data_seg(0xFFF, 0x7)
    assert fault(run(s)) == SS0 and (reg(s, "rsp"), reg(s, "rbp")) == (0x1002, 0x5000)


def test_cmpxchg8b_qword_at_limit() -> None:
    """An 8-byte operand: its last byte decides."""
    s = machine("prot32", "0fc70b f4", rbx=0xFF8)
    s.seg[DS] = data_seg(0xFFF)
    assert run(s).kind == "halted"
    s = machine("prot32", "0fc70b", rbx=0xFF9)
    s.seg[DS] = data_seg(0xFFF)
    assert fault(run(s)) == GP0


# -- real-address mode (SDM Vol. 3A 22.33.1) ------------------------------------------------------

@pytest.mark.parametrize(("code", "regs", "outcome"), [
    ("8b07", {"rbx": 0xFFFF}, GP0),  # word at offset FFFFH
    ("8b07", {"rbx": 0xFFFE}, None),
    ("8a07", {"rbx": 0xFFFF}, None),  # a byte fits
    ("668b07", {"rbx": 0xFFFC}, None),
    ("668b07", {"rbx": 0xFFFD}, GP0),
    ("8b4600", {"rbp": 0xFFFF}, SS0),  # [BP] is a stack reference
    ("50", {"rsp": 1}, SS0),  # PUSH with SP = 1 writes offsets FFFFH..0
    ("50", {"rsp": 0}, None),  # SP = 0: the push lands at FFFEH
    ("5b", {"rsp": 0xFFFF}, SS0),
    ("5b", {"rsp": 0xFFFE}, None),
    ("678b03", {"rbx": 0x10000}, GP0),  # a 32-bit offset beyond the 64-KiB limit
])
def test_real_mode_wraparound_faults(code: str, regs: dict[str, int], outcome: tuple[int, int] | None) -> None:
    s = machine("real", code + "f4", **regs)
    ev = run(s)
    if outcome is None:
        assert ev.kind == "halted"
    else:
        assert fault(ev) == outcome and ev.rip == CODE


def test_unreal_mode_limit() -> None:
    """Real mode keeps the cached limit: a 4-GiB DS (loaded earlier in protected mode) allows 32-bit offsets."""
    s = machine("real", "678b03 f4", rbx=0x10000)
    s.mem.phys.write(0x10000, 2, 0xBEEF)
    s.seg[DS] = data_seg(M32, db=0)
    assert run(s).kind == "halted" and reg(s, "rax") == 0xBEEF


def test_real_mode_ignores_type_and_unusable() -> None:
    """Real mode checks the limit only (module docstring of spec.segmentation): a code-type CS cache
    takes CS: writes, a stale unusable mark is ignored."""
    s = machine("real")
    assert check(s, CS, 0x2000, 2, WRITE, 16) is None
    s.seg[DS] = data_seg(0xFFFF, 0x1, db=0, unusable=True)
    assert check(s, DS, 0x2000, 2, WRITE, 16) is None
    assert check(s, DS, 0xFFFF, 2, READ, 16) == GP0


def test_virtual_8086_limits() -> None:
    """Virtual-8086 mode: protected-mode checks on its 64-KiB data segments."""
    s = machine("prot16")
    s.rflags_sys |= 1 << 17  # VM
    for k in range(6):
        s.seg[k] = Segment(selector=0, base=0, limit=0xFFFF, type=0x3, s=1, dpl=3)
    assert check(s, DS, 0xFFFE, 2, READ, 16) is None
    assert check(s, DS, 0xFFFF, 2, READ, 16) == GP0
    assert check(s, SS, 0xFFFF, 2, WRITE, 16) == SS0


# -- 64-bit mode: canonical addresses, no limit or type checks (SDM Vol. 1 3.3.7.1, Vol. 3A 5.3.1) ----

LOW_TOP, HIGH_BOTTOM = 0x0000_7FFF_FFFF_FFFF, 0xFFFF_8000_0000_0000


@pytest.mark.parametrize("seg", [ES, CS, SS, DS, FS, GS])
@pytest.mark.parametrize("n", SIZES)
def test_canonical_boundaries(seg: int, n: int) -> None:
    s = machine("long64")
    vec = limit_vector(seg)
    assert check(s, seg, LOW_TOP - n + 1, n, w=64) is None
    assert check(s, seg, LOW_TOP - n + 2, n, w=64) == vec  # the last byte crosses into the hole
    assert check(s, seg, LOW_TOP + 1, n, w=64) == vec
    assert check(s, seg, HIGH_BOTTOM, n, WRITE, w=64) is None
    assert check(s, seg, HIGH_BOTTOM - 1, n, w=64) == vec
    assert check(s, seg, M64 - n + 1, n, w=64) is None
    if n > 1:
        assert check(s, seg, M64, n, w=64) is None  # wraps from the top canonical half into the bottom


@pytest.mark.parametrize("n", SIZES)
def test_canonical_la57(n: int) -> None:
    """CR4.LA57: 57-bit linear addresses (SDM Vol. 3A 4.5)."""
    s = machine("long64")
    s.cr4 |= CR4_LA57
    assert check(s, DS, LOW_TOP + 1, n, w=64) is None
    assert check(s, DS, HIGH_BOTTOM - 1, n, w=64) is None
    top57 = (1 << 56) - 1
    assert check(s, DS, top57 - n + 1, n, w=64) is None
    assert check(s, DS, top57 - n + 2, n, w=64) == GP0
    assert check(s, SS, top57 + 1, n, w=64) == SS0
    assert check(s, DS, M64 - top57, n, w=64) is None  # FF00000000000000H
    assert check(s, DS, M64 - top57 - 1, n, w=64) == GP0


def test_64bit_ignores_limits_types_and_null() -> None:
    """SDM Vol. 3A 5.3.1 (no limit checks), 5.4.1.1 (no null checks); types are not checked either."""
    s = machine("long64")
    s.seg[DS] = data_seg(0, 0x1, unusable=True)  # limit 0, read-only, null
    s.seg[SS] = data_seg(0, 0x5)
    assert check(s, DS, 0x5000, 8, WRITE, 64) is None
    assert check(s, SS, 0x5000, 8, WRITE, 64) is None


def test_fs_base_makes_address_non_canonical() -> None:
    """FS/GS bases apply in 64-bit mode; the sum is what must be canonical."""
    s = machine("long64")
    s.seg[FS] = Segment(selector=0, base=LOW_TOP + 1 - 0x1000, limit=0, type=3)
    assert check(s, FS, 0xFFF, 1, w=64) is None
    assert check(s, FS, 0xFFF, 2, w=64) == GP0
    assert check(s, FS, 0x1000, 1, w=32) == GP0  # 32-bit offset, 64-bit sum
    assert check(s, DS, 0x1000, 1, w=64) is None  # DS base ignored


def map_4k(s: MachineState, linear: int, phys: int, tables: int) -> None:
    """Map one 4-KiB page in the flat long64 machine's 4-level tables; new tables at ``tables`` (3 pages)."""
    D = s.mem.phys
    pml4 = s.cr3
    entry = pml4 + ((linear >> 39) & 0x1FF) * 8
    for level, shift in enumerate((30, 21, 12)):
        nxt = tables + level * PAGE
        D.map_page(nxt)
        D.write(entry, 8, nxt | 7)
        entry = nxt + ((linear >> shift) & 0x1FF) * 8
    D.map_page(phys)
    D.write(entry, 8, phys | 7)


def long64_at(rip: int, code: str, **regs: int) -> MachineState:
    """A long64 machine executing ``code`` at ``rip``, with the page(s) around it mapped."""
    s = machine("long64", **regs)
    page = rip & ~(PAGE - 1)
    map_4k(s, page, 0x50000, 0x40000)
    s.mem.phys.write_bytes(0x50000 + (rip - page), bytes.fromhex(code))
    s.rip = rip
    return s


def test_data_at_the_canonical_boundary() -> None:
    for code, regs, outcome in (
            ("8a03", {"rbx": LOW_TOP}, None),
            ("668b03", {"rbx": LOW_TOP}, GP0),
            ("668b4500", {"rbp": LOW_TOP}, SS0),
            ("488b03", {"rbx": LOW_TOP - 6}, GP0),
            ("488b03", {"rbx": LOW_TOP - 7}, None),
            ("488b03", {"rbx": HIGH_BOTTOM - 8}, GP0),
            ("50", {"rsp": LOW_TOP + 8}, SS0),  # the pushed qword starts at 7FFFFFFFFFFFH and crosses
            ("5b", {"rsp": LOW_TOP - 6}, SS0),  # the pop's qword crosses the boundary
            ("648b03", {"rbx": 0}, None)):
        s = machine("long64", code + "f4", **regs)
        map_4k(s, LOW_TOP & ~(PAGE - 1), 0x50000, 0x40000)
        s.seg[FS] = Segment(selector=0, base=0x2000, limit=0, type=3)
        before = reg(s, "rsp")
        ev = run(s)
        if outcome is None:
            assert ev.kind == "halted", code
        else:
            assert fault(ev) == outcome, code
            assert ev.rip == CODE and reg(s, "rsp") == before


def test_32bit_address_size_offsets_are_canonical() -> None:
    """A 67-prefixed [EBP] offset is below 4 GiB: canonical, no fault (paging decides)."""
    s = machine("long64", "66678b4500 f4", rbp=0xFFFF_FFFF_0000_1000)
    assert run(s).kind == "halted"


# -- instruction fetch -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_fetch_ends_exactly_at_cs_limit(mode: str) -> None:
    """MOV r, imm (B8+) occupying CODE .. limit executes; the next fetch (beyond the limit) is #GP(0)."""
    code = "b878563412" if mode == "prot32" else "b83412"
    length = len(code) // 2
    s = machine(mode, code + "f4")
    s.seg[CS] = code_seg(CODE + length - 1, db=1 if mode == "prot32" else 0)
    cpu = SpecCPU(s)
    assert cpu.step() is None
    ev = cpu.step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == CODE + length
    # one byte less: the instruction's last byte is beyond the limit -> #GP(0), nothing executed
    s = machine(mode, code + "f4")
    s.seg[CS] = code_seg(CODE + length - 2, db=1 if mode == "prot32" else 0)
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == CODE and reg(s, "rax") == 0


def test_fetch_checks_only_the_bytes_used() -> None:
    """A one-byte NOP at the limit runs, though the decoder window would reach past it."""
    s = machine("prot32", "90 90 90")
    s.seg[CS] = code_seg(CODE)
    cpu = SpecCPU(s)
    assert cpu.step() is None and s.rip == CODE + 1
    ev = cpu.step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == CODE + 1


def test_fetch_rip_beyond_limit() -> None:
    s = machine("prot32", "90")
    s.seg[CS] = code_seg(CODE - 1)
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == CODE


@pytest.mark.parametrize(("limit", "vector"), [(0x3FFF_FFFF, Vector.GP), (M32, Vector.PF)])
def test_fetch_beyond_limit_before_next_page_fault(limit: int, vector: int) -> None:
    """Compatibility mode, paging on: MOV EAX, imm32 at 3FFFFFFEH continues on the unmapped page
    40000000H (the flat machine maps 1 GiB).  With CS.limit 3FFFFFFFH the bytes beyond the limit are
    #GP(0) before that page is touched (segmentation precedes paging); with a 4-GiB limit it is #PF."""
    s = machine("long64")
    s.seg[CS] = code_seg(limit, db=1)
    s.mem.phys.map_page(0x3FFF_F000)
    s.mem.phys.write_bytes(0x3FFF_FFFE, bytes.fromhex("b878"))
    s.rip = 0x3FFF_FFFE
    ev = SpecCPU(s).step()
    assert ev is not None and ev.kind == "fault" and ev.vector == vector and ev.rip == 0x3FFF_FFFE
    assert ev.error_code == 0 and ev.cr2 == (0x4000_0000 if vector == Vector.PF else None)


def test_fetch_four_gib_limit_wraps() -> None:
    """Limit FFFFFFFFH: an instruction from FFFFFFFFH continues at 0 (SDM Vol. 3A 22.33.1)."""
    s = machine("prot32")
    s.mem.phys.map_page(0xFFFF_F000)
    s.mem.phys.write(0xFFFF_FFFF, 1, 0xB8)
    s.mem.phys.write(0, 4, 0x11223344)
    s.rip = M32
    assert SpecCPU(s).step() is None
    assert reg(s, "rax") == 0x11223344 and s.rip == 4


def test_real_mode_fetch_at_segment_end() -> None:
    """Real mode: at IP FFFEH a 2-byte instruction runs, and the next fetch, at 10000H (sequential
    execution does not wrap IP, see spec.cpu), is beyond the limit: #GP(0); a 3-byte instruction at
    FFFEH is #GP(0) itself (SDM Vol. 3A 22.33.1)."""
    s = machine("real")
    s.mem.phys.map_page(0xF000)
    s.mem.phys.write_bytes(0xFFFE, bytes.fromhex("31c0"))
    s.rip = 0xFFFE
    s.gpr[0] = 5
    cpu = SpecCPU(s)
    assert cpu.step() is None and reg(s, "rax") == 0 and s.rip == 0x10000
    ev = cpu.step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == 0x10000
    s = machine("real")
    s.mem.phys.map_page(0xF000)
    s.mem.phys.write_bytes(0xFFFE, bytes.fromhex("83c001"))
    s.rip = 0xFFFE
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == 0xFFFE


def test_fetch_at_canonical_boundary() -> None:
    """64-bit: an instruction ending at 00007FFFFFFFFFFFH runs and the next fetch (non-canonical RIP)
    is #GP(0); one whose last byte would be non-canonical faults at its own RIP."""
    s = long64_at(LOW_TOP - 1, "31c0", rax=7)
    cpu = SpecCPU(s)
    assert cpu.step() is None and reg(s, "rax") == 0 and s.rip == LOW_TOP + 1
    ev = cpu.step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == LOW_TOP + 1
    s = long64_at(LOW_TOP - 1, "4831c0", rax=7)
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == LOW_TOP - 1 and reg(s, "rax") == 7


def test_fetch_in_the_upper_canonical_half() -> None:
    s = long64_at(HIGH_BOTTOM, "4831c0", rax=7)
    assert SpecCPU(s).step() is None and reg(s, "rax") == 0
    s = machine("long64")
    s.rip = HIGH_BOTTOM - 1
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0


def test_fetch_window_la57() -> None:
    """With CR4.LA57 0000800000000000H is canonical; the window ends at the 57-bit boundary."""
    s = machine("long64")
    s.cr4 |= CR4_LA57
    s.rip = LOW_TOP + 1
    assert fetch_window(s) == (LOW_TOP + 1, (1 << 56) - LOW_TOP - 1)
    s.rip = (1 << 56) - 3
    assert fetch_window(s)[1] == 3
    s.rip = 1 << 56
    with pytest.raises(Fault) as e:
        fetch_window(s)
    assert (e.value.vector, e.value.error_code) == GP0


# -- compatibility mode ----------------------------------------------------------------------------

def compat() -> MachineState:
    s = machine("long64")
    s.seg[CS] = code_seg(M32, db=1, l=0)
    assert s.efer & EFER_LMA and s.code_bits == 32
    return s


def test_compatibility_mode_uses_protected_checks() -> None:
    s = compat()
    s.seg[DS] = data_seg(0xFFF)
    s.seg[SS] = data_seg(0xFFF, 0x7)
    assert check(s, DS, 0xFFC, 4) is None and check(s, DS, 0xFFD, 4) == GP0
    assert check(s, SS, 0xFFF, 4) == SS0 and check(s, SS, 0x1000, 4) is None
    s.seg[ES] = data_seg(M32, unusable=True)
    assert check(s, ES, 0, 1) == GP0
    s.seg[GS] = data_seg(M32, 0x1, base=0xFFFF_F000)
    assert check(s, GS, 0, 1, WRITE) == GP0
    assert Exec(s).linear(GS, 0x2000, 32, 1) == 0x1000  # 32-bit linear addresses wrap


def test_compatibility_mode_fetch_limit() -> None:
    s = compat()
    s.mem.phys.write_bytes(CODE, bytes.fromhex("b878563412"))
    s.seg[CS] = code_seg(CODE + 3, db=1)
    ev = SpecCPU(s).step()
    assert ev is not None and fault(ev) == GP0 and ev.rip == CODE


# -- property: the checks against a byte-by-byte reference ------------------------------------------

def reference(prot: bool, seg: int, sg: Segment, off: int, n: int, write: bool) -> tuple[int, int] | None:
    """SDM Vol. 3A 5.3/5.4.1 written per byte: each byte offset must lie in the segment's valid range;
    bytes past FFFFFFFFH are exempt when the range ends at FFFFFFFFH (the 4-GiB wrap)."""
    code = sg.type >= 8
    if prot:
        if sg.unusable:
            return GP0
        if write and (code or not sg.type & 2):
            return GP0
        if not write and code and not sg.type & 2:
            return GP0
    down = not code and sg.type & 4
    lo, hi = (sg.limit + 1, M32 if sg.db else 0xFFFF) if down else (0, sg.limit)
    for k in range(n):
        o = off + k
        if o > M32 and hi == M32:
            continue
        if not lo <= o <= hi:
            return SS0 if seg == SS else GP0
    return None


_SHARED: dict[str, MachineState] = {}


def shared(mode: str) -> MachineState:
    if mode not in _SHARED:
        _SHARED[mode] = machine(mode)
    return _SHARED[mode]


LIMITS = st.one_of(st.sampled_from([0, 1, 0xFFF, 0xFFFE, 0xFFFF, 0x10000, 0xFFFF_FFF0, M32 - 1, M32]),
                   st.integers(0, M32))


@given(mode=st.sampled_from(["real", "prot16", "prot32"]), seg=st.integers(0, 5), typ=st.integers(0, 15),
       db=st.integers(0, 1), limit=LIMITS, unusable=st.booleans(), n=st.sampled_from([1, 2, 4, 8, 10, 16]),
       write=st.booleans(), w=st.sampled_from([16, 32]), data=st.data())
@settings(max_examples=300)
def test_checks_match_reference(mode: str, seg: int, typ: int, db: int, limit: int, unusable: bool, n: int,
                                write: bool, w: int, data: st.DataObject) -> None:
    s = shared(mode)  # linear() touches no memory: one machine per mode, its segment replaced per example
    sg = Segment(selector=0x10, base=0, limit=limit, type=typ, s=1, db=db, unusable=unusable)
    s.seg[seg] = sg
    near = [limit - n + 1, limit - n + 2, limit, limit + 1, 0xFFFF - n + 1, 0xFFFF - n + 2, M32 - n + 2, 0]
    off = data.draw(st.one_of(st.sampled_from([o & ((1 << w) - 1) for o in near]), st.integers(0, (1 << w) - 1)))
    got = check(s, seg, off, n, WRITE if write else READ, w)
    assert got == reference(mode != "real", seg, sg, off, n, write)


@given(seg=st.integers(0, 5), lin=st.one_of(st.integers(0, M64), st.sampled_from(
    [LOW_TOP - 20 + k for k in range(40)] + [HIGH_BOTTOM - 20 + k for k in range(40)] + [M64 - 3, M64])),
       n=st.sampled_from([1, 2, 4, 8, 16]), la57=st.booleans())
@settings(max_examples=300)
def test_canonical_matches_reference(seg: int, lin: int, n: int, la57: bool) -> None:
    """Every byte (mod 2**64) canonical: bits 63..N-1 equal (SDM Vol. 1 3.3.7.1)."""
    s = shared("long64")
    s.cr4 = (s.cr4 | CR4_LA57) if la57 else (s.cr4 & ~CR4_LA57)
    bits = 57 if la57 else 48

    def canonical(a: int) -> bool:
        top = a >> (bits - 1)
        return top in (0, (1 << (65 - bits)) - 1)

    ok = all(canonical((lin + k) & M64) for k in range(n))
    assert check(s, seg, lin, n, READ, 64) == (None if ok else limit_vector(seg))


# -- the checks are off in the application view ------------------------------------------------------

def test_seg_checks_off() -> None:
    s = machine("real", "8b07 f4", rbx=0xFFFF)
    s.seg_checks = False
    assert run(s).kind == "halted"
    s = machine("long64")
    s.seg_checks = False
    assert check(s, DS, LOW_TOP, 8, w=64) is None
    s.rip = LOW_TOP + 1
    assert fetch_window(s)[0] == LOW_TOP + 1
    assert s.copy().seg_checks is False


# -- symbolic twins: the fault paths are exactly the manual's conditions -------------------------------

def sym_run(D: SymbolicDomain, mode: str, code: bytes, segs: dict[int, Segment] | None = None) -> Fault | None:
    st_, _ = symbolic_state(D, mode)  # type: ignore[arg-type]
    st_.seg_checks = True
    for k, sg in (segs or {}).items():
        st_.seg[k] = sg
    insn = decode(code, BITS[mode])
    x = Exec(st_)
    x.i = insn
    x.next_rip = CODE + insn.length
    try:
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    except Fault as f:
        return f
    return None


def fault_condition(paths: list, vector: int) -> z3.BoolRef:
    conds = [p.condition for p in paths if p.result is not None]
    assert all(p.result.vector == vector and p.result.error_code == 0 for p in paths if p.result is not None)
    return z3.Or(*conds) if conds else z3.BoolVal(False)


def test_symbolic_real_mode_word_read() -> None:
    """MOV AX, [BX] in real mode faults exactly when BX = FFFFH (for every register and memory content)."""
    paths = explore(lambda D: sym_run(D, "real", bytes.fromhex("8b07")))
    bx = z3.Extract(15, 0, z3.BitVec("rbx", 64))
    assert prove(fault_condition(paths, Vector.GP) == (bx == 0xFFFF)) is None


def test_symbolic_expand_down_stack_push() -> None:
    """PUSH EAX on an expand-down 32-bit stack (limit FFFH) faults exactly when ESP - 4 <= FFFH."""
    segs = {SS: data_seg(0xFFF, 0x7, db=1)}
    paths = explore(lambda D: sym_run(D, "prot32", bytes.fromhex("50"), segs))
    esp = z3.Extract(31, 0, z3.BitVec("rsp", 64))
    assert prove(fault_condition(paths, Vector.SS) == z3.ULE(esp - 4, 0xFFF)) is None


def test_symbolic_canonical_qword_read() -> None:
    """MOV RAX, [RBX] faults (#GP(0)) exactly when RBX or RBX+7 is non-canonical."""
    paths = explore(lambda D: sym_run(D, "long64", bytes.fromhex("488b03")))
    rbx = z3.BitVec("rbx", 64)

    def canonical(a: z3.BitVecRef) -> z3.BoolRef:
        top = z3.LShR(a, 47)
        return z3.Or(top == 0, top == (1 << 17) - 1)

    assert prove(fault_condition(paths, Vector.GP) == z3.Not(z3.And(canonical(rbx), canonical(rbx + 7)))) is None
