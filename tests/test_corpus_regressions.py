"""Every spec bug a campaign found stays fixed: corpus/regressions/ replayed on the spec CPU.

Each case file holds the minimized case; the expected stop (what the hardware did, through
KVM at CPL 3 on this project's AMD machine kind) is pinned here, and every file in the
directory must have an entry -- a new regression case cannot be added without its expectation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from difftest.backend import SpecBackend
from difftest.case import Case

REGRESSIONS = Path(__file__).parent.parent / "corpus" / "regressions"

# name -> (vector, error code, CR2) of the first exception, as the hardware gives it
EXPECTED: dict[str, tuple[int, int | None, int | None]] = {
    "rmw-read-fault-reports-write": (14, 0x7, 0x201BF9),
    "cmps-reads-destination-first": (14, 0x4, 0x200FA2),
    "amd-last-segment-prefix-wins": (12, 0x0, None),
}


def _files() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.json"))


def test_every_regression_case_has_an_expectation() -> None:
    names = {p.stem for p in _files()}
    assert names <= set(EXPECTED), names - set(EXPECTED)


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.stem)
def test_regression_case_replays_as_the_hardware_did(path: Path) -> None:
    case = Case.load(path)
    assert case.name == path.stem and "regression" in case.tags and case.explanation
    stop = SpecBackend().run(case.snapshot, case.budget).stop
    vector, error_code, cr2 = EXPECTED[case.name]
    assert (stop.kind, stop.vector, stop.error_code) == ("exception", vector, error_code)
    if cr2 is not None:
        assert stop.cr2 == cr2
