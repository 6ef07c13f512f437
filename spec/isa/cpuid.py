"""CPUID (SDM Vol. 2A CPUID; APM Vol. 3 CPUID and Appendix E): the CPU model's leaves, as data.

EAX selects the leaf and, for the leaves that have subleaves, ECX the
subleaf (other leaves ignore ECX).  The answer is the model's table
(:class:`spec.cpumodel.CpuModel`) with the bits that reflect live state
filled in (SDM Vol. 2A CPUID Tables 3-8, 3-17; APM Vol. 3 E.3.2, E.3.6):

* leaf 1 EBX[31:24]: the initial APIC ID (``model.apic_id``);
* leaf 1 EDX.APIC (bit 9): cleared while IA32_APIC_BASE.EN = 0;
* leaf 1 ECX.OSXSAVE (bit 27) = CR4.OSXSAVE; leaf 7 ECX.OSPKE (bit 4) = CR4.PKE.

A leaf above the maximum basic (leaf 0 EAX) or extended (8000_0000 EAX)
leaf: zeros on AMD (APM Vol. 3 CPUID: undefined functions return 0), the
highest basic leaf on Intel (SDM Vol. 2A CPUID).  A leaf below the maximum
that the table does not list returns zeros.  CPUID runs at any CPL; no flags.
"""

from __future__ import annotations

from spec.cpumodel import APIC_EN, IA32_APIC_BASE, SUBLEAF_LEAVES, CpuModel
from spec.decode.insn import Insn
from spec.isa.context import Exec
from spec.isa.registry import instruction
from spec.state import MachineState
from spec.svm.exitcodes import ExitCode

_ZERO = (0, 0, 0, 0)
CR4_OSXSAVE, CR4_PKE = 1 << 18, 1 << 22


def cpuid_leaf(s: MachineState, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """``(EAX, EBX, ECX, EDX)`` for ``leaf``/``subleaf`` on this state's model (see the module docstring)."""
    model: CpuModel = s.model
    leaves = model.leaves
    ext = leaf >= 0x8000_0000
    top = model.max_ext_leaf if ext else model.max_basic_leaf
    if leaf > top:
        if model.vendor == "intel":
            leaf, subleaf = model.max_basic_leaf, 0
        else:
            return _ZERO
    key = (leaf, subleaf if leaf in SUBLEAF_LEAVES else 0)
    a, b, c, d = leaves.get(key, _ZERO)
    if leaf == 1:
        b = (b & 0x00FF_FFFF) | (model.apic_id & 0xFF) << 24
        if d & (1 << 9):
            base = s.msrs.get(IA32_APIC_BASE)
            if base is None:
                base = model.msr_reset.get(IA32_APIC_BASE, 0)
            if not base & APIC_EN:
                d &= ~(1 << 9)
        c = (c & ~(1 << 27)) | ((1 << 27) if s.cr4 & CR4_OSXSAVE else 0)
    elif leaf == 7 and key[1] == 0:
        c = (c & ~(1 << 4)) | ((1 << 4) if s.cr4 & CR4_PKE else 0)
    return a, b, c, d


@instruction("CPUID", ref="SDM Vol. 2A CPUID; APM Vol. 3 CPUID")
def cpuid(x: Exec, i: Insn) -> None:
    """EAX, EBX, ECX, EDX := the leaf EAX (subleaf ECX); 32-bit writes (zero-extended in 64-bit mode)."""
    x.intercept(ExitCode.CPUID)  # APM 15.9 (no exception precedes it)
    s, D = x.s, x.D
    leaf = D.concrete(s.read_gpr(0, 32))
    subleaf = D.concrete(s.read_gpr(1, 32))
    a, b, c, d = cpuid_leaf(s, leaf, subleaf)
    s.write_gpr(0, 32, D.const(32, a))
    s.write_gpr(3, 32, D.const(32, b))
    s.write_gpr(1, 32, D.const(32, c))
    s.write_gpr(2, 32, D.const(32, d))


__all__ = ["cpuid_leaf"]
