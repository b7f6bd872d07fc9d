"""Readable code: no function in teegpu/ is over 50 lines (the code-health rule of issue 10)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "teegpu"
MAX_LINES = 50


def test_no_function_in_the_package_is_over_50_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
