"""Comparing outcomes (difftest/compare.py) and divergence reports (difftest/report.py).

Most tests compare the spec with itself or with a *perturbed* copy of itself: the
fake backend :class:`Perturbed` runs the spec CPU and injects a bug after a chosen
instruction retires (flip RFLAGS bits, write a wrong byte), so a difference is known
to exist -- or known not to -- and where it comes from.  The real Unicorn and KVM
backends appear where their observability matters (KVM tests skip with the backend's
reason when /dev/kvm is unusable).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftest.backend import Capabilities, Outcome, SpecBackend, Stop
from difftest.backends.kvm import KvmBackend
from difftest.backends.unicorn import UnicornBackend
from difftest.case import HLT, Case, Environment, make_case
from difftest.compare import (
    CLASS_ORDER,
    Difference,
    compare,
    compare_all,
    observe,
    paging_tables,
    tabulate,
)
from difftest.report import first_divergence, prefix, render, run_backends
from spec import flags as F
from spec.cpu import SpecCPU
from spec.machine import CODE, DATA, PAGING_BASE, enter_user_mode, flat_machine
from spec.snapshot import GPR_NAMES, PageModel, Snapshot

H = bytes.fromhex
SPEC = SpecBackend()
STATUS = ("CF", "PF", "AF", "ZF", "SF", "OF")
PD = PAGING_BASE + 2 * 0x1000  # flat_machine("long64"): PML4, PDPT, PD (2-MiB pages)


# -- helpers shared with tests/test_difftest_triage.py --------------------------------------------------------

def build_case(mode: str, insns: list[bytes], *, cpl: int = 0, idt: bool = True, regs: dict[str, int] | None = None,
               rflags: int = 2, data: dict[int, bytes] | None = None, name: str = "t",
               edit: Callable[[Snapshot], None] | None = None) -> Case:
    """A case on :func:`spec.machine.flat_machine` (64-bit: 2-MiB identity pages) running ``insns`` + HLT."""
    m = flat_machine(mode, b"".join(insns) + HLT, idt=idt)  # type: ignore[arg-type]
    if cpl == 3:
        enter_user_mode(m)
    for k, v in (regs or {}).items():
        m.gpr[GPR_NAMES.index(k)] = v
    m.write_rflags(rflags)
    for a, raw in (data or {}).items():
        m.mem.phys.write_bytes(a, raw)
    snap = Snapshot.from_state(m)
    if edit is not None:
        edit(snap)
    env = Environment(mode=mode, paging="4-level" if mode == "long64" else "none",  # type: ignore[arg-type]
                      page_size=1 << 21 if mode == "long64" else 4096, cpl=cpl, idt=idt)  # type: ignore[arg-type]
    return make_case(name, env, snap, CODE, insns)


class Perturbed:
    """The spec CPU with an injected bug: after an instruction whose bytes start with ``trigger`` retires,
    XOR ``flip`` into RFLAGS and/or write ``poke`` = (physical address, bytes)."""

    def __init__(self, name: str, executed_by: str, trigger: bytes | None, *, flip: int = 0,
                 poke: tuple[int, bytes] | None = None, deliver: bool = False) -> None:
        self.name, self.executed_by, self.trigger = name, executed_by, trigger
        self.flip, self.poke, self.deliver = flip, poke, deliver

    def capabilities(self) -> Capabilities:
        return Capabilities(delivers_exceptions=self.deliver)

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        m = snap.to_state()
        cpu = SpecCPU(m, deliver_exceptions=self.deliver)
        ev = None
        for _ in range(budget):
            lin = m.rip + (m.seg[1].base if m.code_bits != 64 else 0)
            head = bytes(m.mem.phys.read_bytes(lin, len(self.trigger))) if self.trigger else b""
            ev = cpu.step()
            if ev is not None:
                break
            if self.trigger and head == self.trigger:
                if self.flip:
                    undefined = m.undefined
                    m.write_rflags(m.D.concrete(m.read_rflags()) ^ self.flip)
                    m.undefined = undefined
                if self.poke:
                    m.mem.phys.write_bytes(*self.poke)
        if ev is None:
            stop = Stop(kind="budget", rip=m.rip)
        else:
            kind = "exception" if ev.kind == "fault" else ev.kind
            stop = Stop(kind=kind, rip=ev.rip, vector=ev.vector, error_code=ev.error_code,  # type: ignore[arg-type]
                        cr2=ev.cr2, detail=ev.detail)
        return Outcome(backend=self.name, stop=stop, final=Snapshot.from_state(m), executed_by=self.executed_by)


def renamed(out: Outcome, name: str, **update: object) -> Outcome:
    return out.model_copy(update={"backend": name, **update})


def with_final(out: Outcome, name: str, edit: Callable[[Snapshot], None]) -> Outcome:
    final = out.final.model_copy(deep=True)  # type: ignore[union-attr]
    edit(final)
    return renamed(out, name, final=final)


def poke_page(snap: Snapshot, addr: int, raw: bytes) -> None:
    base = addr & ~0xFFF
    pages = {p.address: p for p in snap.pages}
    data = bytearray(pages[base].to_bytes())
    data[addr - base:addr - base + len(raw)] = raw
    pages[base] = PageModel(address=base, data=bytes(data).hex())
    snap.pages = sorted(pages.values(), key=lambda p: p.address)


def fields(diffs: list[Difference]) -> set[str]:
    return {d.field for d in diffs}


_PROBE = KvmBackend()
KVM_CAPS = _PROBE.capabilities()
_PROBE.close()
needs_kvm = pytest.mark.skipif(not KVM_CAPS.available, reason=f"KVM backend unavailable: {KVM_CAPS.reason}")
KVM = KvmBackend() if KVM_CAPS.available else None  # one reused VM, as a campaign worker has
UNICORN = UnicornBackend()


# -- the spec against itself ----------------------------------------------------------------------------------

ALU = {"real": ["01d8", "c1e003", "f7e3", "29c8"], "prot16": ["01d8", "c1e003", "f7e3", "29c8"],
       "prot32": ["01d8", "c1e003", "f7e3", "29c8", "a300000100"],
       "long64": ["4801d8", "48c1e003", "48f7e3", "4829c8", "48890425" + "00000100"]}


@pytest.mark.parametrize(("mode", "cpl"), [("real", 0), ("prot16", 0), ("prot16", 3), ("prot32", 0), ("prot32", 3),
                                         ("long64", 0), ("long64", 3)])
def test_spec_agrees_with_itself(mode: str, cpl: int) -> None:
    case = build_case(mode, [H(x) for x in ALU[mode]], cpl=cpl, regs={"rax": 0x1234, "rbx": 0x77, "rcx": 5})
    a = SPEC.run(case.snapshot, case.budget)
    assert compare(a, renamed(a, "again"), case) == []
    assert not compare_all([a, renamed(a, "again")], case).diverges


# -- flags: exactly the undefined ones are masked -------------------------------------------------------------

def _modrm(reg: int, rm: int) -> int:
    return 0xC0 | (reg & 7) << 3 | (rm & 7)


@st.composite
def alu64(draw: st.DrawFn) -> bytes:
    """One 64-bit register ALU instruction (RSP untouched); MUL/IMUL/shifts leave flags undefined."""
    r, m = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 7])), draw(st.sampled_from([0, 1, 2, 3, 5, 6, 7]))
    kind = draw(st.sampled_from(["binop", "shift", "mul", "imul2", "inc"]))
    if kind == "binop":  # ADD OR ADC SBB AND SUB XOR CMP
        return bytes([0x48, draw(st.sampled_from([0x01, 0x09, 0x11, 0x19, 0x21, 0x29, 0x31, 0x39])), _modrm(r, m)])
    if kind == "shift":  # SHL SHR SAR by an immediate (AF undefined, OF undefined for counts > 1)
        return bytes([0x48, 0xC1, _modrm(draw(st.sampled_from([4, 5, 7])), m), draw(st.integers(0, 70))])
    if kind == "mul":  # MUL/IMUL r/m64: SF ZF AF PF undefined
        return bytes([0x48, 0xF7, _modrm(draw(st.sampled_from([4, 5])), m)])
    if kind == "imul2":
        return bytes([0x48, 0x0F, 0xAF, _modrm(r, m)])
    return bytes([0x48, 0xFF, _modrm(draw(st.sampled_from([0, 1])), m)])  # INC/DEC: CF kept


@settings(max_examples=40, deadline=None)
@given(insns=st.lists(alu64(), min_size=1, max_size=6), values=st.lists(st.integers(0, (1 << 64) - 1), min_size=4,
                                                                         max_size=4),
       perturb=st.sets(st.sampled_from(STATUS), min_size=1), gpr=st.sampled_from([None, "rax", "rdi"]))
def test_exactly_the_undefined_flags_are_masked(insns: list[bytes], values: list[int], perturb: set[str],
                                                gpr: str | None) -> None:
    case = build_case("long64", insns, regs=dict(zip(("rax", "rcx", "rdx", "rbx"), values, strict=True)))
    a = SPEC.run(case.snapshot, case.budget)
    assert a.final is not None
    flip = sum(1 << F.BY_NAME[n] for n in perturb)

    def edit(s: Snapshot) -> None:
        s.regs.rflags ^= flip
        if gpr:
            setattr(s.regs, gpr, getattr(s.regs, gpr) ^ 0x100)

    b = with_final(a, "perturbed", edit)
    expected = {f"rflags.{n}" for n in perturb if n not in a.final.undefined_flags} | ({gpr} if gpr else set())
    diffs = compare(a, b, case)
    assert fields(diffs) == expected
    assert all(d.values == {"spec": d.values["spec"], "perturbed": d.values["perturbed"]} for d in diffs)
    # Unmasked (no reference mask): every perturbed flag shows.
    assert fields(compare(a, b, case, undefined_flags=())) == {f"rflags.{n}" for n in perturb} | (
        {gpr} if gpr else set())


def test_a_later_write_defines_the_flags_again() -> None:
    """MUL leaves SF/ZF/AF/PF undefined; a following ADD defines all six (SDM Vol. 2B MUL; Vol. 2A ADD)."""
    mul = build_case("long64", [H("48f7e3")], regs={"rax": 0x1234, "rbx": 0x5678})
    mul_add = build_case("long64", [H("48f7e3"), H("4801d8")], regs={"rax": 0x1234, "rbx": 0x5678})
    af = 1 << F.AF
    for case, masked in ((mul, True), (mul_add, False)):
        a = SPEC.run(case.snapshot, case.budget)
        assert a.final is not None
        assert ("AF" in a.final.undefined_flags) == masked
        b = with_final(a, "other", lambda s: setattr(s.regs, "rflags", s.regs.rflags ^ af))
        assert fields(compare(a, b, case)) == (set() if masked else {"rflags.AF"})
    a = SPEC.run(mul.snapshot, mul.budget)
    assert a.final is not None and set(a.final.undefined_flags) == {"PF", "AF", "ZF", "SF"}
    cf = with_final(a, "other", lambda s: setattr(s.regs, "rflags", s.regs.rflags ^ 1))  # CF is defined by MUL
    assert [(d.field, d.cls, d.values) for d in compare(a, cf, mul)] == [
        ("rflags.CF", "flags.CF", {"spec": str(a.final.regs.rflags & 1), "other": str(cf.final.regs.rflags & 1)})]


# -- registers, segments, control registers, memory ----------------------------------------------------------

def test_registers_segments_and_control_registers() -> None:
    case = build_case("long64", [H("4801d8")], regs={"rax": 1, "rbx": 2})
    a = SPEC.run(case.snapshot, case.budget)

    def edit(s: Snapshot) -> None:
        s.regs.r15 = 7
        s.segments.ds.selector = 0x23
        s.control.cr4 |= 1 << 7
        s.efer ^= 1 << 11

    diffs = compare(a, with_final(a, "b", edit), case)
    assert {(d.field, d.cls) for d in diffs} == {("r15", "gpr"), ("ds", "seg"), ("cr4", "cr"), ("efer", "cr")}
    assert next(d for d in diffs if d.field == "r15").values == {"spec": "0x0", "b": "0x7"}


def test_memory_bytes_and_paging_entries_are_named() -> None:
    case = build_case("long64", [H("48890425" + "00000100")], regs={"rax": 0x1122334455667788})
    a = SPEC.run(case.snapshot, case.budget)
    assert a.final is not None
    pde = next(p for p in a.final.pages if p.address == PD).to_bytes()
    entry = int.from_bytes(pde[:8], "little")  # PDE 0 maps 0-2 MiB: the code and stack page, accessed

    def edit(s: Snapshot) -> None:
        poke_page(s, DATA + 3, b"\x00")  # one byte of the stored value
        poke_page(s, DATA + 0x20, b"\x01\x02")  # two more, elsewhere
        poke_page(s, PD, (entry ^ 0x20).to_bytes(8, "little"))  # A bit of PDE 0
        poke_page(s, PD + 8, (int.from_bytes(pde[8:16], "little") ^ 0x40).to_bytes(8, "little"))  # D of PDE 1
        poke_page(s, PD + 16, (int.from_bytes(pde[16:24], "little") ^ 0x2).to_bytes(8, "little"))  # R/W of PDE 2

    diffs = {d.field: d for d in compare(a, with_final(a, "b", edit), case)}
    assert set(diffs) == {f"mem[{DATA + 3:#x}]", f"mem[{DATA + 0x20:#x}..{DATA + 0x21:#x}]", f"pte[{PD:#x}].A",
                          f"pte[{PD + 8:#x}].D", f"pte[{PD + 16:#x}]"}
    assert diffs[f"mem[{DATA + 3:#x}]"].values == {"spec": "55", "b": "00"}
    assert diffs[f"pte[{PD:#x}].A"].cls == "pte.A" and diffs[f"pte[{PD:#x}].A"].values == {"spec": "1", "b": "0"}
    assert diffs[f"pte[{PD + 8:#x}].D"].cls == "pte.D"
    assert "PDE #1" in diffs[f"pte[{PD + 8:#x}].D"].note and "2 MiB" in diffs[f"pte[{PD + 8:#x}].D"].note
    assert diffs[f"pte[{PD + 16:#x}]"].cls == "pte"


def test_paging_tables_of_flat_long64() -> None:
    tables = paging_tables(build_case("long64", []).snapshot)
    assert [(t.address, t.level, t.level_name) for t in tables] == [
        (PAGING_BASE, 4, "PML4E"), (PAGING_BASE + 0x1000, 3, "PDPTE"), (PD, 2, "PDE")]
    assert paging_tables(build_case("prot32", []).snapshot) == []


def test_only_the_cases_pages_are_compared() -> None:
    case = build_case("long64", [H("90")])
    a = SPEC.run(case.snapshot, case.budget)

    def extra(s: Snapshot) -> None:
        s.pages = sorted([*s.pages, PageModel(address=0x900000, data="ff")], key=lambda p: p.address)

    assert compare(a, with_final(a, "b", extra), case) == []

    def missing(s: Snapshot) -> None:
        s.pages = [p for p in s.pages if p.address != DATA]

    assert compare(a, with_final(a, "b", missing), case) == []  # not reported: not observed

    def changed(s: Snapshot) -> None:
        poke_page(s, DATA + 0xFFF, b"\x01")

    assert fields(compare(a, with_final(a, "b", changed), case)) == {f"mem[{DATA + 0xFFF:#x}]"}


# -- the stop event ---------------------------------------------------------------------------------------------

def test_stop_fields_and_error_codes() -> None:
    case = build_case("long64", [H("0f0b")])
    a = SPEC.run(case.snapshot, case.budget)
    assert (a.stop.kind, a.stop.vector) == ("exception", 6)
    other = renamed(a, "b", stop=a.stop.model_copy(update={"vector": 13, "error_code": 0}))
    assert {(d.field, tuple(d.values.values())) for d in compare(a, other, case)} == {("stop.vector", ("0x6", "0xd"))}
    # an error code only one side reports is not compared ...
    gp = build_case("long64", [H("488b03")], regs={"rbx": 1 << 63})  # non-canonical: #GP(0)
    g = SPEC.run(gp.snapshot, gp.budget)
    assert (g.stop.vector, g.stop.error_code) == (13, 0)
    blind = renamed(g, "unicorn-like", stop=g.stop.model_copy(update={"error_code": None}))
    assert compare(g, blind, gp) == []
    # ... unless both backends' capabilities say they report one
    caps = {"spec": Capabilities(), "unicorn-like": Capabilities()}
    assert fields(compare(g, blind, gp, capabilities=caps)) == {"stop.error_code"}
    wrong = renamed(g, "b", stop=g.stop.model_copy(update={"error_code": 8}))
    assert fields(compare(g, wrong, gp)) == {"stop.error_code"}
    rip = renamed(g, "b", stop=g.stop.model_copy(update={"rip": g.stop.rip + 1}))
    assert fields(compare(g, rip, gp)) == {"stop.rip"}


def test_cr2_on_page_faults() -> None:
    def unmap(s: Snapshot) -> None:
        poke_page(s, PD + 16, bytes(8))  # PDE 2 (4-6 MiB) not present

    case = build_case("long64", [H("488b042510004000")], edit=unmap)  # mov rax,[0x400010]
    a = SPEC.run(case.snapshot, case.budget)
    assert (a.stop.vector, a.stop.cr2) == (14, 0x400010)
    b = renamed(a, "b", stop=a.stop.model_copy(update={"cr2": 0x400000}))
    assert [(d.field, d.cls) for d in compare(a, b, case)] == [("cr2", "cr2")]


def test_incomparable_outcomes_are_never_divergences() -> None:
    case = build_case("long64", [H("4801d8")])
    a = SPEC.run(case.snapshot, case.budget)
    for kind in ("unsupported", "unimplemented"):
        gap = Outcome(backend="b", stop=Stop(kind=kind, rip=0x1000, detail="x"), final=None, executed_by="x")
        assert compare(a, gap, case) == [] and compare(gap, a, case) == []
        comp = compare_all([a, gap, renamed(a, "c")], case)
        assert not comp.diverges and comp.incomparable == {"b": f"{kind}: x"} and comp.backends == ("spec", "c")


def test_time_bounded_budget_compares_only_the_kind() -> None:
    case = build_case("long64", [H("ebfe")])  # jmp $
    a = SPEC.run(case.snapshot, 7)
    assert a.stop.kind == "budget"
    kvm_like = with_final(a, "kvm", lambda s: setattr(s.regs, "rax", 99))
    kvm_like = kvm_like.model_copy(update={"executed_by": "hardware"})
    assert compare(a, kvm_like, case) == []  # both ran out of budget: no comparable point
    exact = with_final(a, "uni", lambda s: setattr(s.regs, "rax", 99)).model_copy(update={"executed_by": "qemu-tcg"})
    assert fields(compare(a, exact, case)) == {"rax"}  # instruction-exact budgets are comparable
    halted = renamed(a, "kvm", stop=Stop(kind="halted", rip=0x1003), executed_by="hardware")
    assert fields(compare(a, halted, case)) == {"stop.kind"}


def test_duplicate_backend_names_are_rejected() -> None:
    case = build_case("long64", [H("90")])
    a = SPEC.run(case.snapshot, case.budget)
    with pytest.raises(ValueError, match="same backend"):
        compare(a, a, case)
    with pytest.raises(ValueError, match="twice"):
        compare_all([a, a], case)


# -- delivery: frames, the terminating HLT, shutdown ----------------------------------------------------------

DELIVER = Perturbed("spec-deliver", "spec", None, deliver=True)


@pytest.mark.parametrize(("mode", "code", "cpl", "vector"), [
    ("long64", "0f0b", 0, 6), ("long64", "0f0b", 3, 6), ("prot32", "0f0b", 0, 6), ("prot32", "0f0b", 3, 6),
    ("real", "0f0b", 0, 6), ("long64", "31c9f7f1", 3, 0),
    ("long64", "488b042510004000", 0, 14), ("long64", "488b042510004000", 3, 14),
    ("long64", "4801d8", 3, None),  # ends in #GP(0) at the terminating HLT: the event "end"
])
def test_delivering_and_stopping_backends_compare_at_the_exception(mode: str, code: str, cpl: int,
                                                                    vector: int | None) -> None:
    """The spec with and without delivery agree: the frame gives back RIP, CS, RFLAGS, RSP, SS; the frame's
    bytes and the accessed/dirty bits only the delivery set are not compared.  A real difference still shows."""
    def unmap(s: Snapshot) -> None:
        if s.control.cr0 >> 31:
            poke_page(s, PD + 16, bytes(8))

    case = build_case(mode, [H(code)], cpl=cpl, regs={"rax": 0xAB, "rbx": 5, "rsp": 0x7F00}, rflags=0x2 | 1,
                      edit=unmap)
    stopped = SPEC.run(case.snapshot, case.budget)
    delivered = DELIVER.run(case.snapshot, case.budget)
    ev = observe(delivered, case)
    assert ev.delivered and ev.frame is not None
    assert ev.kind == ("end" if vector is None else "exception") and ev.vector == vector
    assert compare(stopped, delivered, case) == []
    assert compare(delivered, stopped, case) == []
    assert observe(stopped, case).kind == ev.kind
    bad = with_final(delivered, "bad", lambda s: setattr(s.regs, "rdx", 1))
    assert fields(compare(stopped, bad, case)) == {"rdx"}
    stack = with_final(stopped, "bad", lambda s: poke_page(s, 0x7000, b"\x99"))
    assert fields(compare(delivered, stack, case)) == {"mem[0x7000]"}


def test_halting_at_the_terminator_at_cpl3_is_the_end() -> None:
    """Unicorn once halted at the terminating HLT at CPL 3 instead of #GP(0): both mean "ran to the end"."""
    case = build_case("long64", [H("4801d8")], cpl=3)
    a = SPEC.run(case.snapshot, case.budget)
    assert observe(a, case).kind == "end"
    halted = renamed(a, "uni", stop=Stop(kind="halted", rip=0x1004))
    assert observe(halted, case).kind == "end"
    assert compare(a, halted, case) == []
    inner = build_case("long64", [H("f4"), H("90")], cpl=3)  # a HLT of the code itself is compared strictly
    b = SPEC.run(inner.snapshot, inner.budget)
    assert observe(b, inner).kind == "exception"
    assert fields(compare(b, renamed(b, "uni", stop=Stop(kind="halted", rip=0x1001)), inner)) >= {"stop.kind"}


def test_shutdown_without_idt_matches_the_stopped_exception() -> None:
    """KVM cannot deliver without an IDT and shuts down (vector unknown, RF set): compared on RIP/CR2/state."""
    case = build_case("long64", [H("0f0b")], idt=False)
    a = SPEC.run(case.snapshot, case.budget)
    kvm_like = with_final(a, "kvm", lambda s: setattr(s.regs, "rflags", s.regs.rflags | 1 << F.RF))
    kvm_like = kvm_like.model_copy(update={"stop": Stop(kind="shutdown", rip=a.stop.rip), "executed_by": "hardware"})
    assert compare(a, kvm_like, case) == []
    moved = kvm_like.model_copy(update={"stop": Stop(kind="shutdown", rip=a.stop.rip + 2)})
    assert fields(compare(a, moved, case)) == {"stop.rip"}


# -- pairs and rows -----------------------------------------------------------------------------------------------

def test_tabulate_finds_the_dissenter_and_marks_undefined_rows() -> None:
    case = build_case("long64", [H("48c1e003")], regs={"rax": 0x1234})  # SHL: AF undefined
    spec = SPEC.run(case.snapshot, case.budget)
    af, cf = 1 << F.AF, 1 << F.CF
    uni = with_final(spec, "unicorn", lambda s: setattr(s.regs, "rflags", s.regs.rflags ^ af ^ cf))
    kvm = renamed(spec, "kvm", executed_by="hardware")
    comp = compare_all([uni, kvm, spec], case)
    assert comp.backends == ("spec", "kvm", "unicorn")  # the reference first
    assert set(comp.pairs) == {"spec~unicorn", "kvm~unicorn"}
    rows = {r.field: r for r in comp.rows}
    assert rows["rflags.CF"].dissenters == ("unicorn",) and not rows["rflags.CF"].undefined
    assert rows["rflags.AF"].undefined and rows["rflags.AF"].dissenters == ("kvm", "unicorn")
    assert "spec" not in rows["rflags.AF"].values  # masked for the spec
    assert [r.field for r in comp.rows] == ["rflags.CF", "rflags.AF"]  # defined rows first
    assert comp.headline() is comp.rows[0]
    two = tabulate(compare(spec, uni, case))
    assert [r.dissenters for r in two] == [("spec", "unicorn")]  # two backends: a tie


def test_class_order_starts_with_the_stop() -> None:
    assert CLASS_ORDER[:4] == ("stop.kind", "stop.vector", "stop.error_code", "stop.rip")
    assert CLASS_ORDER.index("gpr") < CLASS_ORDER.index("flags.CF") < CLASS_ORDER.index("mem")


# -- bisection and rendering --------------------------------------------------------------------------------------

CHAIN = ["4801d8", "4811c8", "4829d1", "48c1e003", "4811d8", "4831f6", "4801c1"]  # add adc sub shl adc xor add


@pytest.mark.parametrize("at", [0, 2, 4, 6])
def test_bisection_finds_the_injected_instruction(at: int) -> None:
    insns = [H(x) for x in CHAIN]
    case = build_case("long64", insns, regs={"rax": 0xFFFF_FFFF_FFFF_FFF0, "rbx": 0x7F, "rcx": 3, "rdx": 9})
    # A CF flip after instruction `at` (SUB at 2 is followed by SHL, which overwrites CF: the divergence
    # disappears from the final state -- the bisection still finds prefix at+1 diverging, prefix at not).
    fake = Perturbed("fake", "qemu-tcg", insns[at], flip=1)
    backends = [SPEC, fake]
    diverges = compare_all(run_backends(case, backends), case).diverges
    if not diverges:
        with pytest.raises(ValueError, match="does not diverge"):
            first_divergence(case, backends)
        assert compare_all(run_backends(prefix(case, at + 1), backends), prefix(case, at + 1)).diverges
        return
    first = insns.index(insns[at])  # identical earlier bytes trigger the bug earlier
    assert first_divergence(case, backends) == first


def test_bisection_reports_the_environment_and_needs_a_predicate() -> None:
    case = build_case("long64", [H("90"), H("90")])
    env_bug = Perturbed("fake", "qemu-tcg", HLT, poke=(DATA, b"\x01"))
    env_bug.run = _poke_always(env_bug)  # type: ignore[method-assign]
    assert first_divergence(case, [SPEC, env_bug]) == -1
    with pytest.raises(ValueError, match="backends or a diverges"):
        first_divergence(case)
    assert first_divergence(case, diverges=lambda c: len(c.insn_offsets) >= 2) == 1


def _poke_always(b: Perturbed) -> Callable[[Snapshot, int], Outcome]:
    inner = Perturbed.run

    def run(snap: Snapshot, budget: int) -> Outcome:
        out = inner(b, snap, budget)
        return with_final(out, b.name, lambda s: poke_page(s, DATA, b"\x01"))

    return run


def test_render_shows_disassembly_and_values_side_by_side() -> None:
    insns = [H(x) for x in CHAIN[:2]]  # add, adc: a CF flip after the ADC stays visible
    case = build_case("long64", insns, regs={"rax": 1})
    backends = [SPEC, Perturbed("fake", "qemu-tcg", insns[1], flip=1), Perturbed("kvm", "hardware", None)]
    outs = run_backends(case, backends)
    comp = compare_all(outs, case)
    text = render(case, outs, comp, index=1)
    lines = text.splitlines()
    assert any(line.startswith("=>") and "adc rax,rcx" in line for line in lines)
    assert "first divergence: instruction 1" in text and "long64/4-level/2M/cpl0" in text
    row = next(line for line in lines if "rflags.CF" in line)
    assert "0" in row and "1 *" in row  # the dissenter is starred
    assert all(b.name in text for b in backends)
    assert "no differences" in render(case, outs[:1], [])


# -- the real backends ---------------------------------------------------------------------------------------------

@needs_kvm
@pytest.mark.parametrize("cpl", [0, 3])
@settings(max_examples=8, deadline=None)
@given(insns=st.lists(alu64(), min_size=1, max_size=6), values=st.lists(st.integers(0, (1 << 64) - 1), min_size=4,
                                                                         max_size=4))
def test_spec_unicorn_kvm_differ_only_in_undefined_flags(cpl: int, insns: list[bytes], values: list[int]) -> None:
    """ORACLES.md: on ALU sequences Unicorn and KVM (emulator at CPL 0, hardware at CPL 3) disagree only in
    flags the spec leaves undefined -- at CPL 3 compared through KVM's delivered #GP frame at the final HLT."""
    assert KVM is not None
    case = build_case("long64", insns, cpl=cpl, regs=dict(zip(("rax", "rcx", "rdx", "rbx"), values, strict=True)))
    comp = compare_all(run_backends(case, [SPEC, UNICORN, KVM]), case)
    assert not comp.incomparable
    assert all(r.undefined for r in comp.rows), [(r.field, r.values) for r in comp.rows]
