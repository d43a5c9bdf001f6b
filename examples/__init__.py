"""Example services built on saga-es (importable, so their workers run with ``celery -A``)."""
