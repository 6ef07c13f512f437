"""Model-specific registers and counters: RDMSR, WRMSR, RDTSC, RDTSCP, RDPMC, SWAPGS
(SDM Vol. 2B RDMSR/WRMSR/RDTSC/RDTSCP/RDPMC/SWAPGS, Vol. 4 Table 2-2; APM Vol. 2 Appendix A, Vol. 3).

Which MSRs exist, and their reserved-bit masks, come from the CPU model
(:class:`spec.cpumodel.CpuModel`, ``state.model``); an index the model does
not have is #GP(0), as is a write with a reserved bit set.  Values live in
``state.msrs`` (absent: the model's reset value, else 0), except:

* IA32_TSC: the time-stamp counter, ``(model.tsc(icount) + state.tsc_offset)
  mod 2^64``; a write sets the offset so that the TSC reads back the value
  written, then keeps counting (SDM Vol. 3B 18.17);
* EFER: ``state.efer``.  Writable bits are ``model.efer_allowed`` (others
  #GP(0)); LMA is read-only -- the value written there is ignored (SDM Vol.
  3A Table 2-1 "LMA (R)"; KVM does the same); changing LME while CR0.PG = 1
  is #GP(0) (SDM Vol. 3A 9.8.5; APM Vol. 2 14.6.1);
* FS_BASE / GS_BASE: the hidden bases of FS and GS (``state.seg[4/5].base``,
  SDM Vol. 3A 3.4.4);
* value rules: LSTAR, CSTAR, FS_BASE, GS_BASE, KERNEL_GS_BASE must be
  canonical (#GP(0)); PAT entries must be valid memory types 0, 1, 4-7
  (SDM Vol. 3A 13.12.2, #GP(0) otherwise); TSC_AUX bits 63:32 are reserved
  on Intel (#GP(0)) and ignored on AMD (read as 0: current AMD processors
  drop them, as KVM documents); SYSENTER_ESP/EIP must be canonical on Intel,
  while AMD (which has no 64-bit SYSENTER) keeps only bits 31:0; SYSENTER_CS
  keeps bits 31:0; the AMD performance counters are 48 bits wide (bits 63:48
  dropped).

The AMD legacy performance counters (PerfCtr0-3, read by RDPMC 0-3) exist
but count nothing: no event is modelled, a counter holds what software last
wrote (documented model gap).  The Intel model has no counters (every RDPMC
index is #GP(0)).

Vendor differences follow ``x.vendor`` (set by the CPU).
"""

from __future__ import annotations

from spec.cpumodel import (
    AMD_PERF_CTR,
    CSTAR,
    EFER,
    FS_BASE,
    GS_BASE,
    IA32_PAT,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_EIP,
    IA32_SYSENTER_ESP,
    IA32_TSC,
    KERNEL_GS_BASE,
    LSTAR,
    TSC_AUX,
)
from spec.decode.insn import Insn
from spec.faults import Fault, Vector
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.isa.system import canonical, emit, require_cpl0
from spec.state import CR0_PG, EFER_LMA, EFER_LME, MachineState
from spec.svm.exitcodes import MSR_READ, MSR_WRITE, ExitCode
from spec.svm.intercepts import VMExit

_M32, _M48, _M64 = 0xFFFF_FFFF, (1 << 48) - 1, (1 << 64) - 1
_RAX, _RCX, _RDX = 0, 1, 2
_FS, _GS = 4, 5
CR4_TSD, CR4_PCE = 1 << 2, 1 << 8
_CANONICAL = frozenset({LSTAR, CSTAR, FS_BASE, GS_BASE, KERNEL_GS_BASE})
_PAT_VALID = frozenset({0, 1, 4, 5, 6, 7})  # UC WC WT WP WB UC- (2, 3 reserved)


def _gp() -> Fault:
    return Fault(Vector.GP, 0)


def tsc(s: MachineState) -> int:
    """The time-stamp counter now: the model's time source at this instruction count, plus the offset."""
    return (s.model.tsc(s.icount) + s.tsc_offset) & _M64


def read_msr(s: MachineState, index: int) -> int:
    """The value RDMSR returns, or #GP(0) for an MSR the model does not have."""
    if index not in s.model.msr_reserved:
        raise _gp()
    if index == IA32_TSC:
        return tsc(s)
    if index == EFER:
        return s.efer
    if index == FS_BASE:
        return s.seg[_FS].base
    if index == GS_BASE:
        return s.seg[_GS].base
    v = s.msrs.get(index)
    return s.model.msr_reset.get(index, 0) if v is None else v


def write_msr(s: MachineState, index: int, v: int, vendor: str = "amd") -> None:
    """WRMSR's effect, after every check (#GP(0) for an unknown MSR, a reserved bit, or a bad value)."""
    model = s.model
    rsv = model.msr_reserved.get(index)
    if rsv is None or v & rsv:
        raise _gp()
    if index in _CANONICAL and not canonical(s, v):
        raise _gp()
    if index == IA32_TSC:
        s.tsc_offset = (v - model.tsc(s.icount)) & _M64
        return
    if index == EFER:
        _write_efer(s, v)
        return
    if index == FS_BASE or index == GS_BASE:
        k = _FS if index == FS_BASE else _GS
        seg = s.seg[k].copy()
        seg.base = v
        s.seg[k] = seg
        return
    if index == IA32_PAT:
        if any((v >> (8 * k)) & 0xFF not in _PAT_VALID for k in range(8)):
            raise _gp()
    elif index == TSC_AUX:
        if vendor == "intel" and v >> 32:
            raise _gp()
        v &= _M32
    elif index == IA32_SYSENTER_ESP or index == IA32_SYSENTER_EIP:
        if vendor == "intel":
            if not canonical(s, v):
                raise _gp()
        else:
            v &= _M32
    elif index == IA32_SYSENTER_CS:
        v &= _M32
    elif index in AMD_PERF_CTR:
        v &= _M48
    s.msrs[index] = v


def _write_efer(s: MachineState, v: int) -> None:
    allowed = s.model.efer_allowed
    if v & ~allowed:
        raise _gp()
    old = s.efer
    new = (v & ~EFER_LMA) | (old & EFER_LMA)
    if s.cr0 & CR0_PG and (old ^ new) & EFER_LME:
        raise _gp()
    if new != old:
        s.efer = new
        emit(s, ("efer", old, new))


def _ecx(x: Exec) -> int:
    return x.D.concrete(x.s.read_gpr(_RCX, 32))


def _set_edx_eax(x: Exec, v: int) -> None:
    """EDX:EAX := v (32-bit writes: in 64-bit mode RAX/RDX bits 63:32 are cleared)."""
    s, D = x.s, x.D
    s.write_gpr(_RAX, 32, D.const(32, v & _M32))
    s.write_gpr(_RDX, 32, D.const(32, (v >> 32) & _M32))


@instruction("RDMSR", ref="SDM Vol. 2B RDMSR; APM Vol. 3 RDMSR")
def rdmsr(x: Exec, i: Insn) -> None:
    """EDX:EAX := MSR[ECX].  #GP(0) at CPL > 0 or for an MSR the model does not have."""
    s = x.s
    require_cpl0(s)
    index = _ecx(x)
    _msr_intercept(x, index, write=False)
    _set_edx_eax(x, read_msr(s, index))


@instruction("WRMSR", ref="SDM Vol. 2B WRMSR; APM Vol. 3 WRMSR")
def wrmsr(x: Exec, i: Insn) -> None:
    """MSR[ECX] := EDX:EAX.  #GP(0) at CPL > 0, for an unknown MSR, a reserved bit or an invalid value."""
    s, D = x.s, x.D
    require_cpl0(s)
    index = _ecx(x)
    _msr_intercept(x, index, write=True)
    v = D.concrete(s.read_gpr(_RDX, 32)) << 32 | D.concrete(s.read_gpr(_RAX, 32))
    write_msr(s, index, v, x.vendor)
    svm = s.svm
    if svm is not None and index == EFER and svm.intercepts(ExitCode.EFER_WRITE_TRAP):
        # APM 15.8.1 "EFER write trap": after the write completed, EXITINFO1 = the new EFER.
        raise VMExit(ExitCode.EFER_WRITE_TRAP, s.efer, nrip=x.next_rip, trap=True)


def _msr_intercept(x: Exec, index: int, write: bool) -> None:
    """SVM MSR_PROT (APM 15.11): after the CPL check, before the MSR index or value is checked.
    EXITINFO1 = 0 for RDMSR, 1 for WRMSR."""
    svm = x.s.svm
    if svm is not None and svm.msr_intercepted(index, write):
        raise VMExit(ExitCode.MSR, MSR_WRITE if write else MSR_READ, nrip=x.next_rip)


def _tsc_allowed(s: MachineState) -> None:
    """RDTSC/RDTSCP: #GP(0) when CR4.TSD = 1 and CPL > 0 (SDM Vol. 2B RDTSC; virtual-8086 mode is CPL 3)."""
    if s.cr4 & CR4_TSD and s.cpl:
        raise _gp()


@instruction("RDTSC", ref="SDM Vol. 2B RDTSC; APM Vol. 3 RDTSC")
def rdtsc(x: Exec, i: Insn) -> None:
    """EDX:EAX := TSC.  #UD on a model without TSC (CPUID.1:EDX.TSC)."""
    s = x.s
    if not s.model.has("tsc"):
        raise Fault(Vector.UD)
    _tsc_allowed(s)
    x.intercept(ExitCode.RDTSC)
    _set_edx_eax(x, tsc(s))


@instruction("RDTSCP", ref="SDM Vol. 2B RDTSCP; APM Vol. 3 RDTSCP")
def rdtscp(x: Exec, i: Insn) -> None:
    """EDX:EAX := TSC, ECX := TSC_AUX[31:0].  #UD without CPUID.80000001H:EDX.RDTSCP."""
    s = x.s
    if not s.model.has("rdtscp"):
        raise Fault(Vector.UD)
    _tsc_allowed(s)
    x.intercept(ExitCode.RDTSCP)
    aux = s.msrs.get(TSC_AUX, 0) & _M32
    _set_edx_eax(x, tsc(s))
    s.write_gpr(_RCX, 32, x.D.const(32, aux))


@instruction("RDPMC", ref="SDM Vol. 2B RDPMC; APM Vol. 3 RDPMC, Vol. 2 13.2")
def rdpmc(x: Exec, i: Insn) -> None:
    """EDX:EAX := performance counter ECX.  #GP(0) at CPL > 0 with CR4.PCE = 0, or for a counter
    the model does not have (AMD: 0-3, the 48-bit PerfCtr0-3; Intel model: none)."""
    s = x.s
    if s.cpl and not s.cr4 & CR4_PCE:
        raise _gp()
    x.intercept(ExitCode.RDPMC)  # before the counter index is checked (an operand value, APM 15.9)
    idx = _ecx(x)
    counters = s.model.perf_counters
    if idx >= len(counters):
        raise _gp()
    _set_edx_eax(x, s.msrs.get(counters[idx], 0) & _M48)


@instruction("SWAPGS", ref="SDM Vol. 2B SWAPGS; APM Vol. 3 SWAPGS")
def swapgs(x: Exec, i: Insn) -> None:
    """Exchange GS.base with KERNEL_GS_BASE (64-bit mode only: the decoder raises #UD elsewhere).
    #GP(0) at CPL > 0."""
    s = x.s
    require_cpl0(s)
    kernel = s.msrs.get(KERNEL_GS_BASE, 0)
    gs = s.seg[_GS].copy()
    s.msrs[KERNEL_GS_BASE] = gs.base
    gs.base = kernel
    s.seg[_GS] = gs


__all__ = ["read_msr", "tsc", "write_msr"]
