"""The CPU model: which processor the spec claims to be, as data.

A :class:`CpuModel` is the identity and the optional parts of the processor:

* ``vendor`` (``"amd"`` or ``"intel"``) and the CPUID leaves as a table
  ``(leaf, subleaf) -> (EAX, EBX, ECX, EDX)``: CPUID returns them (plus the
  few bits that reflect live state, see :mod:`spec.isa.cpuid`);
* ``maxphyaddr``: the physical-address width (CPUID Fn8000_0008 EAX[7:0]);
  reserved-bit checks of CR3, the PDPTEs and APIC_BASE use it;
* ``tsc``: the time source of the time-stamp counter, a function of the
  number of retired instructions (deterministic by default, so that runs are
  reproducible);
* derived from the leaves, once, at construction: the set of feature names
  the leaves advertise (``features``), the CR4 bits that may be set
  (``cr4_allowed``), the EFER bits that may be set (``efer_allowed``), and the
  MSRs that exist with their reserved-bit masks (``msr_reserved``) and reset
  values (``msr_reset``).

The CPUID feature bits are the single source of truth: a feature the leaves
do not advertise is absent everywhere (its CR4/EFER bit is reserved, its MSRs
raise #GP), as on a processor without it (SDM Vol. 3A 2.5 "Reserved bits";
APM Vol. 2 3.1).

The default model (:data:`DEFAULT_MODEL`)
-----------------------------------------

``AuthenticAMD``, family 19h, model 11h, stepping 1 (signature 00A10F11h,
the encoding of a Zen 4 server part), MAXPHYADDR 48 (matching
:class:`spec.paging.PagingControl`'s default), linear-address width 48, or
57 with LA57.  It advertises exactly what the spec implements:

==================  =========================  ===================================================
leaf / register     features                   implemented by
==================  =========================  ===================================================
1 EDX               DE PSE TSC MSR PAE CX8     DR4/DR5 aliasing (MOV DR), 4-MiB pages, RDTSC,
                    APIC SEP PGE CMOV PAT      RDMSR/WRMSR, PAE paging, CMPXCHG8B, APIC_BASE MSR,
                    PSE36                      SYSENTER MSRs, global pages, CMOVcc, PAT MSR, PSE-36
1 ECX               CX16 POPCNT                CMPXCHG16B, POPCNT
7.0 EBX             SMEP SMAP                  paging checks (spec/paging.py)
7.0 ECX             UMIP PKU LA57              SGDT/SIDT/SLDT/STR/SMSW at CPL>0 -> #GP, protection
                                               keys, 5-level paging
8000_0001 ECX       LahfSahf AltMovCr8 ABM     LAHF/SAHF in 64-bit mode, LOCK MOV CR0 = CR8,
                    3DNowPrefetch              LZCNT, PREFETCH/PREFETCHW
8000_0001 EDX       the leaf-1 EDX bits above  (AMD mirrors them)
                    SysCall NX Page1GB         SYSCALL/SYSRET MSRs, EFER.NXE, 1-GiB pages,
                    RDTSCP LM                  RDTSCP/TSC_AUX, long mode
8000_0008 EAX       PhysAddrSize 48,
                    LinAddrSize 57
==================  =========================  ===================================================

Not advertised, because the spec does not implement them: FPU (x87), VME,
MCE/MCA, MTRR, CLFSH, MMX, FXSR, SSE*, XSAVE, PCID, FSGSBASE, BMI1/BMI2,
SVM (no VMRUN yet: EFER.SVME is reserved until a model advertises SVM),
x2APIC, the hypervisor bit.  Leaves 2-6 and 8000_0005-8000_0007 are zero
(no cache/TLB/power information).  Leaf numbers beyond the maxima return
zeros on AMD (APM Vol. 3 CPUID: reserved functions return 0) and the
highest basic leaf on Intel (SDM Vol. 2A CPUID, "If a value entered for
CPUID.EAX is higher than the maximum input value...").

Gaps the lead should know about: the model advertises SMAP and PKU, whose
instructions STAC/CLAC and RDPKRU/WRPKRU are not in the opcode map yet (the
paging checks themselves are implemented); TZCNT decodes as TZCNT although
BMI1 is not advertised (a processor without BMI1 executes F3 0F BC as BSF).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

M64 = (1 << 64) - 1
EAX, EBX, ECX, EDX = range(4)

# Feature name -> (leaf, subleaf, register, bit) (SDM Vol. 2A CPUID Tables 3-8..3-10, 3-17;
# APM Vol. 3 Appendix E).
FEATURE_BITS: dict[str, tuple[int, int, int, int]] = {
    # CPUID.1:EDX
    "fpu": (1, 0, EDX, 0), "vme": (1, 0, EDX, 1), "de": (1, 0, EDX, 2), "pse": (1, 0, EDX, 3),
    "tsc": (1, 0, EDX, 4), "msr": (1, 0, EDX, 5), "pae": (1, 0, EDX, 6), "mce": (1, 0, EDX, 7),
    "cx8": (1, 0, EDX, 8), "apic": (1, 0, EDX, 9), "sep": (1, 0, EDX, 11), "mtrr": (1, 0, EDX, 12),
    "pge": (1, 0, EDX, 13), "mca": (1, 0, EDX, 14), "cmov": (1, 0, EDX, 15), "pat": (1, 0, EDX, 16),
    "pse36": (1, 0, EDX, 17), "clfsh": (1, 0, EDX, 19), "mmx": (1, 0, EDX, 23), "fxsr": (1, 0, EDX, 24),
    "sse": (1, 0, EDX, 25), "sse2": (1, 0, EDX, 26), "htt": (1, 0, EDX, 28),
    # CPUID.1:ECX
    "sse3": (1, 0, ECX, 0), "cx16": (1, 0, ECX, 13), "pcid": (1, 0, ECX, 17), "x2apic": (1, 0, ECX, 21),
    "movbe": (1, 0, ECX, 22), "popcnt": (1, 0, ECX, 23), "xsave": (1, 0, ECX, 26), "osxsave": (1, 0, ECX, 27),
    "hypervisor": (1, 0, ECX, 31),
    # CPUID.(7,0):EBX/ECX
    "fsgsbase": (7, 0, EBX, 0), "bmi1": (7, 0, EBX, 3), "smep": (7, 0, EBX, 7), "bmi2": (7, 0, EBX, 8),
    "erms": (7, 0, EBX, 9), "invpcid": (7, 0, EBX, 10), "smap": (7, 0, EBX, 20),
    "umip": (7, 0, ECX, 2), "pku": (7, 0, ECX, 3), "ospke": (7, 0, ECX, 4), "la57": (7, 0, ECX, 16),
    "rdpid": (7, 0, ECX, 22),
    # CPUID.80000001H:ECX/EDX
    "lahf_lm": (0x8000_0001, 0, ECX, 0), "svm": (0x8000_0001, 0, ECX, 2), "altmovcr8": (0x8000_0001, 0, ECX, 4),
    "abm": (0x8000_0001, 0, ECX, 5), "prefetchw": (0x8000_0001, 0, ECX, 8),
    "syscall": (0x8000_0001, 0, EDX, 11), "nx": (0x8000_0001, 0, EDX, 20), "page1gb": (0x8000_0001, 0, EDX, 26),
    "rdtscp": (0x8000_0001, 0, EDX, 27), "lm": (0x8000_0001, 0, EDX, 29),
    # CPUID.80000008H:EBX
    "wbnoinvd": (0x8000_0008, 0, EBX, 9),
}

# Leaves whose output depends on ECX (the subleaf); every other leaf ignores ECX (SDM Vol. 2A CPUID).
SUBLEAF_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1F, 0x8000_001D, 0x8000_0020})

# -- CR4 and EFER bits, and which feature makes each one writable (SDM Vol. 3A 2.5, 2.2.1; APM Vol. 2 3.1) --
CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_MCE, CR4_PGE, CR4_PCE = (1 << k for k in range(9))
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_UMIP, CR4_LA57 = 1 << 9, 1 << 10, 1 << 11, 1 << 12
CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 21, 1 << 22
CR4_BY_FEATURE: dict[int, str | None] = {
    CR4_VME: "vme", CR4_PVI: "vme", CR4_TSD: "tsc", CR4_DE: "de", CR4_PSE: "pse", CR4_PAE: "pae", CR4_MCE: "mce",
    CR4_PGE: "pge", CR4_PCE: None,  # RDPMC exists on every model (APM Vol. 3 RDPMC; SDM Vol. 3B 20.2)
    CR4_OSFXSR: "fxsr", CR4_OSXMMEXCPT: "sse", CR4_UMIP: "umip", CR4_LA57: "la57", CR4_FSGSBASE: "fsgsbase",
    CR4_PCIDE: "pcid", CR4_OSXSAVE: "xsave", CR4_SMEP: "smep", CR4_SMAP: "smap", CR4_PKE: "pku",
}
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12
EFER_BY_FEATURE: dict[int, str] = {EFER_SCE: "syscall", EFER_LME: "lm", EFER_LMA: "lm", EFER_NXE: "nx",
                                   EFER_SVME: "svm"}

# -- MSR indices (SDM Vol. 4 Table 2-2; APM Vol. 2 Appendix A) --------------------------------------------
IA32_TSC = 0x10
IA32_APIC_BASE = 0x1B
IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
IA32_PAT = 0x277
EFER = 0xC000_0080
STAR, LSTAR, CSTAR, SFMASK = 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084
FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX = 0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103
AMD_PERF_EVTSEL = (0xC001_0000, 0xC001_0001, 0xC001_0002, 0xC001_0003)  # APM Vol. 2 13.2.1 (legacy counters)
AMD_PERF_CTR = (0xC001_0004, 0xC001_0005, 0xC001_0006, 0xC001_0007)

PAT_RESET = 0x0007_0406_0007_0406  # SDM Vol. 3A 13.12.4 (Table 13-12): WB WT UC- UC, twice
APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_BSP, APIC_EN = 1 << 8, 1 << 11


def _mask(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1) if hi >= lo else 0


@dataclass(frozen=True)
class TscClock:
    """A deterministic time source: TSC = ``base + rate * retired instructions`` (mod 2^64).

    The architecture only requires the TSC to increase monotonically (SDM
    Vol. 3B 18.17); counting retired instructions makes a run reproducible
    and the value exact in tests.  Any callable ``f(icount) -> int`` can
    replace it in a model (e.g. a wall clock for interactive use).
    """

    base: int = 0
    rate: int = 1

    def __call__(self, icount: int) -> int:
        return (self.base + self.rate * icount) & M64


def signature(family: int, model: int, stepping: int) -> int:
    """CPUID.1:EAX / 8000_0001:EAX for a display family/model (SDM Vol. 2A Figure 3-6; APM Vol. 3 E.3.2).

    Families above 0Fh are encoded as base family 0Fh plus an extended
    family; the extended model holds the model's high nibble.
    """
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family > 0xF else 0
    return (stepping & 0xF) | (model & 0xF) << 4 | base_family << 8 | (model >> 4) << 16 | ext_family << 20


def _words(text: str) -> list[int]:
    raw = text.encode("ascii")
    return [int.from_bytes(raw[k:k + 4], "little") for k in range(0, len(raw), 4)]


def build_leaves(*, vendor: str = "amd", family: int = 0x19, model: int = 0x11, stepping: int = 1,
                 features: frozenset[str] | set[str] = frozenset(), maxphyaddr: int = 48,
                 brand: str = "refvmm spec CPU") -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """The CPUID table of a model with the given identity and ``features`` (names of :data:`FEATURE_BITS`).

    Vendor strings (SDM Vol. 2A CPUID leaf 0; APM Vol. 3 E.3.1):
    ``AuthenticAMD`` / ``GenuineIntel`` in EBX, EDX, ECX.  On AMD, leaf
    8000_0000 repeats the vendor string and 8000_0001 EDX mirrors the
    leaf-1 EDX bits 0-9, 12-17 and 23-24 (APM Vol. 3 E.4.2; bit 11 there is
    SysCall, not SEP).
    """
    unknown = set(features) - FEATURE_BITS.keys()
    if unknown:
        raise ValueError(f"unknown CPUID features: {sorted(unknown)}")
    vend = "AuthenticAMD" if vendor == "amd" else "GenuineIntel"
    b, d, c = _words(vend)
    regs: dict[tuple[int, int], list[int]] = {}
    for f in features:
        leaf, sub, reg, bit = FEATURE_BITS[f]
        regs.setdefault((leaf, sub), [0, 0, 0, 0])[reg] |= 1 << bit
    sig = signature(family, model, stepping)
    leaves: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    leaves[(0, 0)] = (7, b, c, d)
    l1 = regs.get((1, 0), [0, 0, 0, 0])
    # EBX: brand index 0, CLFLUSH line size in 8-byte units (if CLFSH), one logical processor, APIC ID 0.
    l1_ebx = (8 << 8 if "clfsh" in features else 0) | 1 << 16
    leaves[(1, 0)] = (sig, l1_ebx, l1[ECX], l1[EDX])
    for leaf in range(2, 7):
        leaves[(leaf, 0)] = (0, 0, 0, 0)
    l7 = regs.get((7, 0), [0, 0, 0, 0])
    leaves[(7, 0)] = (0, l7[EBX], l7[ECX], l7[EDX])  # EAX: highest subleaf of leaf 7 = 0
    ext = regs.get((0x8000_0001, 0), [0, 0, 0, 0])
    ext_edx = ext[EDX]
    if vendor == "amd":
        ext_edx |= l1[EDX] & (_mask(9, 0) | _mask(17, 12) | _mask(24, 23))
    leaves[(0x8000_0000, 0)] = (0x8000_0008, b, c, d) if vendor == "amd" else (0x8000_0008, 0, 0, 0)
    leaves[(0x8000_0001, 0)] = (sig if vendor == "amd" else 0, 0, ext[ECX], ext_edx)
    words = _words(brand.ljust(48, "\0")[:48])
    for k in range(3):
        leaves[(0x8000_0002 + k, 0)] = tuple(words[4 * k:4 * k + 4])  # type: ignore[assignment]
    for leaf in (0x8000_0005, 0x8000_0006, 0x8000_0007):
        leaves[(leaf, 0)] = (0, 0, 0, 0)
    lin = 57 if "la57" in features else 48
    e8 = regs.get((0x8000_0008, 0), [0, 0, 0, 0])
    leaves[(0x8000_0008, 0)] = (maxphyaddr | lin << 8, e8[EBX], 0, 0)  # ECX: NC = 0 (one core)
    return leaves


DEFAULT_FEATURES = frozenset({
    "de", "pse", "tsc", "msr", "pae", "cx8", "apic", "sep", "pge", "cmov", "pat", "pse36",
    "cx16", "popcnt", "smep", "smap", "umip", "pku", "la57",
    "lahf_lm", "altmovcr8", "abm", "prefetchw", "syscall", "nx", "page1gb", "rdtscp", "lm",
})


@dataclass(frozen=True, eq=False)
class CpuModel:
    """A processor model: identity, CPUID leaves, MAXPHYADDR, TSC time source; the rest is derived.

    Frozen and shared: states hold a reference, copies share it.  Build a
    variant with :func:`make_model` (or pass ``leaves`` directly).
    """

    vendor: str = "amd"
    leaves: Mapping[tuple[int, int], tuple[int, int, int, int]] = field(
        default_factory=lambda: build_leaves(features=DEFAULT_FEATURES))
    maxphyaddr: int = 48
    tsc: Callable[[int], int] = field(default_factory=TscClock)
    apic_id: int = 0
    # Derived in __post_init__ (not constructor arguments).
    features: frozenset[str] = field(init=False)
    cr4_allowed: int = field(init=False)
    efer_allowed: int = field(init=False)
    msr_reserved: Mapping[int, int] = field(init=False)
    msr_reset: Mapping[int, int] = field(init=False)
    perf_counters: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.vendor not in ("amd", "intel"):
            raise ValueError(f"vendor must be 'amd' or 'intel', not {self.vendor!r}")
        leaves = MappingProxyType(dict(self.leaves))
        feats = frozenset(name for name, (leaf, sub, reg, bit) in FEATURE_BITS.items()
                          if leaves.get((leaf, sub), (0, 0, 0, 0))[reg] >> bit & 1)
        cr4 = 0
        for bit, need in CR4_BY_FEATURE.items():
            if need is None or need in feats:
                cr4 |= bit
        efer = 0
        for bit, need in EFER_BY_FEATURE.items():
            if need in feats:
                efer |= bit
        rsv, reset = _msrs(self.vendor, feats, self.maxphyaddr)
        object.__setattr__(self, "leaves", leaves)
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "cr4_allowed", cr4)
        object.__setattr__(self, "efer_allowed", efer)
        object.__setattr__(self, "msr_reserved", MappingProxyType(rsv))
        object.__setattr__(self, "msr_reset", MappingProxyType(reset))
        object.__setattr__(self, "perf_counters", AMD_PERF_CTR if self.vendor == "amd" else ())

    def has(self, feature: str) -> bool:
        return feature in self.features

    @property
    def max_basic_leaf(self) -> int:
        return self.leaves.get((0, 0), (0, 0, 0, 0))[EAX]

    @property
    def max_ext_leaf(self) -> int:
        return self.leaves.get((0x8000_0000, 0), (0, 0, 0, 0))[EAX]


def _msrs(vendor: str, feats: frozenset[str], maxphy: int) -> tuple[dict[int, int], dict[int, int]]:
    """The MSRs a model has -> reserved-bit mask (#GP if written with one set), and reset values.

    Only plain bit-mask rules live here; MSRs with value rules (canonical
    addresses, PAT encodings, EFER's LME/LMA rules, the TSC) are checked in
    :mod:`spec.isa.msr`.
    """
    rsv: dict[int, int] = {}
    reset: dict[int, int] = {}
    if "tsc" in feats:
        rsv[IA32_TSC] = 0
    if "apic" in feats:
        # IA32_APIC_BASE: BSP (8), EN (11), base (MAXPHYADDR-1:12); x2APIC EN (10) only with x2APIC
        # (SDM Vol. 3A 11.4.4 Figure 11-5; APM Vol. 2 16.3.1).
        ok = APIC_BSP | APIC_EN | _mask(maxphy - 1, 12) | (1 << 10 if "x2apic" in feats else 0)
        rsv[IA32_APIC_BASE] = M64 ^ ok
        reset[IA32_APIC_BASE] = APIC_DEFAULT_BASE | APIC_BSP | APIC_EN
    if "sep" in feats:
        for idx in (IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP):
            rsv[idx] = 0  # value rules in spec.isa.msr (vendor-dependent width)
    if "pat" in feats:
        rsv[IA32_PAT] = 0  # value rule: each byte a valid memory type
        reset[IA32_PAT] = PAT_RESET
    if feats & {"syscall", "lm", "nx", "svm"}:
        rsv[EFER] = 0  # value rule: the writable bits of CpuModel.efer_allowed
    if "syscall" in feats:
        rsv[STAR] = 0
    if "lm" in feats:
        for idx in (LSTAR, CSTAR, FS_BASE, GS_BASE, KERNEL_GS_BASE):
            rsv[idx] = 0  # value rule: canonical
        rsv[SFMASK] = 0  # all 64 bits stored; SYSCALL uses bits 31:0 (APM Vol. 2 6.1.1)
    if "rdtscp" in feats or "rdpid" in feats:
        rsv[TSC_AUX] = 0  # value rule: bits 63:32 (vendor-dependent)
    if vendor == "amd":
        # Legacy performance counters, always present on AMD (APM Vol. 2 13.2.1).  PerfEvtSel reserved bits:
        # 19, 21, 39:36, 63:42 (41:40 HostOnly/GuestOnly exist only with SVM).
        evt = (1 << 19) | (1 << 21) | _mask(39, 36) | _mask(63, 42) | (0 if "svm" in feats else _mask(41, 40))
        for idx in AMD_PERF_EVTSEL:
            rsv[idx] = evt
        for idx in AMD_PERF_CTR:
            rsv[idx] = 0  # 48-bit counters: bits 63:48 are dropped on write
    return rsv, reset


def make_model(*, vendor: str = "amd", family: int = 0x19, model: int = 0x11, stepping: int = 1,
               features: frozenset[str] | set[str] = DEFAULT_FEATURES, add: frozenset[str] | set[str] = frozenset(),
               remove: frozenset[str] | set[str] = frozenset(), maxphyaddr: int = 48,
               tsc: Callable[[int], int] | None = None) -> CpuModel:
    """A model with ``features`` (+ ``add`` - ``remove``); e.g. ``make_model(add={"pcid"})``."""
    feats = (frozenset(features) | frozenset(add)) - frozenset(remove)
    leaves = build_leaves(vendor=vendor, family=family, model=model, stepping=stepping, features=feats,
                          maxphyaddr=maxphyaddr)
    return CpuModel(vendor=vendor, leaves=leaves, maxphyaddr=maxphyaddr, tsc=tsc or TscClock())


DEFAULT_MODEL = CpuModel()
"""The default processor (see the module docstring): shared by every state that is not given another."""

__all__ = ["DEFAULT_FEATURES", "DEFAULT_MODEL", "FEATURE_BITS", "CpuModel", "TscClock", "build_leaves",
           "make_model", "signature"]
