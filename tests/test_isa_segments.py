"""Segment-register loads (spec/isa/segments.py): MOV Sreg (8E), MOV r/m,Sreg (8C), load_segment.

Protected-mode loads read a GDT/LDT built in test memory (SDM Vol. 3A 3.4.5
descriptor format) and check the faults and error codes of SDM Vol. 2B MOV
"Protected Mode Exceptions" / "64-Bit Mode Exceptions".
"""

from __future__ import annotations

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.faults import Vector
from spec.machine import flat_machine
from spec.state import MachineState, Segment

ES, CS, SS, DS, FS, GS = range(6)
GPR = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
GDT = 0x20000
LDT = 0x20800


def desc(base: int, limit: int, typ: int, *, s: int = 1, dpl: int = 0, p: int = 1, db: int = 1, g: int = 0,
         l: int = 0) -> int:
    """A segment descriptor (SDM Vol. 3A Figure 3-8), written independently of the spec's decoder."""
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = (((base >> 16) & 0xFF) | (typ << 8) | (s << 12) | (dpl << 13) | (p << 15) | (limit & 0xF0000)
          | (l << 21) | (db << 22) | (g << 23) | (base & 0xFF00_0000))
    return lo | (hi << 32)


# GDT entries by selector.
ENTRIES = {
    0x08: desc(0, 0xFFFFF, 0xB, g=1),                    # code 32, flat
    0x10: desc(0, 0xFFFFF, 0x3, g=1),                    # data RW accessed, flat
    0x18: desc(0x12345678, 0xABCDE, 0x2),                # data RW, not accessed, byte granular
    0x20: desc(0, 0xFFFF, 0x0),                          # data read-only
    0x28: desc(0, 0xFFFFF, 0x2, dpl=3, g=1),             # data RW DPL 3
    0x30: desc(0, 0xFFFF, 0x8),                          # code execute-only
    0x38: desc(0x1000, 0xFFFF, 0xA),                     # code readable, non-conforming, DPL 0
    0x40: desc(0x2000, 0xFFFF, 0xE),                     # code readable, conforming, DPL 0
    0x48: desc(0, 0xFFFF, 0x2, p=0),                     # data RW not present
    0x50: desc(LDT, 0x17, 0x2, s=0, db=0),               # LDT descriptor (system)
    0x58: desc(0x4000, 0xF, 0x2, g=1),                   # data RW, G=1: limit 0xFFFF
    0x60: desc(0xFEDCBA98, 0xFFFF, 0x3),                 # data with a high base (FS/GS in 64-bit mode)
    0x68: desc(0, 0xFFFF, 0x2, dpl=3, p=0),              # data RW DPL 3 not present
    0x70: desc(0, 0xFFFF, 0x2, dpl=1),                   # data RW DPL 1
}
GDT_LIMIT = 0x78 - 1
LDT_ENTRIES = {0x0: desc(0x5000, 0xFFFF, 0x2), 0x8: desc(0x6000, 0xFFFF, 0x2, dpl=3),
               0x10: desc(0, 0xFFFF, 0x2, p=0)}


def machine(mode: str, code: bytes | str, *, cpl: int = 0, ldt: bool = True) -> MachineState:
    """A flat machine in ``mode`` with the test GDT (and LDT) loaded; CS/SS DPL set to ``cpl``."""
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    s = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    s.mem.phys.map_page(GDT)
    for sel, d in ENTRIES.items():
        s.mem.phys.write(GDT + sel, 8, d)
    for off, d in LDT_ENTRIES.items():
        s.mem.phys.write(LDT + off, 8, d)
    s.gdtr.base, s.gdtr.limit = GDT, GDT_LIMIT
    if ldt:
        s.ldtr = Segment(selector=0x50, base=LDT, limit=0x17, type=2, s=0)
    else:
        s.ldtr = Segment(selector=0, base=0, limit=0, type=2, s=0, unusable=True)
    if cpl and mode != "real":
        s.seg[CS] = Segment(**{**_fields(s.seg[CS]), "dpl": cpl, "selector": 0x08 | cpl})
        s.seg[SS] = Segment(**{**_fields(s.seg[SS]), "dpl": cpl, "selector": 0x28 | cpl})
    return s


def _fields(seg: Segment) -> dict:
    return {k: getattr(seg, k) for k in Segment.__slots__}  # type: ignore[attr-defined]


def run(s: MachineState, budget: int = 50, **regs: int) -> StopEvent:
    """Run to the HLT that ``machine`` appends.

    The shadow a MOV SS sets lasts one instruction (SDM Vol. 3A 6.8.3), so the
    value ``interrupt_shadow`` had right after the first instruction is kept
    in ``s.shadow_after_first``.  At CPL > 0 the trailing HLT raises #GP(0)
    (SDM Vol. 2A HLT); reaching it that way counts as completing, reported as
    ``halted``.
    """
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & ((1 << 64) - 1)
    cpu = SpecCPU(s)
    ev = cpu.step()
    s.shadow_after_first = s.interrupt_shadow  # type: ignore[attr-defined]
    if ev is None:
        ev = cpu.run(budget - 1)
    at_hlt = ev.kind == "fault" and (ev.vector, ev.error_code) == (Vector.GP, 0) and s.cpl > 0 \
        and s.mem.phys.read((s.seg[CS].base + ev.rip) & 0xFFFF_FFFF, 1) == 0xF4
    return StopEvent(kind="halted", rip=ev.rip + 1) if at_hlt else ev


def reg(s: MachineState, name: str) -> int:
    return s.D.concrete(s.gpr[GPR[name]])


def fault(ev: StopEvent) -> tuple[int | None, int | None]:
    assert ev.kind == "fault", ev
    return ev.vector, ev.error_code


# -- encodings used below, checked against capstone ------------------------------------------

ENCODINGS = [
    (16, "8ed8", "mov ds, ax"), (32, "8ed8", "mov ds, eax"), (64, "8ed8", "mov ds, eax"),
    (32, "8ec0", "mov es, eax"), (32, "8ed0", "mov ss, eax"), (32, "8ee0", "mov fs, eax"),
    (64, "8ee8", "mov gs, eax"), (32, "8ec8", "mov cs, eax"), (16, "8ec8", "mov cs, ax"),
    (64, "8ec8", "mov cs, eax"), (32, "8e18", "mov ds, word ptr [eax]"),
    (16, "8cd8", "mov ax, ds"), (32, "8cd8", "mov eax, ds"), (32, "668cd8", "mov ax, ds"),
    (64, "488cd8", "mov rax, ds"), (64, "8cd8", "mov eax, ds"), (64, "668cd8", "mov ax, ds"),
    (32, "8c18", "mov word ptr [eax], ds"), (64, "8c23", "mov word ptr [rbx], fs"),
    (16, "8c1f", "mov word ptr [bx], ds"), (16, "668c1f", "mov word ptr [bx], ds"),
    (32, "8c1b", "mov word ptr [ebx], ds"), (32, "668c1b", "mov word ptr [ebx], ds"),
    (64, "8c1b", "mov word ptr [rbx], ds"), (64, "488c1b", "mov word ptr [rbx], ds"),
    (16, "8e1f", "mov ds, word ptr [bx]"), (64, "8e18", "mov ds, word ptr [rax]"), (32, "8ec3", "mov es, ebx"),
    (16, "8cc8", "mov ax, cs"), (64, "8ed0", "mov ss, eax"),
]


@pytest.mark.parametrize(("bits", "hexcode", "text"), ENCODINGS)
def test_encodings_disassemble(bits: int, hexcode: str, text: str) -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32,
                                            64: capstone.CS_MODE_64}[bits])
    code = bytes.fromhex(hexcode)
    insns = list(md.disasm(code, 0))
    assert len(insns) == 1 and insns[0].size == len(code)
    assert f"{insns[0].mnemonic} {insns[0].op_str}" == text


# -- real and virtual-8086 mode ---------------------------------------------------------------

SREG_MOV = {ES: "8ec0", SS: "8ed0", DS: "8ed8", FS: "8ee0", GS: "8ee8"}


@given(sreg=st.sampled_from([ES, SS, DS, FS, GS]), sel=st.integers(0, 0xFFFF),
       upper=st.integers(0, 0xFFFF_FFFF))
@settings(max_examples=60)
def test_real_mode_load(sreg: int, sel: int, upper: int) -> None:
    """Real mode: selector stored, base = selector << 4, limit/attributes unchanged (SDM Vol. 3A 20.1.1)."""
    s = machine("real", SREG_MOV[sreg])
    s.seg[sreg] = Segment(selector=0x1111, base=0x11110, limit=0x1234, type=0x3, db=1)
    ev = run(s, rax=(upper << 16) | sel)
    assert ev.kind == "halted"
    seg = s.seg[sreg]
    assert (seg.selector, seg.base, seg.limit, seg.type, seg.db) == (sel, sel << 4, 0x1234, 0x3, 1)
    assert s.shadow_after_first == (sreg == SS)  # type: ignore[attr-defined]


def test_virtual8086_load() -> None:
    """Virtual-8086 mode loads like real mode (SDM Vol. 3A 20.2.1): no descriptor is read."""
    s = machine("prot32", "8ed8")
    s.seg[CS] = Segment(selector=0, base=0, limit=0xFFFF, type=0xB)
    s.rflags_sys |= 1 << F.VM
    ev = run(s, rax=0xBEEF, budget=1)
    assert ev.kind == "budget"
    assert (s.seg[DS].selector, s.seg[DS].base) == (0xBEEF, 0xBEEF0)


# -- protected mode: successful loads ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize("sreg", [ES, DS, FS, GS, SS])
def test_protected_load_from_gdt(mode: str, sreg: int) -> None:
    """Base, limit and attributes come from the descriptor; the accessed bit is set in memory."""
    s = machine(mode, SREG_MOV[sreg])
    ev = run(s, rax=0x18)
    assert ev.kind == "halted", ev
    seg = s.seg[sreg]
    assert (seg.selector, seg.base, seg.limit) == (0x18, 0x12345678, 0xABCDE)
    assert (seg.type, seg.s, seg.dpl, seg.p, seg.db, seg.g, seg.unusable) == (0x3, 1, 0, 1, 1, 0, False)
    assert s.mem.phys.read(GDT + 0x18 + 5, 1) == 0x93  # accessed bit (type bit 0) now set
    assert s.shadow_after_first == (sreg == SS)  # type: ignore[attr-defined]


def test_granularity_scales_limit() -> None:
    """G = 1: limit = (limit << 12) | 0xFFF (SDM Vol. 3A 3.4.5)."""
    s = machine("prot32", "8ed8")
    assert run(s, rax=0x58).kind == "halted"
    assert (s.seg[DS].limit, s.seg[DS].base, s.seg[DS].g) == (0xFFFF, 0x4000, 1)


def test_accessed_bit_already_set_is_not_rewritten() -> None:
    s = machine("prot32", "8ed8")
    before = s.mem.phys.read(GDT + 0x10, 8)
    assert run(s, rax=0x10).kind == "halted"
    assert s.mem.phys.read(GDT + 0x10, 8) == before


def test_load_from_ldt() -> None:
    """TI = 1 selects the LDT (SDM Vol. 3A 3.4.2)."""
    s = machine("prot32", "8ed8 8ec0")
    ev = run(s, rax=0x0C | 3)  # LDT index 1, RPL 3: DPL 3 data
    assert ev.kind == "halted"
    assert (s.seg[DS].selector, s.seg[DS].base, s.seg[ES].base) == (0x0F, 0x6000, 0x6000)
    s = machine("prot32", "8ed8")
    assert run(s, rax=0x04).kind == "halted"
    assert s.seg[DS].base == 0x5000


@pytest.mark.parametrize("sreg", [FS, GS, DS])
def test_64bit_base_from_descriptor(sreg: int) -> None:
    """64-bit mode: a selector load takes the 32-bit descriptor base, upper bits zero (SDM Vol. 3A 3.4.4)."""
    s = machine("long64", SREG_MOV[sreg])
    s.seg[sreg] = Segment(**{**_fields(s.seg[sreg]), "base": 0xFFFF_8000_0000_0000})
    assert run(s, rax=0x60).kind == "halted"
    assert s.seg[sreg].base == 0xFEDCBA98


def test_readable_code_into_data_register() -> None:
    """DS may hold a readable code segment (SDM Vol. 2B MOV: "not a data or readable code segment")."""
    s = machine("prot32", "8ed8 8ec3")
    assert run(s, rax=0x38, rbx=0x40).kind == "halted"
    assert (s.seg[DS].base, s.seg[DS].type, s.seg[ES].base, s.seg[ES].type) == (0x1000, 0xB, 0x2000, 0xF)


def test_conforming_code_ignores_privilege() -> None:
    """Conforming code: the DPL >= max(CPL, RPL) check is skipped (SDM Vol. 3A 5.6)."""
    s = machine("prot32", "8ed8", cpl=3)
    assert run(s, rax=0x43).kind == "halted"
    assert s.seg[DS].selector == 0x43


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_ss_load_at_cpl3(mode: str) -> None:
    s = machine(mode, "8ed0", cpl=3)
    assert run(s, rax=0x2B).kind == "halted"
    assert s.seg[SS].selector == 0x2B and s.cpl == 3


# -- null selectors -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize("sreg", [ES, DS, FS, GS])
@pytest.mark.parametrize("sel", [0, 1, 2, 3])
def test_null_selector_data(mode: str, sreg: int, sel: int) -> None:
    """A null selector into DS/ES/FS/GS loads and marks the register unusable (SDM Vol. 3A 3.4.2)."""
    s = machine(mode, SREG_MOV[sreg])
    base = s.seg[sreg].base
    assert run(s, rax=sel).kind == "halted"
    assert (s.seg[sreg].selector, s.seg[sreg].unusable, s.seg[sreg].base) == (sel, True, base)


@pytest.mark.parametrize("mode", ["prot16", "prot32"])
def test_null_ss_faults_outside_64bit(mode: str) -> None:
    """SDM Vol. 2B MOV: "#GP(0) If an attempt is made to load SS register with a NULL segment selector"."""
    s = machine(mode, "8ed0")
    assert fault(run(s, rax=0)) == (Vector.GP, 0)


def test_null_ss_in_64bit_mode() -> None:
    """64-bit mode: null SS allowed at CPL < 3 with RPL = CPL; #GP(0) at CPL 3 or RPL != CPL
    (SDM Vol. 2B MOV "64-Bit Mode Exceptions")."""
    s = machine("long64", "8ed0")
    assert run(s, rax=0).kind == "halted"
    assert (s.seg[SS].selector, s.seg[SS].unusable, s.cpl) == (0, True, 0)
    s = machine("long64", "8ed0")
    assert fault(run(s, rax=1)) == (Vector.GP, 0)
    s = machine("long64", "8ed0", cpl=3)
    assert fault(run(s, rax=3)) == (Vector.GP, 0)
    s = machine("long64", "8ed0", cpl=1)
    s.seg[SS] = Segment(**{**_fields(s.seg[SS]), "selector": 0x71, "dpl": 1})
    assert run(s, rax=1).kind == "halted"
    assert s.seg[SS].unusable and s.cpl == 1


# -- faults and error codes ----------------------------------------------------------------------

# (sreg, selector, cpl, expected vector, expected error code)
FAULTS = [
    # beyond the GDT limit: #GP(selector & 0xFFFC)
    (DS, 0x78, 0, Vector.GP, 0x78), (DS, 0x7B, 0, Vector.GP, 0x78), (SS, 0x80, 0, Vector.GP, 0x80),
    # LDT: beyond its limit (TI kept in the error code)
    (DS, 0x1C, 0, Vector.GP, 0x1C), (ES, 0x1F, 0, Vector.GP, 0x1C),
    # SS: RPL != CPL, read-only data, code, DPL != CPL, system descriptor
    (SS, 0x13, 0, Vector.GP, 0x10), (SS, 0x20, 0, Vector.GP, 0x20), (SS, 0x38, 0, Vector.GP, 0x38),
    (SS, 0x28, 0, Vector.GP, 0x28), (SS, 0x10, 3, Vector.GP, 0x10), (SS, 0x13, 3, Vector.GP, 0x10),
    (SS, 0x50, 0, Vector.GP, 0x50), (SS, 0x2A, 3, Vector.GP, 0x28),
    # SS not present: #SS(selector)
    (SS, 0x48, 0, Vector.SS, 0x48), (SS, 0x6B, 3, Vector.SS, 0x68), (SS, 0x14, 0, Vector.SS, 0x14),
    # data registers: execute-only code, system descriptor
    (DS, 0x30, 0, Vector.GP, 0x30), (FS, 0x50, 0, Vector.GP, 0x50),
    # data registers: DPL < CPL, DPL < RPL (data and non-conforming code)
    (DS, 0x10, 3, Vector.GP, 0x10), (DS, 0x13, 0, Vector.GP, 0x10), (GS, 0x3B, 0, Vector.GP, 0x38),
    (ES, 0x70, 2, Vector.GP, 0x70), (ES, 0x72, 1, Vector.GP, 0x70),
    # data registers: not present -> #NP(selector), after the privilege checks
    (DS, 0x48, 0, Vector.NP, 0x48), (FS, 0x6B, 3, Vector.NP, 0x68), (GS, 0x14, 0, Vector.NP, 0x14),
    (DS, 0x68, 3, Vector.NP, 0x68),
]


@pytest.mark.parametrize("mode", ["prot16", "prot32", "long64"])
@pytest.mark.parametrize(("sreg", "sel", "cpl", "vector", "code"), FAULTS)
def test_load_faults(mode: str, sreg: int, sel: int, cpl: int, vector: int, code: int) -> None:
    """SDM Vol. 2B MOV "Protected Mode Exceptions"; the faulting load leaves no trace (precise faults)."""
    s = machine(mode, SREG_MOV[sreg], cpl=cpl)
    before = s.seg[sreg].copy()
    gdt = s.mem.phys.read_bytes(GDT, 0x1000)
    ev = run(s, rax=sel)
    assert fault(ev) == (vector, code)
    assert ev.rip == 0x1000
    assert s.seg[sreg] == before and not s.interrupt_shadow
    assert s.mem.phys.read_bytes(GDT, 0x1000) == gdt


def test_ldt_selector_without_ldt() -> None:
    """TI = 1 with a null LDTR: #GP(selector) (SDM Vol. 3A 3.5.1)."""
    s = machine("prot32", "8ed8", ldt=False)
    assert fault(run(s, rax=0x07)) == (Vector.GP, 0x04)


def test_descriptor_read_is_supervisor() -> None:
    """At CPL 3 the descriptor read and accessed-bit write are implicit supervisor accesses
    (SDM Vol. 3A 4.6.1): the spec passes user=False, implicit=True to the memory layer."""
    s = machine("prot32", "8ed8", cpl=3)
    seen: list[tuple[bool, bool]] = []
    orig = s.mem.translate

    def spy(linear: int, kind: object, user: bool, implicit: bool = False) -> int:
        if GDT <= linear < GDT + 0x1000:
            seen.append((user, implicit))
        return orig(linear, kind, user, implicit)  # type: ignore[arg-type]

    s.mem.translate = spy  # type: ignore[method-assign]
    s.mem.phys.write(GDT + 0x28 + 5, 1, 0xF2)  # DPL 3 data, accessed bit clear
    assert run(s, rax=0x2B).kind == "halted"
    assert len(seen) == 2 and all(acc == (False, True) for acc in seen)  # descriptor read, accessed bit


# -- MOV to CS, interrupt shadow, MOV from segment registers ---------------------------------------

@pytest.mark.parametrize("mode", ["real", "prot16", "prot32", "long64"])
def test_mov_to_cs_is_ud(mode: str) -> None:
    """SDM Vol. 2B MOV: "#UD If attempt is made to load the CS register"."""
    s = machine(mode, "8ec8")
    assert fault(run(s, rax=0x08)) == (Vector.UD, None)


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_mov_ds_leaves_no_shadow(mode: str) -> None:
    s = machine(mode, "8ed8")
    assert run(s, rax=0x10).kind == "halted"
    assert not s.interrupt_shadow


@pytest.mark.parametrize(("mode", "hexcode", "size"), [
    ("real", "8cd8", 16), ("real", "668cd8", 32), ("prot16", "8cd8", 16), ("prot32", "8cd8", 32),
    ("prot32", "668cd8", 16), ("long64", "8cd8", 32), ("long64", "668cd8", 16), ("long64", "488cd8", 64),
])
@given(upper=st.integers(0, (1 << 64) - 1), sel=st.integers(0, 0xFFFF))
@settings(max_examples=25)
def test_mov_from_sreg_register(mode: str, hexcode: str, size: int, upper: int, sel: int) -> None:
    """8C to a register: 16-bit keeps the upper bits; 32-bit zero-extends (SDM Vol. 2B MOV: P6 and later
    fill the high bytes with zeros) and, as any 32-bit write, clears bits 63:32; 64-bit zero-extends."""
    s = machine(mode, hexcode)
    s.seg[DS] = Segment(**{**_fields(s.seg[DS]), "selector": sel})
    assert run(s, rax=upper).kind == "halted"
    if size == 16:
        expected = (upper & ~0xFFFF) | sel
    else:
        expected = sel
    assert reg(s, "rax") == expected


@pytest.mark.parametrize(("mode", "hexcode"), [("real", "8c1f"), ("real", "668c1f"), ("prot32", "8c1b"),
                                               ("prot32", "668c1b"), ("long64", "8c1b"), ("long64", "488c1b")])
def test_mov_from_sreg_memory_is_16_bits(mode: str, hexcode: str) -> None:
    """A memory destination is always 16 bits, whatever the operand size (SDM Vol. 2B MOV)."""
    s = machine(mode, hexcode)
    s.seg[DS] = Segment(**{**_fields(s.seg[DS]), "selector": 0xA5C3})
    s.mem.phys.write(0x2000, 8, 0x1122334455667788)
    assert run(s, rbx=0x2000).kind == "halted"
    assert s.mem.phys.read(0x2000, 8) == 0x1122334455660000 | 0xA5C3


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_mov_sreg_from_memory(mode: str) -> None:
    """8E with a memory source reads 16 bits."""
    s = machine(mode, "8e18" if mode != "real" else "8e1f")
    if mode == "real":
        s.mem.phys.write(0x2000, 4, 0xFFFF0018)
        assert run(s, rbx=0x2000).kind == "halted"
        assert s.seg[DS].selector == 0x18 and s.seg[DS].base == 0x180
        return
    s.mem.phys.write(0x10000, 4, 0xFFFF0018)
    assert run(s, rax=0x10000).kind == "halted"
    assert s.seg[DS].selector == 0x18 and s.seg[DS].base == 0x12345678

