"""The core stays sans-I/O: no module of engine.core imports an I/O framework."""

import ast
import json
import pathlib
import subprocess
import sys

import engine.core

FORBIDDEN = {"asyncio", "ray", "redis", "asyncpg", "aiohttp", "uvloop", "socket", "psycopg"}
CORE_DIR = pathlib.Path(engine.core.__file__).parent


def io_imports(path: pathlib.Path) -> list[str]:
    """The modules of ``FORBIDDEN`` that the source at ``path`` imports, in order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [name for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_no_core_module_names_an_io_framework() -> None:
    offenders = [
        f"{path.name}: {name}"
        for path in sorted(CORE_DIR.glob("*.py"))
        for name in io_imports(path)
    ]
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
    """The checker the test above runs, on a module that breaks the rule in each way."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import json, asyncio\n"
        "from redis import Redis\n"
        "import ray.util as util\n"
        "from aiohttp.web import Application\n"
        "def later():\n"
        "    import socket\n"
        "from . import clock\n"
    )
    assert sorted(io_imports(bad)) == ["aiohttp.web", "asyncio", "ray.util", "redis", "socket"]
    good = tmp_path / "good.py"
    good.write_text("import json\nfrom dataclasses import dataclass\nimport asyncpgx\n")
    assert io_imports(good) == []
