"""The shape of the package: small modules and functions, no private names across modules, no import cycles, and
every exception a user can see derives from DgemmaError (STYLE.md, issue 28)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from dgemma.errors import DgemmaError

PACKAGE = Path(__file__).resolve().parent.parent / "dgemma"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


# Exceptions that never reach a user: each is caught and turned into a user error or an HTTP answer, or is a bug.
INTERNAL_EXCEPTIONS = {
    "dgemma.control.schema.base.Empty",  # a branch no value can take: the schema writer drops or refuses it
    "dgemma.cache.CacheFullError",  # blocks a caller failed to reserve: a scheduling bug
    "dgemma.engine.block_manager.OutOfBlocksError",  # an allocation not checked first: a scheduling bug
    "dgemma.engine.scheduler.QueueFullError",  # the server answers 429 with Retry-After
    "dgemma.server.streaming.APIError",  # the HTTP error answer itself (status, message, field)
    "dgemma.text.template_budget.TemplateOverLimit",  # ChatTemplate turns it into a TokenizerError
    "dgemma.text.template_sandbox.TemplateRaised",  # ChatTemplate turns it into a TokenizerError
}


def _modules() -> list[tuple[str, Path]]:
    return [(p.relative_to(PACKAGE).as_posix(), p) for p in sorted(PACKAGE.rglob("*.py"))]


def _module_name(rel: str) -> str:
    return "dgemma." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".") if rel != "__init__.py" \
        else "dgemma"


def _resolve(rel: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom in the file `rel` names."""
    if node.level == 0:
        return node.module or ""
    parts = _module_name(rel).split(".")
    base = parts if rel.endswith("__init__.py") else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_module_over_400_lines():
    over = {rel: n for rel, p in _modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not over, over


def test_no_function_over_80_lines():
    over = {}
    for rel, p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    over[f"{rel}:{node.name}"] = n
    assert not over, over


def test_no_private_name_imported_across_modules():
    found = set()
    for rel, p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(rel, node)
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    # dgemma's own modules only (the schema writer reads the standard library's regex parser)
                    if private and source.startswith("dgemma") and not source.rsplit(".", 1)[-1].startswith("_"):
                        found.add(f"{rel}:{source.rsplit('.', 1)[-1]}.{alias.name}")
    assert not found, found


def test_no_import_cycle_at_import_time():
    """Module-level imports only: an import inside a function runs later and cannot deadlock a partial module."""
    names = {_module_name(rel) for rel, _ in _modules()}
    graph: dict[str, set[str]] = {}
    for rel, p in _modules():
        deps = graph.setdefault(_module_name(rel), set())
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                source = _resolve(rel, node)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    deps.add(target if target in names else source)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
    for deps in graph.values():
        deps &= names
    # a package's __init__ importing its own submodules is how a package exports them, not a cycle
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if m.startswith(d + ".") or d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def _exception_classes():
    for rel, _ in _modules():
        name = _module_name(rel)
        if rel.endswith("__main__.py") or rel.startswith("control/_compile_worker"):
            continue  # __main__ runs the CLI on import; the worker is a script run in its own process
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == name:  # not signals
                yield f"{name}.{cls.__qualname__}", cls


def test_every_exception_is_a_user_error_or_a_documented_internal_one():
    bad = {qual for qual, cls in _exception_classes() if not issubclass(cls, DgemmaError)}
    assert bad - INTERNAL_EXCEPTIONS == set()
    assert INTERNAL_EXCEPTIONS <= bad, "an internal exception now derives from DgemmaError: drop it from the list"


def test_user_errors_say_what_they_are():
    undocumented = [qual for qual, cls in _exception_classes() if not (cls.__doc__ or "").strip()]
    assert not undocumented


@pytest.mark.parametrize("path", ["assets/sudoku/config.json", "templates/gemma4.jinja", "server/static"])
def test_package_data_is_found_by_importlib_resources(path):
    from importlib.resources import files

    assert (files("dgemma") / path).is_file() or (files("dgemma") / path).is_dir()
