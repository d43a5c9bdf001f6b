"""A timer process that dies by SIGKILL right after its Nth claim, before firing that batch:
the worst moment, with due timers claimed (their lease set) and not fired.

    python tests/timer_crash_process.py --database-url URL --batch-size 5 --lease 3 \
        --kill-after-claims 3 --record claimed.json

``--record`` receives the saga ids of the batch it dies holding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from saga_es.demo.order_saga import order_fulfillment
from saga_es.persistence.timer_table import ScheduledTimer
from saga_es.timer_process import run_timers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--kill-after-claims", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    claims = 0

    def after_claim(batch: Sequence[ScheduledTimer]) -> None:
        nonlocal claims
        claims += 1
        if claims == args.kill_after_claims:
            args.record.write_text(json.dumps([str(t.saga_id) for t in batch]))
            os.kill(os.getpid(), signal.SIGKILL)

    run_timers(
        [order_fulfillment],
        args.database_url,
        batch_size=args.batch_size,
        lease=timedelta(seconds=args.lease),
        after_claim=after_claim,
    )


if __name__ == "__main__":
    main()
