"""Read models that follow the saga event log (see the projections issue)."""
