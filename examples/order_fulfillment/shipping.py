"""Shipping: creates the shipment, the saga's point of no return (no compensation)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from examples.order_fulfillment.faults import inject_faults
from examples.order_fulfillment.models import Shipment
from examples.order_fulfillment.runtime import app, participant, settings
from saga_es.demo.order_saga import Order
from saga_es.messages import CommandMessage

__all__ = ["app", "create", "shipping"]

shipping = participant("shipping")


@shipping.handles("shipping.create", max_retries=settings.max_retries, backoff=settings.backoff)
def create(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    order = Order.model_validate(command.payload["data"])
    shipment = Shipment(
        saga_id=command.saga_id,
        order_id=order.order_id,
        lines=[line.model_dump() for line in order.lines],
        created_at=datetime.now(UTC),
    )
    session.add(shipment)
    session.flush()
    return {"shipment_id": str(shipment.shipment_id)}
