"""The CellSeg1 engine: Segment Anything + LoRA adapters, training and inference.

This package has no daemon dependencies: it works on arrays and files and is
used by the built-in SAM segmenter plugin and the ``train``/``segment`` commands.
"""
