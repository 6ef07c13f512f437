"""Test harness for the SVM model: a bare flat machine turned into a guest of an :class:`SVMProcessor`.

``make_guest(st, ...)`` writes the state of a flat machine (spec/machine.py) into a VMCB that
lives in the same physical memory, with the IOPM and MSRPM next to it, and returns a
:class:`Guest` whose ``run()`` executes VMRUN.  ``state_of(guest)`` rebuilds a machine state from
the VMCB after #VMEXIT (the processor's save path), ``compare`` diffs two states field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spec.cpu import SpecCPU
from spec.cpumodel import make_model
from spec.domain.concrete import CONCRETE as D
from spec.machine import flat_machine
from spec.state import EFER_SVME, MachineState
from spec.svm.exitcodes import INTERCEPT_BITS, ExitCode
from spec.svm.processor import SVMProcessor
from spec.svm.vmcb import VMCB, load_guest_state, save_guest_state, vmload_state, vmsave_state

MODEL = make_model(add={"svm"})
VMCB_PA = 0xF0000
IOPM_PA = 0xE0000  # 3 pages
MSRPM_PA = 0xEC000  # 2 pages
SVM_PAGES = frozenset({VMCB_PA >> 12, *(p >> 12 for p in range(IOPM_PA, IOPM_PA + 0x3000, 0x1000)),
                       *(p >> 12 for p in range(MSRPM_PA, MSRPM_PA + 0x2000, 0x1000))})
BASE_INTERCEPTS = (ExitCode.VMRUN, ExitCode.INTR, ExitCode.SHUTDOWN)
M64 = (1 << 64) - 1


@dataclass
class Guest:
    proc: SVMProcessor
    vmcb: VMCB
    gprs: list[int] = field(default_factory=list)

    def run(self, budget: int = 1000) -> VMCB:
        self.proc.vmrun(self.vmcb.pa, self.gprs, budget)
        return self.vmcb

    @property
    def phys(self) -> Any:
        return self.proc.phys


def machine(mode: str, code: bytes, *, idt: bool = True, svme: bool = True) -> MachineState:
    """A flat machine with the SVM-capable model (EFER.SVME set: a VMCB's guest EFER must have it)."""
    st = flat_machine(mode, code, idt=idt)  # type: ignore[arg-type]
    st.model = MODEL
    if svme:
        st.efer |= EFER_SVME
    return st


def make_guest(st: MachineState, intercepts: tuple[int, ...] = (), *, all_intercepts: bool = False,
               v_intr_masking: bool = True, asid: int = 1) -> Guest:
    """A VMCB holding ``st`` (which shares its physical memory with the processor), ready for VMRUN."""
    phys = st.mem.phys
    for base, n in ((VMCB_PA, 1), (IOPM_PA, 3), (MSRPM_PA, 2)):
        for k in range(n):
            phys.map_page(base + k * 0x1000)
    vmcb = VMCB(phys, VMCB_PA)
    save_guest_state(st, vmcb)
    vmsave_state(st, vmcb)
    vmcb.guest_asid = asid
    vmcb.iopm_base_pa = IOPM_PA
    vmcb.msrpm_base_pa = MSRPM_PA
    vmcb.v_intr_masking = int(v_intr_masking)
    vmcb.interrupt_shadow = int(st.interrupt_shadow)
    if all_intercepts:
        vmcb.set_intercept_vector((1 << INTERCEPT_BITS) - 1)
        phys.write_bytes(IOPM_PA, b"\xff" * 0x3000)
        phys.write_bytes(MSRPM_PA, b"\xff" * 0x2000)
    for code in (*BASE_INTERCEPTS, *intercepts):
        vmcb.set_intercept(code)
    proc = SVMProcessor(phys, MODEL)
    proc.msrs = dict(st.msrs)
    proc.dr = list(st.dr)
    proc.icount = st.icount
    return Guest(proc, vmcb, [D.concrete(v) for v in st.gpr])


def state_of(g: Guest) -> MachineState:
    """The guest state as the VMCB (and the GPR list) hold it after #VMEXIT."""
    s = MachineState.concrete(g.phys)
    s.model = MODEL
    s.msrs = dict(g.proc.msrs)
    s.dr = list(g.proc.dr)
    vmload_state(g.vmcb, s)
    load_guest_state(g.vmcb, s)
    gpr = list(s.gpr)
    for k in range(16):
        if k not in (0, 4):
            gpr[k] = D.const(64, g.gprs[k])
    s.gpr = gpr
    s.icount = g.proc.icount
    s.interrupt_shadow = bool(g.vmcb.interrupt_shadow)
    s.nmi_blocked = g.proc.nmi_blocked
    return s


_MSR_VIEW = (0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102, 0x174, 0x175, 0x176, 0x277)


def _msr(s: MachineState, index: int) -> int:
    v = s.msrs.get(index)
    return s.model.msr_reset.get(index, 0) if v is None else v


def snapshot(s: MachineState, *, memory: bool = True) -> dict[str, Any]:
    """The architectural state of ``s`` as plain data (RIP, GPRs, RFLAGS, segments, system registers, RAM)."""
    out: dict[str, Any] = {
        "rip": s.rip, "gpr": [D.concrete(v) for v in s.gpr], "rflags": D.concrete(s.read_rflags()),
        "seg": [tuple(vars_(x)) for x in s.seg], "ldtr": tuple(vars_(s.ldtr)), "tr": tuple(vars_(s.tr)),
        "gdtr": (s.gdtr.base, s.gdtr.limit), "idtr": (s.idtr.base, s.idtr.limit),
        "cr": (s.cr0, s.cr2, s.cr3, s.cr4, s.efer), "dr": (s.dr[0], s.dr[1], s.dr[2], s.dr[3], s.dr[6], s.dr[7]),
        "cpl": s.cpl, "msrs": tuple(_msr(s, i) for i in _MSR_VIEW), "nmi_blocked": s.nmi_blocked,
    }
    if memory:
        out["mem"] = {k: bytes(v) for k, v in s.mem.phys.pages.items() if k not in SVM_PAGES}
    return out


def vars_(seg: Any) -> tuple:
    return (seg.selector, seg.base, seg.limit, seg.type, seg.s, seg.dpl, seg.p, seg.avl, seg.l, seg.db, seg.g,
            seg.unusable)


def compare(a: dict[str, Any], b: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys where two snapshots differ (memory: the differing page numbers)."""
    diffs = []
    for k in a:
        if k in ignore:
            continue
        if k == "mem":
            pages = sorted(p for p in set(a[k]) | set(b[k]) if a[k].get(p) != b[k].get(p))
            if pages:
                diffs.append(f"mem pages {[hex(p) for p in pages]}")
        elif a[k] != b[k]:
            diffs.append(f"{k}: {a[k]} != {b[k]}")
    return diffs


def run_bare(st: MachineState, budget: int = 1000) -> Any:
    return SpecCPU(st, deliver_exceptions=True).run(budget)
