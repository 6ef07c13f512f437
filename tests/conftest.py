"""Shared test helpers: run code bytes on a flat machine in a given mode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from spec.cpu import SpecCPU, StopEvent
from spec.machine import MODES, flat_machine
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
