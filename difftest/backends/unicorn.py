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
  are written through ``UC_X86_REG_FS_BASE``/``GS_BASE``.  Those segment loads read
  the GDT through the guest's page tables and set accessed bits the guest never set,
  so in protected mode memory is written again after them and the TLB dropped.
* CPL 3: QEMU takes the CPL from the DPL of SS (``hflags``), and a setup write of SS
  is checked against the current CPL, so it cannot raise it.  In the 32-bit engine SS
  is first loaded the virtual-8086 way (EFLAGS.VM=1 gives it DPL 3, no descriptor read),
  after which the normal, checked segment loads run at CPL 3.  The 64-bit engine's
  segment writes only set selectors, so there the CPU leaves CPL 0 the architectural
  way: one SYSRETQ (SDM Vol. 2B SYSRET: CS/SS get fixed DPL-3 caches, RIP = RCX), run
  with paging still off from three bytes of the first page before the snapshot's
  memory and registers are loaded (so the guest's memory is not touched).
* Exceptions are never delivered: ``UC_HOOK_INTR`` records vector, RIP and CR2 (CR2
  only readable inside the hook) and stops; #UD comes back as ``UC_ERR_INSN_INVALID``.
  Error codes are not observable (``error_code=None``).
* HLT stops ``emu_start`` with RIP after it, like an exhausted instruction count.  They
  are told apart with a block hook: HLT ends its translation block, so the stop is a
  HLT exactly when the last block entered ends at the final linear RIP (a budget stop
  happens at an instruction boundary inside, or at the start of, the last block entered).
* Access to physical memory that is not present (``UC_ERR_*_UNMAPPED``) is reported as
  ``unsupported``: the spec models open bus there, Unicorn stops.

Speed (a campaign runs hundreds of cases a second per worker): an engine keeps its
memory mappings while consecutive snapshots have the same set of pages (then every
page is rewritten, so nothing of the previous case survives besides what the two
flushes drop); registers move in one ``uc_reg_write_batch`` / ``uc_reg_read_batch``
call each, in the setup order above, through prebuilt ctypes arrays (the bindings'
per-register ``reg_write`` costs ~3 us a register); pages read back unchanged are
the input's page objects.

Final snapshot: the input snapshot with GPRs, RIP, RFLAGS, segment selectors, CR0, CR3,
CR4, EFER, CR2 (when a #PF was seen) and every page replaced by what Unicorn reports.
Left as in the input (Unicorn cannot report them): the hidden parts of segment caches,
LDTR/TR, GDTR/IDTR, DRs, other MSRs, PDPTEs, PKRU, CR8, interrupt shadow / NMI
blocking, ``undefined_flags`` (Unicorn has no notion of undefined flags) and ``halted``
(set when the stop was HLT).
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
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
from spec.snapshot import GPR_NAMES, PageModel, SegmentModel, Snapshot, trusted

PAGE = 0x1000
MSR_EFER = 0xC0000080
EFER_SCE = 1
RFLAGS_VM = 1 << 17
SYSRETQ = b"\x48\x0f\x07"
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


class _Mmr(ctypes.Structure):
    """``uc_x86_mmr`` (unicorn/x86.h): a descriptor-table register."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


class _Msr(ctypes.Structure):
    """``uc_x86_msr`` (unicorn/x86.h)."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class _RegisterBatch:
    """A fixed list of registers moved in one ``uc_reg_{write,read}_batch`` call.

    Plain registers live in a ``uint64`` array (zeroed before a read: Unicorn
    writes only the register's width), GDTR/IDTR and MSRs in their structures.
    """

    def __init__(self, uc: Uc, regs: list[int | tuple[int, int]]) -> None:
        self.uc = uc
        n = len(regs)
        self.n = n
        self.ids = (ctypes.c_int * n)(*(r if isinstance(r, int) else X.UC_X86_REG_MSR if r[0] == _MSR else r[1]
                                        for r in regs))
        self.values = (ctypes.c_uint64 * n)()
        self.structs: dict[int, _Mmr | _Msr] = {}
        ptrs = []
        for k, r in enumerate(regs):
            if isinstance(r, tuple):
                obj = _Msr(r[1]) if r[0] == _MSR else _Mmr()
                self.structs[k] = obj
                ptrs.append(ctypes.addressof(obj))
            else:
                ptrs.append(ctypes.addressof(self.values) + 8 * k)
        self.ptrs = (ctypes.c_void_p * n)(*ptrs)
        self._write = getattr(uc, "_do_reg_write_batch", None)
        self._read = getattr(uc, "_do_reg_read_batch", None)

    def write(self, values: list[int | tuple[int, int]]) -> None:
        """Write ``values`` (``(base, limit)`` for a table register) in order; a refusal raises ``UcError``."""
        for k, obj in self.structs.items():
            v = values[k]
            if isinstance(obj, _Msr):
                obj.value = v  # type: ignore[assignment]
            else:
                obj.selector, obj.base, obj.limit, obj.flags = 0, v[0], v[1], 0  # type: ignore[index]
                values[k] = 0
        self.values[:] = values  # type: ignore[assignment]
        if self._write is None:  # bindings without the raw entry point: the public (slower) one
            self.uc.reg_write_batch([(self.ids[k], values[k] if k not in self.structs else self._public(k))
                                     for k in range(self.n)])
            return
        status = self._write(self.ids, self.ptrs, self.n)
        if status:
            raise UcError(status)

    def _public(self, k: int) -> Any:
        obj = self.structs[k]
        if isinstance(obj, _Msr):
            return (obj.rid, obj.value)
        return (obj.selector, obj.base, obj.limit, obj.flags)

    def read(self) -> list[int]:
        """The registers' values (an MSR's value; table registers are not read back)."""
        if self._read is None:
            got = self.uc.reg_read_batch([(self.ids[k], self.structs[k].rid) if k in self.structs  # type: ignore[union-attr]
                                          else self.ids[k] for k in range(self.n)])
            return [int(v) for v in got]
        ctypes.memset(self.values, 0, 8 * self.n)
        status = self._read(self.ids, self.ptrs, self.n)
        if status:
            raise UcError(status)
        out = list(self.values)
        for k, obj in self.structs.items():
            out[k] = obj.value if isinstance(obj, _Msr) else 0
        return out


_MSR, _TABLE = "msr", "table"


class _Engine:
    """One reused ``Uc``, its register batches, its mappings and the per-run observations of its hooks."""

    def __init__(self, uc_mode: int) -> None:
        self.uc = Uc(UC_ARCH_X86, uc_mode)
        self.bits = {UC_MODE_16: 16, UC_MODE_32: 32, UC_MODE_64: 64}[uc_mode]
        self.regions: list[tuple[int, int]] = []  # mapped now
        self.mapped: tuple[int, ...] = ()  # the page addresses those regions were made for
        wide = self.bits == 64
        gprs = list(_GPR64 if wide else _GPR32)
        flags_reg, rip_reg = (X.UC_X86_REG_RFLAGS, X.UC_X86_REG_RIP) if wide else (X.UC_X86_REG_EFLAGS,
                                                                                     X.UC_X86_REG_EIP)
        # Setup order (module docstring): GDTR, IDTR, EFER, CR3, CR4, CR0, CR2, segments, [FS/GS base], GPRs...
        self.setup = _RegisterBatch(self.uc, [
            (_TABLE, X.UC_X86_REG_GDTR), (_TABLE, X.UC_X86_REG_IDTR), (_MSR, MSR_EFER),
            X.UC_X86_REG_CR3, X.UC_X86_REG_CR4, X.UC_X86_REG_CR0, X.UC_X86_REG_CR2,
            *(reg for _, reg in _SEGS),
            *([X.UC_X86_REG_FS_BASE, X.UC_X86_REG_GS_BASE] if wide else []),
            *gprs, flags_reg, rip_reg])
        self.readback = _RegisterBatch(self.uc, [*gprs, flags_reg, *(reg for _, reg in _SEGS), X.UC_X86_REG_CR0,
                                                 X.UC_X86_REG_CR3, X.UC_X86_REG_CR4, (_MSR, MSR_EFER)])
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


_CAPABILITIES = Capabilities(modes=frozenset({"real", "prot16", "prot32", "long64"}),
                             paging=frozenset({"none", "32-bit", "PAE", "4-level"}), cpls=frozenset({0, 3}),
                             delivers_exceptions=False, reports_error_codes=False)


class UnicornBackend:
    """Unicorn 2.x (QEMU TCG) as a differential-testing backend; see the module docstring."""

    name = "unicorn"

    def __init__(self) -> None:
        self._engines: dict[int, _Engine] = {}

    def capabilities(self) -> Capabilities:
        return _CAPABILITIES  # frozen: shared safely

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
        addrs = tuple(p.address for p in snap.pages)
        fresh = addrs != eng.mapped
        if fresh:
            while eng.regions:
                uc.mem_unmap(*eng.regions[-1])
                eng.regions.pop()
            eng.mapped = ()
            run_start = run_end = -1
            regions = []
            for a in addrs:  # sorted; contiguous pages become one mapping
                if a != run_end:
                    if run_start >= 0:
                        regions.append((run_start, run_end - run_start))
                    run_start = a
                run_end = a + PAGE
            if run_start >= 0:
                regions.append((run_start, run_end - run_start))
            for addr, size in regions:
                uc.mem_map(addr, size)
                eng.regions.append((addr, size))
            eng.mapped = addrs
        if eng.bits == 64 and snap.segments.ss.dpl == 3:
            self._enter_cpl3_long(eng, snap)
        for p in snap.pages:  # a fresh mapping is zero; a reused one holds the previous case's bytes
            if p.data or not fresh:
                uc.mem_write(p.address, p.to_bytes())
        # Both flushes are mandatory when an Uc is reused (ORACLES.md).
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        uc.ctl_flush_tb()
        c, r, segs = snap.control, snap.regs, snap.segments
        if eng.bits == 32 and segs.ss.dpl == 3 and mode != "real":
            # CPL 3 (module docstring): a virtual-8086-style SS load sets QEMU's CPL to 3 first.
            uc.reg_write(X.UC_X86_REG_EFLAGS, RFLAGS_VM | 2)
            uc.reg_write(X.UC_X86_REG_SS, segs.ss.selector)
            uc.reg_write(X.UC_X86_REG_EFLAGS, 2)
        values: list[Any] = [(snap.gdtr.base, snap.gdtr.limit), (snap.idtr.base, snap.idtr.limit), snap.efer,
                             c.cr3, c.cr4, c.cr0, c.cr2, *(getattr(segs, name).selector for name, _ in _SEGS)]
        if eng.bits == 64:
            values += [segs.fs.base, segs.gs.base, *(getattr(r, name) for name in GPR_NAMES)]
        else:
            values += [getattr(r, name) & 0xFFFF_FFFF for name in GPR_NAMES[:8]]
        values += [r.rflags, r.rip]
        eng.setup.write(values)
        if mode != "real":
            # The segment loads above read the guest's GDT through its page tables, setting accessed bits
            # (descriptor and paging-structure A bits) that the guest did not: restore memory, drop the TLB.
            for p in snap.pages:
                uc.mem_write(p.address, p.to_bytes())
            uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    @staticmethod
    def _enter_cpl3_long(eng: _Engine, snap: Snapshot) -> None:
        """Leave CPL 0 in the 64-bit engine with one SYSRETQ (module docstring).

        Runs in the pristine engine state (paging off) right after the snapshot's pages are mapped and
        before they are written: the SYSRETQ borrows three bytes of the first page, restored at once.
        With paging on, Unicorn's own code-page lookups (after a run, when memory is (un)mapped) would
        page-fault silently at CPL 3, and QEMU would then report the case's first fault as #DF.
        """
        uc = eng.uc
        if not snap.pages:
            raise UcError(UC_ERR_EXCEPTION)
        rip = snap.regs.rip
        page = snap.pages[0].address
        code = page + 0x800 if page <= rip < page + 0x10 else page  # SYSRETQ must not sit at the stop address
        saved = uc.mem_read(code, len(SYSRETQ))
        try:
            uc.mem_write(code, SYSRETQ)
            uc.msr_write(MSR_EFER, uc.msr_read(MSR_EFER) | EFER_SCE)
            uc.reg_write(X.UC_X86_REG_RCX, rip)
            uc.reg_write(X.UC_X86_REG_R11, 2)
            eng.intr = None
            uc.emu_start(code, rip)  # not count=1: a count stop makes QEMU report the next fault as #DF
        finally:
            uc.mem_write(code, bytes(saved))
        if eng.intr is not None or uc.reg_read(X.UC_X86_REG_RIP) != rip:
            raise UcError(UC_ERR_EXCEPTION)

    def _read_back(self, eng: _Engine, snap: Snapshot, stop: Stop) -> Snapshot:
        uc = eng.uc
        got = eng.readback.read()
        r = snap.regs
        regs = dict(r.__dict__)
        if eng.bits == 64:
            regs.update(zip(GPR_NAMES, got[:16], strict=True))
            k = 16
        else:
            for name, v in zip(GPR_NAMES[:8], got[:8], strict=True):
                regs[name] = (regs[name] & ~0xFFFF_FFFF) | v
            k = 8
        regs["rflags"] = got[k]
        regs["rip"] = stop.rip
        sels = got[k + 1:k + 7]
        cr0, cr3, cr4, efer = got[k + 7:k + 11]
        segments = dict(snap.segments.__dict__)
        for (name, _), sel in zip(_SEGS, sels, strict=True):
            segments[name] = trusted(SegmentModel, {**segments[name].__dict__, "selector": sel})
        control = {**snap.control.__dict__, "cr0": cr0, "cr3": cr3, "cr4": cr4}
        if stop.cr2 is not None:
            control["cr2"] = stop.cr2
        # One read per mapped region (contiguous pages, see _load), sliced into pages: fewer round trips.
        memory = {addr: uc.mem_read(addr, size) for addr, size in eng.regions}
        starts = sorted(memory)
        pages = []
        region = -1
        for p in snap.pages:
            while region + 1 < len(starts) and starts[region + 1] <= p.address:
                region += 1
            base = starts[region]
            off = p.address - base
            raw = memory[base][off:off + PAGE]
            pages.append(p if raw == p.to_bytes() else PageModel.from_bytes(p.address, raw))
        values = dict(snap.__dict__)
        values.update(regs=trusted(type(r), regs), segments=trusted(type(snap.segments), segments),
                      control=trusted(type(snap.control), control), msrs=dict(snap.msrs), dr=list(snap.dr),
                      pdptes=list(snap.pdptes), undefined_flags=list(snap.undefined_flags), efer=efer,
                      halted=stop.kind == "halted", pages=pages)
        return trusted(Snapshot, values)


__all__ = ["UnicornBackend"]
