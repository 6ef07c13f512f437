"""The KVM backend: run a snapshot on this machine's KVM through raw ``/dev/kvm`` ioctls.

No native dependencies: the structures of ``<linux/kvm.h>`` (``kvm_regs``,
``kvm_sregs``/``kvm_segment``/``kvm_dtable``, ``kvm_userspace_memory_region``,
``kvm_cpuid2``, the ``kvm_run`` page shared with the kernel) are packed with
:mod:`struct`, and the ioctl numbers are computed from the ``_IO``/``_IOR``/
``_IOW``/``_IOWR`` encoding (``dir << 30 | size << 16 | type << 8 | nr``).

Who executes the code (see /work/shared/ORACLES.md): at CPL 3 the real CPU
(hardware ground truth); at CPL 0 -- real mode included -- KVM's own instruction
emulator, an independent implementation that cannot do some instructions
(an internal-error exit, reported as ``unsupported``).  ``Outcome.executed_by``
says which.

One VM and one vCPU per backend object, created lazily on first use and reused.
Guest physical memory is one anonymous host mapping of ``mem_limit`` bytes; per
case only the snapshot's pages are written into it and registered with KVM, one
memory slot per run of contiguous pages.  The slots are deleted and re-added on
every case (size 0, then full size) so that KVM drops shadow page tables built
from the previous case's PTEs (without that, CPL3 code sees stale translations).
Physical addresses outside the snapshot's pages reach user space as MMIO exits
and behave like the spec's open bus (reads all ones, writes dropped); port I/O
likewise (``IN`` reads all ones, ``OUT`` is dropped).

Stops:

* ``KVM_EXIT_HLT`` -- ``halted`` with RIP after the HLT; but when the HLT is one
  of :func:`spec.machine.install_idt`'s handler stubs (``HANDLERS + 16 * vector``
  and the guest's IDT/IVT entry for that vector points there), the exception was
  delivered by the CPU and is decoded from the handler's stack frame:
  ``exception`` with the vector, the error code (for vectors in
  :data:`spec.faults.HAS_ERROR_CODE`), the RIP saved in the frame and, for #PF,
  CR2.  Software ``INT n`` to a vector with an error code would be misdecoded
  (the CPU pushes none) -- do not use those with the stubs.
* ``KVM_EXIT_SHUTDOWN`` -- ``shutdown``: without usable IDT entries a fault
  escalates to a triple fault; KVM leaves RIP at the faulting instruction and
  CR2 set but does not report the vector (``detail`` says so).  Exact exception
  comparison therefore needs the install_idt stubs.
* internal error / emulation failure / failed entry -- ``unsupported`` with the detail.
* the time bound (``signal.setitimer`` + SIGALRM, so ``KVM_RUN`` returns EINTR) -- ``budget``.
  KVM cannot count instructions; the budget is turned into a time bound
  (``max(time_limit, budget * 2 us)``).

The guest's CPUID is KVM_GET_SUPPORTED_CPUID, set once per vCPU.  On this
machine kind it lacks PDPE1GB (CPUID 80000001H:EDX[26]) although the host CPU
has it, so PS=1 in a PDPTE is a reserved-bit #PF (error code RSVD) under KVM,
while the spec's CPU model maps a 1-GiB page: a CPU-model difference, not a bug.

The time bound uses SIGALRM, so :meth:`KvmBackend.run` bounds hung guests only
when called from the main thread (campaign workers are processes); from another
thread it runs unbounded.

Not supported here (reported ``unsupported`` by :meth:`KvmBackend.capabilities`):
32-bit 2-level and PAE paging (this nested KVM shuts down immediately on them,
ORACLES.md), 5-level paging, compatibility mode, CPL 1/2, virtual-8086 mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
from typing import Any

from difftest.backend import Capabilities, Outcome, Stop, describe
from spec.domain.concrete import CONCRETE
from spec.faults import HAS_ERROR_CODE
from spec.machine import HANDLER_STRIDE, HANDLERS
from spec.memory import PAGE, AccessKind
from spec.paging import CR4_PKE, CR4_SMAP, CR4_SMEP, Access, PagingControl, paging_mode, walk
from spec.snapshot import GPR_NAMES, PageModel, Registers, SegmentModel, Snapshot, TableRegisterModel, trusted

# -- ioctl numbers (<asm-generic/ioctl.h>, <linux/kvm.h>) ---------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# struct layouts
REGS = struct.Struct("<18Q")  # rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
SEGMENT = struct.Struct("<QIH10B")  # base limit selector type present dpl db s l g avl unusable padding
DTABLE = struct.Struct("<QH3H")
SREGS_SIZE = 8 * SEGMENT.size + 2 * DTABLE.size + 7 * 8 + 4 * 8  # 312
SREGS_TAIL = struct.Struct("<7Q")  # cr0 cr2 cr3 cr4 cr8 efer apic_base (interrupt_bitmap follows)
MEM_REGION = struct.Struct("<IIQQQ")  # slot flags guest_phys_addr memory_size userspace_addr
CPUID2_HEADER = struct.Struct("<II")  # nent padding
CPUID_ENTRY_SIZE = 40

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, CPUID2_HEADER.size)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, MEM_REGION.size)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, REGS.size)
KVM_SET_REGS = _iow(0x82, REGS.size)
KVM_GET_SREGS = _ior(0x83, SREGS_SIZE)
KVM_SET_SREGS = _iow(0x84, SREGS_SIZE)
KVM_SET_CPUID2 = _iow(0x90, CPUID2_HEADER.size)
KVM_CAP_NR_MEMSLOTS = 10

# exit reasons
KVM_EXIT_IO, KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 4, 5, 6
KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR = 8, 9, 10, 17
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
              7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
INTERNAL_SUBERRORS = {1: "emulation failure", 2: "simultaneous exceptions", 3: "delivery event", 4: "unexpected exit"}

# kvm_run: request_interrupt_window u8, immediate_exit u8, pad[6], exit_reason u32, ..., union at 32
RUN_EXIT_REASON = 8
RUN_UNION = 32
RUN_IO = struct.Struct("<BBHIQ")  # direction size port count data_offset
RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr data[8] len is_write
RUN_INTERNAL = struct.Struct("<II")  # suberror ndata (data[] follows, u64)
KVM_EXIT_IO_IN = 0

API_VERSION = 12
DEFAULT_MEM_LIMIT = 256 << 20  # guest physical memory the backend can back (host mapping is lazy)
APIC_BASE = 0xFEE00900  # default xAPIC base, enabled, BSP
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; absent from Python 3.11
MAX_EXITS = 10_000  # MMIO/IO exits handled in one case before giving up

SEG_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")  # kvm_sregs order
KVM_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _on_alarm(signum: int, frame: Any) -> None:
    """SIGALRM: nothing to do -- its arrival makes KVM_RUN fail with EINTR (fcntl.ioctl does not retry)."""


def _pack_segment(s: SegmentModel) -> bytes:
    return SEGMENT.pack(s.base, s.limit, s.selector, s.type, s.p, s.dpl, s.db, s.s, s.l, s.g, s.avl,
                        int(s.unusable), 0)


def _unpack_segment(buf: bytes | bytearray, off: int) -> SegmentModel:
    base, limit, sel, typ, p, dpl, db, s, lng, g, avl, unusable, _ = SEGMENT.unpack_from(buf, off)
    # every field is in range by construction (struct widths, masks): no re-validation needed
    return trusted(SegmentModel, {"selector": sel, "base": base, "limit": limit, "type": typ & 15, "s": s & 1,
                                  "dpl": dpl & 3, "p": p & 1, "avl": avl & 1, "l": lng & 1, "db": db & 1,
                                  "g": g & 1, "unusable": bool(unusable)})


def _runs(addresses: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``(start, size)`` of sorted page addresses."""
    runs: list[tuple[int, int]] = []
    for a in addresses:
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((a, PAGE))
    return runs


# -- decoding an exception delivered to install_idt's HLT stubs ------------------------------------------

class _PageReader:
    """Reads linear memory of a snapshot through its paging structures (without changing it)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.pages = {p.address: p for p in snap.pages}
        self.cache: dict[int, bytes] = {}

    def phys(self, addr: int, n: int) -> int | None:
        out = b""
        while n:
            page = addr & ~(PAGE - 1)
            off = addr - page
            k = min(n, PAGE - off)
            data = self.cache.get(page)
            if data is None:
                p = self.pages.get(page)
                if p is None:
                    return None
                data = self.cache[page] = p.to_bytes()
            out += data[off:off + k]
            addr, n = addr + k, n - k
        return int.from_bytes(out, "little")

    def read(self, addr: int, n: int) -> int:
        """Physical reads for the walker (a missing page reads as zeros: a not-present entry)."""
        v = self.phys(addr, n)
        return 0 if v is None else v

    def write(self, addr: int, n: int, value: int) -> None:
        """The walker's accessed/dirty updates are dropped: reading a frame must not change the snapshot."""

    def translate(self, linear: int) -> int | None:
        """Linear -> physical with the spec's walker (any paging mode), for a supervisor read; only a
        not-present or reserved-bit entry stops it (SMEP, SMAP and protection keys are switched off)."""
        s = self.snap
        ctl = PagingControl(cr0=s.control.cr0, cr3=s.control.cr3,
                            cr4=s.control.cr4 & ~(CR4_SMEP | CR4_SMAP | CR4_PKE), efer=s.efer,
                            pdptes=tuple(s.pdptes))
        mode = paging_mode(ctl.cr0, ctl.cr4, ctl.efer)
        if mode is None or not s.efer & (1 << 10):  # legacy modes: 32-bit linear addresses
            linear &= 0xFFFF_FFFF
        if mode is None:
            return linear
        w = walk(CONCRETE, self, mode, ctl, linear, Access(AccessKind.READ, 0))
        return None if w.fault is not None else w.phys

    def linear(self, addr: int, n: int) -> int | None:
        pa = self.translate(addr)
        if pa is None or (pa & (PAGE - 1)) + n > PAGE:
            return None if pa is None else self._split(addr, n)
        return self.phys(pa, n)

    def _split(self, addr: int, n: int) -> int | None:
        value = 0
        for i in range(n):
            pa = self.translate(addr + i)
            b = None if pa is None else self.phys(pa, 1)
            if b is None:
                return None
            value |= b << (8 * i)
        return value


def stub_exception(final: Snapshot) -> Stop | None:
    """The exception a snapshot halted in an :func:`spec.machine.install_idt` stub took, or ``None``.

    ``final`` must be halted right after the stub's HLT (RIP = stub + 1).  The
    vector comes from the stub address, checked against the guest's IDT (IVT in
    real mode); the error code (for vectors that push one) and the faulting RIP
    come from the frame on the handler's stack (SDM Vol. 3A 6.12.1, Figures 6-4
    and 6-9); CR2 from the final CR2 for #PF.  Works on any backend's final
    snapshot, so the spec (delivering exceptions) and KVM are decoded alike.
    """
    segs = final.segments
    hlt = (segs.cs.base + final.regs.rip - 1) & 0xFFFF_FFFF_FFFF_FFFF
    v, rem = divmod(hlt - HANDLERS, HANDLER_STRIDE)
    if rem or not 0 <= v < 256:
        return None
    mem = _PageReader(final)
    real = not final.control.cr0 & 1
    long_mode = bool(final.efer & (1 << 10))
    idt = final.idtr
    if real:
        ent = mem.phys(idt.base + 4 * v, 4) if 4 * v + 3 <= idt.limit else None
        if ent is None or ((ent >> 16) << 4) + (ent & 0xFFFF) != HANDLERS + HANDLER_STRIDE * v:
            return None
        width, has_err = 2, False
    else:
        gsize = 16 if long_mode else 8
        if gsize * v + gsize - 1 > idt.limit:
            return None
        lo = mem.linear(idt.base + gsize * v, 8)
        hi = mem.linear(idt.base + gsize * v + 8, 8) if long_mode else 0
        if lo is None or hi is None:
            return None
        offset = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFF_FFFF) << 32
        if offset != HANDLERS + HANDLER_STRIDE * v:
            return None
        gtype = (lo >> 40) & 0xF
        width = 8 if long_mode else (4 if gtype in (0xE, 0xF) else 2)
        has_err = v in HAS_ERROR_CODE
    if long_mode:
        sp = final.regs.rsp
    elif real or not segs.ss.db:
        sp = final.regs.rsp & 0xFFFF
    else:
        sp = final.regs.rsp & 0xFFFF_FFFF
    base = segs.ss.base + sp
    err = None
    if has_err:
        err = mem.linear(base, width)
        base += width
    rip = mem.linear(base, width)
    if rip is None or (has_err and err is None):
        return None
    cr2 = final.control.cr2 if v == 14 else None
    return Stop(kind="exception", rip=rip, vector=v, error_code=err, cr2=cr2,
                detail="delivered to the install_idt stub; decoded from the handler's stack frame")


# -- the backend ----------------------------------------------------------------------------------------

class KvmBackend:
    """Runs snapshots on KVM (see the module docstring)."""

    name = "kvm"

    def __init__(self, *, time_limit: float = 0.05, mem_limit: int = DEFAULT_MEM_LIMIT,
                 device: str = "/dev/kvm") -> None:
        self.time_limit = time_limit
        self.mem_limit = mem_limit
        self.device = device
        self._caps: Capabilities | None = None
        self._kvm = self._vm = self._vcpu = -1
        self._run: mmap.mmap | None = None
        self._mem: mmap.mmap | None = None
        self._host = 0  # host address of _mem
        self._slots: list[tuple[int, int]] = []  # registered (guest address, size), slot = index
        self._max_slots = 32
        self._apic_base = APIC_BASE
        self._sregs_template = bytearray(SREGS_SIZE)

    # -- setup ----------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            reason = self._open()
            if reason:
                self.close()
                self._caps = Capabilities(available=False, reason=reason)
            else:
                self._caps = Capabilities(modes=frozenset({"real", "prot16", "prot32", "long64"}),
                                          paging=frozenset({"none", "4-level"}), cpls=frozenset({0, 3}),
                                          delivers_exceptions=True, reports_error_codes=True)
        return self._caps

    def _open(self) -> str:
        """Create the VM and vCPU; the reason they are unusable, or ``""``."""
        try:
            self._kvm = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            return f"cannot open {self.device}: {e.strerror or e}"
        try:
            version = fcntl.ioctl(self._kvm, KVM_GET_API_VERSION)
            if version != API_VERSION:
                return f"KVM API version {version}, expected {API_VERSION}"
            self._vm = fcntl.ioctl(self._kvm, KVM_CREATE_VM, 0)
            # Optional probes: a KVM that cannot answer keeps the default of 32 slots; the TSS area is
            # only needed by Intel VMX for real mode (3 pages), SVM hosts accept or ignore it.
            with contextlib.suppress(OSError):
                self._max_slots = max(1, fcntl.ioctl(self._vm, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS))
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._vm, KVM_SET_TSS_ADDR, 0x7FFF_D000)
            self._vcpu = fcntl.ioctl(self._vm, KVM_CREATE_VCPU, 0)
            run_size = fcntl.ioctl(self._kvm, KVM_GET_VCPU_MMAP_SIZE)
            self._run = mmap.mmap(self._vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._set_cpuid()
            fcntl.ioctl(self._vcpu, KVM_GET_SREGS, self._sregs_template, True)
            self._apic_base = SREGS_TAIL.unpack_from(self._sregs_template, 8 * SEGMENT.size + 2 * DTABLE.size)[6]
            self._mem = mmap.mmap(-1, self.mem_limit, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
            view = ctypes.c_char.from_buffer(self._mem)
            self._host = ctypes.addressof(view)
            del view  # release the buffer export so that close() can unmap
        except (OSError, ValueError, OverflowError) as e:
            return f"KVM setup failed: {e.strerror or e}"
        return ""

    def _set_cpuid(self) -> None:
        nent = 128
        while True:
            buf = bytearray(CPUID2_HEADER.pack(nent, 0) + bytes(CPUID_ENTRY_SIZE * nent))
            try:
                fcntl.ioctl(self._kvm, KVM_GET_SUPPORTED_CPUID, buf, True)
                break
            except OSError as e:
                if e.errno != errno.E2BIG or nent > 4096:
                    raise
                nent *= 2
        got = CPUID2_HEADER.unpack_from(buf)[0]
        fcntl.ioctl(self._vcpu, KVM_SET_CPUID2, bytearray(buf[:CPUID2_HEADER.size + CPUID_ENTRY_SIZE * got]), True)

    def close(self) -> None:
        for m in (self._run, self._mem):
            if m is not None:
                m.close()
        self._run = self._mem = None
        for fd in (self._vcpu, self._vm, self._kvm):
            if fd >= 0:
                os.close(fd)
        self._kvm = self._vm = self._vcpu = -1
        self._slots = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing left to release
            self.close()

    # -- running --------------------------------------------------------------------------------
    def run(self, snap: Snapshot, budget: int) -> Outcome:
        caps = self.capabilities()
        reason = caps.refuse(snap)
        _, paging, cpl = describe(snap)
        if reason is None and paging in ("32-bit", "PAE"):
            reason = f"{paging} paging: this KVM shuts down immediately on it (ORACLES.md)"
        executed_by = "hardware" if cpl == 3 else "kvm-emulator"
        if reason is None:
            reason = self._load_memory(snap)
        if reason is not None:
            return Outcome(backend=self.name, stop=Stop(kind="unsupported", rip=snap.regs.rip, detail=reason),
                           final=None, executed_by=executed_by)
        self._set_registers(snap)
        stop = self._execute(max(self.time_limit, budget * 2e-6))
        final = self._read_back(snap, halted=stop.kind == "halted")
        update: dict[str, Any] = {"rip": final.regs.rip}
        if stop.kind == "shutdown":
            update["cr2"] = final.control.cr2
        stop = stop.model_copy(update=update)
        if stop.kind == "halted":
            stop = stub_exception(final) or stop
        return Outcome(backend=self.name, stop=stop, final=final, executed_by=executed_by)

    def _load_memory(self, snap: Snapshot) -> str | None:
        mem = self._mem
        assert mem is not None
        addrs = [p.address for p in snap.pages]
        if addrs and addrs[-1] + PAGE > self.mem_limit:
            return f"page {addrs[-1]:#x} lies above the backend's guest memory ({self.mem_limit:#x} bytes)"
        runs = _runs(addrs)
        if len(runs) > self._max_slots:
            return f"{len(runs)} discontiguous page runs exceed KVM's {self._max_slots} memory slots"
        for p in snap.pages:
            mem[p.address:p.address + PAGE] = p.to_bytes()
        # Delete every old slot, then add the new ones: KVM drops the shadow page tables built from
        # the previous case's PTEs (ORACLES.md: stale translations at CPL3 otherwise).
        host = self._host
        for slot, (gpa, _) in enumerate(self._slots):
            fcntl.ioctl(self._vm, KVM_SET_USER_MEMORY_REGION, MEM_REGION.pack(slot, 0, gpa, 0, host + gpa))
        for slot, (gpa, size) in enumerate(runs):
            fcntl.ioctl(self._vm, KVM_SET_USER_MEMORY_REGION, MEM_REGION.pack(slot, 0, gpa, size, host + gpa))
        self._slots = runs
        return None

    def _set_registers(self, snap: Snapshot) -> None:
        r = snap.regs
        fcntl.ioctl(self._vcpu, KVM_SET_REGS,
                    REGS.pack(*(getattr(r, n) for n in KVM_GPR_ORDER), r.rip, r.rflags))
        segs = snap.segments
        buf = bytearray(b"".join(_pack_segment(getattr(segs, n)) for n in SEG_ORDER))
        buf += DTABLE.pack(snap.gdtr.base, snap.gdtr.limit, 0, 0, 0)
        buf += DTABLE.pack(snap.idtr.base, snap.idtr.limit, 0, 0, 0)
        c = snap.control
        buf += SREGS_TAIL.pack(c.cr0, c.cr2, c.cr3, c.cr4, c.cr8, snap.efer, self._apic_base)
        buf += bytes(32)  # interrupt_bitmap: nothing pending
        fcntl.ioctl(self._vcpu, KVM_SET_SREGS, buf)

    def _execute(self, seconds: float) -> Stop:
        run = self._run
        assert run is not None
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGALRM, _on_alarm) if in_main else None
        try:
            if in_main:
                signal.setitimer(signal.ITIMER_REAL, seconds)
            for _ in range(MAX_EXITS):
                try:
                    fcntl.ioctl(self._vcpu, KVM_RUN, 0)
                except InterruptedError:
                    return Stop(kind="budget", detail=f"time bound of {seconds:.3f} s ran out (EINTR)")
                reason = struct.unpack_from("<I", run, RUN_EXIT_REASON)[0]
                if reason == KVM_EXIT_HLT:
                    return Stop(kind="halted")
                if reason == KVM_EXIT_SHUTDOWN:
                    return Stop(kind="shutdown", detail="fault without delivery (triple fault); vector unknown")
                if reason == KVM_EXIT_IO:
                    direction, size, _port, count, data_off = RUN_IO.unpack_from(run, RUN_UNION)
                    if direction == KVM_EXIT_IO_IN:
                        run[data_off:data_off + size * count] = b"\xff" * (size * count)
                    continue
                if reason == KVM_EXIT_MMIO:
                    _addr, _, length, is_write = RUN_MMIO.unpack_from(run, RUN_UNION)
                    if not is_write:
                        run[RUN_UNION + 8:RUN_UNION + 8 + length] = b"\xff" * length
                    continue
                if reason == KVM_EXIT_INTR:
                    return Stop(kind="budget", detail=f"time bound of {seconds:.3f} s ran out (EXIT_INTR)")
                if reason == KVM_EXIT_INTERNAL_ERROR:
                    sub, ndata = RUN_INTERNAL.unpack_from(run, RUN_UNION)
                    data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, RUN_UNION + 8)
                    what = INTERNAL_SUBERRORS.get(sub, f"suberror {sub}")
                    return Stop(kind="unsupported",
                                detail=f"KVM internal error: {what} (data {' '.join(hex(d) for d in data)})")
                if reason == KVM_EXIT_FAIL_ENTRY:
                    code = struct.unpack_from("<Q", run, RUN_UNION)[0]
                    return Stop(kind="unsupported", detail=f"KVM entry failed: hardware reason {code:#x}")
                return Stop(kind="unsupported", detail=f"unexpected KVM exit {EXIT_NAMES.get(reason, reason)}")
            return Stop(kind="budget", detail=f"more than {MAX_EXITS} I/O or MMIO exits")
        finally:
            if in_main:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)

    def _read_back(self, snap: Snapshot, *, halted: bool) -> Snapshot:
        regs = bytearray(REGS.size)
        fcntl.ioctl(self._vcpu, KVM_GET_REGS, regs, True)
        vals = REGS.unpack(regs)
        gprs = dict(zip(KVM_GPR_ORDER, vals[:16], strict=True))
        new_regs = trusted(Registers, {**{n: gprs[n] for n in GPR_NAMES}, "rip": vals[16], "rflags": vals[17]})
        sregs = bytearray(SREGS_SIZE)
        fcntl.ioctl(self._vcpu, KVM_GET_SREGS, sregs, True)
        segs = {n: _unpack_segment(sregs, k * SEGMENT.size) for k, n in enumerate(SEG_ORDER)}
        off = 8 * SEGMENT.size
        gbase, glimit = DTABLE.unpack_from(sregs, off)[:2]
        ibase, ilimit = DTABLE.unpack_from(sregs, off + DTABLE.size)[:2]
        cr0, cr2, cr3, cr4, cr8, efer, _ = SREGS_TAIL.unpack_from(sregs, off + 2 * DTABLE.size)
        mem = self._mem
        assert mem is not None
        # Unchanged pages stay the input's page objects; changed ones are canonical by construction.
        pages = []
        for p in snap.pages:
            a = p.address
            raw = mem[a:a + PAGE]
            pages.append(p if raw == p.to_bytes() else PageModel.from_bytes(a, raw))
        return snap.model_copy(update={
            "regs": new_regs,
            "segments": trusted(type(snap.segments), segs),
            "control": trusted(type(snap.control), {"cr0": cr0, "cr2": cr2, "cr3": cr3, "cr4": cr4, "cr8": cr8}),
            "efer": efer,
            "gdtr": trusted(TableRegisterModel, {"base": gbase, "limit": glimit}),
            "idtr": trusted(TableRegisterModel, {"base": ibase, "limit": ilimit}),
            "halted": halted,
            "pages": pages,
        })

