"""Layer ``routing``: which experiment and which adapter an image gets.

``experiments``: the root's rules and the plugins' answers; ``registry``:
registered adapters, versions and assignments (stored in the catalog).

May import: ``model``, ``ngff``, ``catalog`` and the shared top level.
Imported by: ``pipeline``, ``service``, ``cli``.
"""
