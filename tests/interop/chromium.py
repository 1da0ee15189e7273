"""Headless Chromium inside a network namespace, for the interop tests that need a real
browser: the page is served by an HTTP server in the test process whose listening socket
was created inside the namespace, and the page talks back to the test by ``fetch``.

    page = PageServer(socket_in_namespace(ns), PAGE)
    browser = launch(ns, f"http://127.0.0.1:{page.port}/page", home)
    kind, body = page.posts.get(timeout=30)     # what the page POSTed to /<kind>
    page.replies["answer"] = {"sdp": ...}       # what the page GETs from /answer
    stop(browser, group=True)

Chromium runs as the probe of this machine found it must: ``--headless --no-sandbox``
(root), no GPU, no QUIC, no background networking, a fresh profile; it gathers host
candidates only on an interface with a default route, so the namespace needs one.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

_CLONE_NEWNET = 0x40000000
_MAX_BODY = 1 << 20


def program(name: str, package: str) -> str:
    """The path of ``name``; a missing program fails the test (it is never skipped)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package {package}); this test needs it")
    return path


def socket_in_namespace(name: str) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 of namespace ``name``: created by a thread that
    entered it (setns changes only the calling thread's namespace)."""
    made: list[socket.socket | BaseException] = []

    def enter_and_listen() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{name}") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            made.append(sock)
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter_and_listen)
    thread.start()
    thread.join(10)
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


class PageServer:
    """Serves ``page`` at ``/page``; a POST of JSON to ``/<kind>`` lands in :attr:`posts`
    as ``(kind, body)``; a GET of ``/<key>`` answers ``replies[key]`` as JSON once the test
    has set it, 204 before (the page polls)."""

    def __init__(self, sock: socket.socket, page: str) -> None:
        posts: queue.Queue[tuple[str, Any]] = queue.Queue()
        replies: dict[str, Any] = {}
        self.posts = posts
        self.replies = replies
        body_of_page = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                key = self.path.lstrip("/").split("?")[0]
                if key == "page":
                    self._send(200, "text/html", body_of_page)
                elif key in replies:
                    self._send(200, "application/json", json.dumps(replies[key]).encode())
                else:
                    self._send(204 if key else 404, "text/plain", b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                posts.put(
                    (self.path.lstrip("/"), json.loads(self.rfile.read(min(length, _MAX_BODY))))
                )
                self._send(204, "text/plain", b"")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            sock.getsockname(), Handler, bind_and_activate=False
        )
        self.httpd.socket.close()
        self.httpd.socket = sock
        self.port: int = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def launch(namespace: str, url: str, home: str) -> subprocess.Popen[bytes]:
    """Headless Chromium in ``namespace`` loading ``url``, with a fresh profile under
    ``home``; in its own process group, so :func:`stop` takes its helpers with it."""
    chromium = program("chromium", "chromium")
    env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home}
    return subprocess.Popen(
        [
            "ip", "netns", "exec", namespace, chromium, "--headless", "--no-sandbox",
            "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={Path(home) / 'profile'}", url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )  # fmt: skip


def stop(process: subprocess.Popen[Any], *, group: bool = False) -> None:
    """SIGTERM (to the process group we started, for Chromium's helpers), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            process.wait(10)
