"""The campaign database: configuration binding, atomic batches, findings merging, resumable index ranges."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difftest.store import BatchResult, Divergence, Store, StoreError, pending_batches

CONFIG = {"seed": 1, "backends": ["spec", "unicorn"], "envs": ["long64/4-level/4K/cpl0"], "length": 20}


def batch(start: int, end: int, *, divergences: list[Divergence] = (), cov: dict | None = None) -> BatchResult:  # type: ignore[assignment]
    b = BatchResult(start, end)
    b.count("cases", end - start)
    b.count("stop/spec/halted", end - start)
    for pair, n in (cov or {("01 ADD Ev,Gv", "long64"): end - start}).items():
        b.coverage[pair] = n
    for d in divergences:
        b.add_divergence(d)
    return b


def test_new_database_records_its_config_and_reopens(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with Store.open(db, CONFIG) as s:
        assert s.config() == CONFIG
        s.commit_batch(batch(0, 10))
    assert Store.peek_config(db) == CONFIG
    with Store.open(db, dict(CONFIG)) as s:
        assert s.done_ranges() == [(0, 10)] and s.counters()["cases"] == 10


def test_a_different_config_is_a_one_line_error_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with Store.open(db, CONFIG) as s:
        s.commit_batch(batch(0, 5))
    before = db.read_bytes()
    with pytest.raises(StoreError) as e:
        Store.open(db, {**CONFIG, "seed": 2})
    msg = str(e.value)
    assert "\n" not in msg and "seed is 1 there, 2 here" in msg
    assert db.read_bytes() == before
    with Store.open(db, CONFIG) as s:
        assert s.done_count() == 5


@pytest.mark.parametrize(("content", "needle"), [
    (b"this is not a database at all, just some text" * 50, "not a usable campaign database"),
    (b"SQLite format 3\x00" + b"\xff" * 200, "not a usable campaign database"),
])
def test_corrupt_file_is_rejected_untouched(tmp_path: Path, content: bytes, needle: str) -> None:
    db = tmp_path / "c.db"
    db.write_bytes(content)
    with pytest.raises(StoreError) as e:
        Store.open(db, CONFIG)
    assert needle in str(e.value) and str(db) in str(e.value) and "\n" not in str(e.value)
    assert db.read_bytes() == content
    with pytest.raises(StoreError):
        Store.peek_config(db)
    assert db.read_bytes() == content


def test_foreign_sqlite_database_is_rejected_untouched(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(StoreError, match="not a refvmm campaign database"):
        Store.open(db, CONFIG)
    assert db.read_bytes() == before


def test_directory_and_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        Store.open(tmp_path, CONFIG)
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "no" / "c.db", CONFIG)


def test_second_process_is_locked_out(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with Store.open(db, CONFIG):
        with pytest.raises(StoreError, match="in use by another campaign"):
            Store.open(db, CONFIG)
    Store.open(db, CONFIG).close()  # released on close


def test_batches_merge_counters_coverage_and_reject_overlap(tmp_path: Path) -> None:
    with Store.open(tmp_path / "c.db", CONFIG) as s:
        s.commit_batch(batch(0, 10))
        s.commit_batch(batch(20, 25, cov={("01 ADD Ev,Gv", "long64"): 1, ("90 NOP", "long64"): 2}))
        assert s.counters() == {"cases": 15, "stop/spec/halted": 15}
        assert s.coverage() == {("01 ADD Ev,Gv", "long64"): 11, ("90 NOP", "long64"): 2}
        assert s.watermark() == 10 and s.done_count() == 15
        for start, end in [(5, 12), (0, 10), (24, 30), (9, 21)]:
            with pytest.raises(StoreError, match="overlap"):
                s.commit_batch(batch(start, end))
        assert s.counters()["cases"] == 15  # nothing of a rejected batch was recorded
        s.commit_batch(batch(10, 20))
        assert s.done_ranges() == [(0, 25)] and s.watermark() == 25


def div(key: str, index: int, *, known: bool = False, count: int = 1) -> Divergence:
    return Divergence(key=key, known=known, verdict="unknown", index=index, count=count, instruction=f"insn{index}",
                      case_json=None if known else f'{{"case": {index}}}')


def test_findings_keep_the_lowest_index_and_add_counts(tmp_path: Path) -> None:
    with Store.open(tmp_path / "c.db", CONFIG) as s:
        s.commit_batch(batch(40, 50, divergences=[div("A", 45), div("K", 41, known=True)]))
        s.commit_batch(batch(0, 10, divergences=[div("A", 7, count=3)]))
        a = s.finding("A")
        assert a is not None and (a.first_index, a.count, a.instruction, a.case_json) == (7, 4, "insn7", '{"case": 7}')
        assert s.pending_minimizations() == [("A", 7)]
        s.set_minimized("A", '{"small": 1}', "corpus/findings/A.json")
        s.commit_batch(batch(10, 20, divergences=[div("A", 3)]))  # lower index after minimization
        a = s.finding("A")
        assert a is not None and a.first_index == 7 and a.count == 5  # the minimized representative stays
        assert a.minimized_json == '{"small": 1}' and a.file == "corpus/findings/A.json"
        assert s.pending_minimizations() == []
        k = s.finding("K")
        assert k is not None and k.known and k.case_json is None
        assert s.signature_counts() == (1, 1, 1)


def test_batch_result_merges_divergences_within_a_batch() -> None:
    b = BatchResult(0, 10)
    b.add_divergence(div("A", 8))
    b.add_divergence(div("A", 2))
    b.add_divergence(div("A", 5))
    d = b.divergences["A"]
    assert (d.index, d.count, d.instruction) == (2, 3, "insn2")


ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=8)


@given(ranges, st.integers(0, 250) | st.none(), st.integers(1, 17))
def test_pending_batches_cover_exactly_the_unfinished_indices(raw: list[tuple[int, int]], limit: int | None,
                                                              size: int) -> None:
    done_set: set[int] = set()
    for start, n in raw:
        done_set |= set(range(start, start + n))
    done: list[tuple[int, int]] = []
    for i in sorted(done_set):
        if done and done[-1][1] == i:
            done[-1] = (done[-1][0], i + 1)
        else:
            done.append((i, i + 1))
    horizon = limit if limit is not None else 300
    got: list[tuple[int, int]] = []
    for b in pending_batches(done, limit, size):
        if b[0] >= horizon:
            break
        got.append(b)
    assert all(0 < e - s <= size for s, e in got)
    assert all(a[1] <= b[0] for a, b in pairwise(got))  # increasing, disjoint
    covered = {i for s, e in got for i in range(s, e)}
    expect = set(range(horizon)) - done_set
    if limit is None:
        covered = {i for i in covered if i < horizon}
    assert covered == expect


WRITER = textwrap.dedent("""
    import sys
    from difftest.store import BatchResult, Divergence, Store
    s = Store.open(sys.argv[1], {"seed": 1})
    i = s.done_ranges()[-1][1] if s.done_ranges() else 0
    print("ready", flush=True)
    while True:
        b = BatchResult(i, i + 3)
        b.count("cases", 3)
        b.coverage[("row", "long64")] = 3
        b.add_divergence(Divergence(key=f"k{i % 7}", known=False, verdict="unknown", index=i, case_json="{}"))
        s.commit_batch(b)
        i += 3
""")


def test_sigkill_leaves_whole_batches_only(tmp_path: Path) -> None:
    """A writer killed mid-stream: every recorded number agrees with the finished ranges (atomic batches)."""
    db = tmp_path / "k.db"
    for _ in range(2):  # kill, then resume and kill again
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.4)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with Store.open(db, {"seed": 1}) as s:
            done = s.done_count()
            assert done > 0 and s.done_ranges() == [(0, done)]
            assert s.counters()["cases"] == done
            assert s.coverage()[("row", "long64")] == done
            assert sum(f.count for f in s.findings()) == done // 3
