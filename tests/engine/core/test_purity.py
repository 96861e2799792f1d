"""The core stays sans-I/O: no module of engine.core imports an I/O framework."""

import ast
import json
import pathlib
import subprocess
import sys

import engine.core

FORBIDDEN = {"asyncio", "ray", "redis", "asyncpg", "aiohttp", "uvloop", "socket", "psycopg"}
CORE_DIR = pathlib.Path(engine.core.__file__).parent


def test_no_core_module_names_an_io_framework() -> None:
    offenders = []
    for path in sorted(CORE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_the_core_loads_no_io_framework() -> None:
    modules = [f"engine.core.{p.stem}" for p in CORE_DIR.glob("*.py") if p.stem != "__init__"]
    script = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True
        ).stdout
    )
    assert sorted({m.split(".")[0] for m in loaded} & FORBIDDEN) == []


def test_the_checker_would_notice(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom redis import Redis\n")
    tree = ast.parse(bad.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert found & FORBIDDEN == {"asyncio", "redis"}
