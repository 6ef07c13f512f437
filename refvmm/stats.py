"""Per-VM statistics: how much the guest ran, and how often the VMM had to step in.

* ``guest_instructions`` -- instructions the guest retired: those the processor ran in
  guest mode (``hardware_instructions``) plus those the VMM completed on the guest's
  behalf (``emulated_instructions``: intercepted instructions it emulated -- CPUID, port
  I/O, MSRs, hypercalls, MMIO accesses, HLT).  This is the count the bare machine would
  report for the same run, and the clock the guest's TSC follows.
* ``exits`` -- #VMEXITs by exit name (``IOIO``, ``NPF``, ``EXCP14``, ...), and
  ``exits_per_1000`` = 1000 * exits / guest instructions: the efficiency measure of
  Popek and Goldberg (most instructions should run without the VMM).
* ``injections`` -- events injected through EVENTINJ, by vector.

:class:`VMStats` is a pydantic record (``model_dump_json`` for reports);
:func:`stats_table` renders it with rich for ``refvmm run``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, computed_field
from rich.table import Table

from spec.svm.exitcodes import exit_name


class VMStats(BaseModel):
    """Counters of one VM (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")  # the computed fields of a dump are recomputed, not read

    paging: str = ""
    vmruns: int = 0
    hardware_instructions: int = 0
    emulated_instructions: int = 0
    exits: dict[str, int] = Field(default_factory=dict)
    injections: dict[str, int] = Field(default_factory=dict)
    mmio_accesses: int = 0
    port_accesses: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def guest_instructions(self) -> int:
        return self.hardware_instructions + self.emulated_instructions

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exits_per_1000(self) -> float:
        n = self.guest_instructions
        return 1000.0 * self.total_exits / n if n else 0.0

    def record_exit(self, code: int) -> None:
        name = exit_name(code)
        self.exits[name] = self.exits.get(name, 0) + 1

    def record_injection(self, vector: int) -> None:
        key = str(vector)
        self.injections[key] = self.injections.get(key, 0) + 1


def stats_table(stats: VMStats, title: str = "exit statistics") -> Table:
    """A rich table: guest instructions, exits by reason (most frequent first), exit rate."""
    t = Table(title=f"{title} ({stats.paging} paging)" if stats.paging else title)
    t.add_column("counter")
    t.add_column("value", justify="right")
    t.add_column("per 1000 guest instr.", justify="right")
    n = stats.guest_instructions

    def rate(k: int) -> str:
        return f"{1000.0 * k / n:.2f}" if n else "-"

    t.add_row("guest instructions", f"{n:,}", "")
    t.add_row("  run by the processor", f"{stats.hardware_instructions:,}", "")
    t.add_row("  emulated by the VMM", f"{stats.emulated_instructions:,}", "")
    t.add_row("VMRUNs", f"{stats.vmruns:,}", "")
    t.add_row("exits", f"{stats.total_exits:,}", rate(stats.total_exits))
    for name, count in sorted(stats.exits.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(f"  {name}", f"{count:,}", rate(count))
    for vector, count in sorted(stats.injections.items(), key=lambda kv: int(kv[0])):
        t.add_row(f"injected vector {vector}", f"{count:,}", rate(count))
    if stats.port_accesses:
        t.add_row("port accesses", f"{stats.port_accesses:,}", rate(stats.port_accesses))
    if stats.mmio_accesses:
        t.add_row("MMIO accesses", f"{stats.mmio_accesses:,}", rate(stats.mmio_accesses))
    return t


__all__ = ["VMStats", "stats_table"]
