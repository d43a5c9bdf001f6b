"""The relay loop against the in-memory source and publisher: policies, failures, outages,
stopping, retention. Plus the Celery message it builds, and ``memory://`` with a worker."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from processes import wait_until
from relay_support import command

from outbox_relay import (
    InMemoryOutboxSource,
    InMemoryPublisher,
    MessageRejectedError,
    Relay,
    RelayConfigurationError,
    SendTaskPublisher,
)
from outbox_relay.celery_wire import CeleryWire
from outbox_relay.runner import parse_retention
from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app, command_kwargs


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger(f"test_relay.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False
    handler.logger = logger  # type: ignore[attr-defined]
    yield handler
    logger.removeHandler(handler)


def relay_for(
    source: InMemoryOutboxSource, publisher: InMemoryPublisher, records: Records, **options: Any
) -> Relay:
    options = {"backoff_initial": 0.01, "backoff_cap": 0.05, "poll_interval": 0.05, **options}
    return Relay(source, publisher, logger=records.logger, **options)  # type: ignore[attr-defined]


def saga(source: InMemoryOutboxSource, versions: int, **kw: Any) -> list[CommandMessage]:
    saga_id = uuid.uuid4()
    commands = [command(saga_id, v, **kw) for v in range(1, versions + 1)]
    for c in commands:
        source.add(c)
    return commands


class Running:
    """``relay.run()`` in a thread, stopped and joined on exit."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the relay did not stop"
        assert not self.errors, self.errors


# -- publishing -------------------------------------------------------------------------------


def test_publishes_every_row_once_in_saga_order(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    sagas = [saga(source, 4) for _ in range(5)]
    relay = relay_for(source, publisher, records, batch_size=3)
    assert relay.publish_pending() == 20
    assert sorted(c.message_id for c in publisher.sent) == sorted(
        c.message_id for s in sagas for c in s
    )
    for commands in sagas:
        sent = [c for c in publisher.sent if c.saga_id == commands[0].saga_id]
        assert sent == commands
    assert all(s.publish_attempts == 1 and s.published_at for s in source.rows.values())


def test_published_commands_equal_the_stored_ones(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    (stored,) = saga(source, 1, payload={"nested": {"list": [1, "two", None]}, "amount": "9.90"})
    relay_for(source, publisher, records).publish_pending()
    assert publisher.sent == [stored]


# -- rows that cannot be published ------------------------------------------------------------


def test_an_invalid_row_is_parked_and_blocks_only_its_saga(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    bad = command(uuid.uuid4(), 1)
    fields = bad.model_dump(mode="json")
    fields.update(payload="[1, 2]", phase="sideways")
    bad_seq = source.add_raw(position=0, **fields)
    later = command(bad.saga_id, 2)
    source.add(later)
    others = [saga(source, 2) for _ in range(3)]
    relay = relay_for(source, publisher, records, max_attempts=3)

    relay.publish_pending()

    assert {c.message_id for c in publisher.sent} == {c.message_id for s in others for c in s}
    stored = source.rows[bad_seq]
    assert stored.publish_attempts == 3
    assert stored.parked_at is not None
    assert stored.last_error is not None
    assert "field 'phase'" in stored.last_error
    (blocked,) = relay.blocked_sagas()
    assert (blocked.message_id, blocked.held_back) == (str(bad.message_id), 1)
    assert len(records.lines(logging.WARNING)) == 2  # attempts 1 and 2
    (parked_line,) = records.lines(logging.ERROR)
    assert f"saga={bad.saga_id}" in parked_line
    assert f"message_id={bad.message_id}" in parked_line
    assert "step=charge" in parked_line
    assert "later commands stay unpublished" in parked_line

    # Fixed by hand, unparked: the saga goes on, in order.
    stored.row = dataclasses.replace(stored.row, payload="{}", phase="action")
    assert relay.unpark([bad_seq]) == 1
    relay.publish_pending()
    assert [c.message_id for c in publisher.sent if c.saga_id == bad.saga_id] == [
        bad.message_id,
        later.message_id,
    ]
    assert relay.blocked_sagas() == []


def test_with_on_parked_skip_the_saga_goes_on(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    first, second = saga(source, 2, queue="nowhere")
    relay = relay_for(
        source, publisher, records, on_parked="skip", max_attempts=1, allowed_queues=["payment"]
    )
    relay.publish_pending()
    assert publisher.sent == []  # both went to a queue not allowed
    assert [p.message_id for p in relay.parked_rows()] == [
        str(first.message_id),
        str(second.message_id),
    ]
    assert relay.blocked_sagas() == []


def test_the_destination_allow_list_takes_names_and_patterns(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    ok = [saga(source, 1, queue=q)[0] for q in ("payment", "shipping.eu", "shipping.us")]
    (refused,) = saga(source, 1, queue="billing")
    relay = relay_for(
        source, publisher, records, max_attempts=1, allowed_queues=["payment", "shipping.*"]
    )
    relay.publish_pending()
    assert publisher.sent == ok
    (parked,) = relay.parked_rows()
    assert parked.message_id == str(refused.message_id)
    assert parked.last_error is not None
    assert "queue 'billing' is not an allowed destination" in parked.last_error


def test_a_row_the_serializer_rejects_counts_toward_parking(records: Records) -> None:
    source = InMemoryOutboxSource()
    (refused,) = saga(source, 1, payload={"huge": "x"})
    (fine,) = saga(source, 1)
    publisher = InMemoryPublisher(
        reject=lambda c: "too large" if c.message_id == refused.message_id else None
    )
    relay = relay_for(source, publisher, records, max_attempts=2)
    relay.publish_pending()
    assert publisher.sent == [fine]
    (parked,) = relay.parked_rows()
    assert (parked.message_id, parked.last_error, parked.publish_attempts) == (
        str(refused.message_id),
        "too large",
        2,
    )


def test_a_nacked_message_stays_unpublished_without_counting_an_attempt(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    (nacked,) = saga(source, 1)
    (fine,) = saga(source, 1)
    publisher.nack.add(nacked.message_id)
    relay = relay_for(source, publisher, records)
    report = relay.publish_batch()
    assert (report.published, report.unconfirmed) == (1, 1)
    row = next(s for s in source.rows.values() if s.row.message_id == str(nacked.message_id))
    assert (row.published_at, row.publish_attempts) == (None, 0)
    publisher.nack.clear()
    relay.publish_pending()
    assert publisher.sent == [fine, nacked]


# -- outages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["broker", "database"])
def test_an_outage_is_waited_out_with_one_warning(records: Records, target: str) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    relay = relay_for(source, publisher, records)
    down = publisher if target == "broker" else source
    before = saga(source, 2)
    with Running(relay):
        wait_until(lambda: len(publisher.sent) == 2, timeout=10, what="first rows")
        down.unavailable = True
        during = saga(source, 2)
        wait_until(lambda: relay.broker.ongoing or relay.database.ongoing, timeout=10,
                   what="the outage to be noticed")  # fmt: skip
        outage = relay.broker if target == "broker" else relay.database
        failures = outage.failures
        wait_until(lambda: outage.failures >= failures + 5, timeout=10,
                   what="several retries")  # fmt: skip
        assert len(publisher.sent) == 2
        down.unavailable = False
        wait_until(lambda: len(publisher.sent) == 4, timeout=10, what="rows after the outage")
    assert publisher.sent == before + during
    warnings = [w for w in records.lines(logging.WARNING) if "unavailable" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{target} unavailable")
    recovered = [i for i in records.lines(logging.INFO) if "available again" in i]
    assert len(recovered) == 1
    assert recovered[0].startswith(f"{target} available again")


def test_the_backoff_grows_and_is_capped() -> None:
    from outbox_relay.backoff import Backoff

    backoff = Backoff(initial=0.5, cap=4.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


# -- stopping ---------------------------------------------------------------------------------


def test_stop_finishes_the_batch_in_hand(records: Records) -> None:
    source, publisher = InMemoryOutboxSource(), InMemoryPublisher()
    for _ in range(5):
        saga(source, 1)
    relay: Relay

    def stop_mid_batch(rows: Any, result: Any) -> None:
        relay.stop()  # as the SIGTERM handler does, between publishing and marking

    relay = relay_for(source, publisher, records, batch_size=2, after_publish=stop_mid_batch)
    relay.run()  # returns by itself
    assert len(publisher.sent) == 2
    published = [s for s in source.rows.values() if s.published_at is not None]
    assert {s.row.message_id for s in published} == {str(c.message_id) for c in publisher.sent}


# -- retention --------------------------------------------------------------------------------


class CountingSource(InMemoryOutboxSource):
    def __init__(self) -> None:
        super().__init__()
        self.purges = 0
        self.claims = 0

    def delete_published(self, older_than: timedelta) -> int:
        self.purges += 1
        return super().delete_published(older_than)

    def claim(self, limit: int, *, skip_parked: bool = False) -> Any:
        self.claims += 1
        return super().claim(limit, skip_parked=skip_parked)


def test_retention_runs_periodically_and_deletes_old_published_rows(records: Records) -> None:
    source, publisher = CountingSource(), InMemoryPublisher()
    old, recent = saga(source, 1)[0], saga(source, 1)[0]
    now = datetime.now(UTC)
    for stored in source.rows.values():
        age = timedelta(days=8) if stored.row.message_id == str(old.message_id) else timedelta(0)
        stored.published_at = now - age
    clock = [1000.0]
    relay = relay_for(
        source, publisher, records, retention=timedelta(days=7), retention_interval=60,
        clock=lambda: clock[0],
    )  # fmt: skip
    with Running(relay):
        wait_until(lambda: source.purges == 1, timeout=10, what="the first purge")
        assert [s.row.message_id for s in source.rows.values()] == [str(recent.message_id)]
        claims = source.claims
        wait_until(lambda: source.claims >= claims + 5, timeout=10, what="a few cycles")
        assert source.purges == 1  # not due yet
        clock[0] += 61
        wait_until(lambda: source.purges == 2, timeout=10, what="the next purge")


def test_retention_off_deletes_nothing(records: Records) -> None:
    source = InMemoryOutboxSource()
    saga(source, 1)
    next(iter(source.rows.values())).published_at = datetime.now(UTC) - timedelta(days=365)
    assert relay_for(source, InMemoryPublisher(), records, retention=None).purge_published() == 0
    assert len(source.rows) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
     ("90", timedelta(seconds=90)), ("off", None)],
)  # fmt: skip
def test_retention_durations(text: str, expected: timedelta | None) -> None:
    assert parse_retention(text) == expected


@pytest.mark.parametrize("text", ["soon", "-1d", "0"])
def test_bad_retention_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|positive"):
        parse_retention(text)


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", 0), ("poll_interval", 0), ("on_parked", "drop"), ("max_attempts", 0),
     ("retention", timedelta(0)), ("backoff_initial", 0)],
)  # fmt: skip
def test_unusable_options_are_refused(option: str, value: Any) -> None:
    with pytest.raises(RelayConfigurationError, match=option.split("_")[0]):
        Relay(InMemoryOutboxSource(), InMemoryPublisher(), **{option: value})


# -- the Celery message -----------------------------------------------------------------------


def test_the_celery_message_is_what_send_task_would_send() -> None:
    app = celery_app("memory://")
    cmd = command(payload={"order_id": "o-7", "lines": [{"sku": "A", "quantity": 2}]})
    wire = CeleryWire(app).encode(cmd)
    assert wire.queue == "payment"
    assert wire.headers["task"] == "payment.charge"
    assert wire.headers["id"] == wire.headers["root_id"] == str(cmd.message_id)
    assert wire.properties["correlation_id"] == str(cmd.message_id)
    assert wire.properties["delivery_mode"] == 2
    assert wire.content_type == "application/json"
    import json

    args, kwargs, embed = json.loads(wire.body)
    assert (args, kwargs) == ([], command_kwargs(cmd))
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert "o-7" in wire.headers["kwargsrepr"]


def test_a_message_over_the_size_limit_is_rejected() -> None:
    cmd = command(payload={"blob": "x" * 5000})
    with pytest.raises(MessageRejectedError, match="exceeds the limit of 4000 bytes"):
        CeleryWire(celery_app("memory://"), max_message_bytes=4000).encode(cmd)


def test_memory_transport_runs_the_command_task_in_process(records: Records) -> None:
    from celery.contrib.testing.worker import start_worker

    app = celery_app("memory://", name=f"embedded-{uuid.uuid4().hex[:6]}")
    ran: list[tuple[str, dict[str, Any]]] = []

    @app.task(name="payment.charge", bind=True, shared=False)  # type: ignore[untyped-decorator]
    def charge(self: Any, command: dict[str, Any]) -> None:
        ran.append((self.request.id, command))

    source = InMemoryOutboxSource()
    commands = saga(source, 2)
    relay = relay_for(source, SendTaskPublisher(app=app), records)  # type: ignore[arg-type]
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["payment"]):
        assert relay.publish_pending() == 2
        wait_until(lambda: len(ran) == 2, timeout=20, what="the worker to run both tasks")
    assert ran == [(str(c.message_id), c.model_dump(mode="json")) for c in commands]
