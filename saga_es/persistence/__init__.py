"""Storage: the saga event stream plus the engine's outbox, inbox and timer tables."""
