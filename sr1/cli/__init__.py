"""The ``sr1`` command line: a thin typer layer, one library call per command, rendered with rich."""
