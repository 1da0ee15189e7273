"""Network namespace labs for the tests under tests/nat: namespaces, veth pairs, addresses,
routes, nftables rulesets and the processes run inside them, all removed in ``finally``
even when a test fails.

    with netns.lab("knat") as lab:
        inet, lan = lab.namespace("inet"), lab.namespace("lan")
        lab.link(inet, "eth0", "192.0.2.1/24", lan, "eth0", "192.0.2.2/24")
        server = inet.start("tsunagu", "stun-server", "--listen", "192.0.2.1:3478")
        server.wait_for_line("listening ")
        print(lan.run("tsunagu", "stun", "stun:192.0.2.1").stdout)

Rules it keeps, so tests can run on a developer's machine and in CI alike:

- Nothing is created in the host namespace: a veth pair is created inside one lab
  namespace with its peer end placed straight into the other, addresses, routes, sysctls and
  rulesets are set with ``ip -n``/``ip netns exec`` inside lab namespaces only.
- Names carry the process id and a random token, so concurrent test runs do not collide.
- Teardown stops the processes the lab started (by their pid), then any process still
  inside a lab namespace (which only the lab could have put there), then deletes the
  namespaces, which deletes their interfaces, routes and rulesets with them.
- Every wait is bounded in time; nothing sleeps in place of an event.
- A missing tool or missing privileges raise :class:`NetnsError`: the tests fail, they do
  not skip.

Programs named by a bare name that exists in this interpreter's ``bin`` directory (the
project's venv: ``tsunagu``, ``python``) run from there; other names go through ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

__all__ = ["Lab", "Namespace", "NetnsError", "Process", "lab", "require_tools", "two_hosts"]

COMMAND_TIMEOUT = 10.0  # seconds one `ip`/`nft`/helper command may take
STOP_TIMEOUT = 5.0  # seconds a process gets to exit after SIGTERM before SIGKILL
_MAX_OUTPUT = 1 << 20  # bytes of a started process's stdout kept while waiting for a line

_VENV_BIN = Path(sys.executable).parent


class NetnsError(RuntimeError):
    """A namespace, link, address, route or rule could not be set up."""


def require_tools(*tools: str) -> None:
    """Raise :class:`NetnsError` unless we are root and every tool is on PATH."""
    if os.geteuid() != 0:
        raise NetnsError("network namespace tests need root (CI runs them as root)")
    missing = [tool for tool in ("ip", *tools) if shutil.which(tool) is None]
    if missing:
        raise NetnsError(
            f"missing {', '.join(missing)}: scripts/test.sh installs iproute2, nftables "
            "and iptables"
        )


def _program(argv: Sequence[str]) -> list[str]:
    first = argv[0]
    if "/" not in first and (_VENV_BIN / first).exists():
        first = str(_VENV_BIN / first)
    return [first, *argv[1:]]


def _run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no exit within {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
    return done


class Process:
    """A process started inside a namespace. Its stdout is a pipe, read by
    :meth:`wait_for_line` (a process that goes on printing a lot must be read by the
    caller, or it blocks once the pipe is full); its stderr goes to a temporary file, so
    logging never blocks it."""

    def __init__(
        self, argv: Sequence[str], popen: subprocess.Popen[bytes], stderr: IO[bytes]
    ) -> None:
        self.argv = list(argv)
        self.popen = popen
        self._stderr = stderr
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, prefix: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """The first stdout line starting with ``prefix``; NetnsError (with the process's
        stderr) if it exits or ``timeout`` seconds pass first."""
        stdout = self.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while len(self._buffer) < _MAX_OUTPUT:
                while b"\n" in self._buffer:
                    raw, _, self._buffer = self._buffer.partition(b"\n")
                    line = raw.decode(errors="replace")
                    if line.startswith(prefix):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self.popen.wait(timeout=STOP_TIMEOUT)
                    raise NetnsError(
                        f"{' '.join(self.argv)} exited {self.popen.returncode} before "
                        f"printing {prefix!r}: {self.stderr_text()}"
                    )
                self._buffer += chunk
        raise NetnsError(
            f"{' '.join(self.argv)}: no {prefix!r} line within {timeout:g} s: {self.stderr_text()}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within STOP_TIMEOUT. Idempotent."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()

    def stderr_text(self) -> str:
        """What the process has written on stderr so far (the last 4 KiB)."""
        if self._stderr.closed:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 4096))
        return self._stderr.read().decode(errors="replace").strip()


class Namespace:
    """One network namespace of a :class:`Lab`."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def run(
        self,
        *argv: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (bounded by ``timeout``)."""
        return _run(
            ["ip", "netns", "exec", self.name, *_program(argv)],
            stdin=stdin,
            check=check,
            timeout=timeout,
        )

    def ip(self, *args: str) -> None:
        """``ip -n NAME ARGS``."""
        _run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (e.g. ``net.ipv4.ip_forward``)."""
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into this namespace only."""
        self.run("nft", "-f", "-", stdin=ruleset)

    def start(self, *argv: str, stdin: bool = False) -> Process:
        """Start a long-running process inside the namespace; the lab stops it. With
        ``stdin`` its standard input is a pipe (``process.popen.stdin``)."""
        command = ["ip", "netns", "exec", self.name, *_program(argv)]
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the Process closes it
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if stdin else None,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except OSError:
            stderr.close()
            raise
        process = Process(command, popen, stderr)
        self.lab.processes.append(process)
        return process


class Lab:
    """Namespaces and links, torn down by :func:`lab`."""

    def __init__(self, prefix: str) -> None:
        # `ip netns` names are file names; keep them short and unique per run.
        self.prefix = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.namespaces: list[Namespace] = []
        self.processes: list[Process] = []

    def namespace(self, role: str) -> Namespace:
        """A new namespace with its loopback up."""
        ns = Namespace(self, f"{self.prefix}-{role}")
        self.namespaces.append(ns)  # before creating: teardown tolerates a failed add
        _run(["ip", "netns", "add", ns.name])
        ns.ip("link", "set", "lo", "up")
        return ns

    def link(
        self,
        a: Namespace,
        a_ifname: str,
        a_address: str | None,
        b: Namespace,
        b_ifname: str,
        b_address: str | None,
    ) -> None:
        """A veth pair between two lab namespaces, created inside ``a`` with its peer put
        straight into ``b`` (never in the host namespace); addresses in CIDR form."""
        a.ip("link", "add", a_ifname, "type", "veth", "peer", "name", b_ifname, "netns", b.name)
        for ns, ifname, address in ((a, a_ifname, a_address), (b, b_ifname, b_address)):
            if address is not None:
                ns.ip("address", "add", address, "dev", ifname)
            ns.ip("link", "set", ifname, "up")

    def close(self) -> None:
        """Stop every process and delete every namespace; collects errors, raises the
        first one only after trying everything."""
        errors: list[BaseException] = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(exc)
        for ns in reversed(self.namespaces):
            try:
                self._empty(ns)
                _run(["ip", "netns", "delete", ns.name], check=False)
            except (OSError, NetnsError, subprocess.SubprocessError) as exc:
                errors.append(exc)
        listed = _run(["ip", "netns", "list"], check=False).stdout.splitlines()
        existing = {line.split()[0] for line in listed if line.strip()}
        left = [ns.name for ns in self.namespaces if ns.name in existing]
        if left:
            errors.append(NetnsError(f"namespaces left behind: {left}"))
        if errors:
            raise errors[0]

    @staticmethod
    def _empty(ns: Namespace) -> None:
        """Kill what still runs inside ``ns`` (a child of a process we started): a deleted
        namespace lives on, with its interfaces, while a process is inside it."""
        listed = _run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
        for pid in (int(text) for text in listed if text.isdigit()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def two_hosts(
    lab: Lab, roles: tuple[str, str], ips: tuple[str, str]
) -> tuple[Namespace, Namespace]:
    """Two hosts on one link: namespaces ``roles`` joined by ``veth0`` with ``ips`` (/24),
    each routing multicast (224.0.0.0/4, for mDNS) onto the link and its default route via
    the other -- browsers gather host candidates only on an interface with a default
    route."""
    a, b = lab.namespace(roles[0]), lab.namespace(roles[1])
    lab.link(a, "veth0", f"{ips[0]}/24", b, "veth0", f"{ips[1]}/24")
    for ns, other in ((a, ips[1]), (b, ips[0])):
        ns.ip("route", "add", "224.0.0.0/4", "dev", "veth0")
        ns.ip("route", "add", "default", "via", other)
    return a, b


@contextlib.contextmanager
def lab(prefix: str, *tools: str) -> Iterator[Lab]:
    """A :class:`Lab` whose namespaces and processes are removed on exit, whatever happens.

    ``tools`` are commands the test needs besides ``ip`` (e.g. ``"nft"``); a missing one or
    missing root raise :class:`NetnsError` before anything is created.
    """
    require_tools(*tools)
    built = Lab(prefix)
    try:
        yield built
    finally:
        built.close()
