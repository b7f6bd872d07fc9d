"""The trust boundary is an import boundary, held in both directions.

The untrusted server never imports trusted-side code (where pads, verification vectors and
the conversation live): neither in its source nor in a running server process. The trusted
side never imports the server package: it reaches a server only through `ServerProcess`,
which starts a separate process. Relative imports and `from teegpu import server` count.
"""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "teegpu"
SERVER_SIDE = [PACKAGE / "server", PACKAGE / "transport", PACKAGE / "model", PACKAGE / "protocol.py",
               PACKAGE / "ring.py", PACKAGE / "errors.py", PACKAGE / "options.py", PACKAGE / "config.py",
               PACKAGE / "server_process.py", PACKAGE / "__init__.py"]
TRUSTED_SIDE = [PACKAGE / "tee", PACKAGE / "api", PACKAGE / "telemetry"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything a file imports, `from pkg import mod` as pkg.mod too."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def python_files(roots: list[Path]) -> list[Path]:
    return [f for p in roots for f in ([p] if p.is_file() else p.rglob("*.py"))]


def test_server_side_source_imports_nothing_from_tee():
    files = python_files(SERVER_SIDE)
    assert len(files) > 10
    for f in files:
        bad = [m for m in imported_modules(f) if m.startswith(("teegpu.tee", "teegpu.api"))]
        assert not bad, f"{f} imports {bad}"


def test_trusted_side_source_imports_nothing_from_server():
    files = python_files(TRUSTED_SIDE)
    assert len(files) > 8
    for f in files:
        bad = [m for m in imported_modules(f) if m == "teegpu.server" or m.startswith("teegpu.server.")]
        assert not bad, f"{f} imports {bad}"


def test_the_checker_sees_relative_and_from_package_imports(tmp_path):
    """A control: the forms a careless edit would use are all caught."""
    pkg = PACKAGE / "tee" / "_probe_never_committed.py"
    try:
        for line in ("from teegpu import server", "from ..server import linear_server",
                     "from ..server.linear_server import LinearServer", "import teegpu.server.linear_server"):
            pkg.write_text(line + "\n")
            assert "teegpu.server" in imported_modules(pkg) or any(
                m.startswith("teegpu.server.") for m in imported_modules(pkg)), line
    finally:
        pkg.unlink(missing_ok=True)


def loaded_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nprint(','.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m.startswith("teegpu")]


def test_server_process_loads_no_trusted_module():
    mods = loaded_modules("import sys, teegpu.cli as cli, teegpu.server.linear_server, teegpu.server_process\n"
                          "cli.build_parser().parse_args(['serve'])")
    assert "teegpu.server.linear_server" in mods  # the probe works
    assert not [m for m in mods if m.startswith(("teegpu.tee", "teegpu.api"))]


def test_trusted_process_loads_no_server_module():
    mods = loaded_modules("import sys, teegpu.tee.engine, teegpu.tee.scheduler, teegpu.api.app")
    assert "teegpu.tee.engine" in mods
    assert not [m for m in mods if m.startswith("teegpu.server.")]
