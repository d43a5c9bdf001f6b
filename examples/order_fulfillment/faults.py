"""Switches that make an example step misbehave, to watch sagas retry, time out and compensate.

A switch names a command, a mode and the orders it applies to (an ``fnmatch`` pattern on the
order id, ``*`` for all):

    fail        a business failure with ``error_code`` (``card_declined`` for a charge makes
                the saga compensate at once; it is non-retryable in the definition)
    transient   raise a transient error on the first ``times`` tries of each command message;
                the participant retries it (``times`` beyond its retries: a retryable
                failure goes back to the saga)
    hang        sleep ``seconds`` before doing the work (longer than the step's timeout: the
                saga times out; on SQLite the write lock is held meanwhile)
    hold_reply  do the work and commit, then hold the reply until the switch is removed: kill
                the worker meanwhile to see the redelivered command reply the stored outcome

Switches come from ``SAGA_ES_EXAMPLES_FAULTS`` (``command=mode[:arg][@pattern]`` separated by
``;``, e.g. ``payment.charge=fail:card_declined@o-13*;shipping.create=hang:90``) and from the
``example_faults`` table, which can be changed while the workers run (``set_fault``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase

from sqlalchemy import Float, Integer, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from examples.order_fulfillment.models import Base
from saga_es.messages import CommandMessage
from saga_es.participant import BusinessError, current_delivery

__all__ = [
    "FAULTS_ENV",
    "MODES",
    "FaultRow",
    "InjectedTransientError",
    "Switch",
    "clear_faults",
    "holding_reply",
    "inject_faults",
    "parse_switches",
    "set_fault",
]

FAULTS_ENV = "SAGA_ES_EXAMPLES_FAULTS"
MODES = ("fail", "transient", "hang", "hold_reply")


class InjectedTransientError(RuntimeError):
    """The error a ``transient`` switch raises: anything but a BusinessError is transient."""


class FaultRow(Base):
    __tablename__ = "example_faults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(20))
    order_pattern: Mapped[str] = mapped_column(String(200), default="*")
    times: Mapped[int] = mapped_column(Integer, default=1)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str] = mapped_column(String(200), default="rejected")


@dataclass(frozen=True)
class Switch:
    command: str
    mode: str
    order_pattern: str = "*"
    times: int = 1
    seconds: float = 0.0
    error_code: str = "rejected"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fault mode {self.mode!r}: expected one of {', '.join(MODES)}")

    def applies_to(self, command: CommandMessage) -> bool:
        return self.command == command.command and fnmatchcase(
            order_id(command), self.order_pattern
        )


def order_id(command: CommandMessage) -> str:
    data = command.payload.get("data")
    return str(data.get("order_id", "")) if isinstance(data, dict) else ""


def parse_switches(spec: str) -> list[Switch]:
    """``command=mode[:arg][@pattern];...``; arg is the error code, times or seconds."""
    switches = []
    for item in (part.strip() for part in spec.split(";")):
        if not item:
            continue
        command, _, rest = item.partition("=")
        rest, _, pattern = rest.partition("@")
        mode, _, arg = rest.partition(":")
        mode = mode.strip()
        try:
            switches.append(
                Switch(
                    command.strip(),
                    mode,
                    pattern or "*",
                    times=int(arg) if arg and mode == "transient" else 1,
                    seconds=float(arg) if arg and mode == "hang" else 0.0,
                    error_code=arg if arg and mode == "fail" else "rejected",
                )
            )
        except ValueError as exc:
            raise ValueError(f"{FAULTS_ENV}: {item!r}: {exc}") from exc
    return switches


_FROM_ENVIRONMENT = parse_switches(os.environ.get(FAULTS_ENV, ""))


def active(session: Session, command: CommandMessage) -> list[Switch]:
    rows = session.scalars(select(FaultRow).where(FaultRow.command == command.command)).all()
    switches = _FROM_ENVIRONMENT + [
        Switch(r.command, r.mode, r.order_pattern, r.times, r.seconds, r.error_code) for r in rows
    ]
    return [s for s in switches if s.applies_to(command)]


def inject_faults(command: CommandMessage, session: Session) -> None:
    """Called first by every example handler: misbehave as the switches say."""
    for switch in active(session, command):
        if switch.mode == "hang":
            time.sleep(switch.seconds)
        elif switch.mode == "transient":
            delivery = current_delivery()
            tries = delivery.retries if delivery else 0
            if tries < switch.times:
                raise InjectedTransientError(
                    f"switched to fail transiently {switch.times} time(s) for order "
                    f"{order_id(command)} (this was try {tries + 1})"
                )
        elif switch.mode == "fail":
            raise BusinessError(
                switch.error_code, f"switched to fail for order {order_id(command)}"
            )


def holding_reply(sessions: sessionmaker[Session], command: CommandMessage) -> bool:
    with sessions() as session:
        return any(s.mode == "hold_reply" for s in active(session, command))


def set_fault(session: Session, switch: Switch) -> None:
    session.add(
        FaultRow(
            command=switch.command,
            mode=switch.mode,
            order_pattern=switch.order_pattern,
            times=switch.times,
            seconds=switch.seconds,
            error_code=switch.error_code,
        )
    )


def clear_faults(session: Session, command: str | None = None) -> None:
    statement = delete(FaultRow)
    if command is not None:
        statement = statement.where(FaultRow.command == command)
    session.execute(statement)
