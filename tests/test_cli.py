"""The command line, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

from saga_es.persistence.settings import DatabaseSettings

SAGA_ES = shutil.which("saga-es", path=str(Path(sys.executable).parent)) or "saga-es"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SAGA_ES, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_demo_runs_sagas_through_the_relay_and_celery(tmp_path: Path) -> None:
    result = run("demo", "--sagas", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "relay publishes" in out
    assert "in-process broker" in out
    assert "completed" in out
    assert "failed" in out  # orders 3 and 7 compensate
    assert "40 published commands" in out  # 8 completed x 4 + order 3 (2) + order 7 (6)
    assert "SagaCompensated" in out  # the timeline of a compensated saga
    assert (tmp_path / "saga-es-demo.db").exists()


def test_demo_runs_on_real_postgres_and_rabbitmq(
    tmp_path: Path, postgres_url: str, broker_url: str
) -> None:
    result = run(
        "demo", "--sagas", "10", "--postgres", postgres_url, "--broker", broker_url, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "40 published commands" in result.stdout
    assert "SagaCompensated" in result.stdout
    assert not (tmp_path / "saga-es-demo.db").exists()


def test_db_init_creates_the_tables_once_and_again(postgres_server: str) -> None:
    schema = "t_cli_init"
    url = f"{postgres_server}?schema={schema}"
    conninfo = DatabaseSettings.from_url(postgres_server).psycopg_conninfo
    try:
        for _ in range(2):  # idempotent
            result = run("db", "init", "--database-url", url)
            assert result.returncode == 0, result.stderr
        with psycopg.connect(conninfo) as conn:
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (schema,),
                )
            }
        assert {"saga_events", "saga_outbox", "saga_inbox", "saga_timers"} <= tables
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_bad_database_url_is_one_clear_line_and_exit_2() -> None:
    result = run("db", "init", "--database-url", "mysql://somewhere/db")
    assert result.returncode == 2
    assert "scheme must be postgresql:// or sqlite:///" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unreachable_postgres_is_a_clear_error() -> None:
    result = run("db", "init", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 2
    assert "cannot reach PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
