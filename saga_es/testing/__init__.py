"""Test support shipped with saga-es: scenarios without a database, and a virtual clock."""

from saga_es.testing.clock import VirtualClock
from saga_es.testing.scenario import Scenario, scenario

__all__ = ["Scenario", "VirtualClock", "scenario"]
