"""The inspection commands as a user runs them: tables, ``--json``, and bad input refused in
one line with exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from processes import BIN
from projection_support import drive_one

from saga_es.cli import main
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.testing.clock import VirtualClock


@pytest.fixture(scope="module")
def sagas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A few sagas on SQLite, projected once, shared by the tests here (they only read)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cli')}/sagas.db"
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=url, clock=clock) as engine:
        ids = {
            kind: drive_one(engine, clock, f"o-{kind}", kind)
            for kind in ("complete", "declined", "waiting")
        }
    return {"url": url, "ids": ids}


def saga_es(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the ``saga-es`` entry point in this process: exit status, stdout, stderr."""
    argv = sys.argv
    sys.argv = ["saga-es", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = saga_es(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_projections_run_once_then_the_json_of_every_command(
    sagas: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url, ids = sagas["url"], sagas["ids"]
    ran = as_json(capsys, "projections", "run", "--once", "--database-url", url)
    assert ran["events"] > 0
    positions = as_json(capsys, "projections", "status", "--database-url", url)
    assert {(p["name"], p["role"], p["lag_events"]) for p in positions} == {
        ("audit", "active", 0), ("stats", "active", 0), ("status", "active", 0)
    }  # fmt: skip
    status = as_json(capsys, "status", str(ids["declined"]), "--database-url", url)
    assert (status["state"], status["error_code"]) == ("failed", "card_declined")
    assert status["history"][-1]["event_type"] == "SagaCompensated"
    by_key = as_json(capsys, "status", "--key", "o-waiting", "--database-url", url)
    assert [s["current_step"] for s in by_key] == ["reserve_inventory"]
    page = as_json(capsys, "list", "--state", "completed", "--database-url", url)
    assert [s["business_key"] for s in page["items"]] == ["o-complete"]
    assert page["next_cursor"] is None
    history = as_json(capsys, "history", str(ids["complete"]), "--database-url", url)
    assert [h["event_type"] for h in history][:2] == ["SagaStarted", "StepCommandIssued"]
    assert {h["actor"] for h in history} == {"engine", "participant"}
    stats = as_json(capsys, "stats", "--definition", "order-fulfillment", "--database-url", url)
    release = next(
        s for s in stats if s["step"] == "reserve_inventory" and s["phase"] == "compensation"
    )
    assert release["compensated"] == 1
    replay = as_json(
        capsys, "replay", str(ids["declined"]), "--to-version", "7", "--database-url", url
    )
    assert replay["to_version"] == 7
    assert replay["state"]["status"] == "compensating"
    causes = [d["cause"] for d in replay["decisions"]]
    assert causes[0].startswith("started:")
    assert "failed, final: card_declined" in causes[-1]
    assert replay["decisions"][-1]["commands"][0]["command"] == "inventory.release"


def test_tables_for_people(
    sagas: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from projections import cli

    monkeypatch.setattr(cli.console, "width", 200)  # a wide terminal: no cell cut short
    url, ids = sagas["url"], sagas["ids"]
    saga_es(capsys, "projections", "run", "--once", "--database-url", url)
    code, out, _ = saga_es(capsys, "status", "--key", "o-declined", "--database-url", url)
    assert code == 0
    assert "card_declined" in out
    assert "SagaCompensated" in out
    code, out, _ = saga_es(capsys, "replay", str(ids["waiting"]), "--database-url", url)
    assert code == 0
    assert "send inventory.reserve to inventory" in out
    code, out, _ = saga_es(capsys, "list", "--limit", "1", "--database-url", url)
    assert code == 0
    assert "next page: --after " in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["status", str(uuid4())], "not in the status view"),
        (["status", "not-a-uuid"], "not a UUID"),
        (["status"], "give an ID or --key KEY"),
        (["history", str(uuid4())], "not in the status view"),
        (["replay", str(uuid4())], "replay for unknown saga"),
        (["list", "--stuck-for", "abc"], "not a duration"),
        (["list", "--state", "lost"], "one of started, pending"),
        (["list", "--started-after", "yesterday"], "not an ISO 8601 time"),
        (["list", "--updated-after", "2030-01-02", "--updated-before", "2030-01-01"],
         "impossible time range"),
        (["list", "--after", "garbage"], "not a cursor this command returned"),
        (["projections", "rebuild", "everything"], "unknown projection 'everything'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_and_exit_2(
    sagas: dict[str, Any], capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    saga_es(capsys, "projections", "run", "--once", "--database-url", sagas["url"])
    code, out, err = saga_es(capsys, *args, "--database-url", sagas["url"])
    assert code == 2, out + err
    assert says in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_replay_beyond_the_last_version_is_refused(
    sagas: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    saga_id = str(sagas["ids"]["complete"])
    code, _, err = saga_es(
        capsys, "replay", saga_id, "--to-version", "99", "--database-url", sagas["url"]
    )
    assert code == 2
    assert "this saga has versions 1 to 10" in err


def test_the_installed_command_prints_no_traceback(sagas: dict[str, Any], tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "saga-es"), "list", "--stuck-for", "10x", "--database-url", sagas["url"]],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--stuck-for '10x': not a duration" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
