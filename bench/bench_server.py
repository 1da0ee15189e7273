"""STUN Binding server throughput on loopback: tsunagu's ``stun-server`` against coturn.

Two match-ups, each measured with ``bench/stunload`` (a C closed-loop generator built on
demand) keeping ``--window`` Binding requests with FINGERPRINT in flight:

pinned   one core each: the server under ``taskset -c SERVER_CORE`` (coturn with a single
         relay thread, tsunagu with one process), the generator under
         ``taskset -c LOAD_CORE``.  This is the per-core efficiency comparison.
workers  nothing pinned: ``tsunagu stun-server --workers N`` (SO_REUSEPORT) against coturn
         with its default thread count (one relay thread per CPU).  The generator spreads
         its window over ``--sockets`` source ports so that the kernel's 4-tuple hash hands
         every worker a share, and it competes for the same cores as the server: on a
         2-core machine that is the whole point of the figure, not a flaw in it.

Every configuration is run ``--runs`` times for ``--duration`` seconds (after ``--warmup``
seconds of uncounted load); the median responses/s is reported with the range.  Alongside
it: the generator's own CPU (user + sys, from ``getrusage`` inside stunload) and the
server's (from /proc, children included).  A generator well below 100 % while the pinned
server sits near 100 % is what shows the server, not the generator, is being measured.

The machine is shared, so the CPU used by every *other* process during a run is measured
too (from /proc/PID/stat before and after).  A run with more than ``--noise-limit`` % of
a core of such "other" CPU, or a pinned run in which neither the server (below
``--min-server-cpu`` %) nor the generator was saturated, is re-run, up to ``--retries``
times per configuration; runs kept despite noise are flagged in the table.  A neighbour
can only lower a closed-loop rate, so the best run is also given next to the median.

    .venv/bin/python bench/bench_server.py [--quick] [--runs 3] [--duration 5]
        [--window 64] [--workers 2] [--skip-workers] [--noise-limit 15]
        [--min-server-cpu 85] [--retries 2] [--json]

``--quick`` (2 runs of 2 s) finishes in well under 40 s.  If ``tsunagu stun-server`` cannot
be started (the command does not exist yet, say) the script says so and measures coturn
alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from _harness import (
    REPO_DIR,
    HarnessError,
    LoadResult,
    build_stunload,
    command_works,
    cpu_census,
    free_port,
    install_sigterm_handler,
    load_average,
    neighbour_cpu_seconds,
    print_table,
    ratio,
    run_stunload,
    running_server,
)

HOST = "127.0.0.1"
TSUNAGU = REPO_DIR / ".venv" / "bin" / "tsunagu"


@dataclass(frozen=True)
class Run:
    """One generator run against a server, with the CPU accounting around it."""

    load: LoadResult
    server_cpu_pct: float  # server and its children, % of one core over the run
    other_cpu_pct: float  # other processes on the machine, % of one core over the run


@dataclass
class Outcome:
    """All runs of one server configuration, or why it could not be measured."""

    label: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)  # the runs the figures are taken from
    dropped: list[Run] = field(default_factory=list)  # noisy runs replaced by a re-run
    noisy_kept: int = 0  # noisy runs kept because the re-runs ran out
    skipped: str | None = None

    @property
    def note(self) -> str:
        """What the table should say about noise or failure for this configuration."""
        if self.skipped is not None:
            return self.skipped
        notes = []
        if self.noisy_kept:
            notes.append(f"NOISY: {self.noisy_kept} noisy run(s) kept")
        if self.dropped:
            notes.append(f"{len(self.dropped)} noisy run(s) dropped")
        return ", ".join(notes)

    @property
    def rates(self) -> list[float]:
        """Responses/s of every run, in order."""
        return [r.load.responses_per_s for r in self.runs]

    @property
    def median_rate(self) -> float | None:
        """Median responses/s over the runs, ``None`` if nothing was measured."""
        return statistics.median(self.rates) if self.runs else None

    @property
    def best_rate(self) -> float | None:
        """Highest responses/s: noise from other work only ever lowers a closed-loop rate."""
        return max(self.rates) if self.runs else None

    def median_of(self, values: Sequence[float]) -> float | None:
        """Median of per-run figures, tolerating a configuration with no runs."""
        return statistics.median(values) if values else None


def coturn_command(port: int, *, relay_threads: int | None) -> list[str]:
    """coturn as a plain STUN server on one loopback UDP port.

    ``-n``: ignore /etc/turnserver.conf; ``--stun-only``: TURN requests are ignored;
    ``--no-tcp --no-tls --no-dtls``: only the UDP listener we measure;
    ``--no-rfc5780``: no alternate port, no OTHER-/RESPONSE-ORIGIN extras in answers;
    ``-m 1``: one relay thread (``-m 0`` is coturn's "single-threaded mode"; both are one
    core in effect once pinned, and ``-m 1`` is the normal code path of its UDP engine);
    no ``-m``: coturn's default of one relay thread per CPU.  Logs go to stdout, which the
    harness sends to a file; ``--pidfile`` keeps coturn from writing into /var.
    """
    argv = [
        shutil.which("turnserver") or "/usr/bin/turnserver",
        "-n",
        "--no-cli",
        "--stun-only",
        "--listening-ip",
        HOST,
        "--listening-port",
        str(port),
        "--no-tcp",
        "--no-tls",
        "--no-dtls",
        "--no-rfc5780",
        "--log-file",
        "stdout",
        "--simple-log",
        "--pidfile",
        "turnserver.pid",  # relative: the harness runs each server in its own temp dir
    ]
    if relay_threads is not None:
        argv += ["--relay-threads", str(relay_threads)]
    return argv


def tsunagu_command(port: int, *, workers: int | None, help_text: str) -> list[str]:
    """tsunagu's STUN server on one loopback port, optionally with SO_REUSEPORT workers.

    ``--rate-limit 0``: the server's per-source-IP limiter (100 responses/s by default)
    would otherwise measure itself, since all the load comes from 127.0.0.1; coturn has no
    such limit on Binding.  ``--log-level warning`` keeps per-request logging out of the
    figure.  Each is passed only if ``--help`` lists it, so an older build still runs.
    """
    argv = [str(TSUNAGU), "stun-server", "--listen", f"{HOST}:{port}"]
    if "--rate-limit" in help_text:
        argv += ["--rate-limit", "0"]
    if "--log-level" in help_text:
        argv += ["--log-level", "warning"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def tsunagu_status() -> tuple[bool, str, str]:
    """Whether ``tsunagu stun-server`` runs, its ``--help`` text, and why not if it does not."""
    if not TSUNAGU.exists():
        return False, "", f"{TSUNAGU} does not exist"
    ok, output = command_works([str(TSUNAGU), "stun-server", "--help"])
    if not ok:
        last = output.strip().splitlines()[-1:] or ["no output"]
        return False, "", f"`tsunagu stun-server --help` failed: {last[0]}"
    return True, output, ""


def measure(
    label: str,
    argv: list[str],
    port: int,
    args: argparse.Namespace,
    *,
    server_core: int | None,
    load_core: int | None,
    sockets: int,
) -> Outcome:
    """Start one server, run the generator ``args.runs`` times against it, stop it.

    A disturbed run is re-run, at most ``args.retries`` times in all: on a shared 2-core
    machine a neighbour's job halves a closed-loop rate, and such a run measures the
    neighbour, not the server.  Disturbed means other processes used more than
    ``args.noise_limit`` % of a core, or (pinned only) the server was busy less than
    ``args.min_server_cpu`` % while the generator had headroom: in a closed loop with a
    full window one of the two must be saturated, so if neither is, something outside the
    processes we can see (another VM on the host, short-lived jobs) took the CPU.
    """
    outcome = Outcome(label=label, command=argv)
    print(f"\n== {label}")
    pin = f"taskset -c {server_core} " if server_core is not None else ""
    print(f"   server:    {pin}{' '.join(argv)}")
    gen_pin = f"taskset -c {load_core} " if load_core is not None else ""
    print(
        f"   generator: {gen_pin}stunload {HOST} {port} --window {args.window} "
        f"--batch {args.batch} --sockets {sockets} --warmup {args.warmup:g} "
        f"--duration {args.duration:g}"
    )
    clean: list[Run] = []
    noisy: list[Run] = []
    try:
        with running_server(label, argv, core=server_core, host=HOST, port=port) as server:
            for attempt in range(1, args.runs + args.retries + 1):
                if len(clean) >= args.runs:
                    break
                census_before = cpu_census()
                cpu_before = server.cpu_seconds()
                wall_before = time.monotonic()
                result = run_stunload(
                    HOST,
                    port,
                    duration=args.duration,
                    warmup=args.warmup,
                    window=args.window,
                    batch=args.batch,
                    sockets=sockets,
                    core=load_core,
                )
                # Server CPU over the whole stunload run, warmup included: the warmup is
                # load too, and /proc gives no finer split than the process lifetime.
                wall = time.monotonic() - wall_before
                server_s = server.cpu_seconds() - cpu_before
                # Whatever else was busy: a neighbour's job on a 2-core box shows up here.
                other_s = neighbour_cpu_seconds(census_before, cpu_census(), server.pids())
                if not server.alive():
                    raise HarnessError(f"{label} died in run {attempt}:\n{server.log_tail()}")
                run = Run(result, 100.0 * server_s / wall, 100.0 * other_s / wall)
                disturbed = ""
                if run.other_cpu_pct > args.noise_limit:
                    disturbed = "  [noisy: other processes busy]"
                elif (
                    server_core is not None
                    and run.server_cpu_pct < args.min_server_cpu
                    and result.cpu_pct < 95.0
                ):
                    disturbed = "  [noisy: neither server nor generator saturated]"
                (noisy if disturbed else clean).append(run)
                lost = result.timeouts + result.invalid + result.errors
                print(
                    f"   run {attempt}: {result.responses_per_s:>9,.0f} resp/s  "
                    f"p50 {result.p50_us:>5.0f} us  p99 {result.p99_us:>6.0f} us  "
                    f"CPU: generator {result.cpu_pct:3.0f} %  server {run.server_cpu_pct:3.0f} %"
                    f"  other {run.other_cpu_pct:3.0f} %"
                    + (f"  (timeouts/invalid/errors: {lost})" if lost else "")
                    + disturbed
                )
    except HarnessError as exc:
        # The table has room for a hint only; the whole story is printed here.
        outcome.skipped = "FAILED, see above"
        print(f"   FAILED: {exc}")
    # Out of re-runs: fill up with the least disturbed noisy runs (the fastest: noise only
    # ever slows a closed loop down), and say so in the table.
    noisy.sort(key=lambda r: r.load.responses_per_s, reverse=True)
    fill = max(0, args.runs - len(clean))
    outcome.runs = clean + noisy[:fill]
    outcome.noisy_kept = len(noisy[:fill])
    outcome.dropped = noisy[fill:]
    return outcome


def fmt_rate(value: float | None) -> str:
    """Responses/s with thousands separators, or a dash."""
    return "-" if value is None else f"{value:,.0f}"


def fmt_num(value: float | None, unit: str = "") -> str:
    """A rounded figure with an optional unit, or a dash."""
    return "-" if value is None else f"{value:,.0f}{unit}"


def summary_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    """One table row per configuration."""
    rows = []
    for o in outcomes:
        if not o.runs:
            rows.append([o.label, "-", "-", "-", "-", "-", "-", "-", o.note or "not run"])
            continue
        rows.append(
            [
                o.label,
                fmt_rate(o.median_rate),
                f"{fmt_rate(min(o.rates))}-{fmt_rate(max(o.rates))}",
                fmt_num(o.median_of([r.load.p50_us for r in o.runs]), " us"),
                fmt_num(o.median_of([r.load.p99_us for r in o.runs]), " us"),
                fmt_num(o.median_of([r.load.cpu_pct for r in o.runs]), " %"),
                fmt_num(o.median_of([r.server_cpu_pct for r in o.runs]), " %"),
                fmt_num(o.median_of([r.other_cpu_pct for r in o.runs]), " %"),
                o.note,
            ]
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags; every bound is checked so a typo cannot make a runaway load."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 runs of 2 s, 0.3 s warmup")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds per run")
    parser.add_argument("--window", type=int, default=64, help="requests kept in flight")
    parser.add_argument("--batch", type=int, default=32, help="sendmmsg/recvmmsg batch")
    parser.add_argument("--server-core", type=int, default=0, help="core for pinned servers")
    parser.add_argument("--load-core", type=int, default=1, help="core for the generator")
    parser.add_argument("--workers", type=int, default=2, help="tsunagu --workers N")
    parser.add_argument(
        "--sockets", type=int, default=16, help="generator source ports in the workers runs"
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=15.0,
        help="re-run a run if other processes used more than this %% of a core (default 15)",
    )
    parser.add_argument(
        "--min-server-cpu",
        type=float,
        default=85.0,
        help="re-run a pinned run if the server was busier than this %% of a core (85)",
    )
    parser.add_argument(
        "--retries", type=int, default=None, help="re-runs allowed per configuration (2; 1 quick)"
    )
    parser.add_argument("--skip-workers", action="store_true", help="pinned match-up only")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 2, 2.0, 0.3
    if args.retries is None:
        args.retries = 1 if args.quick else 2
    if not 0 <= args.retries <= 10 or args.noise_limit < 0:
        parser.error("need 0 <= --retries <= 10 and --noise-limit >= 0")
    if not 1 <= args.runs <= 20 or not 0 < args.duration <= 60 or not 0 <= args.warmup <= 10:
        parser.error("need 1 <= --runs <= 20, 0 < --duration <= 60, 0 <= --warmup <= 10")
    if not 1 <= args.window <= 4096 or not 1 <= args.batch <= 1024:
        parser.error("need 1 <= --window <= 4096 and 1 <= --batch <= 1024")
    if not 1 <= args.workers <= 64 or not 1 <= args.sockets <= min(256, args.window):
        parser.error("need 1 <= --workers <= 64 and 1 <= --sockets <= min(256, --window)")
    cores = os.cpu_count() or 1
    if not (0 <= args.server_core < cores and 0 <= args.load_core < cores):
        parser.error(f"cores are numbered 0..{cores - 1} on this machine")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration, then print the table and the ratios."""
    args = parse_args(argv)
    install_sigterm_handler()
    build_stunload()  # compile before anything is started, so a build error costs nothing
    if shutil.which("turnserver") is None and not os.path.exists("/usr/bin/turnserver"):
        print("coturn's turnserver is not installed", file=sys.stderr)
        return 1
    load = load_average()
    if load > 0.5:
        print(f"note: load average {load:.2f} before starting; other work skews the figures")
    has_tsunagu, help_text, why = tsunagu_status()
    has_workers = "--workers" in help_text
    if not has_tsunagu:
        print(f"tsunagu stun-server not available ({why}); measuring coturn only")

    pinned: dict[str, Outcome] = {}
    multi: dict[str, Outcome] = {}
    port = free_port(HOST)
    pinned["coturn"] = measure(
        "coturn, 1 relay thread, pinned",
        coturn_command(port, relay_threads=1),
        port,
        args,
        server_core=args.server_core,
        load_core=args.load_core,
        sockets=1,
    )
    if has_tsunagu:
        port = free_port(HOST)
        pinned["tsunagu"] = measure(
            "tsunagu, 1 process, pinned",
            tsunagu_command(port, workers=None, help_text=help_text),
            port,
            args,
            server_core=args.server_core,
            load_core=args.load_core,
            sockets=1,
        )
    if not args.skip_workers:
        port = free_port(HOST)
        multi["coturn"] = measure(
            "coturn, default threads, unpinned",
            coturn_command(port, relay_threads=None),
            port,
            args,
            server_core=None,
            load_core=None,
            sockets=args.sockets,
        )
        if has_tsunagu and has_workers:
            port = free_port(HOST)
            multi["tsunagu"] = measure(
                f"tsunagu, --workers {args.workers}, unpinned",
                tsunagu_command(port, workers=args.workers, help_text=help_text),
                port,
                args,
                server_core=None,
                load_core=None,
                sockets=args.sockets,
            )
        elif has_tsunagu:
            print("\ntsunagu stun-server has no --workers flag yet; workers run skipped")

    outcomes = [*pinned.values(), *multi.values()]
    print(
        f"\nSTUN Binding throughput on {HOST}, window {args.window}, "
        f"{args.runs} x {args.duration:g} s per configuration (median, range over runs)\n"
    )
    print_table(
        ["configuration", "resp/s", "range", "p50", "p99", "gen CPU", "srv CPU", "other", "note"],
        summary_rows(outcomes),
    )

    def rate(table: dict[str, Outcome], key: str) -> float | None:
        return table[key].median_rate if key in table else None

    def best(table: dict[str, Outcome], key: str) -> float | None:
        return table[key].best_rate if key in table else None

    pinned_ratio = ratio(rate(pinned, "tsunagu"), rate(pinned, "coturn"))
    multi_ratio = ratio(rate(multi, "tsunagu"), rate(multi, "coturn"))
    pinned_best = ratio(best(pinned, "tsunagu"), best(pinned, "coturn"))
    multi_best = ratio(best(multi, "tsunagu"), best(multi, "coturn"))
    print(f"\ntsunagu / coturn, pinned to one core:  {pinned_ratio} (median)  {pinned_best} (best)")
    if not args.skip_workers:
        print(f"tsunagu / coturn, unpinned, workers:   {multi_ratio} (median)  {multi_best} (best)")
    print(
        "CPU columns are % of one core: gen = the generator (user+sys, measured interval; "
        "below 100 % it was\nwaiting on the server), srv = the server and its children, "
        "other = all other processes\n(above ~10 % a neighbour was taking CPU and the "
        "figures are low and noisy)."
    )

    if args.json:
        summary = {
            "window": args.window,
            "runs": args.runs,
            "duration_s": args.duration,
            "configurations": [
                {
                    "label": o.label,
                    "command": o.command,
                    "median_responses_per_s": o.median_rate,
                    "responses_per_s": o.rates,
                    "p50_us": [r.load.p50_us for r in o.runs],
                    "p99_us": [r.load.p99_us for r in o.runs],
                    "generator_cpu_pct": [r.load.cpu_pct for r in o.runs],
                    "server_cpu_pct": [round(r.server_cpu_pct, 1) for r in o.runs],
                    "other_cpu_pct": [round(r.other_cpu_pct, 1) for r in o.runs],
                    "dropped_noisy_runs": len(o.dropped),
                    "noisy_runs_kept": o.noisy_kept,
                    "skipped": o.skipped,
                }
                for o in outcomes
            ],
            "ratio_pinned_median": pinned_ratio,
            "ratio_workers_median": multi_ratio,
            "ratio_pinned_best": pinned_best,
            "ratio_workers_best": multi_best,
        }
        print(json.dumps(summary))
    measured = [o for o in outcomes if o.runs]
    return 0 if measured and "coturn" in pinned and pinned["coturn"].runs else 1


if __name__ == "__main__":
    sys.exit(main())
