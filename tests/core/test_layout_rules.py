"""The code-layout rules of README "How it works", checked on the source (issue #9): no function in
core/ over 80 code lines, every core module over 600 lines says why at its top, and core
modules import other core modules at module level only (a deferred import could hide a cycle
from a reader; import-linter sees them too)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _sources():
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        yield path.relative_to(CORE.parent), text, ast.parse(text)


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    body = node.body
    doc = None
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            doc = (body[0].lineno, body[0].end_lineno)
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        text = lines[number - 1].strip()
        if not text or text.startswith("#") or (doc and doc[0] <= number <= doc[1]):
            continue
        count += 1
    return count


def test_no_core_function_is_over_80_code_lines():
    long = []
    for name, text, tree in _sources():
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_long_core_modules_say_why_at_the_top():
    silent = [
        str(name)
        for name, text, tree in _sources()
        if len(text.splitlines()) > MAX_MODULE_LINES
        and "Why one module of this size" not in (ast.get_docstring(tree) or "")
    ]
    assert not silent, silent


def test_core_imports_core_at_module_level_only():
    deferred = []
    for name, _text, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                modules = []
                if isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                    modules = [inner.module]
                elif isinstance(inner, ast.Import):
                    modules = [a.name for a in inner.names]
                if any(m == "core" or m.startswith("core.") for m in modules):
                    deferred.append(f"{name}:{inner.lineno} in {node.name}")
    assert not deferred, deferred
