"""Layer ``model``: the CellSeg1 engine (SAM + LoRA adapters, training, inference) and other pixel code.

Also the classical segmenter (``classical``), block stitching (``stitch``) and
accuracy metrics (``metrics``). May import only the shared top level;
imported by every layer above it.

This package has no daemon dependencies: it works on arrays and files and is
used by the built-in SAM segmenter plugin and the ``train``/``segment`` commands.
"""
