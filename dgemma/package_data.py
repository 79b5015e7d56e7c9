"""The files dgemma ships inside its package (pyproject's package-data): the Sudoku model, templates, web page."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SUDOKU_MODEL_DIR = PACKAGE_DIR / "assets" / "sudoku"  # the embedded default model: a small Sudoku solver
TEMPLATE_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "server" / "static"
