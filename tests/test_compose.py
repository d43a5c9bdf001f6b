"""docker-compose.yml, run without Docker: its saga-es commands as local processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import _new_schema_url, drop_schema

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
