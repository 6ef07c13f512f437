"""The campaign database: one SQLite file (WAL) that makes a campaign resumable.

A campaign is a deterministic stream of cases (case *i* is a pure function of
the campaign configuration and *i*), so what must survive a crash is *which*
indices are finished and what they found.  The database holds

* ``meta``      -- the campaign configuration (JSON) and the schema version; a
  database answers only to the configuration it was created with;
* ``done``      -- finished index ranges ``[start, end)``;
* ``counters``  -- named totals (cases, stop kinds per backend, unsupported
  reasons, verdicts, ...);
* ``coverage``  -- how often each (opcode-table row, mode) pair was generated;
* ``findings``  -- one row per divergence signature: verdict, known or new, the
  representative case (lowest index), its first diverging instruction, how
  many cases showed it, and -- once minimized -- the minimized case and the
  file it was written to.

Everything a batch of cases produced is committed in **one transaction** with
its ``done`` range (:meth:`Store.commit_batch`), so a process killed at any
moment (SIGKILL included) leaves either the whole batch or nothing: a restart
reruns exactly the unfinished indices, loses no finding and counts no case
twice.  WAL journaling with ``synchronous=NORMAL`` keeps every committed
transaction across a process crash.  An exclusive ``flock`` on the database file
(released by the kernel when the process dies) keeps a second campaign process
away from a database in use.

Bad input -- a file that is not a SQLite database, a database of another
program, an unreadable path, a different configuration -- raises
:class:`StoreError` with one line naming the problem; the file is never
modified in that case.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1
APPLICATION = "refvmm-campaign"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (start INTEGER PRIMARY KEY, end INTEGER NOT NULL, CHECK (end > start));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS coverage (row TEXT NOT NULL, mode TEXT NOT NULL, n INTEGER NOT NULL,
                                     PRIMARY KEY (row, mode));
CREATE TABLE IF NOT EXISTS findings (
    key TEXT PRIMARY KEY,
    known INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    insn_index INTEGER,
    instruction TEXT NOT NULL DEFAULT '',
    fields TEXT NOT NULL DEFAULT '[]',
    backends TEXT NOT NULL DEFAULT '[]',
    explanation TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL,
    case_json TEXT,
    minimized_json TEXT,
    file TEXT
);
"""


class StoreError(Exception):
    """A database that cannot be used (one line, names the file and the problem)."""


class Finding(BaseModel):
    """One divergence signature as recorded in the database."""

    model_config = ConfigDict(extra="forbid")

    key: str
    known: bool
    verdict: str
    first_index: int
    insn_index: int | None = None
    instruction: str = ""
    fields: list[str] = []
    backends: list[str] = []
    explanation: str = ""
    report: str = ""
    count: int
    case_json: str | None = None
    minimized_json: str | None = None
    file: str | None = None

    @property
    def pending_minimization(self) -> bool:
        return not self.known and self.case_json is not None and self.minimized_json is None


@dataclass
class Divergence:
    """What a batch saw of one signature: its lowest-index case and how many cases showed it."""

    key: str
    known: bool
    verdict: str
    index: int
    count: int = 1
    insn_index: int | None = None
    instruction: str = ""
    fields: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    explanation: str = ""
    report: str = ""
    case_json: str | None = None  # the case itself, kept for new signatures (to minimize)

    def merge(self, other: Divergence) -> None:
        """Fold ``other`` (same key) in: counts add up, the lower index is the representative."""
        count = self.count + other.count
        if other.index < self.index:
            self.__dict__.update(other.__dict__)
        self.count = count


@dataclass
class BatchResult:
    """Everything one batch ``[start, end)`` of cases produced."""

    start: int
    end: int
    counters: dict[str, int] = field(default_factory=dict)
    coverage: dict[tuple[str, str], int] = field(default_factory=dict)
    divergences: dict[str, Divergence] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def add_divergence(self, d: Divergence) -> None:
        old = self.divergences.get(d.key)
        if old is None:
            self.divergences[d.key] = d
        else:
            old.merge(d)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Store:
    """An open campaign database (see the module docstring).  Use :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self.path = path
        self.conn = conn
        self._lock_fd = lock_fd

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, config: Mapping[str, Any], *, lock: bool = True) -> Store:
        """Open (or create) the database at ``path`` for the campaign ``config``.

        A new database records ``config``; an existing one must have been
        created with an equal configuration, else :class:`StoreError` names the
        first differing setting.  With ``lock`` the database is reserved for
        this process until :meth:`close` (or its death).
        """
        p = Path(path)
        if p.is_dir():
            raise StoreError(f"{p}: is a directory, expected a campaign database file")
        existing = p.exists() and p.stat().st_size > 0
        if existing and not os.access(p, os.R_OK | os.W_OK):
            raise StoreError(f"{p}: cannot read and write the campaign database (permission denied)")
        if not p.parent.exists():
            raise StoreError(f"{p}: directory {p.parent} does not exist")
        lock_fd = cls._lock(p) if lock else None
        try:
            conn = cls._connect(p, existing)
            try:
                cls._check_or_init(p, conn, dict(config), existing)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(p, conn, lock_fd)

    @staticmethod
    def peek_config(path: str | Path) -> dict[str, Any] | None:
        """The configuration stored in an existing campaign database, read-only (``None`` if there is none).

        Anything unusable about the file raises :class:`StoreError` as :meth:`open` would.
        """
        p = Path(path)
        if not p.exists() or (p.is_file() and p.stat().st_size == 0):
            return None
        if p.is_dir():
            raise StoreError(f"{p}: is a directory, expected a campaign database file")
        try:
            conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as e:
            raise StoreError(f"{p}: cannot open the campaign database: {_one_line(e)}") from None
        try:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in names:
                raise StoreError(f"{p}: not a refvmm campaign database")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("application") != APPLICATION or "config" not in meta:
                raise StoreError(f"{p}: not a refvmm campaign database")
            return json.loads(meta["config"])
        except sqlite3.Error as e:
            raise StoreError(f"{p}: not a usable campaign database: {_one_line(e)}") from None
        except json.JSONDecodeError:
            raise StoreError(f"{p}: the campaign database has no readable configuration") from None
        finally:
            conn.close()

    @staticmethod
    def _lock(p: Path) -> int:
        # flock on the database file itself: independent of SQLite's POSIX (fcntl) locks on Linux.  The fd
        # stays open until close(), after the connection: closing it earlier would drop SQLite's locks.
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"{p}: cannot open the campaign database: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"{p}: the database is in use by another campaign process") from None
        return fd

    @staticmethod
    def _connect(p: Path, existing: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(p, isolation_level=None, timeout=10.0)
        except sqlite3.Error as e:
            raise StoreError(f"{p}: cannot open the campaign database: {_one_line(e)}") from None
        try:
            if existing:
                # Reading the schema first fails on a file that is not a SQLite database, before any write.
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "meta" not in names or "done" not in names:
                    raise StoreError(f"{p}: not a refvmm campaign database")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"{p}: not a usable campaign database: {_one_line(e)}") from None
        except StoreError:
            conn.close()
            raise
        return conn

    @staticmethod
    def _check_or_init(p: Path, conn: sqlite3.Connection, config: dict[str, Any], existing: bool) -> None:
        want = json.dumps(config, sort_keys=True)
        try:
            if existing:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if meta.get("application") != APPLICATION:
                    raise StoreError(f"{p}: not a refvmm campaign database")
                if meta.get("schema") != str(SCHEMA_VERSION):
                    raise StoreError(f"{p}: campaign database schema {meta.get('schema')}, "
                                     f"this refvmm reads schema {SCHEMA_VERSION}")
                have = json.loads(meta["config"])
                if have != json.loads(want):
                    raise StoreError(f"{p}: the database belongs to a different campaign "
                                     f"({_config_difference(have, config)}); use another --db or the same settings")
                return
            with _transaction(conn):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [("application", APPLICATION), ("schema", str(SCHEMA_VERSION)), ("config", want)])
        except sqlite3.Error as e:
            raise StoreError(f"{p}: campaign database error: {_one_line(e)}") from None
        except (KeyError, json.JSONDecodeError):
            raise StoreError(f"{p}: the campaign database has no readable configuration") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return json.loads(self.conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])

    def done_ranges(self) -> list[tuple[int, int]]:
        """Finished index ranges, sorted and merged."""
        merged: list[tuple[int, int]] = []
        for start, end in self.conn.execute("SELECT start, end FROM done ORDER BY start"):
            if merged and merged[-1][1] >= start:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def done_count(self) -> int:
        return sum(e - s for s, e in self.done_ranges())

    def watermark(self) -> int:
        """The lowest index not finished (every index below it is done)."""
        ranges = self.done_ranges()
        return ranges[0][1] if ranges and ranges[0][0] == 0 else 0

    def counters(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT name, n FROM counters").fetchall())

    def coverage(self) -> dict[tuple[str, str], int]:
        return {(r, m): n for r, m, n in self.conn.execute("SELECT row, mode, n FROM coverage")}

    def findings(self) -> list[Finding]:
        cur = self.conn.execute("SELECT key, known, verdict, first_index, insn_index, instruction, fields, backends, "
                                "explanation, report, count, case_json, minimized_json, file FROM findings "
                                "ORDER BY first_index, key")
        return [_finding(row) for row in cur]

    def finding(self, key: str) -> Finding | None:
        row = self.conn.execute("SELECT key, known, verdict, first_index, insn_index, instruction, fields, backends, "
                                "explanation, report, count, case_json, minimized_json, file FROM findings "
                                "WHERE key = ?", (key,)).fetchone()
        return None if row is None else _finding(row)

    def pending_minimizations(self) -> list[tuple[str, int]]:
        """``(key, first_index)`` of the new findings not minimized yet, lowest index first."""
        return self.conn.execute("SELECT key, first_index FROM findings WHERE known = 0 AND case_json IS NOT NULL "
                                 "AND minimized_json IS NULL ORDER BY first_index, key").fetchall()

    def signature_counts(self) -> tuple[int, int, int]:
        """Distinct signatures: (new, known, minimized)."""
        row = self.conn.execute("SELECT COALESCE(SUM(known = 0), 0), COALESCE(SUM(known = 1), 0), "
                                "COALESCE(SUM(minimized_json IS NOT NULL), 0) FROM findings").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    # -- writing ------------------------------------------------------------------------------
    def commit_batch(self, batch: BatchResult) -> None:
        """Record everything ``batch`` produced together with its ``done`` range, atomically.

        Raises :class:`StoreError` (and records nothing) if any index of the
        batch is already done: no case is ever counted twice.
        """
        c = self.conn
        try:
            with _transaction(c, immediate=True):
                clash = c.execute("SELECT start, end FROM done WHERE start < ? AND end > ? LIMIT 1",
                                  (batch.end, batch.start)).fetchone()
                if clash is not None:
                    raise StoreError(f"{self.path}: cases {batch.start}..{batch.end - 1} overlap the finished "
                                     f"range {clash[0]}..{clash[1] - 1}")
                c.execute("INSERT INTO done (start, end) VALUES (?, ?)", (batch.start, batch.end))
                c.executemany("INSERT INTO counters (name, n) VALUES (?, ?) "
                              "ON CONFLICT (name) DO UPDATE SET n = n + excluded.n", batch.counters.items())
                c.executemany("INSERT INTO coverage (row, mode, n) VALUES (?, ?, ?) "
                              "ON CONFLICT (row, mode) DO UPDATE SET n = n + excluded.n",
                              [(r, m, n) for (r, m), n in batch.coverage.items()])
                for d in batch.divergences.values():
                    self._merge_divergence(d)
        except sqlite3.Error as e:
            where = f"cases {batch.start}..{batch.end - 1}"
            raise StoreError(f"{self.path}: cannot record {where}: {_one_line(e)}") from None

    def _merge_divergence(self, d: Divergence) -> None:
        c = self.conn
        row = c.execute("SELECT first_index, minimized_json FROM findings WHERE key = ?", (d.key,)).fetchone()
        values = (d.known, d.verdict, d.index, d.insn_index, d.instruction, json.dumps(d.fields),
                  json.dumps(d.backends), d.explanation, d.report, d.case_json)
        if row is None:
            c.execute("INSERT INTO findings (known, verdict, first_index, insn_index, instruction, fields, backends, "
                      "explanation, report, case_json, count, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (*values, d.count, d.key))
            return
        first_index, minimized = row
        if d.index < first_index and minimized is None:
            # A lower-index case shows the same signature: it becomes the representative (determinism).
            c.execute("UPDATE findings SET known = ?, verdict = ?, first_index = ?, insn_index = ?, instruction = ?, "
                      "fields = ?, backends = ?, explanation = ?, report = ?, case_json = ?, count = count + ? "
                      "WHERE key = ?", (*values, d.count, d.key))
        else:
            c.execute("UPDATE findings SET count = count + ? WHERE key = ?", (d.count, d.key))

    def set_minimized(self, key: str, minimized_json: str, file: str | None, report: str | None = None) -> None:
        """Record the minimized case of finding ``key``, the file it was written to and (if given) its report."""
        try:
            with _transaction(self.conn, immediate=True):
                self.conn.execute("UPDATE findings SET minimized_json = ?, file = ?, report = COALESCE(?, report) "
                                  "WHERE key = ?", (minimized_json, file, report, key))
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot record the minimized case of {key}: {_one_line(e)}") from None


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, immediate: bool = False) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _finding(row: tuple[Any, ...]) -> Finding:
    (key, known, verdict, first_index, insn_index, instruction, fields, backends, explanation, report, count,
     case_json, minimized_json, file) = row
    return Finding(key=key, known=bool(known), verdict=verdict, first_index=first_index, insn_index=insn_index,
                   instruction=instruction, fields=json.loads(fields), backends=json.loads(backends),
                   explanation=explanation, report=report, count=count, case_json=case_json,
                   minimized_json=minimized_json, file=file)


def _config_difference(have: dict[str, Any], want: dict[str, Any]) -> str:
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            return f"{k} is {_short(have.get(k))} there, {_short(want.get(k))} here"
    return "configurations differ"


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def pending_batches(done: list[tuple[int, int]], limit: int | None, batch: int) -> Iterator[tuple[int, int]]:
    """Unfinished index ranges ``[start, end)`` in increasing order, at most ``batch`` long, below ``limit``.

    ``done`` is sorted and merged (:meth:`Store.done_ranges`); ``limit=None``
    continues forever past the last finished index.
    """
    pos = 0
    for start, end in [*done, (limit if limit is not None else 1 << 62, 1 << 62)]:
        stop = start if limit is None else min(start, limit)
        while pos < stop:
            nxt = min(pos + batch, stop)
            yield pos, nxt
            pos = nxt
        pos = max(pos, end)
        if limit is not None and pos >= limit:
            return
