"""A hypothesis state machine: one long-lived guest on refvmm-shadow and on the bare spec, in lockstep.

:class:`Lockstep` keeps two machines with the same guest: a :class:`refvmm.vm.VM` with
shadow paging (its shadow tables, hardware TLB and guest-visible registers persist
from step to step) and a bare spec machine.  Every rule of :class:`ShadowLockstep` is a
*guest operation* -- a few instructions the guest executes at CPL 0 or 3, ending in
HLT -- run on both; after every step the two must agree on the stop, the registers,
CR0/CR2/CR3/CR4, EFER and every page of guest memory (page-table A/D bits, exception
frames).

The guest has two address spaces (two complete sets of paging structures; CR3
selects one) over a sandbox of four linear pages and five frames.  Operations: map a
page to a frame with chosen R/W, U/S, XD; unmap; change permissions; clear A/D; INVLPG;
switch CR3; toggle CR0.WP; access (read, write, execute) at CPL 0 or 3.

Architecturally, a translation whose entry changed may be used stale until it is
invalidated (SDM Vol. 3A 4.10.4): the model tracks such *pending* pages per address
space (an edit makes the page pending; INVLPG in that space or a CR3 load of it clears
it) and accesses only settled pages -- what a correct OS does, and all the bare spec
(which has no TLB) can be compared with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_shadow_guest import CR0_WP, Asm

from difftest.builders import machine
from difftest.case import Environment
from difftest.layout import layout
from refvmm.config import CpuidConfig, MemoryConfig, VMConfig
from refvmm.paging.base import PagingStrategy
from refvmm.paging.shadow import ShadowPaging
from refvmm.vm import VM
from spec.cpu import SpecCPU
from spec.cpumodel import DEFAULT_MODEL
from spec.machine import enter_user_mode
from spec.memory import PAGE
from spec.paging import ACCESSED, DIRTY, RW, US, XD
from spec.paging import P as PRESENT
from spec.snapshot import Snapshot
from spec.state import MachineState
from spec.svm.vmcb import SEG_ORDER

SANDBOX = (0x8000, 0x9000, 0xA000, 0xB000)  # linear pages the operations play with
FRAMES = (0x8000, 0x9000, 0xA000, 0xB000, 0xD000)  # guest-physical frames they map
CODE, STACK_TOP = 0x1000, 0x8000
SPACE_B_OFFSET = 0x4000  # address space B's paging structures: a copy of A's, 16 KiB higher
BUDGET = 200


@dataclass
class StepResult:
    kind: str
    rip: int
    snapshot: Snapshot


def guest_machine(env: Environment) -> tuple[MachineState, dict[int, int], int]:
    """The guest: the difftest machine of ``env`` plus address space B, sandbox frames, user code and stack.

    Returns the state, the leaf table of each address space (root -> leaf table) and the entry size.
    """
    lay = layout(env)
    st = machine(env)
    phys = st.mem.phys
    eb = lay.entry_bytes
    copies = {t: t + SPACE_B_OFFSET for t in lay.tables}
    for t, c in copies.items():
        phys.map_page(c, phys.read_bytes(t, PAGE))
        for k in range(PAGE // eb):  # retarget B's non-leaf entries to B's own structures
            e = phys.read(c + eb * k, eb)
            if e & PRESENT and (e & ~0xFFF & 0xFFFF_FFFF_F000) in copies and t != lay.tables[-1]:
                phys.write(c + eb * k, eb, (e & 0xFFF) | copies[e & ~0xFFF & 0xFFFF_FFFF_F000])
    leaves = {lay.tables[0]: lay.tables[-1], copies[lay.tables[0]]: copies[lay.tables[-1]]}
    for frame in FRAMES:
        if (frame >> 12) not in phys.pages:
            phys.map_page(frame)
        phys.write(frame, 1, 0xC3)  # RET at offset 0: the execute operation calls it
    for pt in leaves.values():
        for page in (*copies.values(), 0x1000, 0x2000, 0x7000):  # B's tables mapped; code and stack user pages
            rights = PRESENT | RW | (US if page < 0x70000 else 0)
            phys.write(pt + eb * (page >> 12), eb, page | rights)
    return st, leaves, eb


class Lockstep:
    """The same guest on a shadow-paging VM and on the bare spec; :meth:`step` runs code on both."""

    def __init__(self, env: Environment, strategy: Callable[[], PagingStrategy] = ShadowPaging) -> None:
        self.env = env
        st, self.leaves, self.eb = guest_machine(env)
        self.kernel_segs = [s.copy() for s in st.seg]
        self.user_segs = [s.copy() for s in enter_user_mode(st.copy()).seg]
        self.spec = Snapshot.from_state(st).to_state()
        config = VMConfig(name="lockstep", paging="shadow", budget=BUDGET, memory=MemoryConfig(size=0), devices=[],
                          cpuid=CpuidConfig(hide=[], hypervisor_bit=False))
        self.vm = VM(config, entry=Snapshot.from_state(st).to_state(), strategy=strategy(), base_model=DEFAULT_MODEL)

    def step(self, insns: list[bytes], cpl: int) -> tuple[StepResult, StepResult]:
        code = b"".join(insns) + b"\xf4"
        segs = self.user_segs if cpl == 3 else self.kernel_segs
        # The bare machine.
        s = self.spec
        s.mem.phys.write_bytes(CODE, code)
        s.rip, s.halted = CODE, False
        s.gpr[4] = STACK_TOP
        s.write_rflags(0x2)
        s.seg = [x.copy() for x in segs]
        ev = SpecCPU(s, deliver_exceptions=True).run(BUDGET)
        bare = StepResult(ev.kind, s.rip, Snapshot.from_state(s))
        # The guest of the VM: the same entry state through the VMCB.
        vm = self.vm
        vm.memory.write_bytes(CODE, code)
        v = vm.vmcb
        v.rip, v.rsp, v.rflags = CODE, STACK_TOP, 0x2
        for name, seg in zip(SEG_ORDER, segs):
            v.store_segment(name, seg)
        v.cpl = cpl
        vm.halted = False  # a new step: the harness wakes the guest, as it does the bare machine
        result = vm.run(BUDGET)
        guest = StepResult(result.reason, v.rip, vm.guest_snapshot())
        return bare, guest


def disagreements(bare: StepResult, guest: StepResult) -> list[str]:
    out = []
    if bare.kind != guest.kind or bare.rip != guest.rip:
        out.append(f"stop: spec {bare.kind} at {bare.rip:#x}, refvmm {guest.kind} at {guest.rip:#x}")
    a, b = bare.snapshot, guest.snapshot
    if a.regs != b.regs:
        out.append(f"registers: {a.regs} vs {b.regs}")
    if a.control != b.control or a.efer != b.efer:
        out.append(f"control registers: {a.control}, efer {a.efer:#x} vs {b.control}, efer {b.efer:#x}")
    pa, pb = {p.address: p.data for p in a.pages}, {p.address: p.data for p in b.pages}
    for addr in sorted(set(pa) | set(pb)):
        if pa.get(addr) != pb.get(addr):
            x, y = bytes.fromhex(pa.get(addr, "")), bytes.fromhex(pb.get(addr, ""))
            k = next((i for i in range(max(len(x), len(y))) if x[i:i + 1] != y[i:i + 1]), 0)
            out.append(f"memory page {addr:#x} differs first at +{k:#x}")
    return out


class ShadowLockstep(RuleBasedStateMachine):
    """Guest operations against refvmm-shadow and the bare spec (module docstring)."""

    ENV = Environment(mode="long64", paging="4-level")
    STRATEGY: Callable[[], PagingStrategy] = ShadowPaging

    @initialize()
    def boot(self) -> None:
        self.ls = Lockstep(self.ENV, type(self).STRATEGY)
        self.asm = Asm(self.ENV.bits)
        lay = layout(self.ENV)
        self.roots = list(self.ls.leaves)
        self.space = 0
        self.wp = True
        self.entries: dict[tuple[int, int], int] = {}
        for space in range(len(self.roots)):
            for page in SANDBOX:  # both spaces start with the layout's sandbox entries
                self.entries[(space, page)] = lay.entry_value(lay.tables[-1] + self.ls.eb * (page >> 12))
        self.pending: set[tuple[int, int]] = set()
        self.log: list[str] = []
        self.last: list[str] = []

    # -- running a step on both machines ----------------------------------------------------------------
    def run(self, what: str, insns: list[bytes], cpl: int = 0) -> None:
        self.log.append(what)
        bare, guest = self.ls.step(insns, cpl)
        self.last = disagreements(bare, guest)
        assert not self.last, "after " + " / ".join(self.log) + ":\n" + "\n".join(self.last)

    def write_entry(self, space: int, page: int, value: int, what: str) -> None:
        pt = self.ls.leaves[self.roots[space]]
        self.entries[(space, page)] = value
        self.pending.add((space, page))
        self.run(f"{what} [{space}] {page:#x} = {value:#x}", self.asm.write_entry(pt + self.ls.eb * (page >> 12),
                                                                                    value, self.ls.eb))

    # -- page-table operations (CPL 0) ----------------------------------------------------------------------
    def pick_space(self, data: st.DataObject) -> int:
        """Mostly the current address space (its edits are the ones an access can see next)."""
        return data.draw(st.sampled_from([self.space, self.space, 1 - self.space]), label="space")

    @rule(data=st.data(), page=st.sampled_from(SANDBOX), frame=st.sampled_from(FRAMES),
          rw=st.booleans(), us=st.booleans(), xd=st.booleans())
    def map(self, data: st.DataObject, page: int, frame: int, rw: bool, us: bool, xd: bool) -> None:
        value = frame | PRESENT | (RW if rw else 0) | (US if us else 0)
        if xd and self.ls.eb == 8:
            value |= XD
        self.write_entry(self.pick_space(data), page, value, "map")

    @rule(data=st.data(), page=st.sampled_from(SANDBOX))
    def unmap(self, data: st.DataObject, page: int) -> None:
        self.write_entry(self.pick_space(data), page, 0, "unmap")

    @rule(data=st.data(), page=st.sampled_from(SANDBOX), bit=st.sampled_from(["RW", "US", "XD"]))
    def protect(self, data: st.DataObject, page: int, bit: str) -> None:
        mask = {"RW": RW, "US": US, "XD": XD if self.ls.eb == 8 else RW}[bit]
        space = self.pick_space(data)
        self.write_entry(space, page, self.entries[(space, page)] ^ mask, f"flip {bit} of")

    @rule(data=st.data(), page=st.sampled_from(SANDBOX))
    def clear_accessed_dirty(self, data: st.DataObject, page: int) -> None:
        space = self.pick_space(data)
        self.write_entry(space, page, self.entries[(space, page)] & ~(ACCESSED | DIRTY), "clear A/D of")

    @rule(data=st.data())
    def invlpg(self, data: st.DataObject) -> None:
        """INVLPG of a page whose entry changed (if any: what a correct OS does), else of any sandbox page."""
        pending = sorted(p for s, p in self.pending if s == self.space)
        page = data.draw(st.sampled_from(pending or list(SANDBOX)), label="page")
        self.pending.discard((self.space, page))
        self.run(f"invlpg {page:#x}", [self.asm.invlpg(page)])

    @rule(space=st.integers(0, 1))
    def switch_cr3(self, space: int) -> None:
        self.space = space
        self.pending -= {(space, p) for p in SANDBOX}
        self.run(f"cr3 := space {space}", [self.asm.mov_eax(self.roots[space]), self.asm.write_cr(3)])

    @rule()
    def toggle_wp(self) -> None:
        self.wp = not self.wp
        self.run(f"CR0.WP := {int(self.wp)}", [self.asm.set_cr(0, CR0_WP, self.wp)])

    # -- accesses ----------------------------------------------------------------------------------------------
    def settled(self, page: int) -> bool:
        return (self.space, page) not in self.pending

    def touch(self, data: st.DataObject, kind: str, cpl: int, page: int | None = None) -> None:
        """One access by the guest to a settled sandbox page (read, write or execute a RET there)."""
        if page is None:
            settled = [p for p in SANDBOX if self.settled(p)]
            if not settled:
                return
            page = data.draw(st.sampled_from(settled), label="page")
        offset = data.draw(st.sampled_from([0x10, 0x804, 0xFFC]), label="offset")
        a = self.asm
        if kind == "read":
            insns = [a.load(page + offset)]
        elif kind == "write":
            insns = [a.store(page + offset, 0x5A5A0000 | page >> 12)]
        else:
            insns = [a.mov_eax(page), a.call_eax()]
            offset = 0
        self.run(f"{kind} {page + offset:#x} at CPL {cpl}", insns, cpl)

    @rule(data=st.data(), cpl=st.sampled_from([0, 3]))
    def read(self, data: st.DataObject, cpl: int) -> None:
        self.touch(data, "read", cpl)

    @rule(data=st.data(), cpl=st.sampled_from([0, 3]))
    def write(self, data: st.DataObject, cpl: int) -> None:
        self.touch(data, "write", cpl)

    @rule(data=st.data(), cpl=st.sampled_from([0, 3]))
    def execute(self, data: st.DataObject, cpl: int) -> None:
        self.touch(data, "execute", cpl)

    @rule(data=st.data(), page=st.sampled_from(SANDBOX), bit=st.sampled_from(["RW", "US", "XD", "P"]),
          kind=st.sampled_from(["read", "write", "execute"]), cpl=st.sampled_from([0, 3]))
    def change_and_touch(self, data: st.DataObject, page: int, bit: str, kind: str, cpl: int) -> None:
        """Touch a page, change one right of its entry in the current space, INVLPG it, read it, touch it again."""
        self.touch(data, {"RW": "write", "XD": "read"}.get(bit, kind), cpl, page)
        mask = {"RW": RW, "US": US, "XD": XD if self.ls.eb == 8 else RW, "P": PRESENT}[bit]
        self.write_entry(self.space, page, self.entries[(self.space, page)] ^ mask, f"flip {bit} of")
        self.pending.discard((self.space, page))
        self.run(f"invlpg {page:#x}", [self.asm.invlpg(page)])
        self.touch(data, "read", cpl, page)
        self.touch(data, kind, cpl, page)

    @precondition(lambda self: hasattr(self, "ls"))
    @invariant()
    def shadow_maps_only_guest_ram(self) -> None:
        """Resource control: shadow leaves map guest RAM only; the tables live in VMM pages, never guest RAM."""
        vm = self.ls.vm
        pager = vm.paging
        if isinstance(pager, ShadowPaging) and pager.tables is not None:
            for leaf in pager.tables.leaves.values():
                assert vm.memory.host_owned(leaf.hpa), f"a shadow leaf maps host page {leaf.hpa:#x}"
            for page in pager.tables.pages:
                assert page in vm.allocator.allocated and not vm.memory.host_owned(page)


def machine_for(env: Environment, **opts: object) -> type[ShadowLockstep]:
    cls = type(f"ShadowLockstep_{env.paging.replace('-', '')}", (ShadowLockstep,), {"ENV": env, **opts})
    return cls


SETTINGS = settings(max_examples=10, stateful_step_count=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestLockstep4Level = machine_for(Environment(mode="long64", paging="4-level")).TestCase
TestLockstep4Level.settings = SETTINGS
TestLockstepPAE = machine_for(Environment(mode="prot32", paging="PAE")).TestCase
TestLockstepPAE.settings = SETTINGS
TestLockstep32Bit = machine_for(Environment(mode="prot32", paging="32-bit")).TestCase
TestLockstep32Bit.settings = SETTINGS
