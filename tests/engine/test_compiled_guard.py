"""A compiled core module older than its source is refused at import, naming the file."""

import os
import pathlib
import shutil
import subprocess
import sys

import engine

ENGINE_DIR = pathlib.Path(engine.__file__).parent


def run_import(tree: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import engine"],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_stale_compiled_module_is_refused(tmp_path: pathlib.Path) -> None:
    shutil.copytree(ENGINE_DIR, tmp_path / "engine", ignore=shutil.ignore_patterns("*.so"))
    native = tmp_path / "engine" / "core" / "shard.cpython-311-x86_64-linux-gnu.so"
    native.write_bytes(b"")
    source = tmp_path / "engine" / "core" / "shard.py"
    os.utime(native, (1_000_000_000, 1_000_000_000))
    os.utime(source, (2_000_000_000, 2_000_000_000))

    refused = run_import(tmp_path)
    assert refused.returncode != 0
    assert "was compiled before shard.py last changed" in refused.stderr

    # Rebuilt after the edit: accepted (the empty file is never imported here).
    os.utime(native, (3_000_000_000, 3_000_000_000))
    assert run_import(tmp_path).returncode == 0
