"""A plain Celery worker app for the relay tests: it knows the order saga's command tasks by
name and writes down every task it runs (task id, kwargs, queue) as a JSON line.

    SAGA_ES_BROKER_URL=amqp://... RELAY_TEST_OUTPUT=/tmp/ran.jsonl \
        celery -A relay_worker_app worker -Q inventory -P solo
"""

from __future__ import annotations

import json
import os
from typing import Any

from saga_es.messaging import celery_app

app = celery_app(os.environ["SAGA_ES_BROKER_URL"], name="relay_test_worker")
OUTPUT = os.environ["RELAY_TEST_OUTPUT"]
COMMANDS = ("inventory.reserve", "payment.charge", "shipping.create", "notification.send")


def _recorder(name: str) -> Any:
    def run(self: Any, **kwargs: Any) -> None:
        line = {
            "task": self.name,
            "task_id": self.request.id,
            "kwargs": kwargs,
            "queue": (self.request.delivery_info or {}).get("routing_key"),
        }
        with open(OUTPUT, "a") as out:
            out.write(json.dumps(line) + "\n")

    run.__name__ = name.replace(".", "_")
    return app.task(name=name, bind=True, shared=False)(run)


tasks = {name: _recorder(name) for name in COMMANDS}
