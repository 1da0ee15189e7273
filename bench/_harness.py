"""Shared plumbing for the network benchmarks in ``bench/``.

What lives here, and why it is shared:

* :func:`build_stunload` and :func:`build_turngen` compile ``bench/stunload.c`` and
  ``bench/turngen.c`` into ``bench/build/`` on demand, so a benchmark never runs a stale
  generator;
* :func:`run_stunload` runs it (optionally pinned with ``taskset -c CORE``) and parses its
  ``--json`` line into a :class:`LoadResult`;
* :class:`ServerProcess` / :func:`running_server` start a server in its own process group,
  optionally pinned, and always kill the whole group on the way out (a ``--workers`` server
  has children), also on Ctrl-C, SIGTERM and at interpreter exit;
* :func:`wait_for_stun` sends real STUN Binding requests from Python until one is answered,
  so a run never starts against a server that is still booting;
* :func:`free_port` picks loopback ports; :func:`print_table` and :func:`ratio` print.

Only loopback is ever a target here: the generator refuses anything else by default.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / "build"
STUNLOAD_SRC = BENCH_DIR / "stunload.c"
WIRE_H = BENCH_DIR / "wire.h"  # included by both generators
STUNLOAD_BIN = BUILD_DIR / "stunload"
TURNGEN_SRC = BENCH_DIR / "turngen.c"
TURNGEN_BIN = BUILD_DIR / "turngen"
CFLAGS = ("-O2", "-Wall", "-Wextra")

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

# Clock ticks per second, for the utime/stime fields of /proc/PID/stat.
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """A benchmark could not be set up (build failed, server did not come up...)."""


# --- stunload --------------------------------------------------------------------------------


def build_c(source: Path, binary: Path, *, force: bool = False) -> Path:
    """Compile a one-file C tool if the binary is missing or older than its source (or
    than ``wire.h``, which the generators include).

    The compiler writes to a private temporary name that is then renamed into place, so two
    benchmarks building at once never run a half-written binary.
    """
    changed = max(source.stat().st_mtime, WIRE_H.stat().st_mtime)  # what it includes too
    up_to_date = binary.exists() and binary.stat().st_mtime >= changed
    if up_to_date and not force:
        return binary
    name = binary.name
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise HarnessError(f"no C compiler (gcc or cc) on PATH; {name} cannot be built")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f".{name}.{os.getpid()}.tmp"
    cmd = [compiler, *CFLAGS, "-o", str(tmp), str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise HarnessError(f"building {name} failed:\n{proc.stderr}")
        if proc.stderr.strip():
            # The source is meant to build warning-free; say so loudly rather than hide it.
            print(f"warning: {name} built with diagnostics:\n{proc.stderr}", file=sys.stderr)
        tmp.replace(binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary


def build_stunload(*, force: bool = False) -> Path:
    """Compile ``bench/stunload.c`` (the STUN Binding generator) when it changed."""
    return build_c(STUNLOAD_SRC, STUNLOAD_BIN, force=force)


def build_turngen(*, force: bool = False) -> Path:
    """Compile ``bench/turngen.c`` (the TURN generator, sink and blaster) when it changed."""
    return build_c(TURNGEN_SRC, TURNGEN_BIN, force=force)


@dataclass(frozen=True)
class LoadResult:
    """One stunload run, as reported by its ``--json`` line."""

    requests_sent: int
    responses: int
    responses_per_s: float
    timeouts: int
    late: int
    invalid: int
    errors: int
    p50_us: float
    p99_us: float
    elapsed_s: float
    cpu_pct: float  # the generator's own CPU (user + sys) over the measured interval
    raw: dict[str, object]

    @classmethod
    def from_json(cls, line: str) -> LoadResult:
        """Parse stunload's JSON object; missing or mistyped fields are a harness error."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise HarnessError(f"stunload printed something that is not an object: {line!r}")

        def num(key: str) -> float:
            value = data.get(key)
            if not isinstance(value, int | float):
                raise HarnessError(f"stunload JSON lacks a numeric {key!r}: {line!r}")
            return float(value)

        return cls(
            requests_sent=int(num("requests_sent")),
            responses=int(num("responses")),
            responses_per_s=num("responses_per_s"),
            timeouts=int(num("timeouts")),
            late=int(num("late")),
            invalid=int(num("invalid")),
            errors=int(num("errors")),
            p50_us=num("p50_us"),
            p99_us=num("p99_us"),
            elapsed_s=num("elapsed_s"),
            cpu_pct=num("cpu_pct"),
            raw=data,
        )


def taskset_prefix(core: int | None) -> list[str]:
    """``taskset -c CORE`` when pinning is asked for, nothing otherwise."""
    if core is None:
        return []
    if shutil.which("taskset") is None:
        raise HarnessError("taskset (util-linux) is needed to pin processes to a core")
    return ["taskset", "-c", str(core)]


def run_stunload(
    host: str,
    port: int,
    *,
    duration: float,
    window: int,
    batch: int = 32,
    sockets: int = 1,
    warmup: float = 0.0,
    timeout_ms: int = 200,
    core: int | None = None,
    software: str | None = None,
) -> LoadResult:
    """Run the generator once against ``host:port`` and return what it measured.

    The subprocess gets a wall-clock bound of the run length plus a margin: stunload bounds
    itself, this is the belt to its braces.  Exit status 3 (nothing answered) still yields a
    result with zero responses, so the caller decides what an unanswered run means.
    """
    binary = build_stunload()
    cmd = [
        *taskset_prefix(core),
        str(binary),
        host,
        str(port),
        "--duration",
        f"{duration:g}",
        "--warmup",
        f"{warmup:g}",
        "--window",
        str(window),
        "--batch",
        str(batch),
        "--sockets",
        str(sockets),
        "--timeout-ms",
        str(timeout_ms),
        "--json",
    ]
    if software is not None:
        cmd += ["--software", software]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + warmup + 15.0, check=False
    )
    if proc.returncode not in (0, 3):
        raise HarnessError(f"stunload exited {proc.returncode}: {proc.stderr.strip()}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise HarnessError(f"stunload printed no JSON: {proc.stdout!r} {proc.stderr!r}")
    return LoadResult.from_json(lines[-1])


# --- processes -------------------------------------------------------------------------------

# Every server this interpreter started and has not yet reaped, for the atexit safety net.
_LIVE: dict[int, ServerProcess] = {}


class ServerProcess:
    """A server started in a new session (process group), optionally pinned to one core.

    Its output goes to a log file in a private temporary directory, so a failure can be
    explained (:meth:`log_tail`) without the server's chatter interleaving with ours.
    """

    def __init__(self, name: str, argv: Sequence[str], *, core: int | None = None) -> None:
        self.name = name
        self.argv = [*taskset_prefix(core), *argv]
        self.core = core
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "server"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-server-{slug}-"))
        self.log_path = self.workdir / "server.log"
        self._log = self.log_path.open("wb")
        # A session of its own: stop() can then signal the whole group, children included,
        # and Ctrl-C in our terminal does not reach it before our cleanup does.
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        _LIVE[self.proc.pid] = self

    @property
    def pid(self) -> int:
        """The server's process id (also its process-group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the main server process is still running."""
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """The server's pid and those of all its descendants (workers, helpers)."""
        return _descendants(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server and all its descendants."""
        return sum(_proc_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        """Resident memory (VmRSS) of the server and its descendants, summed: a worker
        server's supervisor and workers each count (shared pages in each)."""
        return sum(proc_rss_bytes(pid) for pid in self.pids())

    def open_files(self) -> int:
        """File descriptors open in the server and its descendants (sockets included)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the server printed, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers; idempotent."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        # Workers may outlive a parent that exited on its own; the group id still names them.
        _signal_group(pgid, signal.SIGKILL)
        _LIVE.pop(pgid, None)
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group we created; a group that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc/PID/task/TID/children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        task_dir = Path(f"/proc/{current}/task")
        with contextlib.suppress(OSError):
            for task in task_dir.iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; fields are counted after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of one process from /proc/PID/status in bytes, 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0


def _cleanup_all() -> None:
    """atexit safety net: no server outlives the benchmark, whatever path we exit by."""
    for server in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


atexit.register(_cleanup_all)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks (and atexit) stop our servers."""

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def running_server(
    name: str,
    argv: Sequence[str],
    *,
    core: int | None = None,
    host: str = "127.0.0.1",
    port: int,
    ready_timeout: float = 10.0,
) -> Iterator[ServerProcess]:
    """Start a server, wait until it answers a STUN Binding, and always stop it afterwards."""
    server = ServerProcess(name, argv, core=core)
    try:
        if not wait_for_stun(host, port, timeout=ready_timeout, server=server):
            state = "exited" if not server.alive() else "still running"
            raise HarnessError(
                f"{name} did not answer a STUN Binding on {host}:{port} within "
                f"{ready_timeout:g} s ({state}); its output ends with:\n{server.log_tail()}"
            )
        yield server
    finally:
        server.stop()


def command_works(argv: Sequence[str], timeout: float = 15.0) -> tuple[bool, str]:
    """Run a short command (e.g. ``--help``); report success and its combined output."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, proc.stdout + proc.stderr


# --- STUN from Python ------------------------------------------------------------------------


def binding_request() -> tuple[bytes, bytes]:
    """A bare RFC 8489 Binding request and its transaction ID (no attributes needed here)."""
    transaction_id = secrets.token_bytes(12)
    header = struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE)
    return header + transaction_id, transaction_id


def is_binding_success(data: bytes, transaction_id: bytes) -> bool:
    """Whether ``data`` is a Binding success response to ``transaction_id``."""
    if len(data) < 20:
        return False
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    return (
        msg_type == BINDING_SUCCESS
        and cookie == MAGIC_COOKIE
        and length + 20 == len(data)
        and data[8:20] == transaction_id
    )


def wait_for_stun(
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
    interval: float = 0.1,
    server: ServerProcess | None = None,
) -> bool:
    """Send Binding requests every ``interval`` s until one is answered or ``timeout`` passes.

    Gives up early if ``server`` has exited: waiting out the timeout would only delay the
    error message.  At most ``timeout / interval`` requests are sent.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while time.monotonic() < deadline:
            if server is not None and not server.alive():
                return False
            request, transaction_id = binding_request()
            # Refused (nothing bound yet) surfaces as ECONNREFUSED on some calls; it only
            # means "not yet", so it is swallowed like a lost datagram.
            with contextlib.suppress(OSError):
                sock.sendto(request, (host, port))
            until = min(deadline, time.monotonic() + interval)
            while (left := until - time.monotonic()) > 0:
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    break
                try:
                    data = sock.recv(2048)
                except OSError:
                    continue
                if is_binding_success(data, transaction_id):
                    return True
    return False


def free_port(host: str = "127.0.0.1", span: int = 2, attempts: int = 50) -> int:
    """A port P such that P .. P+span-1 are all free for both UDP and TCP on ``host``.

    TCP too because a STUN server (tsunagu's does) also listens on TCP at the same port;
    the span because coturn may bind the next port (RFC 5780's alternate port).  There is
    a window between this check and the server binding; the readiness probe plus the
    server's own bind error cover the rare race.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base + span - 1 > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(span):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        sock = stack.enter_context(socket.socket(family, kind))
                        sock.bind((host, base + offset))
        except OSError:
            continue
        return base
    raise HarnessError(f"no run of {span} ports free for UDP and TCP found on {host}")


def free_udp_port(host: str = "127.0.0.1", span: int = 2, attempts: int = 50) -> int:
    """The original name of :func:`free_port`, which other benchmarks import; same checks."""
    return free_port(host, span, attempts)


# --- output ----------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain-text table: first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def ratio(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` as ``0.42x``, or ``n/a`` when either side is missing."""
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


@dataclass(frozen=True)
class ProcCpu:
    """One process in a :func:`cpu_census`: its name and CPU seconds used so far."""

    name: str
    cpu_s: float


def cpu_census() -> dict[tuple[int, int], ProcCpu]:
    """Every process on the machine, keyed by (pid, start time) so a reused pid is new.

    Two censuses around a run give the CPU used meanwhile by *other* processes: on a
    2-core box one busy neighbour halves a result, and saying so beats a silent bad figure.
    (Machine-wide /proc/stat busy time was tried first: it books some softirq work to no
    process, which reads as a phantom neighbour of 20-30 % in unpinned runs.)
    """
    census: dict[tuple[int, int], ProcCpu] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        census[(int(entry.name), int(fields[19]))] = ProcCpu(name, cpu)
    return census


def neighbour_cpu_seconds(
    before: dict[tuple[int, int], ProcCpu],
    after: dict[tuple[int, int], ProcCpu],
    ours: Collection[int],
) -> float:
    """CPU used between two censuses by processes that are neither ours nor our traffic's.

    Excluded: the pids in ``ours`` (the server tree), this interpreter, and ksoftirqd
    (network receive work that our own packets create).  A process that started and
    exited entirely between the censuses is missed; short-lived noise is rarely the
    problem, long-running neighbours are.
    """
    total = 0.0
    for key, proc in after.items():
        pid = key[0]
        if pid in ours or pid == os.getpid() or proc.name.startswith("ksoftirqd"):
            continue
        earlier = before.get(key)
        total += proc.cpu_s - (earlier.cpu_s if earlier is not None else 0.0)
    return total


def load_average() -> float:
    """The 1-minute load average: other work on this small machine skews every figure."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
