"""Read models that follow the saga event log: status, audit trail and step statistics.

    saga-es projections run            keep the views up to date (``runner``)
    saga-es status|list|history|stats  ask them (``queries``); ``replay`` reads the stream itself

One module per concept: ``schema`` (versioned tables), ``status``/``audit``/``stats`` (pure
projectors), ``writers`` and ``bulk`` (a batch into the tables), ``runner`` (exactly-once
batches; ``collector`` keeps Python's garbage collector out of their way), ``rebuild``,
``monitor`` (positions and lag), ``queries``, ``replay``, ``cli``.
"""

from projections.errors import ProjectionError
from projections.queries import SagaQueries
from projections.rebuild import rebuild
from projections.replay import explain
from projections.runner import ProjectionRunner

__all__ = ["ProjectionError", "ProjectionRunner", "SagaQueries", "explain", "rebuild"]
