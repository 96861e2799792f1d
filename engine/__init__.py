"""Slot booking engine: the pure core (``engine.core``) and the actor shell (``engine.shell``)."""
