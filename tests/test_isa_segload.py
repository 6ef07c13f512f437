"""Far-pointer loads LDS, LES, LSS, LFS, LGS (spec/isa/segload.py).

References: SDM Vol. 2A LDS/LES/LFS/LGS/LSS ("Operation", "Protected Mode
Exceptions", "Real-Address Mode Exceptions", "64-Bit Mode Exceptions"); APM
Vol. 3 LDS/LES/LFS/LGS/LSS (AMD: REX.W is ignored, m16:32); SDM Vol. 3A 3.4.5
(descriptor format), 6.8.3 (MOV SS/POP SS interrupt window; LSS needs none),
20.1.1 (real-mode segment base = selector * 16).
"""

from __future__ import annotations

from typing import Any

import capstone
import iced_x86
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.cpu import SpecCPU, StopEvent
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain, explore, prove
from spec.faults import Vector
from spec.isa import SEMANTICS
from spec.isa.context import Exec
from spec.machine import BITS, CODE, DATA, flat_machine
from spec.state import MachineState
from spec.symexec import symbolic_state

ES, CS, SS, DS, FS, GS = range(6)
SREG = {"LES": ES, "LDS": DS, "LSS": SS, "LFS": FS, "LGS": GS}
OPCODE = {"LES": "c4", "LDS": "c5", "LSS": "0fb2", "LFS": "0fb4", "LGS": "0fb5"}
M64 = (1 << 64) - 1
GDT = 0x20000
PTR_REAL = 0x6000  # where real-mode tests keep the far pointer (DS = 0)


def desc(base: int, limit: int, typ: int, *, s: int = 1, dpl: int = 0, p: int = 1, db: int = 1, g: int = 0) -> int:
    """A code/data segment descriptor (SDM Vol. 3A Figure 3-8), built independently of the spec."""
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = (((base >> 16) & 0xFF) | (typ << 8) | (s << 12) | (dpl << 13) | (p << 15) | (limit & 0xF0000)
          | (db << 22) | (g << 23) | (base & 0xFF00_0000))
    return lo | (hi << 32)


GDT_ENTRIES = {
    0x08: desc(0, 0xFFFFF, 0xB, g=1),            # code, flat (the running CS in prot32)
    0x10: desc(0, 0xFFFFF, 0x3, g=1),            # data RW accessed, flat
    0x18: desc(0x12345678, 0xABCDE, 0x2),        # data RW, not yet accessed
    0x20: desc(0x4000, 0xFFFF, 0x0),             # data read-only
    0x28: desc(0, 0xFFFFF, 0x2, dpl=3, g=1),     # data RW, DPL 3
    0x30: desc(0, 0xFFFF, 0x8),                  # code execute-only
    0x38: desc(0x1000, 0xFFFF, 0xA),             # code execute/read
    0x40: desc(0, 0xFFFF, 0x2, p=0),             # data RW, not present
    0x48: desc(0xFEDCBA98, 0xFFFF, 0x3),         # data with a high base
}
GDT_LIMIT = 0x50 - 1


def machine(mode: str, code: bytes | str, *, pointer: bytes = b"", at: int | None = None, **regs: int) -> MachineState:
    """A flat machine in ``mode`` with the test GDT, ``pointer`` stored at ``at``, registers set."""
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    s.mem.phys.map_page(GDT)
    for sel, d in GDT_ENTRIES.items():
        s.mem.phys.write(GDT + sel, 8, d)
    if mode != "real":
        s.gdtr.base, s.gdtr.limit = GDT, GDT_LIMIT
    if at is None:
        at = ptr_addr(mode)
    s.mem.phys.write_bytes(at, pointer)
    for name, v in regs.items():
        s.gpr[GPRS.index(name)] = v & M64
    return s


def ptr_addr(mode: str) -> int:
    """Where the far pointer is kept: below 64 KiB for 16-bit addressing, the data page otherwise."""
    return PTR_REAL if BITS[mode] == 16 else DATA


GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")


def run(s: MachineState, vendor: str = "amd", budget: int = 20) -> StopEvent:
    return SpecCPU(s, vendor=vendor).run(budget)


def reg(s: MachineState, n: int | str) -> int:
    return s.D.concrete(s.gpr[GPRS.index(n) if isinstance(n, str) else n])


def far(offset: int, selector: int, opsize: int) -> bytes:
    """The memory image of a far pointer: offset (operand size) then selector (SDM Vol. 2A LDS)."""
    return offset.to_bytes(opsize // 8, "little") + selector.to_bytes(2, "little")


def encode(mnem: str, dst: int, bits: int, opsize: int, *, rex_w: bool = False) -> str:
    """``Lxx dst, [rBX]`` (16-bit addressing: r/m 111 = [BX]; 32/64: r/m 011 = [EBX]/[RBX])."""
    rm = 7 if bits == 16 else 3
    pfx = "66" if opsize != bits and not (bits == 64 and opsize == 32) else ""
    if bits == 64 and opsize == 16:
        pfx = "66"
    return pfx + ("48" if rex_w else "") + OPCODE[mnem] + f"{(dst << 3) | rm:02x}"


# -- encodings, checked against capstone and iced-x86 --------------------------------------

CAPSTONE = [
    (16, "c437", "les si, ptr [bx]"), (16, "c537", "lds si, ptr [bx]"), (16, "0fb237", "lss si, ptr [bx]"),
    (16, "0fb437", "lfs si, ptr [bx]"), (16, "0fb537", "lgs si, ptr [bx]"), (16, "66c537", "lds esi, ptr [bx]"),
    (16, "26c537", "lds si, ptr es:[bx]"), (16, "c57600", "lds si, ptr [bp]"), (16, "c538", "lds di, ptr [bx + si]"),
    (16, "67c533", "lds si, ptr [ebx]"), (32, "c533", "lds esi, ptr [ebx]"), (32, "66c533", "lds si, ptr [ebx]"),
    (32, "0fb223", "lss esp, ptr [ebx]"), (64, "0fb233", "lss esi, ptr [rbx]"), (64, "660fb233", "lss si, ptr [rbx]"),
    (64, "480fb233", "lss rsi, ptr [rbx]"), (64, "0fb433", "lfs esi, ptr [rbx]"), (64, "0fb533", "lgs esi, ptr [rbx]"),
    (16, "c4 07", "les ax, ptr [bx]"),
]


@pytest.mark.parametrize(("bits", "hexcode", "text"), CAPSTONE)
def test_encodings_disassemble(bits: int, hexcode: str, text: str) -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32,
                                            64: capstone.CS_MODE_64}[bits])
    code = bytes.fromhex(hexcode.replace(" ", ""))
    (ins,) = md.disasm(code, 0)
    assert ins.size == len(code)
    assert f"{ins.mnemonic} {ins.op_str}" == text


def _iced_mem(bits: int, hexcode: str, amd: bool) -> str:
    opts = iced_x86.DecoderOptions.AMD if amd else iced_x86.DecoderOptions.NONE
    ins = iced_x86.Decoder(bits, bytes.fromhex(hexcode), opts).decode()
    names = {v: k for k, v in vars(iced_x86.MemorySize).items() if isinstance(v, int)}
    return names[ins.memory_size]


@pytest.mark.parametrize(("hexcode", "amd", "size"), [
    ("480fb233", False, "SEG_PTR64"), ("480fb233", True, "SEG_PTR32"), ("0fb233", True, "SEG_PTR32"),
    ("660fb233", False, "SEG_PTR16"), ("480fb433", True, "SEG_PTR32"), ("480fb533", False, "SEG_PTR64"),
])
def test_pointer_sizes_agree_with_iced(hexcode: str, amd: bool, size: str) -> None:
    """The far-pointer size by vendor (iced-x86 decodes with AMD rules on request) matches the spec's decode."""
    assert _iced_mem(64, hexcode, amd) == size
    insn = decode(bytes.fromhex(hexcode), 64, vendor="amd" if amd else "intel")
    assert insn.operands[1].size == {"SEG_PTR16": 32, "SEG_PTR32": 48, "SEG_PTR64": 80}[size]


def test_register_forms_are_invalid_encodings_for_both_disassemblers() -> None:
    for hexcode in ("0fb2c6", "0fb4c0", "0fb5c0"):
        assert iced_x86.Decoder(16, bytes.fromhex(hexcode)).decode().is_invalid


# -- real-address mode: base = selector * 16, every operand size (SDM Vol. 3A 20.1.1) -------

@settings(max_examples=150)
@given(mnem=st.sampled_from(sorted(SREG)), opsize=st.sampled_from([16, 32]), dst=st.integers(0, 7),
       old=st.integers(0, M64), offset=st.integers(0, 0xFFFF_FFFF), selector=st.integers(0, 0xFFFF))
def test_real_mode_loads(mnem: str, opsize: int, dst: int, old: int, offset: int, selector: int) -> None:
    """Lxx r16/r32, m16:16/m16:32 at DS:[BX] in real mode, against a plain-int reference.

    Real-Address Mode: no descriptor checks; the hidden base becomes selector << 4 (SDM Vol. 3A 20.1.1).
    The offset register gets the low operand-size bits: a 16-bit write keeps bits 63:16, a 32-bit one
    zero-extends (SDM Vol. 1 3.4.1.1).
    """
    offset &= (1 << opsize) - 1
    regs = {name: (0x1111 * (k + 1)) for k, name in enumerate(GPRS)}
    regs["rbx"] = PTR_REAL
    if dst != 3:
        regs[GPRS[dst]] = old
    s = machine("real", encode(mnem, dst, 16, opsize), pointer=far(offset, selector, opsize), **regs)
    before = [reg(s, k) for k in range(8)]
    ev = run(s)
    assert ev.kind == "halted", ev
    sreg = SREG[mnem]
    assert s.seg[sreg].selector == selector
    assert s.seg[sreg].base == selector << 4
    want = (before[dst] & ~0xFFFF) | offset if opsize == 16 else offset
    for k in range(8):
        assert reg(s, k) == (want if k == dst else before[k]), GPRS[k]
    for k in range(6):
        if k != sreg:
            assert s.seg[k].selector == 0 and s.seg[k].base == 0


def test_real_mode_segment_override_and_bp_default() -> None:
    """ES override reads the pointer from ES:[BX]; [BP+d] defaults to SS (SDM Vol. 1 3.7.4.1)."""
    s = machine("real", "26 c5 37", pointer=far(0xBEEF, 0x2345, 16), at=0x5000 + 0x1000, rbx=0x1000)
    s.seg[ES].selector, s.seg[ES].base = 0x500, 0x5000
    assert run(s).kind == "halted"
    assert reg(s, "rsi") & 0xFFFF == 0xBEEF and s.seg[DS].selector == 0x2345 and s.seg[DS].base == 0x23450

    s = machine("real", "c4 76 04", pointer=far(0x1357, 0x0246, 16), at=0x3000 + 0x0104, rbp=0x100)
    s.seg[SS].selector, s.seg[SS].base = 0x300, 0x3000
    assert run(s).kind == "halted"
    assert reg(s, "rsi") & 0xFFFF == 0x1357 and s.seg[ES].selector == 0x0246 and s.seg[ES].base == 0x2460


def test_real_mode_16bit_effective_address_wraps() -> None:
    """[BX+SI] is computed modulo 64 KiB with 16-bit addressing (SDM Vol. 1 3.7.5, Vol. 2A Table 2-1)."""
    s = machine("real", "c5 38", pointer=far(0xCAFE, 0x0F00, 16), rbx=0xFFF0, rsi=PTR_REAL + 0x10)
    assert run(s).kind == "halted"
    assert reg(s, "rdi") & 0xFFFF == 0xCAFE and s.seg[DS].base == 0xF000


def test_real_mode_32bit_addressing_and_pointer_across_a_page() -> None:
    """67 selects [EBX]; the 4-byte pointer may straddle a 4-KiB page (it is one operand)."""
    s = machine("real", "67 c5 33", pointer=far(0x0102, 0x0304, 16), at=0x6FFE, rbx=0x6FFE)
    assert run(s).kind == "halted"
    assert reg(s, "rsi") & 0xFFFF == 0x0102 and s.seg[DS].selector == 0x0304


@pytest.mark.parametrize(("code", "regs", "vector"), [
    ("c5 37", {"rbx": 0xFFFE}, Vector.GP),               # m16:16 at DS:FFFE runs to 0x10001
    ("66 c5 37", {"rbx": 0xFFFC}, Vector.GP),            # m16:32 at DS:FFFC runs to 0x10001
    ("c5 76 00", {"rbp": 0xFFFD}, Vector.SS),            # [BP]: through SS
    ("67 c5 33", {"rbx": 0x10000}, Vector.GP),           # a 32-bit offset above FFFFH
])
def test_real_mode_pointer_beyond_the_64k_limit_faults(code: str, regs: dict[str, int], vector: int) -> None:
    """The pointer is one operand: if any byte lies past offset FFFFH the load faults -- #GP(0), or
    #SS(0) through SS -- and neither register changes (SDM Vol. 2A LDS "Real-Address Mode Exceptions";
    Vol. 3A 22.33.1 "Segment Wraparound"; 20.1.1 for 32-bit offsets)."""
    s = machine("real", code, rsi=0x5A5A, **regs)
    ev = run(s)
    assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", vector, 0, CODE)
    assert reg(s, "rsi") == 0x5A5A and s.seg[DS].selector == 0 and s.seg[DS].base == 0


def test_lss_loads_ss_and_sp_without_an_interrupt_shadow() -> None:
    """LSS SP loads SS:SP in one instruction; the SDM's MOV SS/POP SS interrupt window does not apply
    (SDM Vol. 3A 6.8.3: with LSS "this problem does not occur")."""
    s = machine("real", "0f b2 27", pointer=far(0x0FFE, 0x0700, 16), rbx=PTR_REAL)
    cpu = SpecCPU(s)
    assert cpu.step() is None
    assert s.interrupt_shadow is False
    assert reg(s, "rsp") == 0x0FFE and s.seg[SS].base == 0x7000
    # The new stack is used at once: PUSH writes at 0x7000 + 0x0FFC.
    s.mem.phys.write_bytes(s.rip, bytes.fromhex("6a 5a f4"))  # push 0x5a; hlt
    assert cpu.run(5).kind == "halted"
    assert s.mem.phys.read(0x7FFC, 2) == 0x5A


@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
@pytest.mark.parametrize("hexcode", ["0fb2c6", "0fb4c0", "0fb5d8"])
def test_register_source_is_ud(mode: str, hexcode: str) -> None:
    """A register second operand is #UD (SDM Vol. 2A LDS "#UD If source operand is not a memory location")."""
    s = machine(mode, hexcode)
    before = list(s.gpr)
    ev = run(s)
    assert (ev.kind, ev.vector, ev.rip) == ("fault", Vector.UD, CODE)
    assert s.gpr == before


def test_les_lds_are_not_loads_in_64bit_mode() -> None:
    """C4/C5 are the VEX escapes in 64-bit mode, where LES/LDS are invalid (SDM Vol. 2A LDS/LES
    "64-Bit Mode Exceptions: #UD"; Vol. 2A 2.3.5): the spec never runs them as far-pointer loads."""
    for hexcode in ("c533", "c433"):
        s = machine("long64", hexcode, pointer=far(0x1234, 0x10, 32), rbx=DATA)
        ev = run(s)
        assert ev.kind in ("unimplemented", "fault"), ev
        assert ev.kind == "unimplemented" or ev.vector == Vector.UD
        assert s.seg[DS].selector == 0x10 and s.seg[ES].selector == 0x10


# -- protected mode: descriptor checks through load_segment (SDM Vol. 2A LDS Operation) ------

# (mnemonic, selector) -> expected: ("ok", base) or (vector, error code)
PROT_CASES = [
    ("LDS", 0x10, ("ok", 0)), ("LES", 0x18, ("ok", 0x12345678)), ("LFS", 0x20, ("ok", 0x4000)),
    ("LGS", 0x28, ("ok", 0)), ("LDS", 0x38, ("ok", 0x1000)), ("LSS", 0x10, ("ok", 0)),
    ("LSS", 0x18, ("ok", 0x12345678)),
    # SS: not a writable data segment, DPL != CPL, RPL != CPL -> #GP(selector); null -> #GP(0); not present -> #SS.
    ("LSS", 0x20, (Vector.GP, 0x20)), ("LSS", 0x38, (Vector.GP, 0x38)), ("LSS", 0x28, (Vector.GP, 0x28)),
    ("LSS", 0x13, (Vector.GP, 0x10)), ("LSS", 0x00, (Vector.GP, 0)), ("LSS", 0x03, (Vector.GP, 0)),
    ("LSS", 0x40, (Vector.SS, 0x40)),
    # DS/ES/FS/GS: execute-only code -> #GP(selector); not present -> #NP(selector); outside the GDT -> #GP.
    ("LDS", 0x30, (Vector.GP, 0x30)), ("LES", 0x40, (Vector.NP, 0x40)), ("LFS", 0x50, (Vector.GP, 0x50)),
    ("LGS", 0x1238, (Vector.GP, 0x1238)),
]


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
@pytest.mark.parametrize(("mnem", "selector", "expect"), PROT_CASES)
def test_protected_mode_checks(mode: str, mnem: str, selector: int, expect: tuple) -> None:
    """Each check of SDM Vol. 2A LDS/LSS "Protected Mode Exceptions"; a fault leaves everything unchanged."""
    bits = BITS[mode]
    for opsize in (16, 32):
        off = 0x89ABCDEF & ((1 << opsize) - 1)
        s = machine(mode, encode(mnem, 6, bits, opsize), pointer=far(off, selector, opsize), rbx=ptr_addr(mode),
                    rsi=0xFFFF_FFFF_0000_5555)
        before_seg = [seg.copy() for seg in s.seg]
        ev = run(s)
        sreg = SREG[mnem]
        if expect[0] == "ok":
            assert ev.kind == "halted", ev
            assert s.seg[sreg].selector == selector and s.seg[sreg].base == expect[1]
            want = (0xFFFF_FFFF_0000_0000 | off) if opsize == 16 else off
            assert reg(s, "rsi") == want
        else:
            assert (ev.kind, ev.vector, ev.error_code, ev.rip) == ("fault", expect[0], expect[1], CODE), ev
            assert reg(s, "rsi") == 0xFFFF_FFFF_0000_5555
            assert s.seg == before_seg


def test_protected_mode_sets_accessed_bit_and_loads_cache() -> None:
    """The descriptor's accessed bit is set in the GDT (SDM Vol. 3A 3.4.5.1); the cache gets base/limit."""
    s = machine("prot32", "c4 33", pointer=far(0x1000, 0x18, 32), rbx=DATA)
    assert run(s).kind == "halted"
    assert s.mem.phys.read(GDT + 0x18 + 5, 1) & 1
    es = s.seg[ES]
    assert (es.base, es.limit, es.type, es.unusable) == (0x12345678, 0xABCDE, 0x3, False)


def test_null_selector_into_data_segment_register() -> None:
    """A null selector loads DS/ES/FS/GS without a fault, marking the register unusable (SDM Vol. 3A 3.4.2)."""
    s = machine("prot32", "c5 33", pointer=far(0x4242, 0x0003, 32), rbx=DATA)
    assert run(s).kind == "halted"
    assert s.seg[DS].selector == 3 and s.seg[DS].unusable and reg(s, "rsi") == 0x4242


def test_cpl3_lds_rpl_and_dpl() -> None:
    """At CPL 3 a DPL-0 data segment is #GP(selector); the DPL-3 one loads (SDM Vol. 3A 5.6)."""
    for selector, ok in ((0x2B, True), (0x13, False)):
        s = machine("prot32", "c5 33", pointer=far(0x77, selector, 32), rbx=DATA)
        for k in (CS, SS):
            s.seg[k].dpl = 3
            s.seg[k].selector |= 3
        ev = SpecCPU(s).step()  # one step: HLT itself would #GP at CPL 3
        if ok:
            assert ev is None and s.seg[DS].selector == selector
        else:
            assert ev is not None
            assert (ev.vector, ev.error_code) == (Vector.GP, 0x10)


# -- 64-bit mode: LSS/LFS/LGS, operand sizes by vendor (APM Vol. 3 LSS; SDM Vol. 2A LSS) ---------

@pytest.mark.parametrize(("pfx", "vendor", "opsize"), [
    ("", "amd", 32), ("66", "amd", 16), ("48", "amd", 32), ("", "intel", 32), ("66", "intel", 16),
    ("48", "intel", 64), ("6648", "intel", 64), ("6648", "amd", 32),
])
@pytest.mark.parametrize("mnem", ["LSS", "LFS", "LGS"])
def test_long_mode_operand_sizes(pfx: str, vendor: str, opsize: int, mnem: str) -> None:
    """m16:16 with 66, m16:32 by default, m16:64 with REX.W on Intel; AMD ignores REX.W (m16:32)."""
    off = 0x0123_4567_89AB_CDEF & ((1 << opsize) - 1)
    code = pfx + OPCODE[mnem] + "33"
    s = machine("long64", code, pointer=far(off, 0x10, opsize) + b"\xee" * 8, rbx=DATA, rsi=0xFFFF_EEEE_DDDD_CCCC)
    ev = run(s, vendor)
    assert ev.kind == "halted", ev
    want = {16: 0xFFFF_EEEE_DDDD_0000 | off, 32: off, 64: off}[opsize]
    assert reg(s, "rsi") == want
    assert s.seg[SREG[mnem]].selector == 0x10


def test_long_mode_lfs_takes_the_descriptor_base() -> None:
    """In 64-bit mode the FS/GS base comes from the descriptor (32 bits) when loaded by a selector
    (SDM Vol. 3A 3.4.4); a later FS-relative access uses it."""
    s = machine("long64", "0f b4 33 64 8b 04 25 00 00 00 00", pointer=far(0, 0x48, 32), rbx=DATA)
    s.mem.phys.map_page(0xFEDCB000)
    s.mem.phys.write(0xFEDCBA98, 4, 0x600DF00D)
    # Identity-map the high address: a 2 MiB page at 0xFEC00000 in a second PDPT entry (PD at 0x73000).
    pdpt, pd = 0x71000, 0x73000
    s.mem.phys.map_page(pd)
    s.mem.phys.write(pdpt + 8 * 3, 8, pd | 0x7)
    s.mem.phys.write(pd + 8 * ((0xFEC00000 >> 21) & 511), 8, 0xFEC00000 | 0x87)
    assert run(s).kind == "halted"
    assert s.seg[FS].base == 0xFEDCBA98
    assert reg(s, "rax") == 0x600DF00D


def test_long_mode_lss_null_selector() -> None:
    """64-bit mode: LSS with a null selector is allowed at CPL < 3 when RPL = CPL; RPL != CPL is #GP(0)
    (SDM Vol. 2A LSS "64-Bit Mode Exceptions"; Vol. 3A 3.4.4)."""
    s = machine("long64", "0f b2 23", pointer=far(0x7000, 0x0000, 32), rbx=DATA)
    assert run(s).kind == "halted"
    assert s.seg[SS].selector == 0 and reg(s, "rsp") == 0x7000
    s = machine("long64", "0f b2 23", pointer=far(0x7000, 0x0001, 32), rbx=DATA)
    ev = run(s)
    assert (ev.vector, ev.error_code) == (Vector.GP, 0) and reg(s, "rsp") == 0x8000


# -- symbolic twins: the offset register over all memory contents --------------------------

def _store(mem: Any, addr: int, data: bytes) -> Any:
    for k, b in enumerate(data):
        mem = z3.Store(mem, z3.BitVecVal(addr + k, 64), z3.BitVecVal(b, 8))
    return mem


def _sym_run(D: SymbolicDomain, mode: str, code: bytes, ptr_addr: int, selector: int, opsize: int,
             gdt: bool) -> tuple[MachineState, Any, Any]:
    s, inputs = symbolic_state(D, mode)  # type: ignore[arg-type]
    mem = s.mem.phys
    arr = _store(mem.array, ptr_addr + opsize // 8, selector.to_bytes(2, "little"))
    if gdt:
        for sel, d in GDT_ENTRIES.items():
            arr = _store(arr, GDT + sel, d.to_bytes(8, "little"))
        s.gdtr.base, s.gdtr.limit = GDT, GDT_LIMIT
    mem.array = arr
    insn = decode(code, BITS[mode])
    x = Exec(s)
    x.i = insn
    x.next_rip = CODE + insn.length
    SEMANTICS[insn.row.mnemonic].fn(x, insn)
    return s, inputs["rsi"], arr


@pytest.mark.parametrize(("mode", "code", "opsize", "selector", "gdt"), [
    ("real", "c5 36 00 01", 16, 0xF00D, False),      # lds si, [0x100]
    ("real", "66 0f b2 36 00 01", 32, 0x1234, False),  # lss esi, [0x100]
    ("prot32", "0f b4 35 00 01 00 00", 32, 0x18, True),  # lfs esi, [0x100]
    ("prot32", "66 c4 35 00 01 00 00", 16, 0x10, True),  # les si, [0x100]
])
def test_symbolic_offset_register(mode: str, code: str, opsize: int, selector: int, gdt: bool) -> None:
    """For every memory content and RSI: RSI gets the pointer's offset (16-bit: upper bits kept; 32-bit:
    zero-extended), and the segment register gets the selector -- one path, no fault."""
    raw = bytes.fromhex(code.replace(" ", ""))
    paths = explore(lambda D: _sym_run(D, mode, raw, 0x100, selector, opsize, gdt))
    assert len(paths) == 1
    s, rsi0, arr = paths[0].result
    off = z3.Concat(*[z3.Select(arr, z3.BitVecVal(0x100 + k, 64)) for k in reversed(range(opsize // 8))])
    want = z3.Concat(z3.Extract(63, 16, rsi0), off) if opsize == 16 else z3.ZeroExt(32, off)
    assert prove(s.gpr[6] == want) is None
    sreg = SREG[decode(raw, BITS[mode]).row.mnemonic]
    assert s.seg[sreg].selector == selector
    if mode == "real":
        assert s.seg[sreg].base == selector << 4


def test_pointer_decode_shape() -> None:
    """The decoder hands LSS/LFS/LGS a Gv register and an Mp operand of 16 + operand-size bits."""
    for bits in (16, 32, 64):
        for pfx, opsize in (("", 32 if bits != 16 else 16), ("66", 16 if bits != 16 else 32)):
            insn = decode(bytes.fromhex(pfx + "0fb233"), bits)
            assert insn.opsize == opsize
            assert [o.size for o in insn.operands] == [opsize, 16 + opsize]
