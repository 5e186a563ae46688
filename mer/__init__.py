"""mer: a toolkit for micro-expression recognition competitions (CCAC 2024 / DFME)."""

__version__ = "0.1.0"
