"""Read-modify-write destinations are read with write intent (regression: corpus/regressions/).

A page fault on the read of a RMW destination reports W=1 in the error code, as
the write would (SDM Vol. 3A 4.7; hardware gives P|W|U = 7 for RCL m8 at CPL 3 on a
supervisor page, where the spec once gave 5).  Pure reads (CMP, TEST, BT, MOV load)
keep W=0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difftest.backend import SpecBackend
from difftest.case import Case
from spec.cpu import SpecCPU
from spec.machine import DATA, PAGING_BASE, flat_machine

PD = PAGING_BASE + 0x2000
RMW = {  # [rbx] destination forms, 64-bit mode
    "add": "48 01 03", "or": "08 03", "adc": "11 03", "sbb": "19 03", "and": "21 03", "sub": "29 03",
    "xor": "31 03", "inc": "fe 03", "dec": "ff 0b", "neg": "f7 1b", "not": "f6 13", "shl": "d1 23",
    "shr": "d0 2b", "sar": "c1 3b 03", "rol": "d1 03", "ror": "d3 0b", "rcl": "d0 13", "rcr": "d1 1b",
    "shld": "0f a4 03 02", "shrd": "0f ad 03", "xchg": "87 03", "xadd": "0f c1 03", "cmpxchg": "0f b1 03",
    "bts": "0f ab 03", "btr": "0f b3 03", "btc": "0f bb 03", "cmpxchg8b": "0f c7 0b",
}
READS = {"cmp": "39 03", "test": "85 03", "bt": "0f a3 03", "mov-load": "8b 03"}


def _fault(code_hex: str, *, present: bool) -> int | None:
    """Run the form on DATA+8 with DATA's 2 MiB page made read-only (or not present)."""
    st_ = flat_machine("long64", bytes.fromhex(code_hex) + b"\xf4")
    phys = st_.mem.phys
    # The operand lives in the second 2 MiB page (PD entry 1); code, stack and tables stay in entry 0.
    st_.gpr[3] = DATA + 8 + (1 << 21)  # rbx -> the second 2 MiB page
    phys.map_page(DATA + (1 << 21))
    second = (1 << 21) | 0x81 if present else 0  # P, PS, read-only (supervisor + CR0.WP) or not present
    phys.write(PD + 8, 8, second)
    st_.cr0 |= 1 << 16  # WP: supervisor writes honour R/W
    ev = SpecCPU(st_).run(4)
    return ev.error_code if ev.kind == "fault" and ev.vector == 14 else None


@pytest.mark.parametrize("name", sorted(RMW))
@pytest.mark.parametrize("present", [True, False])
def test_rmw_read_fault_has_write_bit(name: str, present: bool) -> None:
    code = _fault(RMW[name], present=present)
    assert code is not None and code & 2, f"{name}: error code {code}"


@pytest.mark.parametrize("name", sorted(READS))
def test_plain_reads_do_not(name: str) -> None:
    assert _fault(READS[name], present=False) == 0  # not present, read, supervisor


@given(st.sampled_from(sorted(RMW)))
def test_rmw_on_read_only_page_never_writes(name: str) -> None:
    code = _fault(RMW[name], present=True)
    assert code == 3  # P|W, supervisor


def test_corpus_regression_case() -> None:
    case = Case.load(Path(__file__).parent.parent / "corpus" / "regressions" / "rmw-read-fault-reports-write.json")
    out = SpecBackend().run(case.snapshot, case.budget)
    assert (out.stop.kind, out.stop.vector, out.stop.error_code) == ("exception", 14, 7)
