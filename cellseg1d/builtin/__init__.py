"""Built-in plugins: ordinary implementations of the cellseg1d hooks."""
