"""Layer ``builtin``: the built-in plugins, ordinary implementations of the hooks.

``readiness`` (completion markers), ``classical`` (the fallback segmenter)
and ``sam`` (SAM + LoRA adapters). Loaded by name through
:func:`cellseg1d.plugins.build_plugin_manager`, like any third-party plugin.

May import: ``model``, ``ngff``, ``catalog`` and the shared top level.
Imported by: ``pipeline``, ``service``, ``cli``.
"""
