"""Guest programs for the shadow-paging tests: a tiny assembler, generated cases, the equivalence check.

Used by tests/test_equivalence*.py, tests/test_shadow_statemachine.py and
tests/test_shadow_mutations.py (pytest puts this directory on ``sys.path``).

:class:`Asm` encodes the handful of instructions the generated guests use, for 16-,
32- and 64-bit code (absolute 32-bit addresses; in 16-bit code with the operand- and
address-size prefixes).  Its encodings are checked against iced-x86 below.

:func:`programs` is a hypothesis strategy of guest programs over one
:class:`~difftest.case.Environment`'s layout (:mod:`difftest.layout`): loads, stores,
calls into data pages (instruction fetches), software interrupts (INT3, INT 80h, INT1, whose
delivery reads the IDT, GDT and TSS and pushes a frame), and at CPL 0 page-table edits -- present,
R/W, U/S, XD, accessed/dirty cleared, a frame remapped -- each followed by the
invalidation the architecture asks for (INVLPG of the page, or a CR3 reload; SDM Vol.
3A 4.10.4), CR0.WP toggles, SMEP/SMAP toggles and paging switched off and on.  A guest
page fault ends the program in the handler stub (``HLT``) with its frame on the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from difftest.backend import Outcome, SpecBackend
from difftest.backends.refvmm import RefvmmBackend
from difftest.builders import build
from difftest.case import Case, Environment
from difftest.compare import compare
from difftest.layout import ENVIRONMENTS, Layout, layout
from spec.paging import ACCESSED, DIRTY, PS, RW, US, XD
from spec.paging import P as PRESENT

CR0_WP, CR0_PG = 1 << 16, 1 << 31
CR4_SMEP, CR4_SMAP = 1 << 20, 1 << 21
M32 = 0xFFFF_FFFF


class Asm:
    """Encodings for ``bits``-bit code (SDM Vol. 2 opcode tables; addresses are 32-bit absolute)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.o32 = b"\x66" if bits == 16 else b""  # 32-bit operand in 16-bit code
        self.a32 = b"\x67" if bits == 16 else b""  # 32-bit address in 16-bit code

    def _mem(self, reg: int, addr: int) -> bytes:
        """ModRM (+SIB) + disp32 for [addr]: mod 00 r/m 101 (disp32), in 64-bit mode via SIB (no RIP-relative)."""
        if self.bits == 64:
            return bytes([reg << 3 | 4, 0x25]) + (addr & M32).to_bytes(4, "little")
        return bytes([reg << 3 | 5]) + (addr & M32).to_bytes(4, "little")

    def load(self, addr: int) -> bytes:  # mov eax, [addr]
        return self.o32 + self.a32 + b"\x8b" + self._mem(0, addr)

    def load_byte(self, addr: int) -> bytes:  # mov al, [addr]
        return self.a32 + b"\x8a" + self._mem(0, addr)

    def store(self, addr: int, value: int) -> bytes:  # mov dword [addr], imm32
        return self.o32 + self.a32 + b"\xc7" + self._mem(0, addr) + (value & M32).to_bytes(4, "little")

    def store_byte(self, addr: int, value: int) -> bytes:  # mov byte [addr], imm8
        return self.a32 + b"\xc6" + self._mem(0, addr) + bytes([value & 0xFF])

    def store_eax(self, addr: int) -> bytes:  # mov [addr], eax
        return self.o32 + self.a32 + b"\x89" + self._mem(0, addr)

    def invlpg(self, addr: int) -> bytes:
        return self.a32 + b"\x0f\x01" + self._mem(7, addr)

    def mov_eax(self, value: int) -> bytes:  # mov eax, imm32
        return self.o32 + b"\xb8" + (value & M32).to_bytes(4, "little")

    def read_cr(self, n: int) -> bytes:  # mov eax/rax, crN
        return bytes([0x0F, 0x20, 0xC0 | n << 3])

    def write_cr(self, n: int) -> bytes:  # mov crN, eax/rax
        return bytes([0x0F, 0x22, 0xC0 | n << 3])

    def or_eax(self, value: int) -> bytes:
        return self.o32 + b"\x0d" + (value & M32).to_bytes(4, "little")

    def and_eax(self, value: int) -> bytes:
        return self.o32 + b"\x25" + (value & M32).to_bytes(4, "little")

    def call_eax(self) -> bytes:  # call ax / eax / rax (near, absolute indirect; the operand size of the code)
        return b"\xff\xd0"

    ret = b"\xc3"

    # -- compound operations ---------------------------------------------------------------------------
    def reload_cr3(self) -> bytes:
        return self.read_cr(3) + self.write_cr(3)

    def set_cr(self, n: int, bit: int, on: bool) -> bytes:
        return self.read_cr(n) + (self.or_eax(bit) if on else self.and_eax(~bit & M32)) + self.write_cr(n)

    def write_entry(self, addr: int, value: int, size: int) -> list[bytes]:
        """Store a paging-structure entry (an 8-byte one as two dword stores, low half first)."""
        out = [self.store(addr, value & M32)]
        if size == 8:
            out.append(self.store(addr + 4, value >> 32))
        return out

    def execute(self, addr: int) -> list[bytes]:
        """Put a RET at ``addr`` and call it: a data write, then an instruction fetch from that page."""
        ret = self.ret
        insns = [self.store_byte(addr + k, b) for k, b in enumerate(ret)]
        return [*insns, self.mov_eax(addr), self.call_eax()]


_FMT = Formatter(FormatterSyntax.INTEL)


def disassemble(code: bytes, bits: int) -> list[str]:
    return [_FMT.format(i) for i in Decoder(bits, code, ip=0x1000)]


def test_asm_encodings_disassemble_as_meant() -> None:
    """Each encoding is one instruction and iced-x86 reads it as intended (16-, 32- and 64-bit code)."""
    for bits in (16, 32, 64):
        a = Asm(bits)
        r = "rax" if bits == 64 else "eax"
        expect = {
            a.load(0x8004): "mov eax,[8004h]", a.store(0x9000, 0x12345678): "mov dword ptr [9000h],12345678h",
            a.store_byte(0x8000, 0xC3): "mov byte ptr [8000h],0C3h", a.invlpg(0x8000): "invlpg [8000h]",
            a.read_cr(3): f"mov {r},cr3", a.write_cr(0): f"mov cr0,{r}", a.mov_eax(7): "mov eax,7",
            a.call_eax(): f"call {dict([(16, 'ax'), (32, 'eax'), (64, 'rax')])[bits]}", a.ret: "ret",
            a.store_eax(0x8008): "mov [8008h],eax", a.load_byte(0x8001): "mov al,[8001h]",
        }
        for code, text in expect.items():
            got = disassemble(code, bits)
            norm = [g.replace("ds:", "").replace("dword ptr ", "") if "mov eax" in g or "],eax" in g else g
                    for g in got]
            assert len(got) == 1 and (norm[0] == text or got[0] == text), (bits, code.hex(), got, text)


# -- generated programs -------------------------------------------------------------------------------------

@dataclass
class Program:
    """A guest program and what it was made of (for messages)."""

    env: Environment
    insns: list[bytes] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    pte_edits: dict[int, int] = field(default_factory=dict)  # initial corruptions, before the run

    def case(self, name: str = "shadow") -> Case:
        return build(self.env, self.insns, pte_edits=self.pte_edits or None, name=name,
                     budget=8 * len(self.insns) + 64)


PAGING_ENVS = [e for e in ENVIRONMENTS if e.paging != "none"]
FLAT_ENVS = [e for e in ENVIRONMENTS if e.paging == "none"]


def _targets(lay: Layout) -> list[int]:
    """Linear addresses the programs touch: data pages, the unmapped page, a page-crossing dword."""
    d0, d1 = lay.data
    return [d0, d0 + 0x10, d1 + 0x20, lay.unmapped + 8, d0 + 0xFFE if d1 == d0 + 0x1000 else d1 + 0x30]


@st.composite
def programs(draw: st.DrawFn, env: Environment, *, max_ops: int = 6) -> Program:
    """A random guest program for ``env`` (module docstring)."""
    lay = layout(env)
    bits = env.bits
    a = Asm(bits)
    prog = Program(env)
    targets = _targets(lay)
    entries = dict(lay.entries)  # entry address -> current value, as the program edits them
    paging = lay.paging
    cpl0 = env.cpl == 0
    cr0_wp = True
    eb = lay.entry_bytes
    wide = eb == 8
    kinds = ["load", "store", "exec", "load", "store", "int"]
    if paging and cpl0:
        kinds += ["edit", "edit", "edit", "wp", "cr4"]
        if env.mode != "long64":
            kinds.append("pg")
    if paging and not cpl0:
        prog.pte_edits = draw(st.dictionaries(st.sampled_from(sorted({lay.leaf_entry(t) for t in targets})),
                                              st.sampled_from([0, 1]), max_size=2))
        for addr, kind in list(prog.pte_edits.items()):
            value = entries.get(addr, 0)
            prog.pte_edits[addr] = value & ~RW if kind else (value | PRESENT | RW | US | lay.data[0])
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(kinds))
        target = draw(st.sampled_from(targets))
        if kind == "load":
            prog.insns.append(a.load(target))
            prog.steps.append(f"load {target:#x}")
        elif kind == "store":
            value = draw(st.sampled_from([0, 0xC3, 0xDEADBEEF, 0x1234]))
            prog.insns.append(a.store(target, value))
            prog.steps.append(f"store {target:#x}")
        elif kind == "int":  # a software interrupt: its delivery touches the IDT, GDT, TSS and stack pages
            code = draw(st.sampled_from([b"\xcc", b"\xcd\x80", b"\xf1"]))  # INT3, INT 80h, INT1
            prog.insns.append(code)
            prog.steps.append(f"int ({code.hex()})")
        elif kind == "exec":
            prog.insns.extend(a.execute(target & ~0xF))
            prog.steps.append(f"exec {target & ~0xF:#x}")
        elif kind == "edit":
            addr = lay.leaf_entry(target)
            old = entries.get(addr, 0)
            change = draw(st.sampled_from(["P", "RW", "US", "A", "D", "XD", "remap", "map"]))
            if change == "XD" and not wide:
                change = "RW"
            bit = {"P": PRESENT, "RW": RW, "US": US, "A": ACCESSED, "D": DIRTY, "XD": XD}.get(change)
            if bit is not None:
                new = old ^ bit if change not in ("A", "D") else old & ~bit
            else:
                large = old & PS if eb == 8 else 0
                frame = lay.data[draw(st.integers(0, 1))]
                if large:
                    frame = lay.data[0]
                new = (old & ~0x000F_FFFF_FFFF_F000) | (frame & ~0xFFF) if change == "remap" else \
                    (frame | PRESENT | RW | (US if env.cpl == 3 else 0) | large)
            entries[addr] = new
            prog.insns.extend(a.write_entry(addr, new, eb))
            how = draw(st.sampled_from(["invlpg", "cr3"]))
            prog.insns.append(a.invlpg(target) if how == "invlpg" else a.reload_cr3())
            prog.steps.append(f"edit {change} of {target:#x} ({old:#x} -> {new:#x}), {how}")
        elif kind == "wp":
            cr0_wp = not cr0_wp
            prog.insns.append(a.set_cr(0, CR0_WP, cr0_wp))
            prog.steps.append(f"CR0.WP={int(cr0_wp)}")
        elif kind == "cr4":
            bit = draw(st.sampled_from([CR4_SMEP, CR4_SMAP]))
            on = draw(st.booleans())
            prog.insns.append(a.set_cr(4, bit, on))
            prog.steps.append(f"CR4.{'SMEP' if bit == CR4_SMEP else 'SMAP'}={int(on)}")
        else:  # paging off, one access, paging on (the PDPTEs reload with PAE, SDM 4.4.1)
            prog.insns.append(a.set_cr(0, CR0_PG, False))
            prog.insns.append(a.load(target))
            prog.insns.append(a.set_cr(0, CR0_PG, True))
            prog.steps.append(f"paging off, load {target:#x}, paging on")
    return prog


# -- running and comparing --------------------------------------------------------------------------------

REFERENCE = SpecBackend(deliver_exceptions=True)
REFERENCE.name = "spec-delivering"


def run_case(case: Case, backend: RefvmmBackend) -> tuple[Outcome, Outcome]:
    ref = REFERENCE.run(case.snapshot, case.budget)
    out = backend.run(case.snapshot, case.budget)
    return ref, out


def differences(case: Case, ref: Outcome, out: Outcome) -> list[str]:
    """What ``out`` gets wrong against the delivering spec: difftest's comparison, CR2 and the stop detail."""
    diffs = [f"{d.field}: {d.values}" for d in compare(ref, out, case)]
    if ref.final is not None and out.final is not None and ref.final.control.cr2 != out.final.control.cr2:
        diffs.append(f"cr2: spec {ref.final.control.cr2:#x} vs {out.final.control.cr2:#x}")
    if out.stop.detail.startswith("refvmm error"):
        diffs.append(out.stop.detail)
    return diffs


def check_equivalent(prog: Program, backend: RefvmmBackend) -> None:
    case = prog.case()
    ref, out = run_case(case, backend)
    assert ref.stop.kind != "unimplemented", ref.stop.detail
    diffs = differences(case, ref, out)
    assert not diffs, (f"{backend.name} diverges from the bare spec in {prog.env.label()}:\n  "
                       + "\n  ".join(prog.steps) + f"\nspec stop: {ref.stop}\n{backend.name} stop: {out.stop}\n"
                       + "\n".join(diffs))
