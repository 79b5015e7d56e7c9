"""What steers a canvas (DESIGN.md, `control/`): pins and seeded canvases, infilling, templates, and constraint
automata (regex, JSON schema, JSON object, choice) with the per-canvas DP that picks the most probable valid
tokens. Why the automata sit on outlines-core, and what was measured: README.md next to this file.

The constraint names below load on first use, so importing a sibling module (pins, infill) does not pull in
outlines-core.
"""

_CONSTRAINT_NAMES = {
    "INVALID": "constraint", "CompileLimits": "constraint", "Constraint": "constraint",
    "ConstraintError": "constraint", "escape_literal": "constraint",
    "ConstraintVocabulary": "vocabulary", "ValidTokens": "dp", "best_valid_tokens": "dp",
}
__all__ = sorted(_CONSTRAINT_NAMES)


def __getattr__(name: str):
    module = _CONSTRAINT_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'dgemma.control' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f".{module}", __name__), name)
