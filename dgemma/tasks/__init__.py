"""Tasks with their own data generators, checkers and CLI commands (Sudoku)."""
