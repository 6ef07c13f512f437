"""The backend interface: describing snapshots and the bare spec CPU as the reference backend."""

from __future__ import annotations

import pytest

from difftest.backend import Capabilities, Outcome, SpecBackend, describe
from spec.machine import enter_user_mode, flat_machine
from spec.snapshot import Snapshot


@pytest.mark.parametrize(("mode", "expected"), [("real", ("real", "none", 0)), ("prot16", ("prot16", "none", 0)),
                                                ("prot32", ("prot32", "none", 0)),
                                                ("long64", ("long64", "4-level", 0))])
def test_describe_flat_machines(mode: str, expected: tuple[str, str, int]) -> None:
    assert describe(Snapshot.from_state(flat_machine(mode))) == expected  # type: ignore[arg-type]


def test_describe_user_mode_and_compat() -> None:
    st = flat_machine("long64", idt=True)
    enter_user_mode(st)
    assert describe(Snapshot.from_state(st)) == ("long64", "4-level", 3)
    st = flat_machine("long64")
    st.seg[1].l = 0
    st.seg[1].db = 1
    assert describe(Snapshot.from_state(st))[0] == "compat"


def test_capabilities_refuse_with_a_reason() -> None:
    snap = Snapshot.from_state(flat_machine("long64"))
    assert Capabilities().refuse(snap) is None
    assert Capabilities(paging=frozenset({"none"})).refuse(snap) == "paging mode 4-level not supported"
    assert Capabilities(available=False, reason="no /dev/kvm").refuse(snap) == "backend unavailable: no /dev/kvm"
    assert Capabilities(cpls=frozenset({3})).refuse(snap) == "CPL 0 not supported"


def test_spec_backend_outcomes_round_trip_as_json() -> None:
    snap = Snapshot.from_state(flat_machine("long64", bytes.fromhex("4801d8" "0f0b")))
    out = SpecBackend().run(snap, 100)
    assert (out.stop.kind, out.stop.vector, out.stop.rip) == ("exception", 6, 0x1003)
    assert out.final is not None and out.final.regs.rip == 0x1003
    assert Outcome.model_validate_json(out.model_dump_json()) == out
    delivered = SpecBackend(deliver_exceptions=True).run(Snapshot.from_state(
        flat_machine("long64", bytes.fromhex("0f0b"), idt=True)), 100)
    assert delivered.stop.kind == "halted"  # the #UD handler stub halts
