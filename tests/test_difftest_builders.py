"""The difftest environments and case builder (difftest/layout.py, difftest/builders.py).

Structure: every environment's snapshot describes as its environment, its GDT
descriptors match the segment caches, its IDT/IVT points every vector at the
``install_idt`` HLT stub, its TSS holds the ring-0 stack, and -- checked with
the spec's own page walker -- its page tables identity-map code, stack, data and
the paging structures with the rights the layout promises, leave ``unmapped``
not present, and ``leaf_entry`` names the entry that maps an address.

End to end: in every environment a short ALU/store/load sequence halts (or, at
CPL 3, takes #GP on the final HLT) with the same final state on the spec, on
Unicorn and on KVM where they can run it; ``unmapped`` gives #PF with the right
CR2 and error code, delivered to the handler stub with the frame on the kernel
stack; a privileged instruction at CPL 3 gives #GP(0).

Measured facts of this machine's KVM (kvm_pvm) the KVM tests record rather than
hide: no PDPE1GB in the guest CPUID (1 GiB pages: reserved-bit #PF, then a triple
fault), no 32-bit/PAE paging (refused), and exception delivery through a 16-bit
interrupt gate pushes a 32-bit frame (the SDM's INT n pseudo-code pushes 16-bit
values), so prot16 exception frames differ.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftest.backend import Outcome, SpecBackend, describe
from difftest.backends.kvm import KvmBackend, stub_exception
from difftest.backends.unicorn import UnicornBackend
from difftest.builders import build, machine, template
from difftest.case import Case, Environment
from difftest.layout import ENVIRONMENTS, LARGE_1G, Layout, layout
from spec.domain.concrete import CONCRETE as D
from spec.faults import HAS_ERROR_CODE
from spec.machine import HANDLER_STRIDE, HANDLERS, USER_VECTORS
from spec.memory import PAGE, AccessKind
from spec.paging import PF_P, PF_U, PF_W, Access, PagingControl, paging_mode, walk
from spec.snapshot import GPR_NAMES, Snapshot

SPEC = SpecBackend()
SPEC_DELIVER = SpecBackend(deliver_exceptions=True)
UNICORN = UnicornBackend()
KVM = KvmBackend(mem_limit=2 << 30)  # the 1 GiB-page environments keep data at 1 GiB
STATUS_BITS = {"CF": 0, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "OF": 11}
IDS = [e.label() for e in ENVIRONMENTS]
PAGING_ENVS = [e for e in ENVIRONMENTS if e.paging != "none"]
USER_ENVS = [e for e in ENVIRONMENTS if e.cpl == 3]


def kvm_available() -> str | None:
    caps = KVM.capabilities()
    return None if caps.available else caps.reason


# -- helpers -------------------------------------------------------------------------------

def pages_of(snap: Snapshot) -> dict[int, bytes]:
    return {p.address: p.to_bytes() for p in snap.pages}


def read(snap: Snapshot, addr: int, n: int) -> int:
    """Physical memory of a snapshot (= linear memory in these identity-mapped machines)."""
    pages = pages_of(snap)
    raw = bytes(pages[(addr + k) & ~(PAGE - 1)][(addr + k) % PAGE] for k in range(n))
    return int.from_bytes(raw, "little")


def control(snap: Snapshot) -> PagingControl:
    c = snap.control
    return PagingControl(cr0=c.cr0, cr3=c.cr3, cr4=c.cr4, efer=snap.efer, pdptes=tuple(snap.pdptes))


def walk_of(snap: Snapshot, linear: int, kind: AccessKind = AccessKind.READ, cpl: int = 0):
    mode = paging_mode(snap.control.cr0, snap.control.cr4, snap.efer)
    assert mode is not None
    phys = snap.to_state().mem.phys  # a copy: the walk sets accessed bits
    return walk(D, phys, mode, control(snap), linear, Access(kind, cpl))


def width(env: Environment) -> int:
    return {16: 2, 32: 4, 64: 8}[env.bits]


def mov_imm(env: Environment, reg: int, value: int) -> bytes:
    """MOV r, imm (B8+r; REX.W in 64-bit mode)."""
    w = width(env)
    return (b"\x48" if w == 8 else b"") + bytes([0xB8 + reg]) + value.to_bytes(w, "little")


def mem_op(env: Environment, opcode: int, reg: int, base: int) -> bytes:
    """``opcode reg, [base]`` (or ``[base], reg``) with a register base: BX in 16-bit code."""
    if env.bits == 16:
        assert base == 3, "16-bit addressing: [bx] only here"
        return bytes([opcode, reg << 3 | 7])
    return (b"\x48" if env.bits == 64 else b"") + bytes([opcode, reg << 3 | base])


def alu_sequence(env: Environment) -> list[bytes]:
    """ALU ops, a store to data[0] + 8, a load back, a push: RAX, RBX, RCX, RDX, RSI and memory change."""
    lay = layout(env)
    addr = lay.data[0] + 8
    rex = b"\x48" if env.bits == 64 else b""
    return [mov_imm(env, 0, 0x7FF1), rex + b"\x01\xd8",  # mov ax, imm; add ax, bx
            mov_imm(env, 3, addr),  # mov bx, data
            mem_op(env, 0x89, 0, 3),  # mov [bx], ax
            mem_op(env, 0x8B, 1, 3),  # mov cx, [bx]
            rex + b"\x31\xca", rex + b"\xf7\xd6",  # xor dx, cx; not si
            b"\x50"]  # push ax


def assert_same_state(a: Outcome, b: Outcome) -> None:
    """Registers, RIP, RFLAGS (minus the spec's undefined flags) and every page agree."""
    assert a.final is not None and b.final is not None, (a.stop, b.stop)
    spec_final = a.final if a.backend == "spec" else b.final
    undef = sum(1 << STATUS_BITS[f] for f in spec_final.undefined_flags)
    for name in GPR_NAMES:
        assert getattr(a.final.regs, name) == getattr(b.final.regs, name), name
    assert a.final.regs.rip == b.final.regs.rip
    assert a.final.regs.rflags & ~undef == b.final.regs.rflags & ~undef
    pa, pb = pages_of(a.final), pages_of(b.final)
    assert pa.keys() == pb.keys()
    differ = [hex(k) for k in pa if pa[k] != pb[k]]
    assert not differ, f"pages differ: {differ}"


def same_stop(a: Outcome, b: Outcome, *, error_code: bool) -> None:
    sa, sb = a.stop, b.stop
    assert (sa.kind, sa.rip, sa.vector) == (sb.kind, sb.rip, sb.vector), (sa, sb)
    if sa.vector == 14:
        assert sa.cr2 == sb.cr2
    if error_code:
        assert sa.error_code == sb.error_code


# -- structure -------------------------------------------------------------------------------

def test_environment_list_covers_the_brief() -> None:
    labels = set(IDS)
    for want in ("real/cpl0", "prot16/cpl0", "prot16/cpl3", "prot32/cpl0", "prot32/cpl3",
                 "prot32/32-bit/4K/cpl0", "prot32/PAE/4K/cpl3", "prot32/PAE/2M/cpl0",
                 "long64/4-level/4K/cpl3", "long64/4-level/2M/cpl0", "long64/4-level/1G/cpl3"):
        assert want in labels
    assert len(labels) == len(ENVIRONMENTS) == 17
    for env in ENVIRONMENTS:
        if env.mode != "real":
            assert env.model_copy(update={"cpl": 3 - env.cpl}).label() in labels


def test_unsupported_environment_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        layout(Environment(mode="prot16", paging="32-bit"))
    with pytest.raises(ValueError, match="not supported"):
        build(Environment(mode="prot16", paging="PAE"), [b"\x90"])


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=IDS)
def test_snapshot_describes_its_environment(env: Environment) -> None:
    case = build(env, [b"\x90"], regs={"rax": 1}, data={layout(env).data[1]: b"\x5a"})
    assert describe(case.snapshot) == (env.mode, env.paging, env.cpl)
    assert case.snapshot.regs.rip == layout(env).code
    assert case.snapshot.regs.rsp == layout(env).stack_top
    assert Case.model_validate_json(case.to_json()) == case
    assert Snapshot.model_validate_json(case.snapshot.to_json()) == case.snapshot
    assert Snapshot.from_state(case.snapshot.to_state()) == case.snapshot
    # the template's machine and the case's snapshot are the same machine apart from the case's changes
    base = Snapshot.from_state(machine(env))
    assert base.segments == case.snapshot.segments and base.control == case.snapshot.control
    assert base.efer == case.snapshot.efer and base.pdptes == case.snapshot.pdptes


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=IDS)
def test_descriptor_tables(env: Environment) -> None:
    snap = build(env, [b"\x90"]).snapshot
    lay = layout(env)
    # the segment caches are what their GDT descriptors load (Unicorn re-loads them from the GDT)
    assert UnicornBackend._check_segments(snap, env.mode) is None
    for v in range(256):
        assert read(snap, HANDLERS + HANDLER_STRIDE * v, 1) == 0xF4
    if env.mode == "real":
        assert (snap.idtr.base, snap.idtr.limit) == (0, 0x3FF)
        assert all(read(snap, 4 * v, 4) == HANDLERS + HANDLER_STRIDE * v for v in range(256))
        return
    gsize = 16 if env.mode == "long64" else 8
    assert snap.idtr.limit == 256 * gsize - 1
    for v in range(256):
        lo = read(snap, snap.idtr.base + gsize * v, 8)
        hi = read(snap, snap.idtr.base + gsize * v + 8, 8) if gsize == 16 else 0
        offset = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFF_FFFF) << 32
        assert offset == HANDLERS + HANDLER_STRIDE * v
        assert (lo >> 45) & 3 == (3 if v in USER_VECTORS else 0)  # DPL
        assert (lo >> 47) & 1  # present
        assert (lo >> 32) & 7 == (1 if env.mode == "long64" and v in (2, 8) else 0)  # IST
    tss = snap.segments.tr
    assert tss.type == 0xB and tss.p and snap.segments.tr.selector
    if env.mode == "long64":
        assert read(snap, tss.base + 4, 8) == lay.kernel_stack_top  # RSP0
        assert read(snap, tss.base + 0x24, 8) != 0  # IST1
    else:
        assert read(snap, tss.base + 4, 4) == lay.kernel_stack_top  # ESP0
        assert read(snap, tss.base + 8, 2) == 0x10  # SS0 = kernel data


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=IDS)
def test_layout_is_consistent(env: Environment) -> None:
    lay = layout(env)
    snap = build(env, [b"\x90"]).snapshot
    backed = {p.address for p in snap.pages}
    assert len(lay.data) >= 2 and all(a % PAGE == 0 for a in lay.data)
    assert lay.data == tuple(range(lay.data[0], lay.data_end, PAGE))
    regions = [range(lay.code, lay.code_end), range(lay.data[0], lay.data_end),
               range(lay.stack_top - PAGE, lay.stack_top), range(lay.unmapped, lay.unmapped + PAGE),
               range(lay.kernel_stack_top - PAGE, lay.kernel_stack_top)]
    regions += [range(t, t + PAGE) for t in lay.tables]
    for i, r in enumerate(regions):
        for q in regions[i + 1:]:
            assert not set(r) & set(q) or r == q
    assert set(lay.pages) == backed
    assert set(lay.data) <= backed and set(lay.tables) <= backed
    if env.mode in ("real", "prot16"):
        assert lay.data_end <= 0x10000 and lay.unmapped < 0x10000  # reachable with 16-bit addresses
    if not lay.paging:
        assert lay.unmapped not in backed
        with pytest.raises(ValueError, match="no paging"):
            lay.leaf_entry(lay.code)


def expected_rights(env: Environment, lay: Layout, page: int) -> tuple[bool, bool]:
    """(user, writable) the layout promises for a mapped page."""
    user_page = page in lay.data or lay.code <= page < lay.code_end or page == lay.stack_top - PAGE
    if env.page_size != PAGE and page < (1 << (30 if env.page_size == LARGE_1G else 21)):
        user_page = True  # the low large page holds code and stack
    return user_page and env.cpl == 3, True


@pytest.mark.parametrize("env", PAGING_ENVS, ids=[e.label() for e in PAGING_ENVS])
def test_page_tables_map_what_the_layout_says(env: Environment) -> None:
    lay = layout(env)
    snap = build(env, [b"\x90"]).snapshot
    mapped = [*range(lay.code, lay.code_end, PAGE), *lay.data, lay.stack_top - PAGE, lay.kernel_stack_top - PAGE,
              *lay.tables, HANDLERS, snap.idtr.base & ~(PAGE - 1), snap.gdtr.base & ~(PAGE - 1)]
    for page in mapped:
        for addr in (page, page + PAGE - 1):
            w = walk_of(snap, addr, AccessKind.WRITE)
            assert w.ok and w.phys == addr, hex(addr)  # identity, supervisor-writable
            assert w.entries[-1][1] == lay.leaf_entry(addr)
        user, _ = expected_rights(env, lay, page)
        uw = walk_of(snap, page, AccessKind.WRITE, cpl=3)
        assert uw.ok == user, hex(page)
        if not user:
            assert uw.fault == PF_P | PF_W | PF_U
    w = walk_of(snap, lay.unmapped, AccessKind.READ, cpl=env.cpl)
    assert w.fault == (PF_U if env.cpl == 3 else 0)  # not present
    assert w.entries[-1][1] == lay.leaf_entry(lay.unmapped)


@pytest.mark.parametrize("env", PAGING_ENVS, ids=[e.label() for e in PAGING_ENVS])
def test_corrupting_a_data_leaf_leaves_the_rest_mapped(env: Environment) -> None:
    lay = layout(env)
    entry = lay.leaf_entry(lay.data[0])
    value = lay.entry_value(entry)
    assert value & 1
    case = build(env, [b"\x90"], pte_edits={entry: value & ~1})
    snap = case.snapshot
    assert read(snap, entry, lay.entry_bytes) == value & ~1
    assert walk_of(snap, lay.data[0]).fault == 0
    for page in (lay.code, lay.stack_top - PAGE, lay.kernel_stack_top - PAGE, HANDLERS, *lay.tables):
        assert lay.leaf_entry(page) != entry
        assert walk_of(snap, page, AccessKind.WRITE).ok, hex(page)


def test_pae_pdpte_registers_follow_the_pdpt() -> None:
    env = Environment(mode="prot32", paging="PAE")
    lay = layout(env)
    snap = build(env, [b"\x90"]).snapshot
    assert snap.pdptes == [read(snap, lay.tables[0] + 8 * k, 8) for k in range(4)]
    assert snap.pdptes[0] == lay.tables[1] | 1 and snap.pdptes[1:] == [0, 0, 0]
    edited = build(env, [b"\x90"], pte_edits={lay.tables[0] + 8: lay.tables[1] | 1}).snapshot
    assert edited.pdptes[1] == lay.tables[1] | 1


# -- build() arguments ----------------------------------------------------------------------------

def test_build_places_code_registers_and_data() -> None:
    env = Environment(mode="long64", paging="4-level")
    lay = layout(env)
    insns = [b"\x48\x01\xd8", b"\x90"]
    case = build(env, insns, regs={"rbx": 7, "r15": 2**64 - 1, "rsp": 0x7000}, rflags=0x203,
                 data={lay.data[1] - 2: b"\x01\x02\x03\x04"}, name="x", budget=9, tags=["t"])
    assert case.instructions() == insns and case.code_bytes == b"".join(insns) + b"\xf4"
    assert case.budget == 9 and case.tags == ["t"] and case.name == "x"
    r = case.snapshot.regs
    assert (r.rbx, r.r15, r.rsp, r.rflags, r.rax) == (7, 2**64 - 1, 0x7000, 0x203, 0)
    assert read(case.snapshot, lay.data[1] - 2, 4) == 0x04030201  # across the two data pages
    default = build(env, [b"\x90"])
    assert default.budget >= 1 and default.snapshot.regs.rflags == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"insns": [b"\x90" * 0x3000]}, "does not fit"),
    ({"data": {0x100: b"\x00"}}, "outside the data pages"),
    ({"data": {0xA000 - 1: b"\x00\x00"}}, "outside the data pages"),
    ({"pte_edits": {0x1000: 0}}, "not a 8-byte entry"),
    ({"pte_edits": {0x73004: 0}}, "not a 8-byte entry"),
    ({"pte_edits": {0x73000: 1 << 64}}, "does not fit"),
    ({"regs": {"rip": 5}}, "unknown register"),
    ({"regs": {"rax": -1}}, "does not fit"),
    ({"rflags": 0}, "bit 1"),
])
def test_bad_arguments_are_one_line_errors(kwargs: dict, message: str) -> None:
    env = Environment(mode="long64", paging="4-level")
    args = {"insns": [b"\x90"], **kwargs}
    insns = args.pop("insns")
    with pytest.raises(ValueError, match=message) as e:
        build(env, insns, **args)
    assert "\n" not in str(e.value)


def test_no_paging_has_no_entries_to_edit() -> None:
    with pytest.raises(ValueError, match="no paging"):
        build(Environment(mode="prot32"), [b"\x90"], pte_edits={0x70000: 0})


def test_cases_share_nothing_mutable_with_the_template() -> None:
    env = Environment(mode="long64", paging="4-level", cpl=3)
    lay = layout(env)
    first = build(env, [b"\x90"], data={lay.data[0]: b"\xff" * 16}, pte_edits={lay.leaf_entry(lay.data[1]): 0})
    first.snapshot.segments.cs.selector = 0
    first.snapshot.control.cr3 = 0
    first.snapshot.regs.rax = 5
    first.snapshot.pages[0].data = "ff"
    first.snapshot.msrs["0x10"] = 1
    second = build(env, [b"\x90"])
    assert second.snapshot == Snapshot.from_state(machine(env)).model_copy(
        update={"pages": second.snapshot.pages})
    assert read(second.snapshot, lay.data[0], 16) == 0
    assert read(second.snapshot, lay.leaf_entry(lay.data[1]), 8) == lay.entry_value(lay.leaf_entry(lay.data[1]))
    assert template(env).snapshot.segments.cs.selector == 0x1B


@pytest.mark.parametrize("mode", ["real", "prot32", "long64"])
def test_without_idt_an_exception_shuts_down(mode: str) -> None:
    env = Environment(mode=mode, paging="4-level" if mode == "long64" else "none", idt=False)  # type: ignore[arg-type]
    case = build(env, [b"\x0f\x0b"])  # ud2
    assert (case.snapshot.idtr.base, case.snapshot.idtr.limit) == (0, 0)
    assert SPEC_DELIVER.run(case.snapshot, case.budget).stop.kind == "shutdown"
    assert SPEC.run(case.snapshot, case.budget).stop.vector == 6


# -- end to end on every backend ---------------------------------------------------------------------

@pytest.mark.parametrize("env", ENVIRONMENTS, ids=IDS)
def test_alu_store_load_agree_on_spec_and_unicorn(env: Environment) -> None:
    case = build(env, alu_sequence(env), regs={"rbx": 0x1111, "rdx": 0x5A5A, "rsi": 0x0F0F})
    s = SPEC.run(case.snapshot, case.budget)
    lay = layout(env)
    addr = lay.data[0] + 8
    assert read(s.final, addr, 2) == (0x7FF1 + 0x1111) & 0xFFFF
    assert s.final.regs.rcx & 0xFFFF == (0x7FF1 + 0x1111) & 0xFFFF
    hlt = lay.code + len(case.code_bytes) - 1
    if env.cpl == 3:  # HLT is privileged: #GP(0) at the HLT (SDM Vol. 2A HLT)
        assert (s.stop.kind, s.stop.vector, s.stop.error_code, s.stop.rip) == ("exception", 13, 0, hlt)
    else:
        assert (s.stop.kind, s.stop.rip) == ("halted", hlt + 1)
    u = UNICORN.run(case.snapshot, case.budget)
    assert u.stop.kind != "unsupported", u.stop.detail
    same_stop(s, u, error_code=False)
    assert_same_state(s, u)


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=IDS)
def test_alu_store_load_agree_on_kvm(env: Environment) -> None:
    why = kvm_available()
    if why:
        pytest.skip(f"KVM backend unavailable: {why}")
    case = build(env, alu_sequence(env), regs={"rbx": 0x1111, "rdx": 0x5A5A, "rsi": 0x0F0F})
    k = KVM.run(case.snapshot, case.budget)
    if env.paging in ("32-bit", "PAE"):  # refused: this nested KVM shuts down on legacy paging (ORACLES.md)
        assert k.stop.kind == "unsupported" and "paging" in k.stop.detail
        return
    if env.page_size == LARGE_1G:
        # This KVM's guest CPUID lacks PDPE1GB: PS in a PDPTE is a reserved bit, so the first fetch
        # #PFs, so does the delivery -> triple fault.  Recorded, not hidden (see the module docstring of kvm.py).
        assert (k.stop.kind, k.stop.rip) == ("shutdown", layout(env).code)
        return
    s = SPEC_DELIVER.run(case.snapshot, case.budget)
    if env.mode == "prot16" and env.cpl == 3:
        # Known KVM-environment divergence (this kvm_pvm host): delivering through a 16-bit interrupt
        # gate from CPL 3 pushes a 32-bit frame; the SDM (6.12.1, INT n pseudo-code) pushes 16-bit values.
        assert s.final is not None and k.final is not None
        assert k.final.regs.rsp == layout(env).kernel_stack_top - 24  # 6 dwords: error code .. SS
        assert s.final.regs.rsp == layout(env).kernel_stack_top - 12  # 6 words
        return
    assert k.stop.kind == ("exception" if env.cpl == 3 else "halted"), k.stop
    assert_same_state(s, k)
    if env.cpl == 3:
        assert stub_exception(k.final) == stub_exception(s.final)  # type: ignore[arg-type]


def unmapped_case(env: Environment, *, store: bool) -> Case:
    lay = layout(env)
    op = mem_op(env, 0x89 if store else 0x8B, 0, 3)
    return build(env, [mov_imm(env, 3, lay.unmapped + 0x10), op], regs={"rax": 0x1234})


@pytest.mark.parametrize("store", [False, True], ids=["load", "store"])
@pytest.mark.parametrize("env", PAGING_ENVS, ids=[e.label() for e in PAGING_ENVS])
def test_unmapped_page_faults(env: Environment, store: bool) -> None:
    lay = layout(env)
    case = unmapped_case(env, store=store)
    fault_rip = lay.code + len(case.instructions()[0])
    err = (PF_W if store else 0) | (PF_U if env.cpl == 3 else 0)  # not present (P=0)
    s = SPEC.run(case.snapshot, case.budget)
    assert (s.stop.kind, s.stop.vector, s.stop.error_code, s.stop.cr2, s.stop.rip) == (
        "exception", 14, err, lay.unmapped + 0x10, fault_rip)
    u = UNICORN.run(case.snapshot, case.budget)
    same_stop(s, u, error_code=False)
    assert_same_state(s, u)
    # delivered: the stub for vector 14 halts with the frame on the kernel stack (the current stack at CPL 0)
    d = SPEC_DELIVER.run(case.snapshot, case.budget)
    assert d.stop.kind == "halted" and d.final is not None
    assert d.final.regs.rip == HANDLERS + HANDLER_STRIDE * 14 + 1
    assert d.final.control.cr2 == lay.unmapped + 0x10
    sp = d.final.regs.rsp
    stack_top = lay.kernel_stack_top if env.cpl == 3 else lay.stack_top
    assert stack_top - PAGE <= sp < stack_top
    w = 8 if env.mode == "long64" else 4
    assert read(d.final, sp, w) == err  # error code, then the faulting RIP (SDM 6.12.1, Figures 6-4/6-9)
    assert read(d.final, sp + w, w) == fault_rip
    assert read(d.final, sp + 2 * w, 2) == case.snapshot.segments.cs.selector
    if env.mode == "long64":
        assert stub_exception(d.final) == s.stop.model_copy(update={"detail": stub_exception(d.final).detail})


@pytest.mark.parametrize("env", [e for e in PAGING_ENVS if e.mode == "long64" and e.page_size != LARGE_1G],
                         ids=lambda e: e.label())
def test_unmapped_page_faults_on_kvm(env: Environment) -> None:
    why = kvm_available()
    if why:
        pytest.skip(f"KVM backend unavailable: {why}")
    case = unmapped_case(env, store=True)
    k = KVM.run(case.snapshot, case.budget)
    s = SPEC.run(case.snapshot, case.budget)
    same_stop(s, k, error_code=True)
    assert_same_state(SPEC_DELIVER.run(case.snapshot, case.budget), k)


@pytest.mark.parametrize("env", [e for e in ENVIRONMENTS if e.paging == "none"], ids=lambda e: e.label())
def test_unmapped_is_not_ram_without_paging(env: Environment) -> None:
    case = unmapped_case(env, store=False)
    s = SPEC.run(case.snapshot, case.budget)
    assert s.stop.kind in ("halted", "exception") and s.stop.vector in (None, 13)  # (13: the CPL-3 HLT)
    assert s.final is not None and s.final.regs.rax & 0xFFFF == 0xFFFF  # open bus reads all ones
    assert UNICORN.run(case.snapshot, case.budget).stop.kind == "unsupported"  # Unicorn has no open bus


@pytest.mark.parametrize("env", USER_ENVS, ids=[e.label() for e in USER_ENVS])
def test_privileged_instruction_at_cpl3_is_gp(env: Environment) -> None:
    lay = layout(env)
    case = build(env, [b"\x90", b"\x0f\x20\xc0"])  # nop; mov eax/rax, cr0
    s = SPEC.run(case.snapshot, case.budget)
    assert (s.stop.kind, s.stop.vector, s.stop.error_code, s.stop.rip) == ("exception", 13, 0, lay.code + 1)
    u = UNICORN.run(case.snapshot, case.budget)
    same_stop(s, u, error_code=False)
    assert_same_state(s, u)
    if kvm_available() is None and env.paging in ("none", "4-level") and env.page_size != LARGE_1G \
            and env.mode != "prot16":
        k = KVM.run(case.snapshot, case.budget)
        same_stop(s, k, error_code=True)
        assert k.executed_by == "hardware"


SMALL_USER_PAGING = [e for e in USER_ENVS if e.paging != "none" and e.page_size == PAGE]


@pytest.mark.parametrize("env", SMALL_USER_PAGING, ids=[e.label() for e in SMALL_USER_PAGING])
def test_user_read_of_a_paging_structure_faults(env: Environment) -> None:
    """CPL 3 really runs at CPL 3 everywhere: the tables are supervisor pages (#PF with P and U set)."""
    lay = layout(env)
    case = build(env, [mov_imm(env, 3, lay.tables[0] + 8), mem_op(env, 0x8B, 0, 3)])
    s = SPEC.run(case.snapshot, case.budget)
    assert (s.stop.vector, s.stop.error_code, s.stop.cr2) == (14, PF_P | PF_U, lay.tables[0] + 8)
    u = UNICORN.run(case.snapshot, case.budget)
    same_stop(s, u, error_code=False)
    assert_same_state(s, u)
    if kvm_available() is None and env.mode == "long64":
        same_stop(s, KVM.run(case.snapshot, case.budget), error_code=True)


def test_kernel_stack_gets_the_frame_at_cpl3() -> None:
    """Delivery from CPL 3 switches to RSP0 and pushes SS, RSP, RFLAGS, CS, RIP, error code (SDM 6.14.2).

    The saved RFLAGS has RF set: the image pushed for a fault sets RF (SDM Vol. 3A 17.3.1.1).
    """
    env = Environment(mode="long64", paging="4-level", cpl=3)
    lay = layout(env)
    case = build(env, [b"\x0f\x20\xc0"])
    d = SPEC_DELIVER.run(case.snapshot, case.budget)
    assert d.final is not None
    sp = d.final.regs.rsp
    assert sp == lay.kernel_stack_top - 6 * 8
    frame = [read(d.final, sp + 8 * k, 8) for k in range(6)]
    assert frame == [0, lay.code, 0x1B, 0x10002, lay.stack_top, 0x23]
    assert 13 in HAS_ERROR_CODE


# -- property: random environments and addresses ------------------------------------------------------

@st.composite
def env_and_linear(draw: st.DrawFn) -> tuple[Environment, int]:
    env = draw(st.sampled_from(PAGING_ENVS))
    lay = layout(env)
    page = draw(st.sampled_from([*range(lay.code, lay.code_end, PAGE), *lay.data, lay.stack_top - PAGE,
                                 lay.kernel_stack_top - PAGE, HANDLERS, *lay.tables, lay.unmapped]))
    return env, page + draw(st.integers(0, PAGE - 1))


@settings(max_examples=60)
@given(env_and_linear(), st.dictionaries(st.sampled_from(GPR_NAMES), st.integers(0, 2**64 - 1), max_size=4),
       st.integers(0, 15))
def test_leaf_entry_maps_the_address(pick: tuple[Environment, int], regs: dict[str, int], off: int) -> None:
    env, linear = pick
    lay = layout(env)
    case = build(env, [b"\x90"], regs=regs, data={lay.data[0] + off: bytes([off + 1])})
    snap = case.snapshot
    assert describe(snap) == (env.mode, env.paging, env.cpl)
    assert Case.model_validate_json(case.to_json()) == case
    assert read(snap, lay.data[0] + off, 1) == off + 1
    for name, value in regs.items():
        assert getattr(snap.regs, name) == value
    w = walk_of(snap, linear)
    leaf = lay.leaf_entry(linear)
    assert w.entries[-1][1] == leaf
    if linear & ~(PAGE - 1) == lay.unmapped:
        assert w.fault == 0 and read(snap, leaf, lay.entry_bytes) & 1 == 0
    else:
        assert w.ok and w.phys == linear
        # the leaf entry really decides: clearing its P bit makes the walk fault right there
        value = read(snap, leaf, lay.entry_bytes)
        broken_case = build(env, [b"\x90"], pte_edits={leaf: value & ~1})
        assert Case.model_validate_json(broken_case.to_json()) == broken_case
        broken = broken_case.snapshot
        bw = walk_of(broken, linear)
        assert bw.fault == 0 and bw.entries[-1][1] == leaf
