"""Shared test helpers: run code bytes on a flat machine in a given mode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec.cpu import SpecCPU, StopEvent
from spec.machine import BITS, MODES, flat_machine
from spec.state import MachineState

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

GPR = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
       "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15}


def run_code(mode: str, code: bytes | str, *, budget: int = 1000, flags: int | None = None,
             mem: dict[int, bytes] | None = None, **regs: int) -> tuple[MachineState, StopEvent]:
    """Run ``code`` (bytes or hex) in ``mode`` until it stops; HLT is appended.

    ``regs`` sets registers by lower-case name; ``flags`` sets RFLAGS;
    ``mem`` writes bytes at physical addresses first.
    """
    if isinstance(code, str):
        code = bytes.fromhex(code.replace(" ", ""))
    st = flat_machine(mode, code + b"\xf4")  # type: ignore[arg-type]
    for name, v in regs.items():
        st.gpr[GPR[name]] = v & ((1 << 64) - 1)
    if flags is not None:
        st.write_rflags(flags | 2)
    for addr, data in (mem or {}).items():
        st.mem.phys.write_bytes(addr, data)
    ev = SpecCPU(st).run(budget)
    return st, ev


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def reg(st: MachineState, name: str) -> int:
    return st.D.concrete(st.gpr[GPR[name]])


def flag(st: MachineState, f: int) -> bool:
    return bool(st.get_flag(f))


M64 = (1 << 64) - 1

_FMT = Formatter(FormatterSyntax.INTEL)
_FMT.space_after_operand_separator = True
_FMT.hex_prefix = "0x"
_FMT.hex_suffix = ""
_FMT.uppercase_hex = False
_FMT.small_hex_numbers_in_decimal = False


def check(mode: str, code: str, text: str) -> str:
    """Assert ``code`` is one instruction that iced-x86 disassembles as ``text``; return ``code``."""
    raw = bytes.fromhex(code)
    insn = next(iter(Decoder(BITS[mode], raw, ip=0x1000)))
    assert insn.len == len(raw), f"{code}: iced length {insn.len}"
    assert _FMT.format(insn) == text, f"{code}: iced says {_FMT.format(insn)!r}"
    return code


def mask(w: int) -> int:
    return (1 << w) - 1


def merge(old: int, new: int, w: int) -> int:
    """The 64-bit register after a ``w``-bit write (32-bit writes zero-extend, SDM Vol. 1 3.4.1.1)."""
    if w >= 32:
        return new & mask(w)
    return (old & ~mask(w) & M64) | (new & mask(w))
