"""The demo order saga with a charge that times out within seconds, for end-to-end tests of
timeouts: the same steps and participants, only the clock is faster.

The services load it by name (``SAGA_ES_DEFINITIONS=...,quick_order:quick_order`` with this
directory on ``PYTHONPATH``), so it must import nothing from the tests but itself.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from saga_es.definition import saga
from saga_es.demo.order_saga import Order, order_fulfillment
from saga_es.retry import RetryPolicy

__all__ = ["CHARGE_TIMEOUT", "SPEC", "quick_order"]

#: Long enough for a healthy payment service to answer, far shorter than a ``hang`` switch.
CHARGE_TIMEOUT = timedelta(seconds=1)

_reserve, _charge, *_rest = order_fulfillment.steps
quick_order = saga(
    "order-fulfillment-quick",
    version=1,
    data=Order,
    steps=[
        _reserve,
        replace(
            _charge,
            timeout=CHARGE_TIMEOUT,
            retry=RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=200)),
            # The refund must not time out while the payment service is still busy.
            compensation_timeout=timedelta(seconds=90),
        ),
        *_rest,
    ],
)

#: What the services' ``SAGA_ES_DEFINITIONS`` lists for a test that runs both sagas.
SPEC = "saga_es.demo.order_saga:order_fulfillment,quick_order:quick_order"
