"""A compiled core module older than its source is bypassed: the source runs, with a warning."""

import os
import pathlib
import shutil
import subprocess
import sys

import engine

ENGINE_DIR = pathlib.Path(engine.__file__).parent
WHICH_SHARD = "import engine.core.shard as s; print(s.__file__)"


def run(tree: pathlib.Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_stale_compiled_module_is_bypassed_for_its_source(tmp_path: pathlib.Path) -> None:
    shutil.copytree(ENGINE_DIR, tmp_path / "engine", ignore=shutil.ignore_patterns("*.so"))
    # Not a real extension: importing it would fail, so a passing import proves
    # the source was chosen.
    native = tmp_path / "engine" / "core" / "shard.cpython-311-x86_64-linux-gnu.so"
    native.write_bytes(b"not an extension module")
    source = tmp_path / "engine" / "core" / "shard.py"
    os.utime(native, (1_000_000_000, 1_000_000_000))
    os.utime(source, (2_000_000_000, 2_000_000_000))

    stale = run(tmp_path, WHICH_SHARD)
    assert stale.returncode == 0, stale.stderr
    assert stale.stdout.strip().endswith("engine/core/shard.py")
    assert "older than the source: running the source" in stale.stderr

    # A compiled file newer than its source is the one Python imports.
    os.utime(native, (3_000_000_000, 3_000_000_000))
    fresh = run(tmp_path, WHICH_SHARD)
    assert fresh.returncode != 0
    assert "shard.cpython-311-x86_64-linux-gnu.so" in fresh.stderr
