"""ICE benchmark: tsunagu's IceConnection against aioice's Connection (the ICE agent aiortc
uses), on loopback, in one run, ratios printed.

Three parts (``--only time``, ``--only data`` or ``--only scale`` runs one):

* time to a selected pair. One run creates two agents (controlling and controlled) of the
  same library, gathers both, signals credentials, candidates and end-of-candidates
  directly (no SDP round trip), and awaits both ``connect()``; the time from creating the
  agents to both ``connect()`` having returned (a nominated pair in use on each side) is
  the figure. Host-only: each agent gathers one UDP host candidate on 127.0.0.1. Relay-only:
  each agent gathers only a relayed candidate from one local coturn (the same relay for
  both libraries), so the checks travel agent -> coturn -> coturn -> agent. ``--runs``
  runs per library and mode, alternating the libraries run by run, after one warm-up run
  each; median, p90, min and max are printed, and the median ratio against the target
  (tsunagu at most 0.5x aioice's time).
* data: the application-data path of a connected host-only pair, as a media stack uses
  it: ``--datagrams`` datagrams of 1000 bytes from the controlling agent to the other, in
  windows of 32 (32 ``send()`` calls, then 32 ``recv()`` calls on the far side), both
  agents in one process; datagrams per second and per CPU-second, ``--data-runs`` runs
  per library, alternating, median printed.
* scale: ``--agents`` agents of one library in one process (a fresh child process per
  library, so neither inherits the other's heap): ``--agents``/2 pairs gather, connect
  and exchange a few datagrams on loopback, all at once, then sit idle for ``--idle``
  seconds with consent freshness running. Printed: CPU seconds the process used during
  setup, its CPU % while idle, RSS growth per agent, and (in a second child with
  tracemalloc on, so the tracing cost never pollutes the CPU figures) the traced peak.

    .venv/bin/python bench/bench_ice.py [--runs 20] [--agents 500] [--only time|data|scale]

Both libraries run with their defaults and on the same event loop (uvloop when installed,
``--loop asyncio`` for the standard one); the timing knobs in which their defaults differ
are printed with the results. aioice 0.13 gathers host candidates from the interfaces
and leaves 127.0.0.1 out, so the bench configures it with loopback as the one host address
by replacing ``aioice.ice.get_host_addresses`` (as tests/interop/test_ice_aioice.py does);
tsunagu is given ``host_addresses=["127.0.0.1"]``. Neither timed path therefore includes
host-address discovery; its cost is printed separately. Traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aioice
import aioice.ice
import aioice.stun
from _harness import (
    free_udp_port,
    install_sigterm_handler,
    load_average,
    print_table,
    ratio,
    running_server,
)

from tsunagu.aio.ice import IceConnection, TurnServer, default_host_addresses
from tsunagu.errors import TsunaguError
from tsunagu.ice.candidate import CandidateType
from tsunagu.ice.config import IceConfig, Nomination

HOST = "127.0.0.1"
USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"
LIBRARIES = ("tsunagu", "aioice")
MODES = ("host", "relay")
MODE_NAMES = {"host": "host-only", "relay": "relay-only"}
TARGET = 0.5  # tsunagu's median time to a selected pair, as a share of aioice's

RUN_LIMIT = 10.0  # seconds one timed run (two agents, gather to connected) may take
SETUP_LIMIT = 90.0  # seconds the scale setup (all pairs) may take
CLOSE_LIMIT = 30.0  # seconds closing every agent may take
DATA_LIMIT = 60.0  # seconds one data run (all its windows) may take
PACKETS = 3  # datagrams each way per pair after connecting
DATA_SIZE = 1000  # data part: bytes per datagram, a typical RTP packet of a video call
DATA_WINDOW = 32  # data part: datagrams sent before the far side reads them
FDS_PER_AGENT = 2  # a host socket, plus headroom (TURN sockets, loop internals)

T = TypeVar("T")
# What a failed run raises: a bound hit, a socket error, a library's "ICE failed"
# (aioice: ConnectionError; tsunagu: IceFailedError, a TsunaguError), a TURN refusal.
RUN_ERRORS = (TimeoutError, OSError, RuntimeError, ConnectionError, TsunaguError)


# --- event loop --------------------------------------------------------------------------


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop both libraries run on: uvloop's, or None for asyncio's own."""
    if name == "asyncio":
        return None
    import uvloop  # noqa: PLC0415 - optional: --loop asyncio works without it

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def default_loop() -> str:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


# --- aioice on loopback ------------------------------------------------------------------


def _aioice_loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [HOST] if use_ipv4 else []


@contextlib.contextmanager
def aioice_on_loopback() -> Iterator[None]:
    """aioice's host candidates on 127.0.0.1 only (its one host-address hook), restored
    afterwards."""
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = _aioice_loopback_addresses
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


# --- one pair of each library ------------------------------------------------------------


async def signal_both(a: Any, b: Any) -> None:
    """What a signalling channel does, the same for both libraries (tsunagu's
    IceConnection and aioice's Connection share these names): credentials, then every
    candidate and end-of-candidates, both ways."""
    a.remote_username, a.remote_password = b.local_username, b.local_password
    b.remote_username, b.remote_password = a.local_username, a.local_password
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            await me.add_remote_candidate(candidate)
        await me.add_remote_candidate(None)


@dataclass(frozen=True)
class Relay:
    """The coturn both libraries allocate on (relay-only mode)."""

    port: int


@dataclass(frozen=True)
class Tuning:
    """tsunagu knobs away from the defaults (``--tsunagu-ta`` etc.); None = default."""

    ta: float | None = None
    nomination: str | None = None

    def config(self) -> IceConfig:
        config = IceConfig()
        if self.ta is not None:
            config = dataclasses.replace(config, ta=self.ta)
        if self.nomination is not None:
            config = dataclasses.replace(config, nomination=Nomination(self.nomination))
        return config

    def describe(self) -> str:
        parts = []
        if self.ta is not None:
            parts.append(f"Ta={self.ta * 1000:g} ms")
        if self.nomination is not None:
            parts.append(f"nomination={self.nomination}")
        return ", ".join(parts)


class Pair:
    """Two connected agents of one library, behind one small interface."""

    async def send(self, first: bool, data: bytes) -> None:
        raise NotImplementedError

    async def recv(self, first: bool) -> bytes:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def mark_idle(self) -> None:
        """The idle time starts (what :meth:`consent_running` compares against)."""

    def consent_running(self) -> bool:
        raise NotImplementedError


@dataclass
class Timing:
    gathered: float  # seconds from the start to both agents gathered
    connected: float  # seconds from the start to both connect() returned


class TsunaguPair(Pair):
    def __init__(self, a: IceConnection, b: IceConnection) -> None:
        self.a, self.b = a, b
        self.responses_before = self.responses()

    @staticmethod
    async def start(mode: str, relay: Relay | None, config: IceConfig) -> tuple[Pair, Timing]:
        start = time.perf_counter()
        if mode == "host":
            a = IceConnection(True, host_addresses=[HOST], allow_loopback=True, config=config)
            b = IceConnection(False, host_addresses=[HOST], allow_loopback=True, config=config)
        else:
            assert relay is not None
            turn = [TurnServer(f"turn:{HOST}:{relay.port}", USER, PASSWORD)]
            a, b = (
                IceConnection(
                    controlling,
                    turn_servers=turn,
                    relay_only=True,
                    allow_loopback=True,
                    config=config,
                )
                for controlling in (True, False)
            )
        try:
            await asyncio.gather(a.gather(), b.gather())
            gathered = time.perf_counter() - start
            await signal_both(a, b)
            await asyncio.gather(a.connect(), b.connect())
            connected = time.perf_counter() - start
        except BaseException:
            await asyncio.gather(a.close(), b.close())
            raise
        want = CandidateType.HOST if mode == "host" else CandidateType.RELAYED
        for conn in (a, b):
            selected = conn.selected_pair
            if selected is None or selected.local.type is not want:
                await asyncio.gather(a.close(), b.close())
                raise RuntimeError(f"tsunagu selected {selected}, expected a {want} pair")
        return TsunaguPair(a, b), Timing(gathered, connected)

    def mark_idle(self) -> None:
        self.responses_before = self.responses()

    def responses(self) -> list[int]:
        """Responses each side's selected pair got to its requests (checks, consent)."""
        counts = []
        for conn in (self.a, self.b):
            selected = conn.selected_pair
            counts.append(-1 if selected is None else selected.responses_received)
        return counts

    async def send(self, first: bool, data: bytes) -> None:
        await (self.a if first else self.b).send(data)

    async def recv(self, first: bool) -> bytes:
        return await (self.a if first else self.b).recv()

    async def close(self) -> None:
        await asyncio.gather(self.a.close(), self.b.close())

    def consent_running(self) -> bool:
        """Each side got an answer to a consent request since it connected (RFC 7675)."""
        return all(
            before >= 0 and now > before
            for before, now in zip(self.responses_before, self.responses(), strict=True)
        )


class AioicePair(Pair):
    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    @staticmethod
    async def start(mode: str, relay: Relay | None) -> tuple[Pair, Timing]:
        start = time.perf_counter()
        if mode == "host":
            a, b = (
                aioice.Connection(
                    ice_controlling=controlling, components=1, use_ipv4=True, use_ipv6=False
                )
                for controlling in (True, False)
            )
        else:
            assert relay is not None
            a, b = (
                aioice.Connection(
                    ice_controlling=controlling,
                    components=1,
                    turn_server=(HOST, relay.port),
                    turn_username=USER,
                    turn_password=PASSWORD,
                    use_ipv4=True,
                    use_ipv6=False,
                    transport_policy=aioice.TransportPolicy.RELAY,
                )
                for controlling in (True, False)
            )
        try:
            await asyncio.gather(a.gather_candidates(), b.gather_candidates())
            gathered = time.perf_counter() - start
            await signal_both(a, b)
            await asyncio.gather(a.connect(), b.connect())
            connected = time.perf_counter() - start
        except BaseException:
            await asyncio.gather(a.close(), b.close())
            raise
        want = "host" if mode == "host" else "relay"
        types = [c.type for conn in (a, b) for c in conn.local_candidates]
        if types != [want, want]:
            await asyncio.gather(a.close(), b.close())
            raise RuntimeError(f"aioice gathered {types}, expected one {want} candidate each")
        return AioicePair(a, b), Timing(gathered, connected)

    async def send(self, first: bool, data: bytes) -> None:
        await (self.a if first else self.b).send(data)

    async def recv(self, first: bool) -> bytes:
        data: bytes = await (self.a if first else self.b).recv()
        return data

    async def close(self) -> None:
        await asyncio.gather(self.a.close(), self.b.close())

    def consent_running(self) -> bool:
        """aioice's consent task is alive on both sides (it ends when consent fails)."""
        tasks = [conn._query_consent_task for conn in (self.a, self.b)]
        return all(task is not None and not task.done() for task in tasks)


async def start_pair(
    library: str, mode: str, relay: Relay | None, tuning: Tuning
) -> tuple[Pair, Timing]:
    if library == "tsunagu":
        return await TsunaguPair.start(mode, relay, tuning.config())
    return await AioicePair.start(mode, relay)


async def exchange(pair: Pair, count: int) -> None:
    """``count`` datagrams each way, each one awaited at the other side."""
    for i in range(count):
        await pair.send(True, b"ping %d" % i)
        if await pair.recv(False) != b"ping %d" % i:
            raise RuntimeError("datagram mismatch")
        await pair.send(False, b"pong %d" % i)
        if await pair.recv(True) != b"pong %d" % i:
            raise RuntimeError("datagram mismatch")


async def bounded(awaitable: Awaitable[T], limit: float) -> T:
    return await asyncio.wait_for(awaitable, limit)


# --- part 1: time to a selected pair -----------------------------------------------------


@dataclass
class Series:
    connected: list[float]
    gathered: list[float]
    failures: list[str]


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (p90 of 20 runs is the 18th fastest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


async def one_run(library: str, mode: str, relay: Relay | None, tuning: Tuning) -> Timing:
    gc.collect()  # outside the timed span, the same for both libraries
    pair, timing = await bounded(start_pair(library, mode, relay, tuning), RUN_LIMIT)
    try:
        await bounded(exchange(pair, 1), RUN_LIMIT)  # connected for real, both ways
    finally:
        await bounded(pair.close(), CLOSE_LIMIT)
    await asyncio.sleep(0.02)  # let closing callbacks (allocation deletes) drain
    return timing


async def time_mode(mode: str, runs: int, relay: Relay | None, tuning: Tuning) -> dict[str, Series]:
    series = {library: Series([], [], []) for library in LIBRARIES}
    for library in LIBRARIES:  # warm-up: imports, first sockets, caches
        try:
            await one_run(library, mode, relay, tuning)
        except RUN_ERRORS as exc:
            series[library].failures.append(f"warm-up: {type(exc).__name__}: {exc}")
    for run in range(runs):
        order = LIBRARIES if run % 2 == 0 else LIBRARIES[::-1]
        for library in order:
            try:
                timing = await one_run(library, mode, relay, tuning)
            except RUN_ERRORS as exc:
                series[library].failures.append(f"{type(exc).__name__}: {exc}")
                continue
            series[library].connected.append(timing.connected)
            series[library].gathered.append(timing.gathered)
    return series


def coturn_command(port: int) -> list[str]:
    """coturn as a TURN server on one loopback port, relaying between loopback peers."""
    return [
        shutil.which("turnserver") or "/usr/bin/turnserver",
        "-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log",
        "--log-file", "stdout", "--pidfile", "turnserver.pid",
        "--listening-ip", HOST, "--relay-ip", HOST, "--listening-port", str(port),
        "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-loopback-peers",
    ]  # fmt: skip


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def print_knobs(tuning: Tuning) -> None:
    ours = tuning.config()
    default = IceConfig()
    note = f" (NOT the default {default.ta * 1000:g} ms)" if ours.ta != default.ta else ""
    print("Timing knobs, each library with its defaults unless marked:")
    rows = [
        ("check pacing", f"Ta {ours.ta * 1000:g} ms{note}", "20 ms sleep in connect()"),
        (
            "nomination",
            f"{ours.nomination} (delay <= {ours.nomination_delay:g} s)",
            "aggressive (USE-CANDIDATE on every check)",
        ),
        (
            "check retransmit",
            f"RTO >= {ours.check_rto_min:g} s, Rc {ours.check_transactions.rc}",
            f"RTO {aioice.stun.RETRY_RTO:g} s, {aioice.stun.RETRY_MAX} retries",
        ),
        ("request rate cap", f"{ours.max_checks_per_second:g}/s, burst {ours.check_burst}", "none"),
        (
            "consent",
            f"{ours.consent_interval:g} s +-{ours.consent_jitter:.0%}",
            f"{aioice.ice.CONSENT_INTERVAL:g} s +-20%",
        ),
    ]
    print_table(["knob", "tsunagu", f"aioice {aioice.__version__}"], rows)
    print()


def print_discovery_cost() -> None:
    """Host-address discovery, which the timed runs leave out (see the module doc)."""
    rounds = 200
    results: dict[str, float] = {}
    calls: list[tuple[str, Callable[[], list[str]]]] = [
        ("tsunagu default_host_addresses()", default_host_addresses),
        ("aioice get_host_addresses()", lambda: aioice.ice.get_host_addresses(True, True)),
    ]
    for name, call in calls:
        call()
        start = time.perf_counter()
        for _ in range(rounds):
            call()
        results[name] = (time.perf_counter() - start) / rounds
    print("Host-address discovery per call (not in the timed runs above):")
    print_table(
        ["call", "us"],
        [(name, f"{seconds * 1e6:.0f}") for name, seconds in results.items()],
    )
    print()


async def data_run(library: str, datagrams: int, tuning: Tuning) -> tuple[float, float]:
    """One data run: datagrams per second of wall time and of this process's CPU time."""
    pair, _ = await bounded(start_pair(library, "host", None, tuning), RUN_LIMIT)
    try:
        await bounded(exchange(pair, 2), RUN_LIMIT)  # warm: the pair is in use both ways
        # RTP's first byte (version 2): RFC 7983 demultiplexing reads 0-3 as STUN.
        payload = b"\x80" + bytes(DATA_SIZE - 1)

        async def stream() -> None:
            for _ in range(datagrams // DATA_WINDOW):
                for _ in range(DATA_WINDOW):
                    await pair.send(True, payload)
                for _ in range(DATA_WINDOW):
                    if len(await pair.recv(False)) != DATA_SIZE:
                        raise RuntimeError("datagram mismatch")

        wall, cpu = time.perf_counter(), time.process_time()
        await bounded(stream(), DATA_LIMIT)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await bounded(pair.close(), CLOSE_LIMIT)
    sent = datagrams // DATA_WINDOW * DATA_WINDOW
    return sent / wall, sent / max(cpu, 1e-9)


async def data_series(
    runs: int, datagrams: int, tuning: Tuning
) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {lib: [] for lib in LIBRARIES}
    for run in range(runs):  # alternating, as the timed runs
        for lib in LIBRARIES if run % 2 == 0 else LIBRARIES[::-1]:
            series[lib].append(await data_run(lib, datagrams, tuning))
    return series


def run_data(args: argparse.Namespace, tuning: Tuning) -> None:
    with aioice_on_loopback():
        series = run_on(args.loop, data_series(args.data_runs, args.datagrams, tuning))
    print(
        f"Application data through a connected host-only pair on loopback: "
        f"{args.datagrams} datagrams of {DATA_SIZE} bytes, windows of {DATA_WINDOW}; "
        f"event loop {args.loop}; median of {args.data_runs} runs per library, alternating"
    )
    medians = {
        lib: (
            statistics.median(r for r, _ in runs),
            statistics.median(c for _, c in runs),
        )
        for lib, runs in series.items()
    }
    rows = [(lib, f"{rate:,.0f}", f"{per_cpu:,.0f}") for lib, (rate, per_cpu) in medians.items()]
    ours, theirs = medians["tsunagu"], medians["aioice"]
    rows.append(("tsunagu / aioice", f"{ours[0] / theirs[0]:.2f}x", f"{ours[1] / theirs[1]:.2f}x"))
    print_table(["library", "datagrams/s", "per CPU-s"], rows)
    print()


def run_time(args: argparse.Namespace, tuning: Tuning) -> None:
    modes = [m for m in MODES if m in args.modes.split(",")]
    results: dict[str, dict[str, Series]] = {}
    relay: Relay | None = None
    with contextlib.ExitStack() as stack:
        if "relay" in modes:
            if shutil.which("turnserver") is None and not os.path.exists("/usr/bin/turnserver"):
                raise SystemExit("coturn's turnserver is not installed (needed for relay-only)")
            port = free_udp_port(HOST, span=1)
            relay = Relay(port)
            stack.enter_context(running_server("coturn", coturn_command(port), port=port))
        stack.enter_context(aioice_on_loopback())
        for mode in modes:
            results[mode] = run_on(
                args.loop, time_mode(mode, args.runs, relay if mode == "relay" else None, tuning)
            )
    label = "" if not tuning.describe() else f"; tsunagu tuned: {tuning.describe()}"
    print(
        f"Time from creating two agents to both connect() returned, loopback; event loop "
        f"{args.loop}; {args.runs} runs per library and mode, alternating{label}"
    )
    rows = []
    for mode, per_library in results.items():
        for library, series in per_library.items():
            values = series.connected
            if not values:
                rows.append((f"{MODE_NAMES[mode]} {library}", *["n/a"] * 5, f"0/{args.runs}"))
                continue
            rows.append(
                (
                    f"{MODE_NAMES[mode]} {library}",
                    ms(statistics.median(series.gathered)),
                    ms(statistics.median(values)),
                    ms(percentile(values, 0.9)),
                    ms(min(values)),
                    ms(max(values)),
                    f"{len(values)}/{args.runs}",
                )
            )
    print_table(
        ["run (ms)", "gathered (median)", "connected median", "p90", "min", "max", "ok"], rows
    )
    print()
    verdicts = []
    for mode, per_library in results.items():
        ours, theirs = (per_library[lib].connected for lib in LIBRARIES)
        if not ours or not theirs:
            verdicts.append((MODE_NAMES[mode], "n/a", "n/a", f"<= {TARGET:.2f}x", "n/a"))
            continue
        ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
        share = ours_median / theirs_median
        connect_share = ratio(
            ours_median - statistics.median(per_library["tsunagu"].gathered),
            theirs_median - statistics.median(per_library["aioice"].gathered),
        )
        verdicts.append(
            (
                MODE_NAMES[mode],
                f"{share:.2f}x",
                connect_share,
                f"<= {TARGET:.2f}x",
                "met" if share <= TARGET else "MISSED",
            )
        )
    print_table(
        ["tsunagu / aioice", "median total", "connect phase", "target", "verdict"], verdicts
    )
    for mode, per_library in results.items():
        for library, series in per_library.items():
            for failure in series.failures[:3]:
                print(f"  failed run ({MODE_NAMES[mode]}, {library}): {failure}")
    print()
    print_knobs(tuning)
    print_discovery_cost()


# --- part 2: many agents in one process --------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to ``needed`` if it is lower (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft, hard


async def scale_child(args: argparse.Namespace, tuning: Tuning) -> dict[str, Any]:
    library = args.scale_child
    pairs_wanted = args.agents // 2
    # Warm-up pair: imports, first-use caches and the loop's own structures are not
    # per-agent costs.
    pair, _ = await bounded(start_pair(library, "host", None, tuning), RUN_LIMIT)
    await bounded(exchange(pair, 1), RUN_LIMIT)
    await bounded(pair.close(), CLOSE_LIMIT)
    await asyncio.sleep(0.1)
    gc.collect()
    fds_before = open_fds()
    if args.tracemalloc:
        tracemalloc.start()
    rss_before = rss_bytes()
    cpu_start, wall_start = time.process_time(), time.perf_counter()

    async def one(_: int) -> Pair:
        made, _timing = await start_pair(library, "host", None, tuning)
        try:
            await exchange(made, PACKETS)
        except BaseException:
            await made.close()
            raise
        return made

    outcomes = await bounded(
        asyncio.gather(*(one(i) for i in range(pairs_wanted)), return_exceptions=True),
        SETUP_LIMIT,
    )
    setup_cpu = time.process_time() - cpu_start
    setup_wall = time.perf_counter() - wall_start
    rss_setup = rss_bytes()
    pairs = [p for p in outcomes if isinstance(p, Pair)]
    errors = [f"{type(e).__name__}: {e}" for e in outcomes if isinstance(e, BaseException)]
    traced_current = traced_peak = 0
    if args.tracemalloc:
        traced_current, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    fds_connected = open_fds()

    idle_cpu_pct = 0.0
    consent_ok = 0
    if args.idle > 0:
        for made in pairs:
            made.mark_idle()
        cpu_idle, wall_idle = time.process_time(), time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_cpu = time.process_time() - cpu_idle
        idle_cpu_pct = 100.0 * idle_cpu / (time.perf_counter() - wall_idle)
        consent_ok = sum(1 for p in pairs if p.consent_running())
    rss_idle = rss_bytes()

    cpu_close, wall_close = time.process_time(), time.perf_counter()
    await bounded(asyncio.gather(*(p.close() for p in pairs), return_exceptions=True), CLOSE_LIMIT)
    close_cpu = time.process_time() - cpu_close
    close_wall = time.perf_counter() - wall_close
    await asyncio.sleep(0.2)
    gc.collect()
    return {
        "library": library,
        "pairs_wanted": pairs_wanted,
        "pairs": len(pairs),
        "errors": errors[:5],
        "setup_cpu": setup_cpu,
        "setup_wall": setup_wall,
        "rss_before": rss_before,
        "rss_setup": rss_setup,
        "rss_idle": rss_idle,
        "traced_current": traced_current,
        "traced_peak": traced_peak,
        "idle": args.idle,
        "idle_cpu_pct": idle_cpu_pct,
        "consent_ok": consent_ok,
        "close_cpu": close_cpu,
        "close_wall": close_wall,
        "fds_connected": fds_connected - fds_before,
        "fds_left": open_fds() - fds_before,
    }


def spawn_child(
    args: argparse.Namespace, library: str, *, traced: bool, idle: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--scale-child",
        library,
        "--agents",
        str(args.agents),
        "--idle",
        f"{idle:g}",
        "--loop",
        args.loop,
    ]
    if traced:
        cmd.append("--tracemalloc")
    if args.tsunagu_ta is not None:
        cmd += ["--tsunagu-ta", f"{args.tsunagu_ta:g}"]
    if args.tsunagu_nomination is not None:
        cmd += ["--tsunagu-nomination", args.tsunagu_nomination]
    limit = RUN_LIMIT + SETUP_LIMIT + idle + CLOSE_LIMIT + 30.0
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"scale child for {library} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def scale_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The figures printed for one child, per agent where it says so."""
    agents = max(1, 2 * int(result["pairs"]))
    kib, mib = 1024.0, 1024.0 * 1024.0
    return {
        "pairs": float(result["pairs"]),
        "consent_ok": float(result["consent_ok"]),
        "setup_wall": result["setup_wall"],
        "setup_cpu": result["setup_cpu"],
        "setup_cpu_agent_ms": 1000 * result["setup_cpu"] / agents,
        "idle_cpu_pct": result["idle_cpu_pct"],
        "idle_cpu_agent_us": 1e6 * result["idle_cpu_pct"] / 100 / agents,
        "rss_growth_mib": (result["rss_setup"] - result["rss_before"]) / mib,
        "rss_agent_kib": (result["rss_setup"] - result["rss_before"]) / agents / kib,
        "rss_idle_agent_kib": (result["rss_idle"] - result["rss_before"]) / agents / kib,
        "traced_peak_kib": result["traced_peak"] / agents / kib,
        "traced_current_kib": result["traced_current"] / agents / kib,
        "close_wall": result["close_wall"],
        "close_cpu": result["close_cpu"],
        "fds_connected": float(result["fds_connected"]),
        "fds_left": float(result["fds_left"]),
    }


def run_scale(args: argparse.Namespace) -> None:
    plain: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBRARIES}
    for repeat in range(args.scale_repeats):  # alternating, as the timed runs
        for lib in LIBRARIES if repeat % 2 == 0 else LIBRARIES[::-1]:
            plain[lib].append(spawn_child(args, lib, traced=False, idle=args.idle))
    traced = (
        {lib: spawn_child(args, lib, traced=True, idle=0.0) for lib in LIBRARIES}
        if args.tracemalloc_pass
        else {}
    )
    print(
        f"{args.agents} agents ({args.agents // 2} pairs) in one process per library, "
        f"host-only on loopback, {PACKETS} datagrams each way per pair, then {args.idle:g} s "
        f"idle with consent running; event loop {args.loop}; median of {args.scale_repeats} "
        f"processes per library{' (tracemalloc: one more, traced)' if traced else ''}; "
        f"load average {load_average():.2f}"
    )
    figures = {
        lib: {
            key: statistics.median(scale_metrics(r)[key] for r in results)
            for key in scale_metrics(results[0])
        }
        for lib, results in plain.items()
    }
    worst = {
        lib: {key: min(scale_metrics(r)[key] for r in results) for key in ("pairs", "consent_ok")}
        for lib, results in plain.items()
    }
    if traced:
        for lib, result in traced.items():
            for key in ("traced_peak_kib", "traced_current_kib"):
                figures[lib][key] = scale_metrics(result)[key]
    wanted = args.agents // 2
    rows: list[tuple[str, ...]] = [
        (
            "pairs connected (worst run)",
            *(f"{worst[lib]['pairs']:.0f}/{wanted}" for lib in LIBRARIES),
            "",
        ),
    ]
    shown = [
        ("setup wall (s)", "setup_wall", ".2f"),
        ("setup CPU (s)", "setup_cpu", ".2f"),
        ("setup CPU per agent (ms)", "setup_cpu_agent_ms", ".2f"),
        ("idle CPU, whole process (%)", "idle_cpu_pct", ".2f"),
        ("idle CPU per agent (us/s)", "idle_cpu_agent_us", ".1f"),
        ("RSS growth, connected (MiB)", "rss_growth_mib", ".1f"),
        ("RSS per agent, connected (KiB)", "rss_agent_kib", ".1f"),
        ("RSS per agent, after idle (KiB)", "rss_idle_agent_kib", ".1f"),
    ]
    if traced:
        shown += [
            ("tracemalloc peak per agent (KiB)", "traced_peak_kib", ".1f"),
            ("tracemalloc connected per agent (KiB)", "traced_current_kib", ".1f"),
        ]
    shown += [
        ("close all, wall (s)", "close_wall", ".3f"),
        ("close all, CPU (s)", "close_cpu", ".3f"),
    ]
    for name, key, fmt in shown:
        ours, theirs = figures["tsunagu"][key], figures["aioice"][key]
        rows.append((name, format(ours, fmt), format(theirs, fmt), ratio(ours, theirs)))
    rows.append(
        (
            "consent running (worst run) [1]",
            *(f"{worst[lib]['consent_ok']:.0f}/{wanted}" for lib in LIBRARIES),
            "",
        )
    )
    for name, key in (
        ("fds open while connected", "fds_connected"),
        ("fds left after close", "fds_left"),
    ):
        rows.append((name, *(f"{figures[lib][key]:.0f}" for lib in LIBRARIES), ""))
    print_table(["metric", "tsunagu", f"aioice {aioice.__version__}", "ratio"], rows)
    print(
        "[1] pairs whose two agents each got a consent request answered during the idle "
        "time (tsunagu), or whose two consent tasks are alive (aioice)"
    )
    slowest = IceConfig().consent_interval * (1 + IceConfig().consent_jitter)
    if args.idle < slowest:
        print(f"    (an idle time under {slowest:g} s may end before a pair's first request)")
    for result in (*(r for results in plain.values() for r in results), *traced.values()):
        for error in result["errors"]:
            print(f"  {result['library']}: failed pair: {error}")
    print()


# --- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per library and mode")
    parser.add_argument("--agents", type=int, default=500, help="agents in the scale part")
    parser.add_argument("--idle", type=float, default=8.0, help="idle seconds (scale part)")
    parser.add_argument(
        "--scale-repeats", type=int, default=3, help="processes per library (scale part)"
    )
    parser.add_argument("--only", choices=("time", "data", "scale"), help="run one part")
    parser.add_argument("--datagrams", type=int, default=20000, help="data part: per run")
    parser.add_argument("--data-runs", type=int, default=5, help="data part: runs per library")
    parser.add_argument("--modes", default="host,relay", help="time part: host,relay")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop())
    parser.add_argument(
        "--no-tracemalloc",
        dest="tracemalloc_pass",
        action="store_false",
        help="skip the scale pass that measures tracemalloc's peak",
    )
    parser.add_argument("--tsunagu-ta", type=float, help="override tsunagu's Ta (s)")
    parser.add_argument(
        "--tsunagu-nomination", choices=[n.value for n in Nomination], help="override"
    )
    parser.add_argument("--scale-child", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.agents < 2 or args.scale_repeats < 1 or not 0 <= args.idle <= 120:
        parser.error("need --runs, --scale-repeats >= 1, --agents >= 2, 0 <= --idle <= 120")
    if not DATA_WINDOW <= args.datagrams <= 1_000_000 or not 1 <= args.data_runs <= 50:
        parser.error(f"need {DATA_WINDOW} <= --datagrams <= 1000000, 1 <= --data-runs <= 50")
    tuning = Tuning(args.tsunagu_ta, args.tsunagu_nomination)
    raise_fd_limit(FDS_PER_AGENT * args.agents + 256)
    if args.scale_child is not None:
        with aioice_on_loopback():
            result = run_on(args.loop, scale_child(args, tuning))
        print(json.dumps(result), flush=True)
        return
    install_sigterm_handler()
    print(f"aioice {aioice.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print()
    if args.only in (None, "time"):
        run_time(args, tuning)
    if args.only in (None, "data"):
        run_data(args, tuning)
    if args.only in (None, "scale"):
        run_scale(args)


if __name__ == "__main__":
    main()
