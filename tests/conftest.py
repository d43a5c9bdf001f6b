"""Shared fixtures.

PostgreSQL tests use the server named by SAGA_ES_TEST_POSTGRES_URL (default: the local ``test``
database) and never skip: if it is unreachable they fail with a message saying so. Each test gets
its own schema, dropped afterwards; SQLite tests get a file in the test's tmp_path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore, init_database

DEFAULT_TEST_POSTGRES = "postgresql://root@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgres"]


def postgres_base_url() -> str:
    return os.environ.get("SAGA_ES_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    url = postgres_base_url()
    conninfo = DatabaseSettings.from_url(url).psycopg_conninfo
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {url} ({exc}). These tests need a real server: start "
            "it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) or "
            "point SAGA_ES_TEST_POSTGRES_URL at one.",
            pytrace=False,
        )
    return url


def _new_schema_url(base: str) -> tuple[str, str]:
    schema = f"t_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in base else "?"
    return schema, f"{base}{sep}schema={schema}"


def drop_schema(base: str, schema: str) -> None:
    conninfo = DatabaseSettings.from_url(base).psycopg_conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, initialised schema for this test only."""
    schema, url = _new_schema_url(postgres_server)
    init_database(DatabaseSettings.from_url(url))
    try:
        yield url
    finally:
        drop_schema(postgres_server, schema)


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    url = f"sqlite:///{tmp_path}/sagas.db"
    init_database(DatabaseSettings.from_url(url))
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once per backend: the storage contract is the same."""
    fixture = "postgres_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def store(database_url: str) -> Iterator[SagaStore]:
    s = SagaStore(DatabaseSettings.from_url(database_url), create_tables=False)
    yield s
    s.close()


def tables(store: SagaStore) -> dict[str, Any]:
    """Everything a decision may write, for 'nothing changed' comparisons."""
    return {
        "events": store.count("events"),
        "outbox": store.outbox(),
        "inbox": store.count("saga_inbox"),
        "timers": store.timers(),
    }


ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "lines": [{"sku": "SKU-1", "quantity": 2}],
    "amount": "25.00",
    "currency": "EUR",
}


def order(n: int | str = 1) -> dict[str, Any]:
    return {**ORDER, "order_id": f"o-{n}"}


# -- RabbitMQ ---------------------------------------------------------------------------------

RABBITMQ_HOST = os.environ.get("SAGA_ES_TEST_RABBITMQ", "guest:guest@127.0.0.1:5672")


def _rabbitmqctl(*args: str) -> None:
    import subprocess

    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A RabbitMQ virtual host for this test run; deleting it at the end removes every queue
    and exchange the tests declared. Fails, never skips, when RabbitMQ is unreachable."""
    import socket

    host, port = RABBITMQ_HOST.rsplit("@", 1)[-1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ is unreachable at {host}:{port} ({exc}). These tests need a real broker: "
            "start it (rabbitmq-server -detached).",
            pytrace=False,
        )
    vhost = f"saga_es_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://{RABBITMQ_HOST}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


# -- the compose topology as local processes --------------------------------------------------

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def topology(
    request: pytest.FixtureRequest, postgres_server: str, broker_url: str, tmp_path: Any
) -> Iterator[Any]:
    """docker-compose.yml's services on schemas of this test's own (the engine's and the
    example services', as in production) and the session's virtual host; not started yet
    (``topology.up()``). Everything is stopped, the schemas dropped and the queues emptied
    afterwards; a failing test shows the processes' logs."""
    from broker import purge
    from topology import QUEUES, Topology

    sagas_schema, sagas_url = _new_schema_url(postgres_server)
    shop_schema, shop_url = _new_schema_url(postgres_server)
    running = Topology(
        tmp_path, database_url=sagas_url, examples_database_url=shop_url, broker_url=broker_url
    )
    try:
        yield running
    finally:
        try:
            running.down()
            if request.node.stash.get(_FAILED, False):
                print(running.logs())
            purge(broker_url, *QUEUES)
        finally:
            for schema in (sagas_schema, shop_schema):
                drop_schema(postgres_server, schema)
