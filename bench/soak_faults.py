"""The soak's faults, injected for real at random intervals from a seeded generator:

- ``worker_kill``: SIGKILL a worker process, start a new one in its place;
- ``worker_stop``: SIGSTOP a worker for longer than the lease, then SIGCONT;
- ``s3_down``: the S3 proxy refuses connections and cuts open ones (5-60 s);
- ``s3_slow``: the proxy holds every chunk of data a while (10-40 s);
- ``s3_reset``: the proxy resets a share of connections mid-request (5-30 s);
- ``pg_kill``: pg_terminate_backend on every connection of the workers to the soak's own
  database;
- ``callback_down``: the callback receiver refuses connections (5-60 s);
- ``callback_hung``: the receiver reads each POST and never answers (5-60 s).

Each resource (the proxy, the receiver, a worker) has at most one fault at a time; every
fault and its end is logged with the time since the start of the load.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from bench.soak_cluster import WORKER_APP, Database, Proc, Processes, ProxyProcess
from bench.soak_receiver import Receiver

# How often each kind is picked, relative to the others.
WEIGHTS = {
    "worker_kill": 2,
    "worker_stop": 2,
    "s3_down": 1,
    "s3_slow": 1,
    "s3_reset": 1,
    "pg_kill": 2,
    "callback_down": 1,
    "callback_hung": 1,
}
KINDS = tuple(WEIGHTS)


@dataclass(frozen=True)
class FaultEvent:
    at: float  # seconds since the load started
    kind: str
    what: str


class Faults:
    def __init__(
        self,
        *,
        processes: Processes,
        proxy: ProxyProcess,
        receiver: Receiver,
        database: Database,
        seed: int,
        lease_seconds: float,
        worker_concurrency: int,
        mean_gap: float,
        started: float,
        say: Callable[[str], None],
    ) -> None:
        self._processes = processes
        self._proxy = proxy
        self._receiver = receiver
        self._database = database
        self._random = random.Random(seed)
        self._lease = lease_seconds
        self._concurrency = worker_concurrency
        self._mean_gap = mean_gap
        self._started = started
        self._say = say
        self._lock = threading.Lock()
        self._busy: dict[str, Callable[[], None]] = {}  # resource -> how its fault ends
        self._timers: list[threading.Timer] = []
        self.events: list[FaultEvent] = []
        self.counts: Counter[str] = Counter()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Inject faults until ``stop`` is set (the first after one gap)."""
        while not stop.wait(self._random.uniform(0.3, 1.7) * self._mean_gap):
            kinds = [kind for kind in KINDS if self._available(kind)]
            if not kinds:
                continue
            kind = self._random.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
            try:
                getattr(self, f"_{kind}")()
            except Exception as exc:  # a fault that could not be made is logged, not fatal
                self._log(kind, f"could not be injected: {type(exc).__name__}: {exc}")

    def _available(self, kind: str) -> bool:
        with self._lock:
            if kind.startswith("s3_"):
                return "proxy" not in self._busy
            if kind.startswith("callback_"):
                return "receiver" not in self._busy
        if kind.startswith("worker_"):
            return bool(self._healthy_workers())
        return True

    def restore(self) -> None:
        """End every fault now: proxy up and clean, receiver up, stopped workers continued."""
        for timer in self._timers:
            timer.cancel()
        with self._lock:
            enders = list(self._busy.values())
        for end in enders:
            end()

    # -- bookkeeping --------------------------------------------------------------------------

    def _log(self, kind: str, what: str) -> None:
        event = FaultEvent(round(time.monotonic() - self._started, 1), kind, what)
        with self._lock:
            self.events.append(event)
        self._say(f"[{event.at:7.1f} s] fault {kind}: {what}")

    def _begin(self, resource: str, kind: str, what: str, seconds: float, end: Callable[[], None]):
        """Record a fault on ``resource`` lasting ``seconds``; ``end`` undoes it (once)."""
        done = threading.Event()

        def finish() -> None:
            if done.is_set():
                return
            done.set()
            with self._lock:
                self._busy.pop(resource, None)
            try:
                end()
                self._log(kind, "over")
            except Exception as exc:
                self._log(kind, f"could not be undone: {type(exc).__name__}: {exc}")

        with self._lock:
            self._busy[resource] = finish
        self.counts[kind] += 1
        self._log(kind, f"{what} for {seconds:.1f} s")
        timer = threading.Timer(seconds, finish)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _healthy_workers(self) -> list[Proc]:
        with self._lock:
            busy = set(self._busy)
        return [p for p in self._processes.workers if p.alive and p.name not in busy]

    # -- the faults ---------------------------------------------------------------------------

    def _worker_kill(self) -> None:
        victim = self._random.choice(self._healthy_workers())
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)
        self._processes.retire(victim)
        new = self._processes.start_worker(self._concurrency)
        self.counts["worker_kill"] += 1
        self._log(
            "worker_kill", f"SIGKILL {victim.name} (pid {victim.process.pid}); started {new.name}"
        )

    def _worker_stop(self) -> None:
        victim = self._random.choice(self._healthy_workers())
        seconds = self._lease + self._random.uniform(2, 15)
        victim.signal(signal.SIGSTOP)
        victim.stopped = True

        def cont() -> None:
            victim.stopped = False
            victim.signal(signal.SIGCONT)

        self._begin(
            victim.name,
            "worker_stop",
            f"SIGSTOP {victim.name} (pid {victim.process.pid})",
            seconds,
            cont,
        )

    def _pg_kill(self) -> None:
        killed = self._database.terminate(WORKER_APP)
        self.counts["pg_kill"] += 1
        self._log("pg_kill", f"pg_terminate_backend on {killed} worker connections")

    def _s3_down(self) -> None:
        self._proxy.command("down")
        self._begin(
            "proxy",
            "s3_down",
            "S3 proxy down",
            self._random.uniform(5, 60),
            lambda: self._proxy.command("up"),
        )

    def _s3_slow(self) -> None:
        delay = round(self._random.uniform(0.05, 0.5), 2)
        self._proxy.command(f"slow {delay}")
        self._begin(
            "proxy",
            "s3_slow",
            f"S3 proxy holds each chunk {delay} s",
            self._random.uniform(10, 40),
            lambda: self._proxy.command("pass"),
        )

    def _s3_reset(self) -> None:
        fraction = round(self._random.uniform(0.2, 0.8), 2)
        self._proxy.command(f"reset {fraction} {512 * 1024}")
        self._begin(
            "proxy",
            "s3_reset",
            f"S3 proxy resets {fraction:.0%} of connections",
            self._random.uniform(5, 30),
            lambda: self._proxy.command("pass"),
        )

    def _callback_down(self) -> None:
        self._receiver.stop()
        self._begin(
            "receiver",
            "callback_down",
            "callback receiver down",
            self._random.uniform(5, 60),
            self._receiver.start,
        )

    def _callback_hung(self) -> None:
        self._receiver.hang()
        self._begin(
            "receiver",
            "callback_hung",
            "callback receiver hangs",
            self._random.uniform(5, 60),
            self._receiver.release,
        )
