"""Running one instruction's semantics symbolically (the engine behind the symbolic twins).

``symbolic_state(D, mode)`` builds a machine in ``mode`` (system state as
:func:`spec.machine.flat_machine` makes it) whose general-purpose registers
and status flags are fresh Z3 variables (``rax`` .. ``r15``, ``CF`` ..) and
whose memory is a symbolic array.  ``execute(x, code)`` decodes ``code``
(concretely) and runs its semantic function once on that state, returning
the stop reason (``None``, or the :class:`Fault` raised).

Use with :func:`spec.domain.symbolic.explore` to cover every path::

    paths = explore(lambda D: run_symbolic(D, "long64", bytes.fromhex("4801d8")))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spec import flags as F
from spec.decode.decoder import decode
from spec.domain.symbolic import SymbolicDomain
from spec.faults import Fault
from spec.isa import SEMANTICS
from spec.isa.context import Exec, Halt
from spec.machine import BITS, CODE, Mode, flat_machine
from spec.memory import LinearMemory, SymbolicMemory
from spec.state import Flags, MachineState

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass
class SymbolicRun:
    """A state after one symbolic instruction, with the inputs it started from."""

    state: MachineState
    inputs: dict[str, Any]  # register name / flag name / "mem" -> initial symbolic value
    fault: Fault | None
    next_rip: int
    halted: bool = False

    def reg(self, name: str, size: int = 64) -> Any:
        return self.state.read_gpr(GPR_NAMES.index(name), size)

    def flag(self, f: int) -> Any:
        return self.state.get_flag(f)


def symbolic_state(D: SymbolicDomain, mode: Mode) -> tuple[MachineState, dict[str, Any]]:
    base = flat_machine(mode)
    mem = SymbolicMemory("mem")
    st = MachineState(D=D, mem=LinearMemory(D, mem))
    inputs: dict[str, Any] = {"mem": mem.array}
    for i, name in enumerate(GPR_NAMES):
        st.gpr[i] = inputs[name] = D.var(64, name)
    st.flags = Flags(D)
    for f in F.STATUS:
        v = D.bool_var(F.NAMES[f])
        st.flags.set(f, v)
        inputs[F.NAMES[f]] = v
    st.rip = base.rip
    st.rflags_sys = base.rflags_sys
    st.seg = [s.copy() for s in base.seg]
    st.cr0, st.cr3, st.cr4, st.efer = base.cr0, base.cr3, base.cr4, base.efer
    st.seg_checks = False  # the application view: no segment-level checks (set True to prove those)
    return st, inputs


def run_symbolic(D: SymbolicDomain, mode: Mode, code: bytes) -> SymbolicRun:
    """Decode ``code`` in ``mode`` and execute it once on a fresh symbolic state."""
    st, inputs = symbolic_state(D, mode)
    insn = decode(code, BITS[mode])
    x = Exec(st)
    x.i = insn
    x.next_rip = CODE + insn.length
    fault = None
    halted = False
    try:
        SEMANTICS[insn.row.mnemonic].fn(x, insn)
    except Fault as f:
        fault = f
    except Halt:
        halted = True
    return SymbolicRun(st, inputs, fault, x.next_rip, halted)
