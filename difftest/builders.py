"""Build test cases: a correct machine for an environment, with the case's code, registers and data.

For each :class:`~difftest.case.Environment` a *template* machine is built once
(and cached) from the :mod:`difftest.layout` of that environment:

* segments and GDT from :func:`spec.machine.flat_machine` (kernel code/data,
  user code/data; SDM Vol. 3A 3.4.5) and, at CPL 3, the user segments of
  :func:`spec.machine.enter_user_mode`;
* interrupt tables from :func:`spec.machine.install_idt`: every vector's handler
  is ``HLT`` at ``HANDLERS + 16 * vector`` (the convention
  :func:`difftest.backends.kvm.stub_exception` decodes), DPL-3 gates for INT3,
  INTO and 0x80, a TSS with the ring-0 stack (SS0:ESP0 / RSP0 = 0x6000) in the
  GDT and TR; in long mode #DF and NMI switch to IST1 (SDM Vol. 3A 6.14.5).
  A handler halts with the exception frame on its stack -- the kernel stack at
  CPL 3 (the privilege change loads it from the TSS, SDM 6.12.1), the case's
  stack at CPL 0 -- and every stack page is part of the compared memory.
  ``idt=False`` keeps the tables in memory but sets the IDTR limit to 0, so an
  exception escalates to a shutdown;
* paging (when the environment has it): the identity-mapping paging structures
  of the layout, CR3 pointing to the root, CR0.PG and CR0.WP (supervisor writes
  honour R/W, SDM 4.6.1), CR4.PAE for PAE and 4-level paging, CR4.PSE for
  32-bit paging, EFER.NXE with 8-byte entries (so XD is an access right and not
  a reserved bit, SDM 4.6.2), EFER.LME/LMA in 64-bit mode, and for PAE the
  PDPTE registers loaded from the PDPT as MOV CR3 would (SDM 4.4.1).

:func:`build` then copies the template and patches only what a case changes:
the code page(s), the data pages written, the paging-structure pages edited and
the registers.  Pages the case does not touch share their (immutable) hex text
with the template, so a 20-instruction case costs well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from difftest.case import HLT, Case, Environment, Provenance, make_case
from difftest.layout import Layout, layout
from spec.machine import (
    GATE_INT32,
    HANDLER_STRIDE,
    HANDLERS,
    KERNEL_CS,
    enter_user_mode,
    flat_machine,
    install_idt,
    set_gate,
)
from spec.memory import PAGE
from spec.paging import CR0_WP, CR4_PAE, CR4_PSE, EFER_NXE
from spec.snapshot import (
    GPR_NAMES,
    RFLAGS_RESERVED,
    SEG_FIELDS,
    ControlRegisters,
    PageModel,
    Registers,
    SegmentModel,
    Segments,
    Snapshot,
    TableRegisterModel,
    trusted,
)
from spec.state import CR0_PG, EFER_LMA, EFER_LME, MachineState

VECTOR_NMI, VECTOR_DF = 2, 8
IST_VECTORS = (VECTOR_NMI, VECTOR_DF)  # long mode: these switch to IST1 (SDM Vol. 3A 6.14.5)
GPR_SET = frozenset(GPR_NAMES)
M64 = (1 << 64) - 1
SEGMENT_REGISTERS = (*SEG_FIELDS, "ldtr", "tr")


@dataclass(frozen=True)
class Template:
    """The machine of one environment before a case's code, registers and data go in."""

    layout: Layout
    snapshot: Snapshot
    page_bytes: dict[int, bytes]  # every page's full 4 KiB, by physical address
    page_hex: dict[int, str]  # every page's canonical hex text (PageModel.data), by physical address


def machine(env: Environment) -> MachineState:
    """A fresh :class:`MachineState` of ``env`` without code (zeros at the code address); :func:`build` adds it."""
    lay = layout(env)
    st = flat_machine(env.mode, b"", data_pages=0, idt=False)
    phys = st.mem.phys
    # Keep flat_machine's low memory (GDT, code/stack pages); everything else (its own page tables
    # included) starts as zero pages.
    phys.pages = {k: v for k, v in phys.pages.items() if (k << 12) in lay.pages and (k << 12) < lay.stack_top}
    for a in lay.pages:
        if (a >> 12) not in phys.pages:
            phys.map_page(a)
    install_idt(st, env.mode)
    if env.mode == "long64":
        for v in IST_VECTORS:
            set_gate(st, v, HANDLERS + HANDLER_STRIDE * v, KERNEL_CS, GATE_INT32, ist=1)
    if not env.idt:
        st.idtr.base, st.idtr.limit = 0, 0
    if lay.paging:
        _enable_paging(st, env, lay)
    if env.cpl == 3:
        enter_user_mode(st)
    st.rip = lay.code
    st.gpr[4] = lay.stack_top
    return st


def _enable_paging(st: MachineState, env: Environment, lay: Layout) -> None:
    phys = st.mem.phys
    for addr, value in lay.entries.items():
        phys.write(addr, lay.entry_bytes, value)
    st.cr3 = lay.tables[0]
    st.cr0 |= CR0_PG | CR0_WP
    if env.paging == "32-bit":
        st.cr4, st.efer = CR4_PSE, 0
    elif env.paging == "PAE":
        st.cr4, st.efer = CR4_PAE, EFER_NXE
        st.pdptes = [phys.read(lay.tables[0] + 8 * k, 8) for k in range(4)]
    else:
        st.cr4, st.efer = CR4_PAE, EFER_LME | EFER_LMA | EFER_NXE


@cache
def _template(mode: str, paging: str, page_size: int, cpl: int, idt: bool) -> Template:
    env = Environment(mode=mode, paging=paging, page_size=page_size, cpl=cpl, idt=idt)  # type: ignore[arg-type]
    st = machine(env)
    snap = Snapshot.from_state(st)
    page_bytes = {k << 12: bytes(v) for k, v in st.mem.phys.pages.items()}
    page_hex = {p.address: p.data for p in snap.pages}
    return Template(layout=layout(env), snapshot=snap, page_bytes=page_bytes, page_hex=page_hex)


def template(env: Environment) -> Template:
    """The cached template of ``env`` (treat it as read-only)."""
    return _template(env.mode, env.paging, env.page_size, env.cpl, env.idt)


def build(env: Environment, insns: list[bytes], *, regs: dict[str, int] | None = None, rflags: int = 0x2,
          data: dict[int, bytes] | None = None, pte_edits: dict[int, int] | None = None,
          name: str = "case", budget: int | None = None, tags: list[str] | None = None,
          provenance: Provenance | None = None) -> Case:
    """A case running ``insns`` + HLT in ``env``.

    ``regs`` sets GPRs by snapshot name (``rsp`` defaults to the layout's stack
    top, the others to 0); ``data`` writes bytes at linear addresses inside the
    data pages; ``pte_edits`` replaces paging-structure entries (physical entry
    address -> value) before the run -- initial corruptions.  Bad arguments are a
    one-line ValueError.
    """
    t = template(env)
    lay = t.layout
    code = b"".join(insns) + HLT
    if lay.code + len(code) > lay.code_end:
        raise ValueError(f"code of {len(code)} bytes does not fit below {lay.code_end:#x}")
    patched: dict[int, bytearray] = {}

    def put(addr: int, raw: bytes) -> None:
        pos = 0
        while pos < len(raw):
            base, off = (addr + pos) & ~(PAGE - 1), (addr + pos) & (PAGE - 1)
            take = min(len(raw) - pos, PAGE - off)
            page = patched.get(base)
            if page is None:
                page = patched[base] = bytearray(t.page_bytes[base])
            page[off:off + take] = raw[pos:pos + take]
            pos += take

    put(lay.code, code)
    lo, hi = lay.data[0], lay.data_end
    for addr, raw in (data or {}).items():
        if not (lo <= addr and addr + len(raw) <= hi):
            raise ValueError(f"data at {addr:#x} (+{len(raw)}) lies outside the data pages {lo:#x}-{hi:#x}")
        put(addr, raw)
    if pte_edits:
        _edit_entries(lay, pte_edits, put)
    snap = _snapshot(t, env, patched, regs or {}, rflags)
    return make_case(name, env, snap, lay.code, insns, budget=budget, tags=tags, provenance=provenance)


def _edit_entries(lay: Layout, edits: dict[int, int], put: Callable[[int, bytes], None]) -> None:
    if not lay.paging:
        raise ValueError(f"{lay.label}: no paging, so no paging-structure entries to edit")
    eb = lay.entry_bytes
    for addr, value in edits.items():
        if (addr & ~(PAGE - 1)) not in lay.tables or addr % eb:
            raise ValueError(f"{addr:#x} is not a {eb}-byte entry of a paging structure "
                             f"({', '.join(hex(a) for a in lay.tables)})")
        if not 0 <= value < 1 << (8 * eb):
            raise ValueError(f"entry value {value:#x} does not fit in {eb} bytes")
        put(addr, value.to_bytes(eb, "little"))


def _snapshot(t: Template, env: Environment, patched: dict[int, bytearray], regs: dict[str, int],
              rflags: int) -> Snapshot:
    """The template's snapshot with the case's registers and patched pages.

    Built with :func:`spec.snapshot.trusted` (no re-validation): every value is
    canonical by construction -- registers are range-checked here, RFLAGS with
    the snapshot's own rule, page text is lower-case hex without trailing zero
    bytes, pages keep the template's sorted order.  Fresh containers throughout,
    so a case shares nothing mutable with the template or with other cases.
    """
    unknown = set(regs) - GPR_SET
    if unknown:
        raise ValueError(f"unknown register(s) {', '.join(sorted(unknown))}; use {', '.join(GPR_NAMES)}")
    for reg_name, value in regs.items():
        if not 0 <= value <= M64:
            raise ValueError(f"{reg_name} = {value:#x} does not fit in 64 unsigned bits")
    if not rflags & 2 or rflags & RFLAGS_RESERVED or rflags < 0:
        raise ValueError(f"rflags {rflags:#x}: bit 1 must be 1 and the reserved bits 0 (SDM Vol. 1 3.4.3)")
    base = t.snapshot
    values = {**base.regs.__dict__, "rsp": t.layout.stack_top, **regs, "rip": t.layout.code, "rflags": rflags}
    pages = []
    for p in base.pages:
        raw = patched.get(p.address)
        text = raw.rstrip(b"\0").hex() if raw is not None else t.page_hex[p.address]
        pages.append(trusted(PageModel, {"address": p.address, "data": text}))
    segs = base.segments.__dict__
    snap = {**base.__dict__,
            "regs": trusted(Registers, values), "pages": pages,
            "segments": trusted(Segments, {name: trusted(SegmentModel, dict(segs[name].__dict__))
                                           for name in SEGMENT_REGISTERS}),
            "control": trusted(ControlRegisters, dict(base.control.__dict__)),
            "gdtr": trusted(TableRegisterModel, dict(base.gdtr.__dict__)),
            "idtr": trusted(TableRegisterModel, dict(base.idtr.__dict__)),
            "msrs": dict(base.msrs), "dr": list(base.dr), "pdptes": list(base.pdptes), "undefined_flags": []}
    if env.paging == "PAE" and t.layout.tables[0] in patched:
        pdpt = patched[t.layout.tables[0]]
        snap["pdptes"] = [int.from_bytes(pdpt[8 * k:8 * k + 8], "little") for k in range(4)]
    return trusted(Snapshot, snap)
