"""The layers hold: ``lint-imports`` keeps every contract in pyproject.toml.

The same check runs as its own step of ``.ci/run``; here it runs with the tests
so that a broken layer fails wherever the suite runs. Each contract is also
shown to catch what it forbids: one planted import in a copy of the tree
breaks it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "gateway", "persistence", "config", "bench")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # The tree under ``root`` is the one analysed, not an installed copy.
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


def test_every_import_contract_is_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("engine/core/clock.py", "import config", "The core is pure"),
        ("engine/core/clock.py", "import engine.shell", "The core is pure"),
        ("persistence/rows.py", "import gateway", "Persistence imports nothing"),
        ("persistence/rows.py", "import engine.shell.owner", "Persistence imports nothing"),
        ("gateway/auth/verify.py", "import persistence.store", "The gateway imports nothing"),
        ("config/settings.py", "import bench", "Nothing imports bench"),
        ("gateway/app.py", "import bench.core", "Nothing imports bench"),
        ("gateway/http.py", "import gateway.live.endpoints", "The gateway's layers"),
        ("gateway/handling.py", "import gateway.routes.slots", "The gateway's layers"),
        ("gateway/live/bus.py", "import gateway.observability.metrics", "The gateway's layers"),
        ("gateway/routes/queue.py", "import gateway.app", "The gateway's layers"),
        ("gateway/live/bus.py", "import gateway.live.watches", "The live updates' layers"),
        (
            "gateway/observability/sampler.py",
            "import gateway.observability.metrics",
            "The operations endpoints' layers",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as source:
        source.write(f"\n{planted}  # planted\n")

    result = _lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert contract in broken
    assert f"{module.removesuffix('.py').replace('/', '.')} -> {planted.split()[1]}" in broken
