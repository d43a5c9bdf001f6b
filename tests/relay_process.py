"""A relay process for the relay tests: ``run_relay`` plus hooks that act in the window
between the broker's confirms and the commit that marks the rows.

    python tests/relay_process.py --database-url URL --broker-url URL [--batch-size N]
        [--record FILE] [--kill-after-batches N | --term-after-batches N] [--backoff-cap S]

--record appends each confirmed batch's message ids to FILE (one JSON line per batch) before
the hooks run; --kill-after-batches sends itself SIGKILL after the Nth batch is confirmed and
before it is marked; --term-after-batches sends itself SIGTERM at that point instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from datetime import timedelta
from typing import Any

from outbox_relay import run_relay


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--record")
    parser.add_argument("--kill-after-batches", type=int)
    parser.add_argument("--term-after-batches", type=int)
    parser.add_argument("--backoff-cap", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    batches = 0

    def after_publish(rows: Any, result: Any) -> None:
        nonlocal batches
        batches += 1
        if args.record:
            with open(args.record, "a") as out:
                out.write(json.dumps([str(m) for m in result.confirmed]) + "\n")
                out.flush()
                os.fsync(out.fileno())
        if batches == args.kill_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)
        if batches == args.term_after_batches:
            os.kill(os.getpid(), signal.SIGTERM)

    run_relay(
        args.database_url,
        args.broker_url,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        retention=timedelta(days=7),
        after_publish=after_publish,
        backoff_initial=0.1,
        backoff_cap=args.backoff_cap,
    )


if __name__ == "__main__":
    main()
