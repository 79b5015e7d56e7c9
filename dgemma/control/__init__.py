"""What steers a canvas: constraint automata (regex, JSON schema, JSON object, choice) and the per-canvas DP.

Rationale is in README.md next to this file.
"""

from .constraint import INVALID, CompileLimits, Constraint, ConstraintError, escape_literal
from .vocabulary import ConstraintVocabulary

__all__ = ["INVALID", "CompileLimits", "Constraint", "ConstraintError", "ConstraintVocabulary", "escape_literal"]
