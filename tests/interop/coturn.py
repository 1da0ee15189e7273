"""coturn's ``turnserver`` started by the interop tests on loopback ports chosen free, with
a self-signed certificate made here. It must be installed (scripts/test.sh installs it): a
missing coturn FAILS the tests, it never skips them.

    server = Coturn(tmp_path)            # --allow-loopback-peers; Coturn(..., permissive=False)
    server.uri("udp")                    # "turn:127.0.0.1:PORT?transport=udp"
    server.stop()

    coturn = coturn_fixture("coturn")    # in a test module: its tests share one server
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.turn_client import TurnTarget
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.message import Message

__all__ = [
    "PASSWORD",
    "REALM",
    "USER",
    "Coturn",
    "PortTakenError",
    "TurnserverProcess",
    "coturn_fixture",
    "free_port",
    "make_certificate",
    "turnserver_binary",
]

USER, PASSWORD, REALM = "tsunagu", "s3cret", "tsunagu.test"
WAIT = 10.0  # seconds coturn may take to answer its first Binding


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 and ::1 (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
                with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp6:
                    udp6.bind(("::1", port))
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as tcp6:
                    tcp6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1: made with the
    ``cryptography`` package when it is installed, else with ``openssl req``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        x509: Any = importlib.import_module("cryptography.x509")
        hashes: Any = importlib.import_module("cryptography.hazmat.primitives.hashes")
        serialization: Any = importlib.import_module("cryptography.hazmat.primitives.serialization")
        ec: Any = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ec")
    except ImportError:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost")] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(private, hashes.SHA256())
    )
    encoding = serialization.Encoding.PEM
    key.write_bytes(
        private.private_bytes(
            encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert.write_bytes(certificate.public_bytes(encoding))
    return cert, key


def turnserver_binary() -> str:
    """Where coturn's ``turnserver`` is; a missing one fails the test."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.fail("coturn's turnserver is not installed (scripts/test.sh installs it)")
    return binary


class PortTakenError(Exception):
    """turnserver could not bind a port that :func:`free_port` had found free: another
    process took it in between (the OS hands out the same ephemeral ports)."""


class TurnserverProcess:
    """A ``turnserver`` run with the arguments ``make_args()`` returns, its output in
    ``directory/turnserver.log``; stopped again at once if it does not get ready
    (:meth:`_wait_ready`, which each kind of server defines). When one of its ports was
    taken between choosing it and binding it, ``make_args()`` is asked again (it picks new
    ports) and the server restarted, up to ``ATTEMPTS`` times."""

    ATTEMPTS = 3

    def __init__(self, directory: Path, make_args: Callable[[], list[str]]) -> None:
        self.log = directory / "turnserver.log"
        for _ in range(self.ATTEMPTS):
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(make_args(), stdout=log, stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
                return
            except PortTakenError:
                self.stop()
            except BaseException:
                self.stop()
                raise
        pytest.fail(f"turnserver found a port taken {self.ATTEMPTS} times: {self._log_text()}")

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _check_started(self) -> None:
        """Fail at once if turnserver exited; raise PortTakenError if it cannot bind."""
        if self.process.poll() is not None:
            pytest.fail(f"turnserver exited: {self._log_text()}")
        if "Address already in use" in self._log_text():
            raise PortTakenError(self._log_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Coturn(TurnserverProcess):
    """One turnserver process on loopback."""

    def __init__(self, directory: Path, *, permissive: bool = True, quota: int | None = None):
        binary = turnserver_binary()
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, key = make_certificate(directory)
        super().__init__(directory, lambda: self._args(binary, directory, key, permissive, quota))

    def _args(
        self, binary: str, directory: Path, key: Path, permissive: bool, quota: int | None
    ) -> list[str]:
        self.port = free_port()
        self.tls_port = free_port()
        args = [
            binary, "-n", "--no-cli", "--no-dtls", "--simple-log",
            "--log-file", "stdout",
            "--pidfile", str(directory / "turnserver.pid"),
            "--listening-ip", "127.0.0.1", "--listening-ip", "::1",
            "--relay-ip", "127.0.0.1", "--relay-ip", "::1",
            "--listening-port", str(self.port), "--tls-listening-port", str(self.tls_port),
            "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
            "--cert", str(self.cert), "--pkey", str(key),
            # Nonces go stale after 3 s, so longer tests see 438 and the client's retry.
            "--stale-nonce=3",  # an optional argument: only this spelling sets it
        ]  # fmt: skip
        if permissive:
            args.append("--allow-loopback-peers")
        if quota is not None:
            args += ["--user-quota", str(quota)]
        return args

    def _wait_ready(self) -> None:
        """Ready when a STUN Binding over UDP is answered and the TLS port accepts."""
        request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)).encode()
        deadline = time.monotonic() + WAIT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.05)
            for _ in range(400):
                self._check_started()
                if time.monotonic() > deadline:
                    break
                probe.sendto(request, ("127.0.0.1", self.port))
                try:
                    probe.recv(2048)
                except TimeoutError:
                    continue
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                    return
        pytest.fail(f"turnserver did not become ready: {self._log_text()}")

    def uri(self, transport: str, host: str = "127.0.0.1") -> str:
        literal = f"[{host}]" if ":" in host else host
        if transport == "tls":
            return f"turns:{literal}:{self.tls_port}?transport=tcp"
        return f"turn:{literal}:{self.port}?transport={transport}"

    def target(self, transport: str, host: str = "127.0.0.1") -> TurnTarget:
        port = self.tls_port if transport == "tls" else self.port
        return TurnTarget(host, port, transport)  # type: ignore[arg-type]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def coturn_fixture(name: str, **options: Any) -> object:
    """A module-scoped pytest fixture called ``name``: one :class:`Coturn` (made with
    ``options``) for the tests of the module that ask for it, stopped after them. Bind it
    at the module's top level, where pytest looks for fixtures:
    ``strict_coturn = coturn_fixture("strict_coturn", permissive=False)``."""

    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
        server = Coturn(tmp_path_factory.mktemp(name), **options)
        yield server
        server.stop()

    return fixture
