"""The CPUID policy: what CPUID tells a guest about its (virtual) processor.

The guest's processor is a :class:`spec.cpumodel.CpuModel` derived from the spec's
model (:data:`spec.cpumodel.DEFAULT_MODEL` unless given):

* **SVM hidden** (CPUID 8000_0001h:ECX[2]): the VMM does not virtualize SVM itself
  (no nested virtualization), so the guest sees no SVM and its EFER.SVME is reserved;
* **features the VMM does not virtualize hidden** (configurable, default
  ``pku``, ``la57``, ``apic``): PKRU is not switched by VMRUN/#VMEXIT and the VMM does
  not save it; the shadow pager implements 2-, 3- and 4-level guest paging, not 5-level;
  the VMM has no local APIC device (so IA32_APIC_BASE does not exist for the guest);
* **hypervisor present** (CPUID.1:ECX[31], SDM Vol. 2A Table 3-10 "Not Used / always 0"
  on bare metal, set by every hypervisor by convention), and the hypervisor leaves
  ``4000_0000h``: EAX = the highest hypervisor leaf (4000_0001h), EBX:ECX:EDX = the
  vendor signature (``"refvmm"`` padded with NULs to 12 bytes);
  ``4000_0001h``: EAX = the hypercall interface version (:data:`refvmm.exits.HYPERCALL_VERSION`).

Because the guest model is a real CpuModel, hiding a feature hides it *everywhere*
(CR4/EFER writability, which MSRs exist), not just in CPUID -- as long as the access
goes through the VMM (intercepted CPUID/MSR and every emulated instruction).  What the
guest executes directly runs on the physical processor model (which has SVM and the
hidden features); a guest that sets CR4.PKE despite CPUID is the classic
virtualization hole, closed under shadow paging (CR4 writes are intercepted) and
documented under nested paging.

Leaves ``4000_0002h .. 4000_00FFh`` return zeros.  Everything else is answered by the
spec's own CPUID (:func:`spec.isa.cpuid.cpuid_leaf`) on the guest model, live bits
(APIC ID, OSXSAVE, OSPKE) included.  Per-leaf overrides (configuration ``cpuid`` hooks)
win over all of the above.
"""

from __future__ import annotations

from spec.cpumodel import DEFAULT_MODEL, ECX, EDX, FEATURE_BITS, CpuModel
from spec.isa.cpuid import cpuid_leaf
from spec.state import MachineState

HYPERVISOR_LEAF = 0x4000_0000
HYPERVISOR_LAST = 0x4000_00FF
ALWAYS_HIDDEN = frozenset({"svm"})
DEFAULT_HIDDEN = frozenset({"pku", "la57", "apic"})
AMD_MIRRORED_EDX = 0x3FF | 0x3F000 | 0x1800000  # leaf-1 EDX bits 9:0, 17:12, 24:23


def _signature(vendor: str) -> tuple[int, int, int]:
    raw = vendor.encode("ascii")[:12].ljust(12, b"\0")
    return tuple(int.from_bytes(raw[k:k + 4], "little") for k in (0, 4, 8))  # type: ignore[return-value]


class CpuidPolicy:
    """The guest's CPUID (see the module docstring)."""

    def __init__(self, base: CpuModel = DEFAULT_MODEL, *, hide: frozenset[str] | set[str] = DEFAULT_HIDDEN,
                 hypervisor_bit: bool = True, vendor: str = "refvmm", interface_version: int = 1) -> None:
        unknown = set(hide) - FEATURE_BITS.keys()
        if unknown:
            raise ValueError(f"unknown CPUID features: {sorted(unknown)}")
        self.base = base
        self.hidden = frozenset(hide) | ALWAYS_HIDDEN
        self.hypervisor_bit = hypervisor_bit
        self.vendor = vendor
        self.interface_version = interface_version
        self.overrides: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.model = self._guest_model()

    def _guest_model(self) -> CpuModel:
        leaves = {k: list(v) for k, v in self.base.leaves.items()}
        for name in self.hidden:
            leaf, sub, reg, bit = FEATURE_BITS[name]
            if (leaf, sub) in leaves:
                leaves[(leaf, sub)][reg] &= ~(1 << bit)
                if leaf == 1 and reg == EDX and self.base.vendor == "amd" and AMD_MIRRORED_EDX >> bit & 1:
                    # AMD mirrors these leaf-1 EDX bits in 8000_0001 EDX (APM Vol. 3 E.4.2).
                    mirror = leaves.get((0x8000_0001, 0))
                    if mirror is not None:
                        mirror[EDX] &= ~(1 << bit)
        if self.hypervisor_bit:
            leaves[(1, 0)][ECX] |= 1 << 31
        return CpuModel(vendor=self.base.vendor, leaves={k: tuple(v) for k, v in leaves.items()},  # type: ignore[misc]
                        maxphyaddr=self.base.maxphyaddr, tsc=self.base.tsc, apic_id=self.base.apic_id)

    def override(self, leaf: int, subleaf: int, regs: tuple[int, int, int, int]) -> None:
        """Answer ``leaf``/``subleaf`` with ``regs`` (a configuration ``cpuid`` hook)."""
        self.overrides[(leaf, subleaf)] = tuple(r & 0xFFFF_FFFF for r in regs)  # type: ignore[assignment]

    def leaf(self, state: MachineState, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """``(EAX, EBX, ECX, EDX)`` for the guest whose view is ``state`` (its CR4 and MSRs give the live bits)."""
        leaf &= 0xFFFF_FFFF
        subleaf &= 0xFFFF_FFFF
        hit = self.overrides.get((leaf, subleaf)) or self.overrides.get((leaf, 0))
        if hit is not None:
            return hit
        if self.hypervisor_bit and HYPERVISOR_LEAF <= leaf <= HYPERVISOR_LAST:
            if leaf == HYPERVISOR_LEAF:
                b, c, d = _signature(self.vendor)
                return (HYPERVISOR_LEAF + 1, b, c, d)
            if leaf == HYPERVISOR_LEAF + 1:
                return (self.interface_version, 0, 0, 0)
            return (0, 0, 0, 0)
        saved = state.model
        state.model = self.model
        try:
            return cpuid_leaf(state, leaf, subleaf)
        finally:
            state.model = saved

    def has(self, feature: str) -> bool:
        return self.model.has(feature)


__all__ = ["ALWAYS_HIDDEN", "DEFAULT_HIDDEN", "HYPERVISOR_LEAF", "CpuidPolicy"]
