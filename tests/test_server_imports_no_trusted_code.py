"""The untrusted server never imports trusted-side code (where pads, verification vectors and
the conversation live): neither in its source nor in a running server process."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "teegpu"
SERVER_SIDE = [PACKAGE / "server", PACKAGE / "transport", PACKAGE / "model", PACKAGE / "protocol.py",
               PACKAGE / "ring.py", PACKAGE / "errors.py", PACKAGE / "server_process.py", PACKAGE / "__init__.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_server_side_source_imports_nothing_from_tee():
    files = [f for p in SERVER_SIDE for f in ([p] if p.is_file() else p.rglob("*.py"))]
    assert len(files) > 10
    for f in files:
        assert not any(m.startswith("teegpu.tee") for m in imported_modules(f)), f


def test_server_process_loads_no_trusted_module():
    code = ("import sys, teegpu.cli as cli, teegpu.server.linear_server, teegpu.server_process\n"
            "cli.build_parser().parse_args(['serve'])\n"
            "print(','.join(m for m in sys.modules if m.startswith('teegpu.tee')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
