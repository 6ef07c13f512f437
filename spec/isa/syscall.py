"""Fast system calls: SYSCALL, SYSRET, SYSENTER, SYSEXIT.

References: AMD APM Vol. 2 6.1.1 "SYSCALL and SYSRET", 6.1.2 "SYSENTER and
SYSEXIT (Legacy Mode Only)"; APM Vol. 3 SYSCALL, SYSRET, SYSENTER, SYSEXIT
("Operation" pseudocode); Intel SDM Vol. 2B SYSCALL, SYSRET, SYSENTER,
SYSEXIT; SDM Vol. 3A 5.8.7-5.8.8.

None of the four reads a descriptor table: CS and SS get their selectors
from MSRs and their hidden parts from fixed values (flat 4-GiB segments,
base 0), so the operating system must keep matching descriptors in the GDT.
CPL is SS.DPL in this model (:attr:`spec.state.MachineState.cpl`), so every
transition below sets SS.DPL to the new CPL.  Segment caches are replaced,
never mutated in place (the CPU's fault rollback keeps the old objects).

The vendors differ; ``x.vendor`` ("amd" by default, the CPU's setting)
selects the behaviour:

==========================  ==========================  ==========================
case                        AMD (default)               Intel
==========================  ==========================  ==========================
SYSCALL outside 64-bit      valid with EFER.SCE = 1:    #UD
mode                        compatibility mode enters
                            at CSTAR, legacy mode at
                            STAR[31:0] (APM Vol. 3
                            SYSCALL)
SYSRET outside 64-bit mode  valid in protected mode     #UD
                            (legacy: returns to 32-bit
                            code, sets IF)
SYSRET with a non-canonical completes; the first fetch  #GP(0) at CPL 0 (SDM Vol.
RCX (64-bit return)         at CPL 3 faults #GP(0)      2B SYSRET)
SYSRET SS hidden part       selector changes, the       loaded with fixed flat
                            attributes do not ("SS      DPL-3 values
                            segment attributes are
                            not", APM Vol. 3 SYSRET);
                            DPL becomes 3 (CPL)
SYSENTER/SYSEXIT in long    #UD ("legacy mode only",    valid; enter 64-bit mode,
mode                        APM Vol. 2 6.1.2)           return by operand size
SYSEXIT 64-bit return with  (no such form)              #GP(0) (SDM Vol. 2B
non-canonical RCX/RDX                                   SYSEXIT)
==========================  ==========================  ==========================

Feature gates: SYSCALL/SYSRET need EFER.SCE, which can only be set when the
CPU model advertises SYSCALL (CPUID 8000_0001H EDX[11], spec/cpumodel.py);
SYSENTER/SYSEXIT are #UD when the model lacks SEP (CPUID 01H EDX[11]).

SYSCALL in real-address mode: the APM lists only #UD (SCE = 0) for it there,
and its legacy-mode pseudocode has no CR0.PE test, so with EFER.SCE = 1 the
spec executes it as written (CS/SS get the flat 32-bit caches, PE stays 0).

RFLAGS: SYSCALL saves RFLAGS with RF cleared in R11 (long mode), then clears
the bits set in SFMASK[31:0] and RF (the upper half of SFMASK is reserved);
legacy-mode SYSCALL clears VM, IF and RF instead.  SYSRET to long mode
loads RFLAGS from R11 with RF, VM and the reserved bits cleared and bit 1 set
(SDM: ``(R11 & 3C7FD7H) | 2``; APM: "RF = 0, VM = 0").  SYSENTER clears VM,
IF and RF; SYSEXIT changes no flag.  Status flags cleared through SFMASK
become defined (0); the others keep their undefined mark.
"""

from __future__ import annotations

from spec import flags as F
from spec.cpumodel import CSTAR, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP, LSTAR, SFMASK, STAR
from spec.decode.insn import Insn
from spec.isa.context import Exec, Vector
from spec.isa.registry import instruction
from spec.segmentation import canonical_half, canonical_run
from spec.state import CR0_PE, EFER_LMA, EFER_SCE, M64, MachineState, Segment

# The MSRs (indices defined once, in spec/cpumodel.py; SDM Vol. 4 Table 2-2; APM Vol. 2 Appendix A.2):
MSR_STAR = STAR  # [31:0] legacy SYSCALL EIP, [47:32] SYSCALL CS (SS = +8), [63:48] SYSRET CS/SS base
MSR_LSTAR = LSTAR  # 64-bit mode SYSCALL target RIP
MSR_CSTAR = CSTAR  # compatibility mode SYSCALL target RIP (AMD)
MSR_SFMASK = SFMASK  # SYSCALL RFLAGS mask (Intel: IA32_FMASK)

_RCX, _RDX, _RSP, _R11 = 1, 2, 4, 11
_M32 = 0xFFFF_FFFF
_IF, _RF, _VM = 1 << F.IF, 1 << F.RF, 1 << F.VM
SYSRET_RFLAGS_MASK = 0x3C_7FD7
"""RFLAGS bits SYSRET takes from R11: all but RF, VM and the reserved bits (SDM Vol. 2B SYSRET)."""


def _code(selector: int, dpl: int, long: bool) -> Segment:
    """A flat execute/read accessed code segment cache: 64-bit (L = 1, D = 0) or 32-bit (L = 0, D = 1)."""
    return Segment(selector=selector, base=0, limit=_M32, type=0xB, s=1, dpl=dpl, p=1, l=int(long),
                   db=int(not long), g=1)


def _stack(selector: int, dpl: int) -> Segment:
    """A flat read/write accessed expand-up data segment cache with B = 1."""
    return Segment(selector=selector, base=0, limit=_M32, type=0x3, s=1, dpl=dpl, p=1, db=1, g=1)


def _canonical(s: MachineState, addr: int) -> bool:
    return canonical_run(addr, canonical_half(s.cr4)) > 0


def _msr(s: MachineState, index: int) -> int:
    """An MSR's value as RDMSR would see it: ``state.msrs``, else the model's reset value (spec/isa/msr.py)."""
    v = s.msrs.get(index)
    return s.model.msr_reset.get(index, 0) if v is None else v


def _in_64bit_mode(s: MachineState) -> bool:
    return bool(s.efer & EFER_LMA and s.seg[1].l)


@instruction("SYSCALL", ref="APM Vol. 3 SYSCALL; APM Vol. 2 6.1.1; SDM Vol. 2B SYSCALL")
def syscall(x: Exec, i: Insn) -> None:
    """Call the CPL-0 entry point named by STAR/LSTAR/CSTAR (module docstring for the modes)."""
    s, D = x.s, x.D
    if not s.efer & EFER_SCE:
        raise x.fault(Vector.UD)
    long_mode = bool(s.efer & EFER_LMA)
    if x.vendor == "intel" and not _in_64bit_mode(s):
        raise x.fault(Vector.UD)  # SDM: valid in 64-bit mode only
    star = _msr(s, MSR_STAR)
    cs_sel = (star >> 32) & 0xFFFF
    if long_mode:
        rflags = s.read_rflags()
        s.write_gpr(_RCX, 64, D.const(64, x.next_rip))
        s.write_gpr(_R11, 64, D.and_(64, rflags, D.const(64, M64 ^ _RF)))
        clear = (_msr(s, MSR_SFMASK) & _M32) | _RF
        undefined = s.undefined
        s.write_rflags(D.and_(64, rflags, D.const(64, M64 ^ clear)))
        s.undefined = undefined & ~clear
        target = _msr(s, MSR_LSTAR if s.seg[1].l else MSR_CSTAR)
        s.seg[1] = _code(cs_sel & 0xFFFC, 0, True)
    else:
        s.write_gpr(_RCX, 32, D.const(32, x.next_rip & _M32))
        s.rflags_sys &= ~(_VM | _IF | _RF)
        target = star & _M32
        s.seg[1] = _code(cs_sel & 0xFFFC, 0, False)
    s.seg[2] = _stack((cs_sel + 8) & 0xFFFF, 0)
    x.next_rip = target


@instruction("SYSRET", ref="APM Vol. 3 SYSRET; APM Vol. 2 6.1.1; SDM Vol. 2B SYSRET")
def sysret(x: Exec, i: Insn) -> None:
    """Return to CPL 3 at RCX (64-bit, REX.W) or ECX, with CS/SS from STAR[63:48]."""
    s, D = x.s, x.D
    intel = x.vendor == "intel"
    if not s.efer & EFER_SCE or (intel and not _in_64bit_mode(s)):
        raise x.fault(Vector.UD)
    if not s.cr0 & CR0_PE or s.cpl != 0:
        raise x.fault(Vector.GP, 0)
    base = (_msr(s, MSR_STAR) >> 48) & 0xFFFF
    long_mode = bool(s.efer & EFER_LMA)
    to64 = long_mode and i.opsize == 64
    rcx = D.concrete(s.read_gpr(_RCX, 64))
    if to64:
        if intel and not _canonical(s, rcx):
            raise x.fault(Vector.GP, 0)  # SDM; AMD faults at CPL 3 on the first fetch instead
        target = rcx
        cs = _code(((base + 16) & 0xFFFF) | 3, 3, True)
    else:
        target = rcx & _M32
        cs = _code(base | 3, 3, False)
    ss_sel = ((base + 8) & 0xFFFF) | 3
    if intel:
        ss = _stack(ss_sel, 3)
    else:
        ss = s.seg[2].copy()
        ss.selector, ss.dpl = ss_sel, 3
    if long_mode:
        s.write_rflags(D.or_(64, D.and_(64, s.read_gpr(_R11, 64), D.const(64, SYSRET_RFLAGS_MASK)),
                             D.const(64, F.RESERVED_ONE)))
    else:
        s.rflags_sys |= _IF  # APM Vol. 3 SYSRET, legacy mode: "RFLAGS.IF = 1"
    s.seg[1] = cs
    s.seg[2] = ss
    x.next_rip = target


def _sysenter_checks(x: Exec) -> int:
    """The checks SYSENTER and SYSEXIT share; returns SYSENTER_CS."""
    s = x.s
    if "sep" not in s.model.features:
        raise x.fault(Vector.UD)  # CPUID.01H:EDX.SEP = 0 (SDM Vol. 2B SYSENTER "#UD")
    if x.vendor != "intel" and s.efer & EFER_LMA:
        raise x.fault(Vector.UD)  # APM Vol. 2 6.1.2: legacy mode only
    if not s.cr0 & CR0_PE:
        raise x.fault(Vector.GP, 0)
    cs = _msr(s, IA32_SYSENTER_CS) & 0xFFFF
    if not cs & 0xFFFC:
        raise x.fault(Vector.GP, 0)  # a null selector (SDM: IA32_SYSENTER_CS[15:2] = 0)
    return cs


@instruction("SYSENTER", ref="SDM Vol. 2B SYSENTER; APM Vol. 3 SYSENTER; SDM Vol. 3A 5.8.7")
def sysenter(x: Exec, i: Insn) -> None:
    """Enter CPL 0 at SYSENTER_EIP with the stack at SYSENTER_ESP; CS from SYSENTER_CS, SS = CS + 8.

    Real mode #GP(0); SYSENTER_CS null #GP(0).  VM, IF, RF are cleared.  In
    IA-32e mode (Intel only) the target is 64-bit code and RIP/RSP take the
    full MSR values; otherwise 32-bit code and EIP/ESP their low halves.
    """
    cs_sel = _sysenter_checks(x)
    s, D = x.s, x.D
    ia32e = bool(s.efer & EFER_LMA)
    s.rflags_sys &= ~(_VM | _IF | _RF)
    sel = cs_sel & 0xFFFC
    s.seg[1] = _code(sel, 0, ia32e)
    s.seg[2] = _stack((sel + 8) & 0xFFFF, 0)
    esp, eip = _msr(s, IA32_SYSENTER_ESP), _msr(s, IA32_SYSENTER_EIP)
    if ia32e:
        s.write_gpr(_RSP, 64, D.const(64, esp & M64))
        x.next_rip = eip & M64
    else:
        s.write_gpr(_RSP, 32, D.const(32, esp & _M32))
        x.next_rip = eip & _M32


@instruction("SYSEXIT", ref="SDM Vol. 2B SYSEXIT; APM Vol. 3 SYSEXIT; SDM Vol. 3A 5.8.7")
def sysexit(x: Exec, i: Insn) -> None:
    """Return to CPL 3 at rDX with the stack at rCX; CS = SYSENTER_CS + 16 (+32 with REX.W), SS = CS + 8.

    Real mode, CPL != 0 or a null SYSENTER_CS: #GP(0).  A 64-bit return
    (Intel, REX.W) needs canonical RCX and RDX (#GP(0)).  Flags unchanged.
    """
    cs_sel = _sysenter_checks(x)
    s, D = x.s, x.D
    if s.cpl != 0:
        raise x.fault(Vector.GP, 0)
    to64 = i.opsize == 64
    if to64:
        rip, rsp = D.concrete(s.read_gpr(_RDX, 64)), s.read_gpr(_RCX, 64)
        if not (_canonical(s, rip) and _canonical(s, D.concrete(rsp))):
            raise x.fault(Vector.GP, 0)
        s.write_gpr(_RSP, 64, rsp)
        s.seg[1] = _code(((cs_sel + 32) & 0xFFFF) | 3, 3, True)
        s.seg[2] = _stack(((cs_sel + 40) & 0xFFFF) | 3, 3)
    else:
        rip = D.concrete(s.read_gpr(_RDX, 32))
        s.write_gpr(_RSP, 32, s.read_gpr(_RCX, 32))
        s.seg[1] = _code(((cs_sel + 16) & 0xFFFF) | 3, 3, False)
        s.seg[2] = _stack(((cs_sel + 24) & 0xFFFF) | 3, 3)
    x.next_rip = rip


__all__ = ["IA32_SYSENTER_CS", "IA32_SYSENTER_EIP", "IA32_SYSENTER_ESP", "MSR_CSTAR", "MSR_LSTAR", "MSR_SFMASK",
           "MSR_STAR", "SYSRET_RFLAGS_MASK"]
