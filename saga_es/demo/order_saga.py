"""Order fulfillment: reserve stock, charge the card, ship (no way back), confirm."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from pydantic import BaseModel, Field

from saga_es.definition import PIVOT, RETRIABLE, saga, step
from saga_es.retry import RetryPolicy

__all__ = ["Order", "OrderLine", "order_fulfillment"]


class OrderLine(BaseModel):
    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)


class Order(BaseModel):
    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    lines: list[OrderLine] = Field(min_length=1)
    amount: Decimal = Field(gt=0, decimal_places=2)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


order_fulfillment = saga(
    "order-fulfillment",
    version=1,
    data=Order,
    steps=[
        step(
            name="reserve_inventory",
            action="inventory.reserve",
            compensation="inventory.release",
            timeout=timedelta(seconds=30),
        ),
        step(
            name="charge_payment",
            action="payment.charge",
            compensation="payment.refund",
            timeout=timedelta(seconds=60),
            retry=RetryPolicy(max_attempts=4, non_retryable=frozenset({"card_declined"})),
        ),
        step(
            name="create_shipment",
            action="shipping.create",
            kind=PIVOT,
            timeout=timedelta(minutes=2),
        ),
        step(
            name="send_confirmation",
            action="notification.send",
            kind=RETRIABLE,
            retry=RetryPolicy.forever(max_backoff=timedelta(minutes=10)),
        ),
    ],
)
