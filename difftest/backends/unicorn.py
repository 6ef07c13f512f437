"""The Unicorn 2.x backend (QEMU TCG): runs a snapshot up to and including its first exception.

Facts this backend relies on are measured in /work/shared/ORACLES.md:

* One ``Uc`` per Unicorn mode, reused across cases: ``UC_MODE_64`` keeps decoding
  64-bit code whatever the control registers say, so real mode runs on a
  ``UC_MODE_16`` engine and the protected modes on ``UC_MODE_32`` (its CS load
  takes the D bit from the guest descriptor, so 16-bit protected code works there).
  In 16/32-bit engines only the 32-bit register names are accessible (R8-R15 and
  the upper halves stay as in the input snapshot).
* Between cases both flushes are mandatory: the TLB (``UC_CTL_TLB_FLUSH``) and the
  translation blocks (``ctl_flush_tb``); every mapping of the previous case is removed.
* Setup order: GDTR, IDTR, EFER, CR3, CR4, CR0, CS (descriptor read from the guest
  GDT), data segments, GPRs, RFLAGS, RIP.  In real mode a segment load sets
  base = selector * 16, so a real-mode snapshot with another base is unsupported; in
  protected mode the hidden parts come from the guest GDT, so a snapshot whose caches
  differ from its descriptors is unsupported (checked against physical memory at
  GDTR.base, i.e. assuming the GDT is identity mapped).  FS/GS bases in 64-bit mode
  are written through ``UC_X86_REG_FS_BASE``/``GS_BASE``.
* Exceptions are never delivered: ``UC_HOOK_INTR`` records vector, RIP and CR2 (CR2
  only readable inside the hook) and stops; #UD comes back as ``UC_ERR_INSN_INVALID``.
  Error codes are not observable (``error_code=None``).
* HLT stops ``emu_start`` with RIP after it, like an exhausted instruction count.  They
  are told apart with a block hook: HLT ends its translation block, so the stop is a
  HLT exactly when the last block entered ends at the final linear RIP (a budget stop
  happens at an instruction boundary inside, or at the start of, the last block entered).
* Access to physical memory that is not present (``UC_ERR_*_UNMAPPED``) is reported as
  ``unsupported``: the spec models open bus there, Unicorn stops.

Final snapshot: the input snapshot with GPRs, RIP, RFLAGS, segment selectors, CR0, CR3,
CR4, EFER, CR2 (when a #PF was seen) and every page replaced by what Unicorn reports.
Left as in the input (Unicorn cannot report them): the hidden parts of segment caches,
LDTR/TR, GDTR/IDTR, DRs, other MSRs, PDPTEs, PKRU, CR8, interrupt shadow / NMI
blocking, ``undefined_flags`` (Unicorn has no notion of undefined flags) and ``halted``
(set when the stop was HLT).
"""

from __future__ import annotations

from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_BLOCK,
    UC_HOOK_INTR,
    UC_MODE_16,
    UC_MODE_32,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from difftest.backend import Capabilities, ModeName, Outcome, Stop, describe
from spec.snapshot import GPR_NAMES, PageModel, SegmentModel, Snapshot

PAGE = 0x1000
MSR_EFER = 0xC0000080
VECTOR_PF = 14
VECTOR_UD = 6

_ENGINE_MODE = {"real": UC_MODE_16, "prot16": UC_MODE_32, "prot32": UC_MODE_32, "compat": UC_MODE_64,
                "long64": UC_MODE_64}
_GPR64 = tuple(getattr(X, f"UC_X86_REG_{n.upper()}") for n in GPR_NAMES)
_GPR32 = tuple(getattr(X, f"UC_X86_REG_E{n[1:].upper()}") for n in GPR_NAMES[:8])
_SEGS = (("cs", X.UC_X86_REG_CS), ("ss", X.UC_X86_REG_SS), ("ds", X.UC_X86_REG_DS), ("es", X.UC_X86_REG_ES),
         ("fs", X.UC_X86_REG_FS), ("gs", X.UC_X86_REG_GS))
_UNMAPPED = {UC_ERR_READ_UNMAPPED: "read", UC_ERR_WRITE_UNMAPPED: "write", UC_ERR_FETCH_UNMAPPED: "fetch"}


def _descriptor(seg: SegmentModel) -> int:
    """The 8-byte descriptor whose load gives ``seg``'s cache (SDM Vol. 3A Figure 3-8), accessed bit ignored."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    access = seg.type | seg.s << 4 | seg.dpl << 5 | seg.p << 7
    flags = seg.avl | seg.l << 1 | seg.db << 2 | seg.g << 3
    return ((limit & 0xFFFF) | (seg.base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((seg.base >> 24) & 0xFF) << 56)


class _Engine:
    """One reused ``Uc`` and the per-run observations of its hooks."""

    def __init__(self, uc_mode: int) -> None:
        self.uc = Uc(UC_ARCH_X86, uc_mode)
        self.bits = {UC_MODE_16: 16, UC_MODE_32: 32, UC_MODE_64: 64}[uc_mode]
        self.regions: list[tuple[int, int]] = []
        self.intr: tuple[int, int, int] | None = None
        self.last_block: tuple[int, int] = (-1, 0)
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)
        self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        # QEMU remembers the last undelivered exception (for #DF detection); restoring the
        # pristine CPU context per case forgets it (otherwise #DE after #DE reads as #DF).
        self.pristine = self.uc.context_save()

    def _on_intr(self, uc: Uc, vector: int, _user: Any) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP if self.bits == 64 else X.UC_X86_REG_EIP)
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)  # only valid inside the hook (ORACLES.md)
        if self.intr is None:
            self.intr = (vector, rip, cr2)
        uc.emu_stop()  # returning without a stop re-executes, escalating to #DF/triple fault

    def _on_block(self, _uc: Uc, address: int, size: int, _user: Any) -> None:
        self.last_block = (address, size)


class UnicornBackend:
    """Unicorn 2.x (QEMU TCG) as a differential-testing backend; see the module docstring."""

    name = "unicorn"

    def __init__(self) -> None:
        self._engines: dict[int, _Engine] = {}

    def capabilities(self) -> Capabilities:
        return Capabilities(modes=frozenset({"real", "prot16", "prot32", "long64"}),
                            paging=frozenset({"none", "32-bit", "PAE", "4-level"}), cpls=frozenset({0, 3}),
                            delivers_exceptions=False, reports_error_codes=False)

    def _unsupported(self, detail: str, rip: int) -> Outcome:
        return Outcome(backend=self.name, stop=Stop(kind="unsupported", rip=rip, detail=detail), final=None,
                       executed_by="qemu-tcg")

    @staticmethod
    def _check_segments(snap: Snapshot, mode: ModeName) -> str | None:
        """Why Unicorn cannot reproduce ``snap``'s segment caches (``None`` if it can)."""
        pages = {p.address: p for p in snap.pages}
        for name, _ in _SEGS:
            seg: SegmentModel = getattr(snap.segments, name)
            if mode == "real":
                if seg.base != seg.selector << 4:
                    return f"real-mode {name} base {seg.base:#x} is not selector*16 (Unicorn derives it)"
                continue
            if mode == "long64" and name != "cs":
                continue  # data-segment caches are ignored in 64-bit mode; FS/GS bases go via their MSRs
            if seg.selector & ~3 == 0:
                if name in ("cs", "ss"):
                    return f"null {name} selector"
                continue
            if seg.selector & 4:
                return f"{name} selector {seg.selector:#x} refers to the LDT"
            addr = snap.gdtr.base + (seg.selector & ~7)
            if addr + 8 > snap.gdtr.base + snap.gdtr.limit + 1:
                return f"{name} selector {seg.selector:#x} beyond the GDT limit"
            page = pages.get(addr & ~(PAGE - 1))
            if page is None or addr % PAGE > PAGE - 8:
                return f"{name} descriptor at {addr:#x} not in one mapped page"
            raw = int.from_bytes(page.to_bytes()[addr % PAGE:addr % PAGE + 8], "little")
            want = _descriptor(seg)
            if (raw ^ want) & ~(1 << 40):  # the accessed bit may differ
                return f"{name} cache differs from its GDT descriptor {raw:#018x}"
        return None

    def run(self, snap: Snapshot, budget: int) -> Outcome:
        caps = self.capabilities()
        why = caps.refuse(snap)
        if why is not None:
            return self._unsupported(why, snap.regs.rip)
        mode, _paging, _cpl = describe(snap)
        why = self._check_segments(snap, mode)
        if why is not None:
            return self._unsupported(why, snap.regs.rip)
        uc_mode = _ENGINE_MODE[mode]
        eng = self._engines.get(uc_mode)
        if eng is None:
            eng = self._engines[uc_mode] = _Engine(uc_mode)
        uc = eng.uc
        try:
            self._load(eng, snap, mode)
        except UcError as e:
            return self._unsupported(f"Unicorn refused the state: {e}", snap.regs.rip)
        eng.intr = None
        eng.last_block = (-1, 0)
        wide = eng.bits == 64
        rip_reg = X.UC_X86_REG_RIP if wide else X.UC_X86_REG_EIP
        start = snap.segments.cs.base + snap.regs.rip if mode == "real" or not wide else snap.regs.rip
        err: UcError | None = None
        try:
            uc.emu_start(start, -1, count=budget)
        except UcError as e:
            err = e
        rip = uc.reg_read(rip_reg)
        if eng.intr is not None:
            vector, rip, cr2 = eng.intr
            stop = Stop(kind="exception", rip=rip, vector=vector, cr2=cr2 if vector == VECTOR_PF else None)
        elif err is not None and err.errno == UC_ERR_INSN_INVALID:
            stop = Stop(kind="exception", rip=rip, vector=VECTOR_UD)
        elif err is not None and err.errno in _UNMAPPED:
            return self._unsupported(f"{_UNMAPPED[err.errno]} of physical memory not present ({err}); "
                                     "the spec models open bus", rip)
        elif err is not None:
            return self._unsupported(f"Unicorn error: {err}", rip)
        else:
            addr, size = eng.last_block
            cs_sel = uc.reg_read(X.UC_X86_REG_CS)
            cs_base = cs_sel << 4 if mode == "real" else (snap.segments.cs.base if mode != "long64" else 0)
            halted = addr >= 0 and addr + size == cs_base + rip
            stop = Stop(kind="halted" if halted else "budget", rip=rip)
        return Outcome(backend=self.name, stop=stop, final=self._read_back(eng, snap, stop), executed_by="qemu-tcg")

    # -- state transfer ------------------------------------------------------------------
    def _load(self, eng: _Engine, snap: Snapshot, mode: ModeName) -> None:
        uc = eng.uc
        uc.context_restore(eng.pristine)
        for addr, size in eng.regions:
            uc.mem_unmap(addr, size)
        eng.regions = []
        run_start = run_end = -1
        for p in snap.pages:  # sorted by address; contiguous pages become one mapping
            if p.address != run_end:
                if run_start >= 0:
                    eng.regions.append((run_start, run_end - run_start))
                run_start = p.address
            run_end = p.address + PAGE
        if run_start >= 0:
            eng.regions.append((run_start, run_end - run_start))
        for addr, size in eng.regions:
            uc.mem_map(addr, size)
        for p in snap.pages:
            if p.data:
                uc.mem_write(p.address, bytes.fromhex(p.data))
        # Both flushes are mandatory when an Uc is reused (ORACLES.md).
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        uc.ctl_flush_tb()
        c = snap.control
        uc.reg_write(X.UC_X86_REG_GDTR, (0, snap.gdtr.base, snap.gdtr.limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, snap.idtr.base, snap.idtr.limit, 0))
        uc.msr_write(MSR_EFER, snap.efer)
        uc.reg_write(X.UC_X86_REG_CR3, c.cr3)
        uc.reg_write(X.UC_X86_REG_CR4, c.cr4)
        uc.reg_write(X.UC_X86_REG_CR0, c.cr0)
        uc.reg_write(X.UC_X86_REG_CR2, c.cr2)
        for name, reg in _SEGS:
            uc.reg_write(reg, getattr(snap.segments, name).selector)
        r = snap.regs
        if eng.bits == 64:
            uc.reg_write(X.UC_X86_REG_FS_BASE, snap.segments.fs.base)
            uc.reg_write(X.UC_X86_REG_GS_BASE, snap.segments.gs.base)
            for reg, name in zip(_GPR64, GPR_NAMES, strict=True):
                uc.reg_write(reg, getattr(r, name))
            uc.reg_write(X.UC_X86_REG_RFLAGS, r.rflags)
            uc.reg_write(X.UC_X86_REG_RIP, r.rip)
        else:
            for reg, name in zip(_GPR32, GPR_NAMES, strict=False):
                uc.reg_write(reg, getattr(r, name) & 0xFFFF_FFFF)
            uc.reg_write(X.UC_X86_REG_EFLAGS, r.rflags)
            uc.reg_write(X.UC_X86_REG_EIP, r.rip)

    def _read_back(self, eng: _Engine, snap: Snapshot, stop: Stop) -> Snapshot:
        uc = eng.uc
        segs = snap.segments.model_copy(update={n: getattr(snap.segments, n).model_copy() for n, _ in _SEGS})
        out = snap.model_copy(update={"regs": snap.regs.model_copy(), "segments": segs,
                                      "control": snap.control.model_copy(), "msrs": dict(snap.msrs),
                                      "dr": list(snap.dr), "pdptes": list(snap.pdptes),
                                      "undefined_flags": list(snap.undefined_flags)})
        r = out.regs
        if eng.bits == 64:
            for reg, name in zip(_GPR64, GPR_NAMES, strict=True):
                setattr(r, name, uc.reg_read(reg))
            r.rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        else:
            for reg, name in zip(_GPR32, GPR_NAMES, strict=False):
                setattr(r, name, (getattr(r, name) & ~0xFFFF_FFFF) | uc.reg_read(reg))
            r.rflags = uc.reg_read(X.UC_X86_REG_EFLAGS)
        r.rip = stop.rip
        for name, reg in _SEGS:
            getattr(out.segments, name).selector = uc.reg_read(reg)
        c = out.control
        c.cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        c.cr3 = uc.reg_read(X.UC_X86_REG_CR3)
        c.cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        if stop.cr2 is not None:
            c.cr2 = stop.cr2
        out.efer = uc.msr_read(MSR_EFER)
        out.halted = stop.kind == "halted"
        out.pages = [PageModel(address=p.address, data=bytes(uc.mem_read(p.address, PAGE)).hex())
                     for p in snap.pages]
        return out


__all__ = ["UnicornBackend"]
