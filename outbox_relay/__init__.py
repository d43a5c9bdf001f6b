"""Publishes committed outbox rows through Celery (see the outbox relay issue)."""
