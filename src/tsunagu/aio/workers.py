"""Several server processes sharing listening ports (SO_REUSEPORT) under one supervisor.

Used by ``tsunagu stun-server --workers N`` and ``tsunagu turn-server --workers N``. The
parent (:class:`Supervisor`) forks ``N`` workers; each binds the same ports with
SO_REUSEPORT, so the kernel spreads clients over them and keeps each client's 5-tuple on
one worker. The supervisor waits for every worker's readiness line and announces the
first, restarts a worker that dies (at most five times a minute, with the same index),
forwards SIGTERM (and, if asked, SIGHUP) to them, and SIGKILLs whoever is still there
``stop_timeout`` seconds after SIGTERM.

Ephemeral ports (port 0) are chosen once by the caller, which binds them with
SO_REUSEPORT before :meth:`Supervisor.run` and hands the sockets over as ``held``: they
are kept until every worker listens on the same ports, then closed (in the workers right
after fork, since a copy left open there would take its share of traffic unread).

Mailboxes. Each worker gets a :class:`WorkerContext`: its index, the worker count, and a
Unix datagram mailbox it may read (:attr:`WorkerContext.inbox`). Anyone holding the
context can post to any worker's mailbox, file descriptors included (SCM_RIGHTS), and the
supervisor can :meth:`~Supervisor.query` every worker at once (the TURN server collects
its metrics that way, and hands an RFC 6062 data connection to the worker that owns its
CONNECTION-ID). A server that never reads its mailbox (the STUN server) simply ignores it;
messages to it are dropped once its buffer is full, never blocking the sender.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Mail", "Supervisor", "WorkerContext", "WorkerGroup", "WorkerTarget"]

logger = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
"""Seconds the supervisor waits for its workers to listen."""
RESTART_WINDOW = 60.0
MAX_RESTARTS = 5
"""Crash-loop guard: at most this many restarts within RESTART_WINDOW seconds."""
MAIL_SIZE = 1 << 17
"""Largest mailbox message (bytes); larger ones are refused by :meth:`WorkerContext.post`."""

_QUERY = b"Q"  # supervisor -> worker: b"Q" + 8-byte sequence + body; answered with _REPLY
_REPLY = b"R"  # worker -> supervisor: b"R" + 8-byte sequence + 2-byte index + body
_POST = b"P"  # worker -> worker: b"P" + body (+ file descriptors)
_MAX_FDS = 4


def _mailbox_pair() -> tuple[socket.socket, socket.socket]:
    """(reading end, sending end) of a non-blocking Unix datagram mailbox."""
    reader, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (reader, sender):
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with contextlib.suppress(OSError):
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return reader, sender


@dataclass(slots=True)
class Mail:
    """A message read from a worker's mailbox."""

    kind: str
    """"query" (from the supervisor: answer with :meth:`reply`) or "post" (a worker's)."""
    body: bytes
    fds: list[int] = field(default_factory=list)
    """File descriptors that came with a post; the reader owns (and must close) them."""
    _context: WorkerContext | None = None
    _sequence: bytes = b""

    def reply(self, body: bytes) -> bool:
        """Answer a query; False if the supervisor's mailbox is full or gone."""
        context = self._context
        if context is None or context._supervisor is None or self.kind != "query":
            return False
        head = _REPLY + self._sequence + context.index.to_bytes(2, "big")
        return _send(context._supervisor, head + body)


def _send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> bool:
    if len(data) > MAIL_SIZE:
        return False
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    except OSError:  # EAGAIN: the mailbox is full; ECONNREFUSED & co: it is gone
        return False
    return True


@dataclass(slots=True)
class WorkerContext:
    """What a worker knows of its siblings: see the module docstring."""

    index: int
    count: int
    inbox: socket.socket
    """This worker's mailbox (non-blocking): register it with the event loop and call
    :meth:`receive` when it is readable."""
    _outboxes: tuple[socket.socket, ...] = ()
    _supervisor: socket.socket | None = None

    def post(self, worker: int, body: bytes, fds: Sequence[int] = ()) -> bool:
        """Send ``body`` (and duplicates of ``fds``) to worker ``worker``'s mailbox; False
        if it is full, gone, or the message is too large. Never blocks."""
        if not 0 <= worker < len(self._outboxes):
            return False
        return _send(self._outboxes[worker], _POST + body, fds)

    def receive(self, limit: int = 64) -> list[Mail]:
        """Up to ``limit`` messages waiting in :attr:`inbox` (never blocks)."""
        mails: list[Mail] = []
        for _ in range(limit):
            try:
                data, fds, _, _ = socket.recv_fds(self.inbox, MAIL_SIZE + 64, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            kind = data[:1]
            if kind == _QUERY and len(data) >= 9:
                mails.append(Mail("query", data[9:], fds, self, data[1:9]))
            elif kind == _POST:
                mails.append(Mail("post", data[1:], fds))
            else:
                for fd in fds:
                    os.close(fd)
        return mails


class WorkerGroup:
    """The mailboxes of ``count`` workers and of their supervisor. The supervisor makes
    one before forking; tests can run several servers in one process with one."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("need at least one worker")
        self.count = count
        self._inboxes = [_mailbox_pair() for _ in range(count)]
        self._mailbox = _mailbox_pair()
        self._lock = threading.Lock()
        self._sequence = itertools.count(1)

    def context(self, index: int) -> WorkerContext:
        return WorkerContext(
            index,
            self.count,
            self._inboxes[index][0],
            tuple(sender for _, sender in self._inboxes),
            self._mailbox[1],
        )

    def keep_only(self, index: int) -> None:
        """In worker ``index`` after fork: close the mailboxes it must not read."""
        self._mailbox[0].close()
        for other, (reader, _) in enumerate(self._inboxes):
            if other != index:
                reader.close()

    def query(self, body: bytes, timeout: float) -> list[tuple[int, bytes]]:
        """Ask every worker (its server answers with ``Mail.reply``); returns (index,
        answer) for those that answered within ``timeout`` seconds, by index. Blocking
        and thread-safe: meant for a metrics thread."""
        reader = self._mailbox[0]
        with self._lock:
            while True:  # forget answers to earlier queries that timed out
                try:
                    reader.recv(MAIL_SIZE + 64)
                except OSError:
                    break
            sequence = next(self._sequence).to_bytes(8, "big")
            asked = {
                index
                for index, (_, sender) in enumerate(self._inboxes)
                if _send(sender, _QUERY + sequence + body)
            }
            answers: dict[int, bytes] = {}
            deadline = time.monotonic() + timeout
            while len(answers) < len(asked):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([reader], [], [], remaining)
                if not ready:
                    break
                try:
                    data = reader.recv(MAIL_SIZE + 64)
                except OSError:
                    continue
                if data[:1] == _REPLY and data[1:9] == sequence and len(data) >= 11:
                    index = int.from_bytes(data[9:11], "big")
                    if index in asked:
                        answers[index] = data[11:]
            return sorted(answers.items())

    def close(self) -> None:
        for pair in (*self._inboxes, self._mailbox):
            for sock in pair:
                sock.close()


WorkerTarget = Callable[[WorkerContext, Callable[[str], None]], int]
"""A worker's body: serve with the context until told to stop, calling ``ready(line)``
once listening; returns the exit status."""


class Supervisor:
    """The parent of ``workers`` forked server processes (POSIX only). See the module
    docstring; :meth:`run` blocks until SIGTERM/SIGINT and returns the exit status."""

    def __init__(
        self,
        workers: int,
        target: WorkerTarget,
        announce: Callable[[str], None],
        *,
        held: Sequence[socket.socket] = (),
        stop_timeout: float = 10.0,
        forward: Sequence[signal.Signals] = (),
        on_stopping: Callable[[], None] | None = None,
    ) -> None:
        """``held``: sockets keeping ephemeral ports until the workers bind them.
        ``forward``: further signals relayed to every worker (e.g. SIGHUP).
        ``on_stopping``: called once SIGTERM/SIGINT arrived, before the workers are told."""
        if workers < 1:
            raise ValueError("need at least one worker")
        self.workers = workers
        self.target = target
        self.announce = announce
        self.stop_timeout = stop_timeout
        self.forward = tuple(forward)
        self.on_stopping = on_stopping
        self.children: dict[int, int] = {}
        """pid -> worker index."""
        self.restarts: list[float] = []
        self.stopping = False
        self.held: list[socket.socket] = list(held)
        self._forwarded: list[signal.Signals] = []
        self.ready_r = self.ready_w = self.wake_r = self.wake_w = -1
        self.group: WorkerGroup | None = None

    # -- the supervisor's side ------------------------------------------------------------

    def run(self) -> int:
        self.group = WorkerGroup(self.workers)
        self.ready_r, self.ready_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # Signals wake select() through this pipe (PEP 475 would otherwise resume it).
        previous_wakeup = signal.set_wakeup_fd(self.wake_w)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, *self.forward)
        handlers = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        try:
            for index in range(self.workers):
                self._spawn(index)
            status = self._await_ready()
            self._release_held()
            if status == 0:
                status = self._supervise()
        finally:
            self._release_held()
            self.stopping = True
            self._stop_children()
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for fd in (self.ready_r, self.ready_w, self.wake_r, self.wake_w):
                os.close(fd)
            group, self.group = self.group, None
            group.close()
        return status

    def query(self, body: bytes, timeout: float) -> list[tuple[int, bytes]]:
        """:meth:`WorkerGroup.query` while running, else nothing. Thread-safe."""
        group = self.group
        return [] if group is None else group.query(body, timeout)

    def _release_held(self) -> None:
        for sock in self.held:
            sock.close()
        self.held = []

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum != signal.SIGCHLD:
            self._forwarded.append(signal.Signals(signum))

    def _spawn(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker; it must never return into the supervisor's code
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, *self.forward):
                    signal.signal(signum, signal.SIG_DFL)
                for fd in (self.ready_r, self.wake_r, self.wake_w):
                    os.close(fd)
                self._release_held()
                group = self.group
                assert group is not None
                group.keep_only(index)
                ready_w = self.ready_w

                def ready(line: str) -> None:
                    os.write(ready_w, (line + "\n").encode())

                status = self.target(group.context(index), ready)
            except BaseException as exc:
                logger.error("worker %d: %s", os.getpid(), exc)
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        self.children[pid] = index
        logger.debug("worker %d started", pid)

    def _wait(self, timeout: float) -> bytes:
        """Sleep until a signal, readiness output of a worker or ``timeout``; returns what
        the workers wrote (b"" if nothing)."""
        readable, _, _ = select.select([self.ready_r, self.wake_r], [], [], max(0.0, timeout))
        if self.wake_r in readable:
            _drain(self.wake_r)
        return os.read(self.ready_r, 65536) if self.ready_r in readable else b""

    def _await_ready(self) -> int:
        """Read one readiness line per worker and announce the first; 1 if a worker fails
        or the workers are not listening within READY_TIMEOUT."""
        lines: list[bytes] = []
        buffer = b""
        deadline = time.monotonic() + READY_TIMEOUT
        while len(lines) < self.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping:
                logger.error("workers did not start listening")
                return 1
            buffer += self._wait(remaining)
            *complete, buffer = buffer.split(b"\n")
            lines += complete
            if self._reap():
                logger.error("a worker exited before listening")
                return 1
        self.announce(lines[0].decode())
        return 0

    def _supervise(self) -> int:
        while not self.stopping:
            self._wait(1.0)  # wakes on signals; discards readiness of restarted workers
            while self._forwarded:
                signum = self._forwarded.pop(0)
                for pid in self.children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
            for pid, index in self._reap().items():
                if self.stopping:
                    break
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
                if len(self.restarts) >= MAX_RESTARTS:
                    logger.error("workers keep dying; giving up")
                    return 1
                self.restarts.append(now)
                logger.warning("worker %d exited; starting another", pid)
                self._spawn(index)
        logger.info("stopping %d workers", len(self.children))
        return 0

    def _reap(self) -> dict[int, int]:
        """Collect exited workers without blocking: pid -> index."""
        exited: dict[int, int] = {}
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            index = self.children.pop(pid, None)
            if index is not None:
                exited[pid] = index
        return exited

    def _stop_children(self) -> None:
        """Forward SIGTERM; SIGKILL whoever is still there after ``stop_timeout``."""
        if self.on_stopping is not None and self.children:
            self.on_stopping()
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                self._wait(min(0.1, deadline - time.monotonic()))
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
