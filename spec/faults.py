"""Architectural exceptions, and the model's own errors kept apart from them.

An instruction that faults raises :class:`Fault` inside the model; the CPU's
``step`` delivers it through the IVT/IDT (:mod:`spec.interrupts`) or, when
delivery is off, turns it into a stop event.  It never escapes into a harness.

:class:`Unimplemented` is a *model* limit ("the spec does not cover this
yet"); it must never be mistaken for an architectural fault, so it is not a
subclass of :class:`Fault`.
"""

from __future__ import annotations

from enum import IntEnum


class Vector(IntEnum):
    """Exception vectors (Intel SDM Vol. 3A 6.3.1, Table 6-1)."""

    DE = 0  # divide error
    DB = 1  # debug
    NMI = 2
    BP = 3  # breakpoint (INT3)
    OF = 4  # overflow (INTO)
    BR = 5  # BOUND range exceeded
    UD = 6  # invalid opcode
    NM = 7  # device not available
    DF = 8  # double fault
    TS = 10  # invalid TSS
    NP = 11  # segment not present
    SS = 12  # stack-segment fault
    GP = 13  # general protection
    PF = 14  # page fault
    MF = 16  # x87 floating-point error
    AC = 17  # alignment check
    MC = 18  # machine check
    XM = 19  # SIMD floating-point
    VE = 20  # virtualization exception
    CP = 21  # control protection


# Vectors that push an error code (SDM Vol. 3A Table 6-1 "Error Code" column).
HAS_ERROR_CODE = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.CP})


class Fault(Exception):
    """An architectural exception raised by an instruction (fault or trap).

    ``error_code`` is ``None`` for vectors that push none.  ``cr2`` is the
    faulting linear address for #PF.  ``trap`` marks exceptions reported
    after the instruction completes (INT n, INT3, INTO): RIP then points past it.
    """

    def __init__(self, vector: int, error_code: int | None = None, *, cr2: int | None = None,
                 trap: bool = False, software: bool = False) -> None:
        super().__init__(vector, error_code)
        self.vector = int(vector)
        self.error_code = error_code
        self.cr2 = cr2
        self.trap = trap
        self.software = software

    def __repr__(self) -> str:
        try:
            name = Vector(self.vector).name
        except ValueError:
            name = f"vector {self.vector}"
        ec = "" if self.error_code is None else f"({self.error_code:#x})"
        return f"#{name}{ec}"

    __str__ = __repr__


def ud() -> Fault:
    return Fault(Vector.UD)


def gp(code: int = 0) -> Fault:
    return Fault(Vector.GP, code)


class Unimplemented(Exception):
    """The model does not (yet) define this behaviour.  Not an architectural event."""
