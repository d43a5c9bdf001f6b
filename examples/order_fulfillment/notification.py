"""Notification: tells the customer the order ships (retried by the saga until it succeeds)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from examples.order_fulfillment.faults import inject_faults
from examples.order_fulfillment.models import Notification
from examples.order_fulfillment.runtime import app, participant, settings
from saga_es.demo.order_saga import Order
from saga_es.messages import CommandMessage

__all__ = ["app", "notification", "send"]

notification = participant("notification")


@notification.handles(
    "notification.send", max_retries=settings.max_retries, backoff=settings.backoff
)
def send(command: CommandMessage, session: Session) -> dict[str, Any]:
    inject_faults(command, session)
    order = Order.model_validate(command.payload["data"])
    shipment = command.payload.get("results", {}).get("create_shipment", {})
    message = f"Order {order.order_id} ships as {shipment.get('shipment_id', 'planned')}."
    record = Notification(
        saga_id=command.saga_id,
        order_id=order.order_id,
        customer_id=order.customer_id,
        message=message,
        sent_at=datetime.now(UTC),
    )
    session.add(record)
    session.flush()
    return {"notification_id": str(record.notification_id)}
