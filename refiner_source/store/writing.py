"""How the store writes, and what it promises of it. Four promises, kept here and nowhere else:

- One writer at a time per SQLite file: every write transaction first takes `SqliteWriterLock`
  (a thread lock in this process, flock across processes), then BEGIN IMMEDIATE. A busy file is
  waited for asleep in the kernel, never in polling steps; waiting longer than the timeout (30 s,
  as SQLite's own) raises StoreUnavailable, so a writer stopped mid-commit costs 503s, never a
  hang. PostgreSQL needs no such lock (nullcontext).
- A webhook's row is durable before it is answered: `GroupCommit.commit` returns only once the
  transaction holding its row has committed (synchronous=FULL on SQLite; PostgreSQL's commit).
- Rows that arrive while a commit syncs go into the next one, one leader per process at a time
  (group commit): one transaction, one INSERT statement and one fsync for all. A caller whose
  group failed gets that error, and its row is never committed later by another leader.
- The leader writes on a connection kept between groups while they come (`HeldWriter`): a second
  idle, a failure, or a fork, and it goes back to the pool, so that the next group's connection is
  pinged (a PostgreSQL restarted meanwhile, say).
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine

from refiner_source.store.errors import StoreMisconfigured, StoreUnavailable, sqlite_file_problem

HELD_IDLE_SECONDS = 1.0  # the held connection goes back to the pool after this long without a group


class SqliteWriterLock:
    """Writers of one SQLite file take turns here, in this process (threads) and across processes
    (flock on a file beside the database), before BEGIN IMMEDIATE.

    SQLite admits one writer at a time and makes the others wait in its busy handler, which
    sleeps 1, 2, 5, 10 ... 100 ms between tries: with gunicorn's workers and the delivery worker
    all writing, they would sleep while the database was free. A lock the kernel hands to the
    next waiter at once keeps the file busy instead.

    flock has no timeout, and a writer stopped mid-commit (SIGSTOP) must cost 503s, not a hang. So
    a busy file is waited for by a thread of this lock's (`_Waiter`), blocked in flock on a
    descriptor of its own, while the caller sleeps on an event with the timeout: nobody polls. A
    caller that gives up leaves its turn to be released by that thread the moment it comes.
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout  # as SQLite's own busy timeout: then the store "is not answering"
        self._reset()

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.threads = threading.Lock()
        self.fd: int | None = None  # opened on first use, in the process that uses it
        self.held_fd: int | None = None  # the descriptor whose flock this process holds now
        self.waiter: _Waiter | None = None

    def __enter__(self) -> None:
        if self.pid != os.getpid():  # forked: the parent's descriptor would share its lock
            self._reset()
        if not self.threads.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"no turn to write to the database within {self.timeout:g} s")
        try:
            if self.fd is None:
                self.fd = self._open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the file is free: most turns
                self.held_fd = self.fd
            except BlockingIOError:
                if self.waiter is None:
                    self.waiter = _Waiter()
                self.held_fd = self.waiter.turn(self._open(), self.timeout)
                if self.held_fd is None:
                    raise StoreUnavailable(f"another process held {self.path} for {self.timeout:g} s") from None
        except BaseException:
            self.threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fd, self.held_fd = self.held_fd, None
        try:
            if fd == self.fd:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:  # a waited-for turn's own descriptor
                _let_go(fd)
        finally:
            self.threads.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # the database's folder is missing or not writable
            raise StoreMisconfigured(sqlite_file_problem(self.path, exc.strerror, "writer lock file")) from exc


@dataclass
class _Turn:
    fd: int  # a descriptor of its own: flock's lock belongs to the open file, not to the thread
    granted: threading.Event = field(default_factory=threading.Event)  # set once decided: held, or failed
    abandoned: bool = False
    error: OSError | None = None  # flock itself failed


class _Waiter:
    """A thread that waits for a busy lock file blocked in flock, one turn after the other, and hands
    each turn to its caller; a turn whose caller gave up is released as soon as it comes."""

    def __init__(self) -> None:
        self.turns: queue.SimpleQueue[_Turn] = queue.SimpleQueue()
        self.decided = threading.Lock()  # a turn is either taken by its caller or abandoned, never both
        threading.Thread(target=self._run, name="refiner-source writer lock", daemon=True).start()

    def turn(self, fd: int, timeout: float) -> int | None:
        """`fd` once it holds the lock, or None after `timeout` (then the thread releases it later).
        Raises StoreUnavailable if flock failed; interrupted (Ctrl-C), the turn is given up too."""
        turn = _Turn(fd)
        self.turns.put(turn)
        try:
            came = turn.granted.wait(timeout)
        except BaseException:
            if not self._give_up(turn) and turn.error is None:
                _let_go(fd)  # it came just as the caller was interrupted
            raise
        if not came and self._give_up(turn):
            return None
        if turn.error is not None:
            raise StoreUnavailable(f"cannot lock the database's writer lock file: {turn.error.strerror}") from turn.error
        return fd

    def _give_up(self, turn: _Turn) -> bool:
        """Abandon `turn`; False if it came meanwhile (then the caller holds the lock after all)."""
        with self.decided:
            if turn.granted.is_set():
                return False
            turn.abandoned = True
            return True

    def _run(self) -> None:
        while True:
            turn = self.turns.get()
            try:
                fcntl.flock(turn.fd, fcntl.LOCK_EX)  # sleeps in the kernel until the holder lets go
            except OSError as exc:
                turn.error = exc
            with self.decided:
                if not turn.abandoned:
                    turn.granted.set()
                    if turn.error is None:
                        continue
            _let_go(turn.fd)  # nobody waits for this turn any more, or it failed


def _let_go(fd: int) -> None:
    """Unlock and close (closing alone would not unlock if a forked child kept a copy of the file)."""
    for step in (lambda: fcntl.flock(fd, fcntl.LOCK_UN), lambda: os.close(fd)):
        try:
            step()
        except OSError:
            pass


def writer_lock(engine: Engine) -> SqliteWriterLock:
    """The writer lock of a SQLite engine's file: a file beside it."""
    return SqliteWriterLock(os.path.abspath(engine.url.database) + "-writer.lock")


class HeldWriter:
    """A write transaction on a connection kept between calls while they come often: for the group
    commit, so that each group under load skips the pool's checkout, its pre-ping and its reset on
    return (bench/README.md has what it saves)."""

    def __init__(self, writer: Engine, guard: Callable[[], Any], lock: AbstractContextManager) -> None:
        self.writer = writer  # the engine with its write option (BEGIN IMMEDIATE on SQLite)
        self.guard = guard  # driver errors to StoreUnavailable
        self.lock = lock
        self.connection: Connection | None = None
        self.pid = 0
        self.used_at = 0.0

    @contextmanager
    def __call__(self) -> Iterator[Connection]:
        with self.guard(), self.lock:
            if self.connection is not None and (self.pid != os.getpid() or time.monotonic() - self.used_at > HELD_IDLE_SECONDS):
                self.close()
            if self.connection is None:
                self.connection, self.pid = self.writer.connect(), os.getpid()
            conn = self.connection
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self.connection = None
                conn.close()  # SQLAlchemy has invalidated it if the error was a lost connection
                raise
            self.used_at = time.monotonic()

    def close(self) -> None:
        """Back to the pool; a forked child leaves its parent's connection alone."""
        if self.connection is not None and self.pid == os.getpid():
            self.connection.close()
        self.connection = None


Row = dict[str, Any]
Key = tuple[str, str]


@dataclass
class Waiting:
    """One caller's row in GroupCommit.commit: filled in by whichever thread commits its group."""

    row: Row
    done: bool = False
    result: bool = False
    error: BaseException | None = None


class GroupCommit:
    """Rows committed together with whatever other threads of this process commit meanwhile. The
    group is taken only once the write is open (the writer lock held), so that everything that
    arrived while the previous commit was syncing goes into this one."""

    def __init__(
        self,
        write: Callable[[], AbstractContextManager[Connection]],
        insert: Callable[[Connection, list[Row]], set[Key]],
        key: Callable[[Row], Key],
    ) -> None:
        self.write = write  # a write transaction (HeldWriter)
        self.insert = insert  # inserts the rows whose key is new; those keys
        self.key = key
        self._leader = threading.Lock()
        self._waiting_lock = threading.Lock()
        self.waiting: list[Waiting] = []

    def commit(self, row: Row) -> bool:
        """Whether `row` was new, once its group has committed; or the group's error."""
        waiting = Waiting(row)
        with self._waiting_lock:
            self.waiting.append(waiting)
        with self._leader:  # one leader per process at a time; the others queue here
            if not waiting.done:  # nobody has committed this row yet: lead the next group
                group: list[Waiting] = []
                try:
                    with self.write() as conn:
                        with self._waiting_lock:
                            group, self.waiting = self.waiting, []
                        # The same key twice in one group (a webhook resent at once): only the
                        # first one's row is written, and only it can be new.
                        first = first_of_each(group, lambda w: self.key(w.row))
                        new_keys = self.insert(conn, [w.row for w in first.values()])
                    for w in group:
                        w.result = w is first.get(self.key(w.row)) and self.key(w.row) in new_keys
                except BaseException as exc:
                    if not group:  # failed before taking the group: this row alone fails, and
                        with self._waiting_lock:  # must not be committed later by another leader
                            if waiting in self.waiting:
                                self.waiting.remove(waiting)
                        group = [waiting]
                    for w in group:
                        w.error = exc
                finally:
                    for w in group:
                        w.done = True
        if waiting.error is not None:
            raise waiting.error
        return waiting.result


def first_of_each(items: Sequence[Any], key) -> dict[Any, Any]:
    """key -> the first item with that key, in the order the keys first appear."""
    first: dict[Any, Any] = {}
    for item in items:
        first.setdefault(key(item), item)
    return first
