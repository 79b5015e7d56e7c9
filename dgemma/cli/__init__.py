"""`dgemma` on the command line: the parser and `main` (main.py), one module per command (generate, chat, edit),
the rest living with their feature (server/serve_cli.py, train/train_cli.py, tasks/sudoku_cli.py, ...)."""

from .chat import fit_conversation
from .main import build_parser, main

__all__ = ["build_parser", "fit_conversation", "main"]
