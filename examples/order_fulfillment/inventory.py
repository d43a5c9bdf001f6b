"""Inventory: reserves an order's lines, releases them when the saga turns back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from examples.order_fulfillment.faults import inject_faults
from examples.order_fulfillment.models import Reservation
from examples.order_fulfillment.runtime import app, participant, settings
from saga_es.demo.order_saga import Order
from saga_es.messages import CommandMessage

__all__ = ["app", "inventory", "release", "reserve"]

inventory = participant("inventory")


@inventory.handles("inventory.reserve", max_retries=settings.max_retries, backoff=settings.backoff)
def reserve(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    order = Order.model_validate(command.payload["data"])
    now = datetime.now(UTC)
    reservations = [
        Reservation(
            saga_id=command.saga_id,
            order_id=order.order_id,
            sku=line.sku,
            quantity=line.quantity,
            reserved_at=now,
        )
        for line in order.lines
    ]
    session.add_all(reservations)
    session.flush()  # assigns the ids the result names
    return {"reservation_ids": [str(r.reservation_id) for r in reservations]}


@inventory.handles("inventory.release", max_retries=settings.max_retries, backoff=settings.backoff)
def release(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    held = session.scalars(
        select(Reservation).where(
            Reservation.saga_id == command.saga_id, Reservation.released_at.is_(None)
        )
    ).all()
    now = datetime.now(UTC)
    for reservation in held:
        reservation.released_at = now
    return {"released": [str(r.reservation_id) for r in held]}
