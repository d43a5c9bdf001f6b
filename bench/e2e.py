"""End to end: completed 4-step order sagas per second, against a Celery chain, same run.

Ours: the engine worker (``saga-es worker``, recording waiting replies together), the outbox
relay (``saga-es relay``) and the participants (bench/e2e_participants.py: the SDK around one
INSERT per step, like the chain's tasks) as separate processes, RabbitMQ and PostgreSQL. Sagas are
started from this process through the engine (each start commits the saga's first event and
outbox row); a saga is done when its stream records SagaCompleted or SagaCompensated.

Baseline: the same four steps as a Celery ``chain`` (each task one INSERT + COMMIT) with a
``link_error`` compensation, RabbitMQ with confirms, ``--pool=prefork -c 2`` (bench/chain_app.py);
done when the last task or the compensation has written its row.

Both scenarios: every saga succeeds; every saga fails at step 3 (the shipment) and compensates.
Each side gets a fresh PostgreSQL schema and a fresh RabbitMQ virtual host, removed afterwards.
Timing runs from the first submission to the last saga done, after a warm-up batch; both
sides are watched alike, by one connection counting finished sagas every 20 ms. The CPU each
process, PostgreSQL, RabbitMQ and the whole machine spent per saga is printed too.

    python bench/e2e.py [--sagas 500] [--database-url ...] [--rabbitmq guest:guest@127.0.0.1:5672]

Ends with one line per scenario, the success path last:

    ratio=<ours/baseline> ours=<sagas/s> baseline=<sagas/s> unit=sagas/s
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg

from saga_es.demo.order_saga import Order, OrderLine, order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import init_database

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_URL = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_RABBITMQ = "guest:guest@127.0.0.1:5672"
# The benchmark's worker modules live in bench/, after the project: bench/projections.py must
# not hide the projections package.
# Participants on thread pools: their work is database round trips and broker confirms, which
# threads overlap (solo pools, one process per queue, measured slower).
POOL = ["-P", "threads", "-c", "4"]
PARTICIPANT_QUEUES = ("inventory,payment", "shipping,notification")
PYTHONPATH = os.pathsep.join((str(ROOT), str(ROOT / "bench")))


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def vhost(rabbitmq: str) -> Iterator[str]:
    name = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://{rabbitmq}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


@contextmanager
def schema(base_url: str) -> Iterator[tuple[str, str]]:
    name = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conninfo = DatabaseSettings.from_url(base_url).psycopg_conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name, f"{base_url}{'&' if '?' in base_url else '?'}schema={name}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _processes() -> Iterator[tuple[int, str, int, float]]:
    """(pid, command name, parent pid, CPU seconds) of every live process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, fields = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        numbers = fields.split()
        yield int(entry.name), name, int(numbers[1]), (int(numbers[11]) + int(numbers[12])) / tick


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for child, _, parent, seconds in _processes():
        parents[child] = parent
        times[child] = seconds
    total, family = 0.0, {pid}
    for child in sorted(parents):  # descendants: a parent's pid is smaller unless pids wrapped
        if child in family or parents[child] in family:
            family.add(child)
            total += times.get(child, 0.0)
    return total


@contextmanager
def processes(*commands: tuple[list[str], dict[str, str]]) -> Iterator[CpuMeter]:
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    running = []
    try:
        for argv, env in commands:
            log = (logs / f"bench-e2e-{Path(argv[0]).name}-{len(running)}.log").open("wb")
            running.append(
                subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log)
            )
        yield CpuMeter(
            {_label(argv): p.pid for (argv, _), p in zip(commands, running, strict=True)}
        )
    finally:
        for p in running:
            p.terminate()
        for p in running:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _label(argv: list[str]) -> str:
    named = next((a for a in argv if "@" in a), None)
    return named.split("@")[0] if named else " ".join(Path(a).name for a in argv[:2])


class CpuMeter:
    """CPU seconds each process (this one included) spends between ``start`` and ``stop``:
    where the time of a saga goes, on a machine where every process shares the same cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return {
            **now,
            "submitter": time.process_time(),
            **_servers_seconds(),
            "machine": _machine_busy_seconds(),
        }

    def start(self) -> None:
        self.before = self._now()

    def stop(self) -> None:
        after = self._now()
        self.spent = {name: after[name] - self.before[name] for name in after}

    def per_saga(self, sagas: int) -> str:
        spent = dict(self.spent)
        machine = 1000 * spent.pop("machine") / sagas
        servers = {name: 1000 * spent.pop(name) / sagas for name in SERVERS}
        parts = [f"{name} {1000 * s / sagas:.1f}" for name, s in spent.items()]
        total = 1000 * sum(spent.values()) / sagas
        return (
            f"CPU ms/saga: {', '.join(parts)}; total {total:.1f}; "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in servers.items())
            + f"; whole machine {machine:.1f}"
        )


#: The servers' processes by command name, measured apart from ours. Processes that ended
#: during the run (a PostgreSQL backend of a closed connection) count in the machine's total.
SERVERS = {"PostgreSQL": ("postgres",), "RabbitMQ": ("beam.smp", "erl_child_setup", "epmd")}


def _servers_seconds() -> dict[str, float]:
    seconds = dict.fromkeys(SERVERS, 0.0)
    for _, command, _, cpu in _processes():
        for server, commands in SERVERS.items():
            if command in commands:
                seconds[server] += cpu
    return seconds


def _machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (every core), from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for(count: Callable[[], int], target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := count()) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {target} done after {timeout:.0f}s")
        time.sleep(0.02)


def order(key: str) -> Order:
    return Order(
        order_id=key,
        customer_id="c-1",
        lines=[OrderLine(sku="SKU-1", quantity=1)],
        amount=Decimal("10.00"),
        currency="EUR",
    )


def ours(base_url: str, rabbitmq: str, sagas: int, fail_at_shipment: bool) -> float:
    with schema(base_url) as (name, url), vhost(rabbitmq) as broker:
        init_database(DatabaseSettings.from_url(url))
        env = {
            "SAGA_ES_DATABASE_URL": url,
            "SAGA_ES_BROKER_URL": broker,
            "SAGA_ES_EXAMPLES_DATABASE_URL": url,
            "PYTHONPATH": PYTHONPATH,
        }
        subprocess.run(
            [sys.executable, "-c", "import e2e_participants; e2e_participants.create_tables()"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        conninfo = DatabaseSettings.from_url(base_url).psycopg_conninfo
        # Only the events logged since the last look: the log commits in notification id
        # order (the events table is locked per insert), so none can appear behind it. By the
        # notification id index (see below): a scan of the whole log every 20 ms cost
        # PostgreSQL 1.4 ms per look, more than some of what the run measures.
        logged = (
            f'SELECT notification_id, topic FROM "{name}".saga_events '
            "WHERE notification_id > %s ORDER BY notification_id"
        )
        ends = {"saga_es.events:SagaCompleted", "saga_es.events:SagaCompensated"}
        position, finished = 0, 0

        def done() -> int:
            nonlocal position, finished
            rows = watcher.execute(logged, (position,)).fetchall()
            if rows:
                position = rows[-1][0]
                finished += sum(1 for _, topic in rows if topic in ends)
            return finished

        # I/O-bound workers (a database round trip or a broker confirm per step): threads
        # overlap those waits; the engine is thread-safe, the participants' sessions too.
        celery = [str(BIN / "celery")]
        quiet = ["-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        services = [
            (
                [str(BIN / "saga-es"), "worker", "--log-level", "WARNING"],
                env,
            ),
            ([str(BIN / "saga-es"), "relay", "--log-level", "WARNING"], env),
            *(
                (
                    [
                        *celery,
                        "-A",
                        "e2e_participants",
                        "worker",
                        *POOL,
                        "-Q",
                        queues,
                        "-n",
                        f"participants{n}@%h",
                        *quiet,
                    ],
                    env,
                )
                for n, queues in enumerate(PARTICIPANT_QUEUES)
            ),
        ]
        prefix = "fail-" if fail_at_shipment else "ok-"
        with (
            psycopg.connect(conninfo, autocommit=True) as watcher,
            processes(*services) as cpu,
            SagaEngine([order_fulfillment], database_url=url) as engine,
        ):
            # The table is new and not analysed yet: the planner would guess a third of the
            # log matches and scan it all.
            watcher.execute("SET enable_seqscan = off")
            for i in range(10):  # warm-up: every process connected and serving
                key = f"{prefix}warm-{i}"
                engine.start(order_fulfillment, order(key), business_key=key)
            wait_for(done, 10, 120)
            cpu.start()
            started = time.perf_counter()
            for i in range(sagas):
                engine.start(order_fulfillment, order(f"{prefix}{i}"), business_key=f"{prefix}{i}")
            wait_for(done, 10 + sagas, 600)
            rate = sagas / (time.perf_counter() - started)
            cpu.stop()
            print(f"  saga-es      {cpu.per_saga(sagas)}", flush=True)
            return rate


def chain(base_url: str, rabbitmq: str, sagas: int, fail_at_shipment: bool) -> float:
    sys.path.insert(0, str(ROOT / "bench"))
    with schema(base_url) as (name, _), vhost(rabbitmq) as broker:
        conninfo = DatabaseSettings.from_url(base_url).psycopg_conninfo
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{name}".chain_effects (id bigserial PRIMARY KEY, '
                "order_id text NOT NULL, step text NOT NULL, compensated boolean DEFAULT false)"
            )
        env = {"CHAIN_DATABASE": conninfo, "CHAIN_SCHEMA": name, "CHAIN_BROKER_URL": broker}
        import chain_app

        client = chain_app.make_app(broker)
        last = "compensated" if fail_at_shipment else "notify"

        watcher = psycopg.connect(conninfo, autocommit=True)

        def done() -> int:
            sql = f'SELECT count(*) FROM "{name}".chain_effects WHERE step = %s'
            row = watcher.execute(sql, (last,)).fetchone()
            return int(row[0]) if row else 0

        def submit(order_id: str) -> None:
            steps = client.signature("chain.reserve", args=(order_id,))
            for task in ("chain.charge", "chain.ship", "chain.notify"):
                steps = steps | client.signature(task)
            steps.apply_async(link_error=client.signature("chain.compensate", args=(order_id,)))

        worker = (
            [
                str(BIN / "celery"),
                "-A",
                "chain_app",
                "worker",
                "--pool=prefork",
                "-c",
                "2",
                "-Q",
                "chain",
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            {**env, "PYTHONPATH": PYTHONPATH},
        )
        prefix = "fail-" if fail_at_shipment else "ok-"
        try:
            with processes(worker) as cpu:
                for i in range(10):
                    submit(f"{prefix}warm-{i}")
                wait_for(done, 10, 120)
                cpu.start()
                started = time.perf_counter()
                for i in range(sagas):
                    submit(f"{prefix}{i}")
                wait_for(done, 10 + sagas, 600)
                rate = sagas / (time.perf_counter() - started)
                cpu.stop()
                print(f"  Celery chain {cpu.per_saga(sagas)}", flush=True)
                return rate
        finally:
            watcher.close()
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=500)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--rabbitmq", default=DEFAULT_RABBITMQ, help="user:password@host:port")
    args = parser.parse_args(argv)
    results = []
    for label, failing in (("failure at step 3", True), ("success path", False)):
        theirs = chain(args.database_url, args.rabbitmq, args.sagas, failing)
        mine = ours(args.database_url, args.rabbitmq, args.sagas, failing)
        print(
            f"{label:18}: saga-es {mine:7.1f} sagas/s   Celery chain {theirs:7.1f} sagas/s",
            flush=True,
        )
        results.append((label, mine, theirs))
    for label, mine, theirs in results:
        print(f"# {label}")
        print(f"ratio={mine / theirs:.2f} ours={mine:.1f} baseline={theirs:.1f} unit=sagas/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
