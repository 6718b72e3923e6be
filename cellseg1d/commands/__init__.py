"""Implementations of the engine commands: ``train``, ``segment``, ``evaluate``, ``models``."""
