"""Layer ``service``: the long-running process.

The daemon (process handling: locks, signals, systemd, reload) and its
scheduler loop, the file watcher and readiness tracker, start-up
reconciliation, logging, systemd notification, metrics and health, and
doctor's checks.

May import: ``pipeline``, ``routing``, ``builtin``, ``model``, ``ngff``,
``catalog`` and the shared top level. Imported by: ``cli`` only.
"""
