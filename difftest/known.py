"""Known divergences: the registry of explained signatures in ``corpus/known/*.json``.

Each file is one :class:`KnownDivergence`: a regular expression over
:attr:`difftest.triage.Signature.key` (``form|mode|field|backends``, matched in
full), the verdict, a short explanation, and an example case file (under
``corpus/known/cases/``) that reproduces a matching signature on the backends it
names.  Campaigns report a divergence whose signature matches an entry as *known*
and only the others as new: ``match(finding.signature, verdict=finding.verdict.verdict)``
(and ``match(gap_signature)`` for outcomes that were not compared).

A key says *where* a divergence is; most entries also need the vote's verdict to agree
(``requires_verdict``), because the vote checks *why* -- that AF is undefined after
this very shift (a count of 0 leaves it defined), that KVM's pushed image differs only
in IF/IOPL.  Entries are tried in file-name order; the numbered names fix it (the two
ORACLES.md undefined-flag classes first, the catch-all ``99-undefined-gap`` last).

Entries about Unicorn (QEMU) divergences are established with KVM present, where the
vote names Unicorn alone as dissenter.  On a machine without ``/dev/kvm`` the same
divergence is a spec/Unicorn tie (dissenters ``spec,unicorn``, verdict ``unknown``):
such entries accept both dissenter lists in their pattern and match on the key alone
(``requires_verdict: false``), so a corpus replays the same with or without KVM.  An
entry that needs the vote (its key alone would also cover an undefined-flag gap) names
the tie key separately (``undecided_pattern``, matched only when the verdict is
``unknown``).  The
refvmm VMM backends never vote (they run the spec; see :class:`difftest.campaign.Checker`),
so their presence does not change any key either.  Crash entries match
``crash|<backend>|<form>|<mode>`` signatures (:func:`difftest.campaign.diagnose_crash`):
cases that kill the backend's process natively.

Loading is strict: a malformed file, an invalid pattern, a missing example or a
name used twice is a one-line :class:`KnownError` naming the file and the problem.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from difftest.triage import Signature, VerdictName

KNOWN_DIR = Path(__file__).resolve().parent.parent / "corpus" / "known"


class KnownError(ValueError):
    """A known-divergence file that cannot be used (one line, names the file and the problem)."""


class KnownDivergence(BaseModel):
    """One explained divergence class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="identifier; the file is <name>.json")
    key_pattern: str = Field(min_length=1, description="regular expression matched against the whole signature key "
                                                       "(form|mode|field|backends)")
    verdict: VerdictName
    explanation: str = Field(min_length=10, description="why the backends differ, with the manual or ORACLES.md fact")
    example: str = Field(pattern=r"^cases/[A-Za-z0-9_.+-]+\.json$",
                         description="case file reproducing the divergence, relative to the registry directory")
    backends: list[str] = Field(min_length=1, description="backends the example needs, e.g. ['spec','unicorn','kvm']")
    requires_verdict: bool = Field(default=True, description="match only when the vote (difftest.triage.vote) "
                                   "reached this verdict too: for entries whose key alone is broader than the cause")
    references: list[str] = Field(default_factory=list, description="manual sections, ORACLES.md, issues")
    undecided_pattern: str | None = Field(default=None, description="for a requires_verdict entry: a key pattern "
                                          "matched when the vote could not decide (verdict 'unknown'), e.g. the "
                                          "spec/Unicorn tie of a Unicorn bug on a machine without KVM")

    @field_validator("key_pattern", "undecided_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        return v

    @property
    def regex(self) -> re.Pattern[str]:
        return _compiled(self.key_pattern)

    def matches(self, sig: Signature | str) -> bool:
        key = sig if isinstance(sig, str) else sig.key
        return self.regex.fullmatch(key) is not None

    def accepts(self, sig: Signature | str, verdict: str | None) -> bool:
        """Whether this entry explains ``sig`` with the vote's ``verdict`` (see :func:`match`)."""
        if self.matches(sig) and (not self.requires_verdict or self.verdict == verdict):
            return True
        key = sig if isinstance(sig, str) else sig.key
        return (self.undecided_pattern is not None and verdict == "unknown"
                and _compiled(self.undecided_pattern).fullmatch(key) is not None)

    def example_path(self, directory: Path | None = None) -> Path:
        return (directory or KNOWN_DIR) / self.example


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def load_file(path: Path, directory: Path | None = None) -> KnownDivergence:
    """One registry file; any problem is a one-line :class:`KnownError`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KnownError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        entry = KnownDivergence.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "entry"
        raise KnownError(f"{path}: {where}: {err['msg']}") from None
    if entry.name != path.stem:
        raise KnownError(f"{path}: name {entry.name!r} does not match the file name")
    if not entry.example_path(directory or path.parent).is_file():
        raise KnownError(f"{path}: example {entry.example} does not exist")
    return entry


def load_known(directory: Path | str | None = None) -> list[KnownDivergence]:
    """Every entry of the registry in ``directory`` (default ``corpus/known``), sorted by file name."""
    d = Path(directory) if directory is not None else KNOWN_DIR
    if not d.is_dir():
        raise KnownError(f"{d}: no such registry directory")
    entries = [load_file(p, d) for p in sorted(d.glob("*.json"))]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise KnownError(f"{d}: entry {e.name!r} given twice")
        seen.add(e.name)
    return entries


@cache
def _registry(directory: str) -> tuple[KnownDivergence, ...]:
    return tuple(load_known(directory))


def match(sig: Signature | str, known: list[KnownDivergence] | None = None, *,
          verdict: str | None = None) -> KnownDivergence | None:
    """The first registry entry (file-name order) whose pattern matches ``sig``'s key, or ``None``.

    ``verdict`` is the vote's (:func:`difftest.triage.vote`).  An entry with
    ``requires_verdict`` matches only when that verdict is given and equals its own -- a key
    says where a divergence is, the vote checks what explains it (e.g. that the flag is
    undefined *there*).  Other entries (gap signatures, or divergences the vote cannot
    classify, like an undefined destination register) match on the key alone.  An entry's
    ``undecided_pattern`` matches when the vote could not decide (``unknown``).
    """
    entries = known if known is not None else _registry(str(KNOWN_DIR))
    return next((e for e in entries if e.accepts(sig, verdict)), None)


def is_known(sig: Signature | str, known: list[KnownDivergence] | None = None, *, verdict: str | None = None) -> bool:
    return match(sig, known, verdict=verdict) is not None


def json_schema() -> str:
    """JSON Schema of a registry file."""
    return json.dumps(KnownDivergence.model_json_schema(mode="validation"), indent=1)
