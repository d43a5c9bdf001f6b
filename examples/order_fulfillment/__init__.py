"""The four services of the demo order saga, as saga participants behind a real broker.

    inventory      inventory.reserve / inventory.release     example_reservations
    payment        payment.charge / payment.refund           example_charges (refund marks)
    shipping       shipping.create (the pivot)               example_shipments
    notification   notification.send (retriable)             example_notifications

Run them all in one worker, or one worker per service:

    python -m examples.order_fulfillment init-db
    celery -A examples.order_fulfillment.services worker -Q inventory,payment,shipping,notification
    celery -A examples.order_fulfillment.payment worker -Q payment

Environment: ``SAGA_ES_EXAMPLES_DATABASE_URL`` (default ``sqlite:///saga-es-examples.db``),
``SAGA_ES_BROKER_URL``, ``SAGA_ES_EXAMPLES_MAX_RETRIES`` / ``SAGA_ES_EXAMPLES_BACKOFF``
(transient retries per command, 5 and 1.0s) and ``SAGA_ES_EXAMPLES_FAULTS``: switches that
make a step misbehave, also settable at run time in the ``example_faults`` table (see
``faults``).
"""
