"""The ``concept-edit`` command line: argument parsing only; every command is one library call."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
