"""Segment-level protection on every memory access and instruction fetch.

Every data access goes from ``segment:offset`` to a linear address through
:meth:`spec.isa.context.Exec.linear`, and every instruction fetch through
:meth:`spec.cpu.SpecCPU.fetch_decode`; both call the checks here first
(segmentation comes before paging, SDM Vol. 3A 3.1).  What is checked
depends on the mode:

==========================  ===================================================
mode                        checks
==========================  ===================================================
protected, compatibility,   null (unusable) segment -> #GP(0); the access kind
virtual-8086                against the segment type (:data:`TYPE_RIGHTS`,
                            SDM Vol. 3A 3.4.5.1 Table 3-1, 5.4; null:
                            5.4.1) -> #GP(0);
                            every byte offset within the segment's valid
                            range (:func:`valid_range`, SDM Vol. 3A 5.3)
                            -> #GP(0), #SS(0) through SS
real-address                the byte offsets within the cached limit only
                            (SDM Vol. 3A 22.33.1 "Segment Wraparound")
64-bit                      no limit, type or null checks (SDM Vol. 3A 5.3.1,
                            5.4.1.1, 3.4.4); every linear byte canonical
                            (SDM Vol. 1 3.3.7.1) -> #GP(0), #SS(0) through SS
==========================  ===================================================

Decisions the manuals leave to the implementation, and what the spec does:

* **The 4-GiB wrap.**  When the upper end of a segment's valid range is
  FFFFFFFFH (an expand-up segment with a 4-GiB limit, or an expand-down
  segment with B = 1), the bytes of an access that run past FFFFFFFFH wrap
  to offset 0 without a limit violation.  SDM Vol. 3A 22.33.1 states this
  for instruction fetch ("Using the Pentium 4 microprocessor family, neither
  of these situations causes a fault" -- for an instruction crossing a
  limit of FFFFFFFFH); the spec applies the same rule to data, as Bochs
  (flat 4-GiB segments) and KVM's instruction emulator do.  With any other
  limit the literal rule of SDM Vol. 3A 5.3 holds: a word at an offset
  greater than (limit - 1) faults, a doubleword beyond (limit - 3), ...
* **Which vector.**  Only *limit* violations (and non-canonical addresses
  in 64-bit mode) through SS raise #SS(0); SDM Vol. 3A 6.15 lists limit
  violations of operations referring to SS, not-present SS loads and
  canonical violations of stack references as the #SS causes, and
  nothing else.  A type violation through SS and a null SS are #GP(0).
  Neither can arise from an SS load in protected mode (MOV/POP/LSS SS
  require a writable data segment and a non-null selector outside 64-bit
  mode, SDM Vol. 2B MOV), only from a cache written directly (VMX/SVM
  state load, snapshots, tests).
* **Real-address mode.**  Segment loads there keep the hidden attributes
  (SDM Vol. 3A 20.1.1), so the cached limit still applies -- "unreal mode"
  -- and so does the expansion direction of a data-type cache; the type
  (rights) and the unusable mark are *not* checked: on hardware real-mode
  loads and the reset state give read/write data attributes, even to CS
  (SDM Vol. 3A 9.1.1 Table 9-1: CS "Present, R/W, Accessed"), and the spec
  keeps whatever type the cache held.  A word at offset FFFFH (or a PUSH
  with SP = 1) is #GP(0) / #SS(0) (SDM Vol. 3A 22.33.1).
* **Virtual-8086 mode** is protected mode: the full checks apply; segment
  loads there give 64-KiB read/write data segments (SDM Vol. 3A 20.2),
  so only limit violations occur in practice.
* **Instruction fetch** checks the limit only, never the type: right after
  CR0.PE is set the processor keeps fetching through the real-mode CS
  cache, whatever its type, until a far transfer reloads CS (SDM Vol. 3A
  9.9.1).  Only the bytes the instruction occupies are checked
  (:func:`fetch_window`): an instruction whose last byte lies beyond the
  limit is #GP(0), one that ends exactly at the limit is not.
* **64-bit mode** segment overrides: the decoder keeps an SS override as
  the operand's segment (ES/CS/SS/DS overrides otherwise being null
  prefixes), so an SS-overridden non-canonical reference is #SS(0), like an
  rSP/rBP-based one (SDM Vol. 2 "64-Bit Mode Exceptions": "#SS(0) If a
  memory address referencing the SS segment is in a non-canonical form").

``MachineState.seg_checks`` = False turns all of this off (the application
view the symbolic instruction twins of :mod:`spec.symexec` prove over).
Concrete offsets (Python ints) take the fast paths; a symbolic offset turns
each check into one domain condition and one ``decide`` (the symbolic domain
forks a fault path where the fault is feasible).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spec.faults import Fault, Vector
from spec.memory import AccessKind
from spec.state import CR0_PE, EFER_LMA, Segment

if TYPE_CHECKING:
    from spec.domain.base import Domain
    from spec.state import MachineState

CS, SS = 1, 2
CR4_LA57 = 1 << 12
M32 = 0xFFFF_FFFF
M64 = 0xFFFF_FFFF_FFFF_FFFF

# -- segment types (SDM Vol. 3A 3.4.5.1, Table 3-1) ------------------------------------------
# Rights of a code/data segment by its 4-bit type field; index ``s << 4 | type`` (S = 0:
# system descriptors, which a segment register never holds: no rights at all).
R, W, X, ED = 1, 2, 4, 8  # readable, writable, executable, expand-down

TYPE_RIGHTS: tuple[int, ...] = tuple(
    [0] * 16  # system segment types
    + [R | (W if t & 2 else 0) | (ED if t & 4 else 0) for t in range(8)]  # data: bit 1 W, bit 2 E
    + [X | (R if t & 2 else 0) for t in range(8, 16)]  # code: bit 1 R, bit 2 C (no rights effect)
)
"""``TYPE_RIGHTS[s << 4 | type]``: bit set of R, W, X, ED (data types 0-7 are always readable)."""

NEEDS: tuple[int, ...] = tuple({AccessKind.READ: R, AccessKind.WRITE: W, AccessKind.FETCH: X}[k] for k in AccessKind)
"""``NEEDS[kind]``: the right an access kind needs (SDM Vol. 3A 5.4)."""

LIMIT_VECTOR: tuple[int, ...] = (Vector.GP, Vector.GP, Vector.SS, Vector.GP, Vector.GP, Vector.GP)
"""Vector of a limit (or canonical) violation through ES, CS, SS, DS, FS, GS (SDM Vol. 3A 6.15)."""

CANONICAL_HALF = {48: 1 << 47, 57: 1 << 56}
_HALF48, _HALF57 = CANONICAL_HALF[48], CANONICAL_HALF[57]


def valid_range(sg: Segment) -> tuple[int, int]:
    """``(lo, hi)``: the offsets a byte access may use in ``sg`` (SDM Vol. 3A 5.3).

    Expand-up (all code segments, data segments with E = 0): 0 .. limit.
    Expand-down (data, E = 1): limit + 1 .. FFFFFFFFH if B = 1, else .. FFFFH.
    """
    if TYPE_RIGHTS[sg.s << 4 | sg.type] & ED:
        return sg.limit + 1, M32 if sg.db else 0xFFFF
    return 0, sg.limit


# -- data accesses ---------------------------------------------------------------------------

def check_legacy(s: MachineState, sg: Segment, sreg: int, off: int, n: int, kind: int) -> None:
    """Check an ``n``-byte access at concrete offset ``off`` outside 64-bit mode; raise the fault.

    Protected/compatibility/virtual-8086 mode: null, type, then limit; real
    mode: the limit only (module docstring).
    """
    rights = TYPE_RIGHTS[sg.s << 4 | sg.type]
    if s.cr0 & CR0_PE:
        if sg.unusable:
            raise Fault(Vector.GP, 0)  # SDM Vol. 3A 5.4.1: access through a null selector
        if not rights & NEEDS[kind]:
            raise Fault(Vector.GP, 0)  # SDM Vol. 3A 5.4: no read/write right for this type
    if rights & ED:
        if off <= sg.limit:
            raise Fault(LIMIT_VECTOR[sreg], 0)
        hi = M32 if sg.db else 0xFFFF
    else:
        hi = sg.limit
    if hi != M32 and off + n - 1 > hi:  # the 4-GiB wrap: see the module docstring
        raise Fault(LIMIT_VECTOR[sreg], 0)


def check_legacy_symbolic(s: MachineState, D: Domain, decide: Callable[[Any], bool], sg: Segment, sreg: int,
                          off: Any, w: int, n: int, kind: int) -> None:
    """:func:`check_legacy` for a ``w``-bit symbolic offset: the range check becomes one ``decide``."""
    rights = TYPE_RIGHTS[sg.s << 4 | sg.type]
    if s.cr0 & CR0_PE:
        if sg.unusable or not rights & NEEDS[kind]:
            raise Fault(Vector.GP, 0)
    lo, hi = valid_range(sg)
    first = D.zext(off, w, 64)
    bad = D.false()
    if lo:
        bad = D.ult(64, first, D.const(64, lo))
    if hi != M32:
        bad = D.bor(bad, D.ult(64, D.const(64, hi), D.add(64, first, D.const(64, n - 1))))
    if decide(bad):
        raise Fault(LIMIT_VECTOR[sreg], 0)


def canonical_half(cr4: int) -> int:
    """2**(N-1) for N-bit linear addresses: 48, or 57 with CR4.LA57 (SDM Vol. 3A 4.5)."""
    return CANONICAL_HALF[57] if cr4 & CR4_LA57 else CANONICAL_HALF[48]


def canonical_run(lin: int, half: int) -> int:
    """How many bytes from ``lin`` on are canonical before the first non-canonical one (0: ``lin`` is not).

    Canonical: bits 63 .. N-1 all equal (SDM Vol. 1 3.3.7.1), i.e. below
    ``half`` or at least 2**64 - ``half``; the top range continues through
    the 2**64 wrap into the bottom one.
    """
    if lin < half:
        return half - lin
    if lin > M64 - half:
        return M64 + 1 - lin + half
    return 0


def check_canonical(lin: int, n: int, cr4: int, sreg: int) -> None:
    """64-bit mode: every byte of an ``n``-byte access at ``lin`` canonical, else #GP(0) / #SS(0) through SS.

    (:meth:`spec.isa.context.Exec.linear` inlines this test on its hot path.)
    """
    if canonical_run(lin, canonical_half(cr4)) < n:
        raise Fault(LIMIT_VECTOR[sreg], 0)


def canonical_symbolic(D: Domain, lin: Any, n: int, cr4: int) -> Any:
    """Whether the first and the last byte of an ``n``-byte access at symbolic 64-bit ``lin`` are canonical
    (a 1-bit domain value; SDM Vol. 1 3.3.7.1)."""
    top = 56 if cr4 & CR4_LA57 else 47

    def canonical(a: Any) -> Any:
        return D.eq(64, D.sext(D.extract(a, top, 0), top + 1, 64), a)

    return D.band(canonical(lin), canonical(D.add(64, lin, D.const(64, n - 1))))


def check_canonical_symbolic(D: Domain, decide: Callable[[Any], bool], lin: Any, n: int, cr4: int,
                             sreg: int) -> None:
    """:func:`check_canonical` for a symbolic 64-bit linear address: the first and the last byte canonical."""
    if decide(D.bnot(canonical_symbolic(D, lin, n, cr4))):
        raise Fault(LIMIT_VECTOR[sreg], 0)


# -- instruction fetch -------------------------------------------------------------------------

FETCH_UNLIMITED = 1 << 32
"""``fetch_window`` availability when no segment limit or canonical boundary is near."""


def fetch_window(s: MachineState) -> tuple[int, int]:
    """``(linear address of RIP, bytes fetchable from there)``; #GP(0) if not even the first byte is.

    64-bit mode: RIP must be canonical and so must every byte of the
    instruction (SDM Vol. 1 3.3.7.1).  Other modes: EIP/IP .. last byte of
    the instruction within CS.limit (SDM Vol. 3A 5.3; code segments are
    expand-up), except that a 4-GiB limit wraps (SDM Vol. 3A 22.33.1).  The
    caller faults an instruction longer than the returned count (#GP(0)).
    """
    rip = s.rip
    cs = s.seg[CS]
    if not s.seg_checks:
        return (rip if s.efer & EFER_LMA and cs.l else (cs.base + rip) & M32), FETCH_UNLIMITED
    if s.efer & EFER_LMA and cs.l:
        half = _HALF57 if s.cr4 & CR4_LA57 else _HALF48  # canonical_run, inlined: one call per fetch
        if rip < half:
            return rip, half - rip
        if rip > M64 - half:
            return rip, M64 + 1 - rip + half
        raise Fault(Vector.GP, 0)
    lin = (cs.base + rip) & M32
    limit = cs.limit
    if limit == M32:
        return lin, FETCH_UNLIMITED
    if rip > limit:
        raise Fault(Vector.GP, 0)
    return lin, limit - rip + 1


__all__ = ["LIMIT_VECTOR", "NEEDS", "TYPE_RIGHTS", "canonical_half", "canonical_run", "check_canonical",
           "check_canonical_symbolic", "check_legacy", "check_legacy_symbolic", "fetch_window", "valid_range"]
