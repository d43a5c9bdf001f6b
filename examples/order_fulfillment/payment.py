"""Payment: charges the order's amount; a refund marks the charge refunded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from examples.order_fulfillment.faults import inject_faults
from examples.order_fulfillment.models import Charge
from examples.order_fulfillment.runtime import app, participant, settings
from saga_es.demo.order_saga import Order
from saga_es.messages import CommandMessage

__all__ = ["app", "charge", "payment", "refund"]

payment = participant("payment")


@payment.handles("payment.charge", max_retries=settings.max_retries, backoff=settings.backoff)
def charge(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    order = Order.model_validate(command.payload["data"])
    record = Charge(
        saga_id=command.saga_id,
        order_id=order.order_id,
        customer_id=order.customer_id,
        amount=order.amount,
        currency=order.currency,
        charged_at=datetime.now(UTC),
    )
    session.add(record)
    session.flush()
    return {"charge_id": str(record.charge_id), "amount": str(order.amount)}


@payment.handles("payment.refund", max_retries=settings.max_retries, backoff=settings.backoff)
def refund(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    charges = session.scalars(
        select(Charge).where(Charge.saga_id == command.saga_id, Charge.refunded_at.is_(None))
    ).all()
    now = datetime.now(UTC)
    for record in charges:
        record.refunded_at = now
    return {"refunded": [str(c.charge_id) for c in charges]}
