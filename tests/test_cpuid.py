"""CPUID and the CPU model (spec/isa/cpuid.py, spec/cpumodel.py).

The default model's leaves are pinned against the documented identity (AuthenticAMD, family 19h model
11h stepping 1, MAXPHYADDR 48) and feature list; properties check that the CPUID bits are the single
source of truth for the CR4/EFER bits and MSRs the model accepts.
"""

from __future__ import annotations

import pytest
from conftest import GPR, check, reg
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.cpu import SpecCPU
from spec.cpumodel import (
    CR4_BY_FEATURE,
    DEFAULT_FEATURES,
    DEFAULT_MODEL,
    EFER_BY_FEATURE,
    FEATURE_BITS,
    CpuModel,
    TscClock,
    build_leaves,
    make_model,
    signature,
)
from spec.faults import Vector
from spec.isa.cpuid import cpuid_leaf
from spec.machine import MODES, USER_CS, USER_DS, flat_machine
from spec.paging import PagingControl
from spec.state import MachineState

M64 = (1 << 64) - 1
CPUID = "0fa2"
BITS = {"real": 16, "prot16": 16, "prot32": 32, "long64": 64}


def run_cpuid(mode: str, leaf: int, subleaf: int = 0, *, model: CpuModel | None = None, cpl: int = 0,
              vendor: str = "amd") -> MachineState:
    s = flat_machine(mode, bytes.fromhex(check(mode, CPUID, "cpuid")) + b"\xf4")  # type: ignore[arg-type]
    if model is not None:
        s.model = model
    if cpl:
        for k, sel in ((1, USER_CS), (2, USER_DS)):
            seg = s.seg[k].copy()
            seg.dpl, seg.selector = 3, sel
            s.seg[k] = seg
    for name in ("rax", "rbx", "rcx", "rdx"):
        s.gpr[GPR[name]] = M64
    s.gpr[0] = 0xDEAD_0000_0000_0000 | leaf
    s.gpr[1] = 0xBEEF_0000_0000_0000 | subleaf
    ev = SpecCPU(s, vendor=vendor).run(10)
    if cpl:
        assert ev.kind == "fault" and ev.vector == Vector.GP and ev.rip == 0x1002, ev.describe()  # HLT at CPL 3
    else:
        assert ev.kind == "halted", ev.describe()
    return s


def regs4(s: MachineState) -> tuple[int, int, int, int]:
    return reg(s, "rax"), reg(s, "rbx"), reg(s, "rcx"), reg(s, "rdx")


def text(*words: int) -> str:
    return b"".join(w.to_bytes(4, "little") for w in words).decode("ascii")


def has(words: tuple[int, int, int, int], reg_index: int, bit: int) -> bool:
    return bool(words[reg_index] >> bit & 1)


@pytest.mark.parametrize("mode", MODES)
def test_vendor_string_every_mode(mode: str) -> None:
    """Leaf 0: maximum basic leaf in EAX, "AuthenticAMD" in EBX, EDX, ECX (APM Vol. 3 E.3.1).  The writes
    are 32 bits: the upper halves are cleared."""
    s = run_cpuid(mode, 0)
    a, b, c, d = regs4(s)
    assert a == 7 and text(b, d, c) == "AuthenticAMD"


def test_signature_family_19h() -> None:
    """Leaf 1 EAX: family = base (0FH) + extended family; model = extended model : base model (SDM Vol. 2A
    Figure 3-6; APM Vol. 3 E.3.2)."""
    a = regs4(run_cpuid("long64", 1))[0]
    stepping, base_model, base_family = a & 0xF, a >> 4 & 0xF, a >> 8 & 0xF
    ext_model, ext_family = a >> 16 & 0xF, a >> 20 & 0xFF
    assert base_family == 0xF and base_family + ext_family == 0x19
    assert ext_model << 4 | base_model == 0x11 and stepping == 1
    assert a == 0x00A1_0F11
    assert signature(6, 0x55, 4) == 0x0005_0654 and signature(0xF, 0x2, 9) == 0x0000_0F29


def test_default_features() -> None:
    """The documented feature list (spec/cpumodel.py docstring): present and absent bits."""
    l1 = cpuid_leaf(flat_machine("long64"), 1, 0)
    e1 = cpuid_leaf(flat_machine("long64"), 0x8000_0001, 0)
    l7 = cpuid_leaf(flat_machine("long64"), 7, 0)
    leaves = {1: l1, 0x8000_0001: e1, 7: l7}
    for name, (leaf, _, r, bit) in FEATURE_BITS.items():
        if leaf in leaves and name != "ospke" and name != "osxsave":
            assert has(leaves[leaf], r, bit) == (name in DEFAULT_FEATURES), name
    for absent in ("fpu", "vme", "mce", "mtrr", "mca", "clfsh", "mmx", "fxsr", "sse", "sse2", "pcid", "svm",
                   "xsave", "fsgsbase", "bmi1", "hypervisor"):
        assert absent not in DEFAULT_MODEL.features
    for present in ("tsc", "msr", "pae", "cx8", "apic", "sep", "pge", "cmov", "pat", "pse36", "popcnt", "abm",
                    "lahf_lm", "syscall", "nx", "page1gb", "rdtscp", "lm", "smep", "smap", "pku", "la57", "umip"):
        assert present in DEFAULT_MODEL.features
    assert e1[0] == l1[0]  # AMD repeats the signature in 8000_0001 EAX


def test_amd_mirrors_leaf1_edx_but_not_sep() -> None:
    """8000_0001 EDX mirrors leaf-1 EDX bits 0-9, 12-17, 23-24 on AMD; bit 11 there is SysCall, not SEP."""
    m = make_model(features={"sep", "pae", "cmov"})
    e1 = m.leaves[(0x8000_0001, 0)]
    assert has(e1, 3, 6) and has(e1, 3, 15) and not has(e1, 3, 11)
    m = make_model(vendor="intel", family=6, model=0x55, features={"sep", "pae", "syscall"})
    e1 = m.leaves[(0x8000_0001, 0)]
    assert e1[3] == 1 << 11 and e1[0] == 0


def test_extended_leaves() -> None:
    s = flat_machine("long64")
    assert cpuid_leaf(s, 0x8000_0000, 0)[0] == 0x8000_0008
    brand = b"".join(w.to_bytes(4, "little") for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004)
                     for w in cpuid_leaf(s, leaf, 0))
    assert brand.rstrip(b"\0") == b"refvmm spec CPU"
    a = cpuid_leaf(s, 0x8000_0008, 0)[0]
    assert a & 0xFF == 48 == PagingControl().maxphyaddr == DEFAULT_MODEL.maxphyaddr
    assert a >> 8 & 0xFF == 57  # LA57 advertised
    assert make_model(remove={"la57"}).leaves[(0x8000_0008, 0)][0] >> 8 == 48


def test_leaves_beyond_the_maximum() -> None:
    """AMD: zeros (APM Vol. 3 CPUID); Intel: the highest basic leaf (SDM Vol. 2A CPUID)."""
    s = flat_machine("long64")
    for leaf in (8, 0x10, 0x8000_0009, 0x8FFF_FFFF, 0x4000_0000):
        assert cpuid_leaf(s, leaf, 0) == (0, 0, 0, 0)
    s.model = make_model(vendor="intel", family=6, model=0x55)
    assert cpuid_leaf(s, 0x20, 0) == cpuid_leaf(s, 7, 0) == s.model.leaves[(7, 0)]
    assert cpuid_leaf(s, 0x8000_0009, 0) == cpuid_leaf(s, 7, 0)


def test_subleaves() -> None:
    """Leaf 7 has subleaves (subleaf 0 only here: EAX = 0); leaf 1 ignores ECX."""
    s = flat_machine("long64")
    assert cpuid_leaf(s, 7, 1) == (0, 0, 0, 0)
    assert cpuid_leaf(s, 1, 5) == cpuid_leaf(s, 1, 0)
    a, b, c, _ = regs4(run_cpuid("long64", 7, 0))
    assert a == 0 and b >> 7 & 1 and c >> 16 & 1  # SMEP, LA57


def test_dynamic_bits() -> None:
    """Leaf 1 EDX.APIC follows IA32_APIC_BASE.EN; EBX[31:24] is the APIC ID; leaf 7 ECX.OSPKE = CR4.PKE
    (SDM Vol. 2A CPUID Tables 3-8, 3-10)."""
    s = flat_machine("long64")
    assert cpuid_leaf(s, 1, 0)[3] >> 9 & 1
    s.msrs[0x1B] = 0xFEE0_0100  # EN = 0
    assert not cpuid_leaf(s, 1, 0)[3] >> 9 & 1
    assert not cpuid_leaf(s, 7, 0)[2] >> 4 & 1
    s.cr4 |= 1 << 22
    assert cpuid_leaf(s, 7, 0)[2] >> 4 & 1
    s.model = CpuModel(apic_id=5)
    assert cpuid_leaf(s, 1, 0)[1] >> 24 == 5


def test_cpuid_at_cpl3() -> None:
    """CPUID is not privileged."""
    _, b, c, d = regs4(run_cpuid("prot32", 0, cpl=3))
    assert text(b, d, c) == "AuthenticAMD"


def test_intel_model_vendor_string() -> None:
    m = make_model(vendor="intel", family=6, model=0x55, stepping=4)
    _, b, c, d = regs4(run_cpuid("long64", 0, model=m, vendor="intel"))
    assert text(b, d, c) == "GenuineIntel"
    assert regs4(run_cpuid("long64", 1, model=m, vendor="intel"))[0] == 0x0005_0654


def test_model_validation() -> None:
    with pytest.raises(ValueError):
        build_leaves(features={"avx512"})
    with pytest.raises(ValueError):
        CpuModel(vendor="via")
    assert TscClock(base=M64, rate=2)(1) == 1  # wraps at 64 bits


@given(st.sets(st.sampled_from(sorted(FEATURE_BITS))))
@settings(max_examples=60)
def test_cpuid_is_the_source_of_truth(features: set[str]) -> None:
    """For any feature set: the model's features are exactly what its leaves advertise, a CR4 bit is
    writable iff its feature is advertised (PCE always), and likewise EFER bits (spec/cpumodel.py)."""
    m = make_model(features=features)
    shown = {f for f in features if f not in ("ospke", "osxsave")}
    assert shown <= m.features <= set(features)
    for bit, need in CR4_BY_FEATURE.items():
        assert bool(m.cr4_allowed & bit) == (need is None or need in m.features)
    for bit, need in EFER_BY_FEATURE.items():
        assert bool(m.efer_allowed & bit) == (need in m.features)
    assert m.cr4_allowed >> 32 == 0 and m.efer_allowed & ~0x1D01 == 0
    assert (0xC000_0082 in m.msr_reserved) == ("lm" in m.features)
    assert (0x10 in m.msr_reserved) == ("tsc" in m.features)
