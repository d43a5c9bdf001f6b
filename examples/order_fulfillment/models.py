"""The effects the example services record, one table per service (SQLAlchemy 2 models).

Every row carries the saga id: a compensation finds what to undo by it, even when the engine
never got the action's result (the action's reply was lost, or it timed out and then
committed).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import JSON, DateTime, Integer, Numeric, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Charge", "Notification", "Reservation", "Shipment"]


class Base(DeclarativeBase):
    """The example services' own tables (the participants' inbox tables are separate)."""


class Reservation(Base):
    __tablename__ = "example_reservations"

    reservation_id: Mapped[UUID] = mapped_column(Uuid, primary_key=True, default=uuid4)
    saga_id: Mapped[UUID] = mapped_column(Uuid, index=True)
    order_id: Mapped[str] = mapped_column(String(100), index=True)
    sku: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int] = mapped_column(Integer)
    reserved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Charge(Base):
    __tablename__ = "example_charges"

    charge_id: Mapped[UUID] = mapped_column(Uuid, primary_key=True, default=uuid4)
    saga_id: Mapped[UUID] = mapped_column(Uuid, index=True)
    order_id: Mapped[str] = mapped_column(String(100), index=True)
    customer_id: Mapped[str] = mapped_column(String(100))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    charged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Shipment(Base):
    __tablename__ = "example_shipments"

    shipment_id: Mapped[UUID] = mapped_column(Uuid, primary_key=True, default=uuid4)
    saga_id: Mapped[UUID] = mapped_column(Uuid, index=True)
    order_id: Mapped[str] = mapped_column(String(100), index=True)
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Notification(Base):
    __tablename__ = "example_notifications"

    notification_id: Mapped[UUID] = mapped_column(Uuid, primary_key=True, default=uuid4)
    saga_id: Mapped[UUID] = mapped_column(Uuid, index=True)
    order_id: Mapped[str] = mapped_column(String(100), index=True)
    customer_id: Mapped[str] = mapped_column(String(100))
    message: Mapped[str] = mapped_column(Text)
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
