"""The SQLite file under the buffer: opening, configuring, transactions, error translation.

``SqliteFile`` is the base of ``SqliteBuffer`` (``sqlite.py``); it knows nothing of events.

- Open: ``_open(readonly)`` connects (``mode=ro`` for readers such as the CLI), refuses a
  schema newer than this code before writing anything (``migrations.check_version``), sets WAL,
  ``synchronous``, ``journal_size_limit`` and ``auto_vacuum=INCREMENTAL`` (only effective at
  creation), then migrates to ``SCHEMA_VERSION``.
- Clean stops: ``close`` records ``meta.clean_stop = 1`` for a connection opened by
  ``SqliteBuffer.open``; ``_check_after_unclean_stop`` runs ``PRAGMA quick_check`` when it is
  0 (a crash or power cut), so damage is found at start, not in the middle of a delivery.
- Transactions: ``_write`` is one ``BEGIN IMMEDIATE`` transaction; any error rolls it back.
  ``_on_commit`` runs after each COMMIT (the buffer applies its running counts there).
- Errors: ``SQLITE_FULL`` -> ``StorageFullError`` (nothing of the call committed); corrupt
  pages -> ``BufferCorruptError`` (and the next start checks the file); anything else ->
  ``BufferUnavailableError`` (retryable), or ``BufferOpenError`` while opening.

Threading: one connection (``check_same_thread=False``) used by one thread at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from buffer.base import BufferCorruptError, BufferOpenError, BufferUnavailableError
from buffer.migrations import check_version, migrate
from config.errors import EdgeAgentError, StorageFullError

__all__ = ["SYNCHRONOUS", "SqliteFile"]

_T = TypeVar("_T")
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_WAL_LIMIT = 8 * 2**20  # bytes the WAL is truncated to after a checkpoint


class SqliteFile:
    """One SQLite connection to the buffer file; see the module docstring."""

    def __init__(self, path: Path | str, synchronous: str, busy_timeout: float) -> None:
        if str(synchronous).upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, "
                             f"not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = str(synchronous).upper()
        self.busy_timeout = float(busy_timeout)
        self.readonly = False
        self._conn: sqlite3.Connection | None = None
        self._owner = False  # opened by open() (not attach): records clean stops
        self._damaged = False  # a corrupt page was met: the next start must check the file

    def _on_begin(self) -> None:
        """Called before each ``_write`` transaction begins."""

    def _on_commit(self) -> None:
        """Called after each committed ``_write`` transaction."""

    def _on_rollback(self) -> None:
        """Called after a ``_write`` transaction was rolled back."""

    def _check_after_unclean_stop(self) -> None:
        """After a crash or power cut (no clean close recorded), run ``quick_check`` once:
        damage found now is salvaged instead of failing later in the middle of a delivery."""
        conn = self._require()
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'clean_stop'").fetchone()
            if row is None or row[0]:
                return
            result = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.Error as e:
            raise self._translate(e, "checking the file", opening=True) from e
        if result != ["ok"]:
            raise BufferCorruptError(f"buffer file {self.path} is damaged: {'; '.join(result)}")


    def close(self) -> None:
        conn, self._conn = self._conn, None
        owner, self._owner = self._owner, False
        if conn is None:
            return
        try:
            if owner and not self._damaged:
                conn.execute("UPDATE meta SET value = 1 WHERE name = 'clean_stop'")
        except sqlite3.Error:
            pass  # then the next start checks the file: the safe side
        finally:
            conn.close()


    def _open(self, readonly: bool) -> None:
        if self._conn is not None:
            raise RuntimeError(f"buffer {self.path} is already open")
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.exists():
                    raise BufferOpenError(f"buffer file {self.path} does not exist")
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False,
                                       timeout=self.busy_timeout)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=self.busy_timeout)
        except (OSError, sqlite3.Error) as e:
            raise BufferOpenError(f"cannot open buffer file {self.path}: {e}") from e
        try:
            self._configure(conn, readonly)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _configure(self, conn: sqlite3.Connection, readonly: bool) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if readonly:
                check_version(conn, self.path)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return
            # A newer schema is refused before anything is written, even the journal mode:
            # the file is left exactly as the newer agent wrote it.
            check_version(conn, self.path)
            # auto_vacuum only takes effect on a file without tables, i.e. at creation.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BufferOpenError(f"buffer file {self.path}: cannot use WAL mode "
                                      f"(journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
            migrate(conn, self.path)
        except sqlite3.Error as e:
            raise self._translate(e, "opening", opening=True) from e


    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"buffer {self.path} is not open")
        return self._conn

    def _translate(self, e: sqlite3.Error, what: str, opening: bool = False) -> EdgeAgentError:
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == sqlite3.SQLITE_FULL:
            return StorageFullError(f"buffer {self.path}: disk full while {what}; nothing of "
                                    f"this call was committed, everything before is kept")
        if primary in _CORRUPT_CODES:
            self._damaged = True
            return BufferCorruptError(f"buffer file {self.path} is damaged ({e}) while {what}")
        if opening:
            return BufferOpenError(f"cannot open buffer file {self.path}: {e}")
        return BufferUnavailableError(f"buffer {self.path}: {what} failed: {e}")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; SQLite errors leave nothing half-done."""
        conn = self._require()
        if self.readonly:
            raise RuntimeError(f"buffer {self.path} is attached read-only; {what} needs a write")
        self._on_begin()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._on_rollback()
                raise
            self._on_commit()
        except sqlite3.Error as e:
            raise self._translate(e, what) from e

    def _read(self, what: str, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._require().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise self._translate(e, what) from e


    def _view(self, what: str, query: Callable[..., _T], *args: object) -> _T:
        try:
            return query(self._require(), *args)
        except sqlite3.Error as e:
            raise self._translate(e, what) from e
