"""Flag control: CLC, STC, CMC, CLD, STD (spec/isa/flagctl.py; SDM Vol. 1 7.3.13.1)."""

from __future__ import annotations

import pytest
from conftest import flag, reg, run_code
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.machine import BITS, MODES

status_flags = st.sets(st.sampled_from(F.STATUS)).map(lambda s: sum(1 << f for f in s))
_FMT = Formatter(FormatterSyntax.INTEL)


def check(mode: str, code: str, text: str) -> str:
    raw = bytes.fromhex(code)
    insn = next(iter(Decoder(BITS[mode], raw, ip=0x1000)))
    assert insn.len == len(raw) and _FMT.format(insn) == text, _FMT.format(insn)
    return code


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=20)
@given(fl=status_flags, df=st.booleans())
def test_clc_stc_cmc(mode: str, fl: int, df: bool) -> None:
    """F8/F9/F5 (SDM Vol. 2A CLC, CMC; Vol. 2B STC): only CF changes."""
    start = fl | (df << F.DF)
    for code, name, cf in (("f8", "clc", False), ("f9", "stc", True), ("f5", "cmc", not fl & 1)):
        s, ev = run_code(mode, check(mode, code, name), flags=start)
        assert ev.kind == "halted"
        assert flag(s, F.CF) == cf
        assert s.read_rflags() == (start & ~1) | cf | 2
        assert s.undefined == 0


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=20)
@given(fl=status_flags, df=st.booleans())
def test_cld_std(mode: str, fl: int, df: bool) -> None:
    """FC/FD (SDM Vol. 2A CLD, Vol. 2B STD): DF (RFLAGS bit 10) only; DF is concrete system state."""
    start = fl | (df << F.DF)
    for code, name, d in (("fc", "cld", 0), ("fd", "std", 1)):
        s, ev = run_code(mode, check(mode, code, name), flags=start)
        assert ev.kind == "halted"
        assert (s.rflags_sys >> F.DF) & 1 == d
        assert s.read_rflags() == (start & ~(1 << F.DF)) | (d << F.DF) | 2


def test_cmc_complements_a_lazily_computed_carry() -> None:
    """CMC after ADD reads the carry from the lazy flag record: 0xFFFFFFFF + 1 carries, CMC clears it."""
    s, ev = run_code("prot32", "01 d8 f5", rax=0xFFFF_FFFF, rbx=1)
    assert ev.kind == "halted" and reg(s, "rax") == 0
    assert not flag(s, F.CF) and flag(s, F.ZF)


def test_clc_stc_define_an_undefined_carry() -> None:
    """After BSF, CF is undefined; CLC/STC define it (the other undefined flags stay so)."""
    for code, cf in (("f8", False), ("f9", True)):
        s, ev = run_code("long64", "0f bc c3" + code, rbx=4)
        assert ev.kind == "halted" and flag(s, F.CF) == cf
        assert s.undefined == (1 << F.OF) | (1 << F.SF) | (1 << F.AF) | (1 << F.PF)
