"""sr1: Search-R1 experiments end to end."""

__version__ = "0.1.0"
