"""Exactly once with real processes: ``saga-es projections run`` killed with -9 in the middle of
a batch and restarted; two runners for the same views at once; a rebuild while sagas run."""

from __future__ import annotations

import itertools
import os
import re
import threading
from pathlib import Path

from processes import BIN, Processes, wait_until
from projection_support import KINDS, assert_views_agree, drive, drive_one, tracking

from projections.rebuild import rebuild
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.persistence.settings import DatabaseSettings
from saga_es.testing.clock import VirtualClock

SAGA_ES = str(BIN / "saga-es")
_COMMITTED = re.compile(r"committed batch \((\d+), (\d+)\]")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SAGA_ES_")}


def _run(url: str, *options: str) -> list[str]:
    return [SAGA_ES, "projections", "run", "--database-url", url, "--log-level", "INFO", *options]


def _committed(output: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in _COMMITTED.findall(output)]


def test_kill_9_in_the_middle_of_a_batch_then_restart_applies_each_event_once(
    database_url: str, tmp_path: Path
) -> None:
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as engine:
        drive(engine, clock, "k", rounds=2)
        head = engine.store.count("events")
        with Processes(tmp_path, _env()) as processes:
            runner = processes.start(
                "projections",
                _run(database_url, "--batch-size", "25", "--pause-before-commit", "0.5"),
            )
            # Wait until a batch has committed and the next one is written and held open.
            wait_until(
                lambda: runner.output().count("holding batch") >= 2,
                timeout=90, what="a second batch held before its commit",
            )  # fmt: skip
            runner.kill9()
            done = _committed(runner.output())
            assert done, runner.output()
            held = runner.output().count("holding batch")
            assert held == len(done) + 1  # killed with one batch written but not committed
            assert set(tracking(database_url).values()) == {done[-1][1]}  # it left no trace
            assert done[-1][1] < head
            again = processes.start("projections-again", [*_run(database_url), "--once"])
            assert again.wait() == 0, again.output()
        assert set(tracking(database_url).values()) == {head}
        assert_views_agree(database_url, engine.store)


def test_two_runners_for_the_same_views_take_turns_and_never_double_count(
    database_url: str, tmp_path: Path
) -> None:
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as engine:
        drive(engine, clock, "t")
        with Processes(tmp_path, _env()) as processes:
            options = (
                "--batch-size",
                "10",
                "--poll-interval",
                "0.1",
                "--pause-before-commit",
                "0.05",
            )
            first = processes.start("first", _run(database_url, *options))
            second = processes.start("second", _run(database_url, *options))
            wait_until(  # both following the log (and answering SIGTERM) before more sagas
                lambda: all("projections started" in p.output() for p in (first, second)),
                what="both runners to start",
            )
            drive(engine, clock, "u")  # more sagas while both run
            head = engine.store.count("events")
            wait_until(
                lambda: set(tracking(database_url).values()) == {head},
                timeout=120, what="both runners to reach the head of the log",
            )  # fmt: skip
            assert first.terminate() == 0
            assert second.terminate() == 0
            batches = sorted(_committed(first.output()) + _committed(second.output()))
        # Every event in exactly one committed batch: consecutive, never overlapping.
        assert batches[0][0] == 0
        assert batches[-1][1] == head
        assert all(a[1] == b[0] for a, b in itertools.pairwise(batches)), batches
        if DatabaseSettings.from_url(database_url).backend == "postgres":
            # The second waited on the tracking rows, then went on from where the first left.
            assert _committed(first.output())
            assert _committed(second.output())
        assert_views_agree(database_url, engine.store)


def test_a_rebuild_while_sagas_run_gives_the_views_incremental_processing_gives(
    database_url: str, tmp_path: Path
) -> None:
    name = "stats"  # counters added up: the view a double or a missed event would show first
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as engine:
        drive(engine, clock, "r")
        with Processes(tmp_path, _env()) as processes:
            processes.start("live", _run(database_url, "--poll-interval", "0.1"))
            writing = threading.Event()
            failures: list[BaseException] = []

            def write() -> None:
                try:
                    n = 0
                    while writing.is_set() or n < len(KINDS):
                        drive_one(engine, clock, f"w-{n}", KINDS[n % len(KINDS)])
                        n += 1
                except BaseException as exc:  # reported by the test, not lost in the thread
                    failures.append(exc)

            writing.set()
            writer = threading.Thread(target=write)
            writer.start()
            try:
                wait_until(lambda: engine.store.count("events") > 0, what="the writer to start")
                before = engine.store.count("events")
                waited: list[bool] = []

                def let_sagas_in(position: int, head: int) -> None:
                    # Between two batches, until the writer got at least one decision in
                    # (on SQLite each batch holds the write lock while it runs).
                    if not waited:
                        wait_until(
                            lambda: engine.store.count("events") > before,
                            what="a saga written during the rebuild",
                        )
                        waited.append(True)

                report = rebuild(
                    DatabaseSettings.from_url(database_url),
                    name,
                    batch_size=20,
                    on_progress=let_sagas_in,
                )
                during = engine.store.count("events") - before
            finally:
                writing.clear()
                writer.join()
            assert during > 0, "no saga was written while the rebuild ran"
            assert not failures, failures
            assert report.new_version == 2
            head = engine.store.count("events")
            wait_until(
                lambda: set(tracking(database_url).values()) == {head},
                timeout=120, what="the live runner to reach the head on the new version",
            )  # fmt: skip
        assert f"{name}_v2" in tracking(database_url)
        assert f"{name}_v1" not in tracking(database_url)
        assert_views_agree(database_url, engine.store)
