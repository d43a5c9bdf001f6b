"""``python -m examples.order_fulfillment init-db``: create the example services' tables."""

from __future__ import annotations

import sys

from examples.order_fulfillment.runtime import settings
from examples.order_fulfillment.services import create_tables


def main(argv: list[str]) -> int:
    if argv != ["init-db"]:
        print("usage: python -m examples.order_fulfillment init-db", file=sys.stderr)
        return 2
    create_tables()
    print(f"example tables ready at {settings.database_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
