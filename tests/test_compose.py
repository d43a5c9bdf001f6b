"""docker-compose.yml, run without Docker: its saga-es commands as local processes.

The sagas that run through the whole topology are in test_e2e.py and test_crash.py; here, how
tests/topology.py reads the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import _new_schema_url, drop_schema
from topology import EXAMPLES_DATABASE_URL_ENV, compose_services

from saga_es.messaging import BROKER_URL_ENV
from saga_es.persistence.settings import DATABASE_URL_ENV, DatabaseSettings
from saga_es.persistence.store import SagaStore

ROOT = Path(__file__).resolve().parents[1]
SAGA_ES = shutil.which("saga-es", path=str(Path(sys.executable).parent)) or "saga-es"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_saga_es_service_uses_the_image_and_waits_for_postgres() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if s.get("image") == "saga-es:latest"}
    assert "db-init" in ours
    for name, service in ours.items():
        assert "postgres" in service["depends_on"], name
        assert service["environment"][DATABASE_URL_ENV].startswith("postgresql://")
    assert ours["db-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_db_init_service_command_creates_the_schema(postgres_server: str) -> None:
    service = compose()["services"]["db-init"]
    schema, url = _new_schema_url(postgres_server)
    env = {**os.environ, **service["environment"], DATABASE_URL_ENV: url}
    try:
        result = subprocess.run(
            [SAGA_ES, *service["command"]], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        # Workers start with table creation off: this only works because db-init ran.
        SagaStore(DatabaseSettings.from_url(url), create_tables=False).close()
    finally:
        drop_schema(postgres_server, schema)


def test_the_topology_runs_each_service_as_compose_says_on_the_tests_urls() -> None:
    urls = {
        DATABASE_URL_ENV: "postgresql://root@127.0.0.1:5432/test?schema=t_sagas",
        EXAMPLES_DATABASE_URL_ENV: "postgresql://root@127.0.0.1:5432/test?schema=t_shop",
        BROKER_URL_ENV: "amqp://guest:guest@127.0.0.1:5672/t_vhost",
    }
    specs = compose_services(urls)
    by_name = {spec.name: spec for spec in specs}
    services = compose()["services"]

    assert set(by_name) == {n for n, s in services.items() if s.get("image") == "saga-es:latest"}
    assert [s.name for s in specs if s.init] == ["db-init", "examples-init"]
    assert all(s.init for s in specs[:2]), "init services run first"
    assert by_name["db-init"].argv == (SAGA_ES, "db", "init")  # the image's ENTRYPOINT
    assert by_name["examples-init"].argv == (
        sys.executable, "-m", "examples.order_fulfillment", "init-db")  # fmt: skip
    assert by_name["relay"].argv == (SAGA_ES, "relay")
    assert by_name["relay"].replicas == 2
    # Several timer processes may run: they claim disjoint timers.
    assert by_name["timers"].argv == (SAGA_ES, "timers", "run")
    assert by_name["timers"].replicas == 2
    assert by_name["timers"].ready_line == "timers started"
    assert by_name["payment"].argv == (
        str(Path(sys.executable).parent / "celery"), *services["payment"]["command"])  # fmt: skip
    for spec in specs:
        assert dict(spec.environment) == urls, spec.name


def test_the_topology_refuses_a_compose_url_it_does_not_replace() -> None:
    with pytest.raises(ValueError, match="rabbitmq"):
        compose_services({DATABASE_URL_ENV: "x", EXAMPLES_DATABASE_URL_ENV: "y"})
