"""docker-compose.yml's saga-es services as local processes: the production topology in a test.

    topology.up()                                   # init services, then every other service
    sagas = topology.start_orders(["a-1", "a-2"])
    topology["payment"].kill9(); topology["payment"].restart()
    topology.settle(sagas)

Compose is the source of truth. Every service that runs the ``saga-es:latest`` image becomes
``entrypoint + command``: the service's ``entrypoint``, or the image's ENTRYPOINT (read from the
Dockerfile), with ``python`` and the console scripts resolved to this virtualenv. It gets the
service's environment with its database and broker URLs pointed at the test's PostgreSQL
schemas and RabbitMQ virtual host, and runs ``deploy.replicas`` times. The services that others
wait for with ``service_completed_successfully`` run first, to completion, and must exit 0.

Two adjustments for running on one machine, neither about what the processes do: celery
workers also get ``celery_args`` (default ``CELERY_WORKER_ARGS``: start fast, log each task
received) and one hostname per replica, as each container has its own; the test may add
environment (``up(env=...)``), for instance shorter participant retry delays.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import yaml
from broker import SERVICE_QUEUES, purge
from conftest import order
from example_services import ExampleDatabase
from processes import BIN, Process, Processes, wait_until

from saga_es.definition import SagaDefinition
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messaging import BROKER_URL_ENV, REPLY_QUEUE
from saga_es.persistence.settings import DATABASE_URL_ENV, DatabaseSettings
from saga_es.state import SagaState
from saga_es.testing.invariants import sagas_left_hanging

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "saga-es:latest"
EXAMPLES_DATABASE_URL_ENV = "SAGA_ES_EXAMPLES_DATABASE_URL"
QUEUES = (*SERVICE_QUEUES, REPLY_QUEUE)
CELERY_WORKER_ARGS = ("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info")
TERMINAL_TOPICS = [
    f"saga_es.events:{name}" for name in ("SagaCompleted", "SagaCompensated", "SagaStuck")
]
_RECEIVED = re.compile(r"Task ([\w.]+)\[([^\]]+)\] received")


@dataclass(frozen=True)
class Effects:
    """What the example services did for one saga: rows written, and rows undone."""

    reserved: int = 0
    released: int = 0
    charged: int = 0
    refunded: int = 0
    shipped: int = 0
    notified: int = 0


NOTHING = Effects()
#: One order line each (``conftest.order``): one reservation per saga.
COMPLETED = Effects(reserved=1, charged=1, shipped=1, notified=1)
FAILED_AT_RESERVE = NOTHING
FAILED_AT_CHARGE = Effects(reserved=1, released=1)
FAILED_AT_SHIPPING = Effects(reserved=1, released=1, charged=1, refunded=1)


# -- docker-compose.yml -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """One compose service as a local command."""

    name: str
    argv: tuple[str, ...]
    environment: Mapping[str, str]
    replicas: int
    init: bool  # others wait for it to complete successfully

    @property
    def celery(self) -> bool:
        return Path(self.argv[0]).name == "celery"

    @property
    def ready_line(self) -> str | None:
        """What a replica logs once it consumes or publishes (None: started is ready)."""
        if "worker" in self.argv:
            return " ready."
        if "relay" in self.argv:
            return "relay started"
        if "timers" in self.argv:
            return "timers started"
        return None


def image_entrypoint(dockerfile: Path = DOCKERFILE) -> list[str]:
    found = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"{dockerfile}: no ENTRYPOINT in exec form")
    return [str(part) for part in json.loads(found.group(1))]


def executable(name: str) -> str:
    """A container's command name, resolved to this virtualenv."""
    if name in ("python", "python3"):
        return sys.executable
    if (BIN / name).exists():
        return str(BIN / name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not in {BIN} nor on PATH")
    return found


def _environment(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):  # the "KEY=value" form
        return dict(str(item).split("=", 1) for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in dict(raw).items()}


def compose_services(
    urls: Mapping[str, str], compose: Path = COMPOSE, dockerfile: Path = DOCKERFILE
) -> list[ServiceSpec]:
    """The image's services, init services first. ``urls`` replaces environment variables
    (the database and broker URLs); any other value still naming a compose host is an error."""
    services: dict[str, Any] = yaml.safe_load(compose.read_text())["services"]
    default_entrypoint = image_entrypoint(dockerfile)
    awaited = {
        dependency
        for service in services.values()
        if isinstance(service.get("depends_on"), dict)  # the list form states no condition
        for dependency, how in service["depends_on"].items()
        if (how or {}).get("condition") == "service_completed_successfully"
    }
    hosts = "|".join(re.escape(n) for n, s in services.items() if s.get("image") != IMAGE)
    names_a_host = re.compile(rf"//([^/@]*@)?({hosts})[:/]")
    specs = []
    for name, service in services.items():
        if service.get("image") != IMAGE:
            continue
        entrypoint = service.get("entrypoint") or default_entrypoint
        if isinstance(entrypoint, str):
            entrypoint = entrypoint.split()
        command = service.get("command") or []
        if isinstance(command, str):
            command = command.split()
        environment = _environment(service.get("environment"))
        environment.update({k: v for k, v in urls.items() if k in environment})
        stale = {k: v for k, v in environment.items() if names_a_host.search(v)}
        if stale:
            raise ValueError(f"service {name}: environment still names compose hosts: {stale}")
        argv = (executable(str(entrypoint[0])), *map(str, entrypoint[1:]), *map(str, command))
        replicas = int(((service.get("deploy") or {}).get("replicas")) or 1)
        specs.append(ServiceSpec(name, argv, environment, replicas, init=name in awaited))
    return sorted(specs, key=lambda s: not s.init)


# -- running it -------------------------------------------------------------------------------


class Service:
    """The replicas of one long-running service: kill -9 them, start them again."""

    def __init__(
        self,
        spec: ServiceSpec,
        processes: Processes,
        env: Mapping[str, str],
        celery_args: Sequence[str] = CELERY_WORKER_ARGS,
    ) -> None:
        self.spec, self.processes, self.env = spec, processes, dict(env)
        self.celery_args = list(celery_args)
        self.replicas: list[Process] = []

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def process(self) -> Process:
        """The one replica of a service that has one."""
        assert len(self.replicas) == 1, f"{self.name} has {len(self.replicas)} replicas"
        return self.replicas[0]

    def argv(self, replica: int) -> list[str]:
        argv = list(self.spec.argv)
        if self.spec.celery:
            argv += [*self.celery_args, "--hostname", f"{self.name}-{replica}@%h"]
        return argv

    def launch(self) -> None:
        """Start every replica that is not running, without waiting for them."""
        for index in range(self.spec.replicas):
            if index == len(self.replicas):
                name = self.name if self.spec.replicas == 1 else f"{self.name}-{index + 1}"
                self.replicas.append(self.processes.start(name, self.argv(index + 1), **self.env))
            elif not self.replicas[index].running():
                self.replicas[index].start()

    def wait_ready(self, timeout: float = 60.0) -> Service:
        for process in self.replicas:
            ready = functools.partial(self._ready, process)
            wait_until(ready, timeout=timeout, what=f"{process.name} to be ready")
            assert process.running(), f"{process.name} exited:\n{process.output()[-4000:]}"
        return self

    def _ready(self, process: Process) -> bool:
        """Exited (the caller says so), or logged its ready line once per start."""
        marker = self.spec.ready_line
        if not process.running() or marker is None:
            return True
        return process.output().count(marker) >= process.starts

    def restart(self) -> Service:
        """Start the replicas that are not running (after ``kill9``) and wait until ready."""
        self.launch()
        return self.wait_ready()

    def kill9(self, replica: int | None = None) -> None:
        for process in self.replicas if replica is None else [self.replicas[replica]]:
            process.kill9()

    def running(self) -> bool:
        return bool(self.replicas) and all(p.running() for p in self.replicas)

    def output(self) -> str:
        return "".join(p.output() for p in self.replicas)

    def count_in_log(self, text: str) -> int:
        return self.output().count(text)


class Topology:
    """The compose services on the test's schemas and virtual host, plus what a test needs to
    drive and inspect them: an engine on the same database, and the example services' tables."""

    def __init__(
        self,
        directory: Path,
        *,
        database_url: str,
        examples_database_url: str,
        broker_url: str,
        celery_args: Sequence[str] = CELERY_WORKER_ARGS,
    ) -> None:
        self.directory = directory
        self.celery_args = list(celery_args)
        self.database_url, self.broker_url = database_url, broker_url
        self.examples_database_url = examples_database_url
        self.specs = compose_services(
            {
                DATABASE_URL_ENV: database_url,
                EXAMPLES_DATABASE_URL_ENV: examples_database_url,
                BROKER_URL_ENV: broker_url,
            }
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_ES_")}
        self.processes = Processes(directory, base)
        self.services: dict[str, Service] = {}
        self._engine: SagaEngine | None = None
        self._shop: ExampleDatabase | None = None
        self._connections: dict[str, psycopg.Connection[Any]] = {}

    # -- up and down --------------------------------------------------------------------------

    def up(self, *, without: Iterable[str] = (), env: Mapping[str, str] | None = None) -> None:
        """Run the init services to completion (exit 0), then start every other service but
        ``without`` (started later with ``start``), and wait until they are all ready."""
        purge(self.broker_url, *QUEUES)  # nothing an earlier test left may leak in
        extra = dict(env or {})
        inits = [s for s in self.specs if s.init]
        running = [
            subprocess.Popen(
                spec.argv,
                env={**self.processes.env, **spec.environment, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for spec in inits
        ]  # independent of each other, as in compose: concurrently
        for spec, init in zip(inits, running, strict=True):
            try:
                output, _ = init.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                init.kill()
                output, _ = init.communicate()
            assert init.returncode == 0, f"{spec.name} exited {init.returncode}:\n{output}"
        skipped = set(without)
        for spec in self.specs:
            if not spec.init:
                env = {**spec.environment, **extra}
                self.services[spec.name] = Service(spec, self.processes, env, self.celery_args)
        unknown = skipped - set(self.services)
        assert not unknown, f"no such services: {unknown}"
        for service in self.services.values():
            if service.name not in skipped:
                service.launch()
        for service in self.services.values():
            if service.name not in skipped:
                service.wait_ready()

    def start(self, name: str) -> Service:
        return self[name].restart()

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def down(self) -> None:
        """Kill every process (-9: a graceful stop is not what the tests look at, and takes
        seconds per worker) and wait for it; close the connections. Safe to call twice."""
        for process in self.processes.all:
            process.kill9()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._shop is not None:
            self._shop.close()
            self._shop = None
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def logs(self) -> str:
        return self.processes.logs()

    # -- the databases ------------------------------------------------------------------------

    @property
    def engine(self) -> SagaEngine:
        if self._engine is None:
            self._engine = SagaEngine([order_fulfillment], database_url=self.database_url)
        return self._engine

    @property
    def shop(self) -> ExampleDatabase:
        """The example services' tables, their inbox and their fault switches."""
        if self._shop is None:
            self._shop = ExampleDatabase(self.examples_database_url)
        return self._shop

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement on the saga database; ``{schema}`` names its schema."""
        return self._run(self.database_url, statement, params)

    def shop_sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement on the example services' database; ``{schema}`` names its schema."""
        return self._run(self.examples_database_url, statement, params)

    def _run(self, url: str, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        settings = DatabaseSettings.from_url(url)
        conn = self._connections.get(url)
        if conn is None or conn.closed:  # one per database, kept: tests poll with these
            conn = self._connections[url] = psycopg.connect(
                settings.psycopg_conninfo, autocommit=True
            )
        cursor = conn.execute(statement.format(schema=f'"{settings.schema}"'), list(params))
        return cursor.fetchall() if cursor.description else []

    # -- driving sagas ------------------------------------------------------------------------

    def start_orders(
        self,
        keys: Iterable[str],
        *,
        definition: SagaDefinition = order_fulfillment,
        clock: Callable[[], datetime] | None = None,
    ) -> dict[str, UUID]:
        """Start one order saga per key (order id ``o-<key>``); saga ids by key. ``clock``:
        start them as if at that time (an hour ago: their first deadline has passed)."""
        if clock is None:
            engine = self.engine
        else:
            engine = SagaEngine([definition], database_url=self.database_url, clock=clock)
        try:
            return {
                key: engine.start(definition, order(key), business_key=f"o-{key}").saga_id
                for key in keys
            }
        finally:
            if engine is not self.engine:
                engine.close()

    def timed_out_and_retried(self, sagas: Iterable[UUID]) -> bool:
        """Whether every saga in ``sagas`` waits for attempt 2 of a step (its first attempt's
        deadline fired, then the retry it scheduled)."""
        waiting = [self.engine.get_state(s).awaiting for s in sagas]
        return all(a is not None and a.attempt == 2 for a in waiting)

    def terminal(self, sagas: Sequence[UUID]) -> int:
        """How many of ``sagas`` have ended (completed, compensated or stuck)."""
        rows = self.sql(
            "SELECT count(*) FROM {schema}.saga_events "
            "WHERE topic = ANY(%s) AND originator_id = ANY(%s)",
            [TERMINAL_TOPICS, list(sagas)],
        )
        return int(rows[0][0])

    def unpublished(self) -> int:
        rows = self.sql("SELECT count(*) FROM {schema}.saga_outbox WHERE published_at IS NULL")
        return int(rows[0][0])

    def replies_handled(self) -> int:
        return self.engine.store.count("saga_inbox")

    def settle(
        self,
        sagas: Iterable[UUID],
        *,
        timeout: float = 90.0,
        also: Callable[[], object] | None = None,
    ) -> dict[UUID, SagaState]:
        """Wait until every saga in ``sagas`` has ended and the outbox is empty (every row
        published and marked). Their states. Timers are the timer service's business."""
        ids = list(sagas)
        deadline = time.monotonic() + timeout

        def ended() -> bool:
            if also is not None:
                also()
            return self.terminal(ids) == len(ids)

        try:
            # Each poll is a query over the sagas' events: a large run is polled less often,
            # not to take the machine from the processes under test.
            interval = 0.05 if len(ids) <= 100 else 0.5
            wait_until(ended, timeout=timeout, what=f"{len(ids)} sagas to end", interval=interval)
            wait_until(
                lambda: self.unpublished() == 0,
                timeout=max(5.0, deadline - time.monotonic()),
                what="every outbox row to be published and marked",
            )
        except AssertionError as exc:
            waiting = [
                f"{s}: {st.status.value} at {st.current_step}"
                for s in ids
                if not (st := self.engine.get_state(s)).is_terminal
            ]
            raise AssertionError(f"{exc}; not ended: {waiting[:10]}\n{self.logs()}") from None
        return {s: self.engine.get_state(s) for s in ids}

    # -- what happened ------------------------------------------------------------------------

    def effects(self) -> dict[UUID, Effects]:
        """Per saga, what the example services did (counted in their tables)."""
        found: dict[UUID, dict[str, int]] = {}
        queries = {
            ("reserved", "released"): "SELECT saga_id, count(*), count(released_at) "
            "FROM {schema}.example_reservations GROUP BY saga_id",
            ("charged", "refunded"): "SELECT saga_id, count(*), count(refunded_at) "
            "FROM {schema}.example_charges GROUP BY saga_id",
            ("shipped",): "SELECT saga_id, count(*) FROM {schema}.example_shipments GROUP BY 1",
            ("notified",): "SELECT saga_id, count(*) FROM {schema}.example_notifications "
            "GROUP BY 1",
        }
        for fields, statement in queries.items():
            for saga_id, *counts in self.shop_sql(statement):
                found.setdefault(saga_id, {}).update(zip(fields, counts, strict=True))
        return {saga_id: Effects(**counts) for saga_id, counts in found.items()}

    def assert_at_rest(
        self,
        expected: Mapping[UUID, Effects],
        *,
        saga_dead_letters: int = 0,
        participant_dead_letters: int = 0,
    ) -> None:
        """What must hold once a run is over: each saga's effects exactly as expected (each
        happened once, or not at all), every outbox row published and none parked, no saga
        left hanging, and no message dead-lettered but those the test sent on purpose."""
        effects = self.effects()
        wrong = {s: (effects.get(s, NOTHING), e) for s, e in expected.items()}
        wrong = {s: pair for s, pair in wrong.items() if pair[0] != pair[1]}
        assert not wrong, f"{len(wrong)} sagas (found, expected): {list(wrong.items())[:5]}"
        assert set(effects) <= set(expected), "effects of sagas the test did not start"
        rows = self.sql(
            "SELECT count(*), count(published_at), count(parked_at) FROM {schema}.saga_outbox"
        )[0]
        assert rows[1] == rows[0], f"{rows[0] - rows[1]} of {rows[0]} outbox rows unpublished"
        assert rows[2] == 0, f"{rows[2]} outbox rows parked"
        assert sagas_left_hanging(self.engine.store) == []
        letters = self.engine.store.dead_letters()
        assert len(letters) == saga_dead_letters, letters
        assert len(self.shop.dead_letters()) == participant_dead_letters

    # -- what the logs say --------------------------------------------------------------------

    def received(self, *names: str) -> Counter[str]:
        """Deliveries per task id (each celery "Task ...[id] received" line) to the replicas
        of the named services."""
        found: Counter[str] = Counter()
        for name in names:
            for _task, task_id in _RECEIVED.findall(self[name].output()):
                found[task_id] += 1
        return found


def participant_services(topology: Topology) -> list[str]:
    return [name for name, s in topology.services.items() if s.spec.celery]


#: A saga that went straight through: each step's command issued once and answered once.
HAPPY_EVENTS = ["SagaStarted", *["StepCommandIssued", "StepSucceeded"] * 4, "SagaCompleted"]


def kinds(topology: Topology, saga_id: UUID) -> list[str]:
    """The saga's events, by class name."""
    return [type(e).__name__ for e in topology.engine.events(saga_id)]
