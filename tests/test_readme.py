"""The README's quick start, run exactly as printed, on the embedded defaults.

The block after the ``quick-start`` marker is handed to bash unchanged, in an
empty directory, with the virtualenv's commands on the PATH (as after
``. .venv/bin/activate``) and no service configured: the server starts its own
PostgreSQL, Redis and Ray, as on a newcomer's machine.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from persistence.services import POSTGRES_SUBDIR, REDIS_SUBDIR, stop_postgres, stop_redis

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_START_PORT = 8080
# Creating the embedded databases and starting Ray take most of it.
QUICK_START_TIMEOUT_S = 300


def quick_start_block() -> str:
    text = README.read_text()
    marker = text.index("<!-- quick-start")
    match = re.search(r"```bash\n(.*?)```", text[marker:], re.DOTALL)
    assert match is not None, "no bash block after the quick-start marker"
    return match.group(1)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_block_is_what_the_readme_shows() -> None:
    block = quick_start_block()
    assert block.startswith("slotengine serve --port 8080 &\n")
    # The server's exit status is the block's last: `bash -e` fails on any but 0.
    assert block.rstrip().endswith("kill %1; wait %1")


@pytest.mark.slow
def test_the_quick_start_works_as_printed(tmp_path: Path) -> None:
    assert _port_is_free(QUICK_START_PORT), "the quick start needs port 8080 free"
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "REDIS_URL", "RAY_ADDRESS", "SLOTENGINE_JWT_SECRET")
        and not name.startswith("SLOTENGINE_")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        done = subprocess.run(
            ["bash", "-e", "-c", quick_start_block()],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=QUICK_START_TIMEOUT_S,
            check=False,
        )
    finally:
        # The embedded services outlive the server by design (a restart reuses
        # them); the test leaves nothing running.
        data_dir = tmp_path / ".slotengine"
        stop_redis(data_dir / REDIS_SUBDIR)
        stop_postgres(data_dir / POSTGRES_SUBDIR)
    # Every command succeeded, the server's stop included: SIGTERM (`kill %1`) stops
    # it gracefully, with exit status 0 (`wait %1`), not through Ray's handler.
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "SIGTERM received: stopping gracefully" in done.stderr, done.stderr[-4000:]
    assert "SIGTERM received at" not in done.stderr, done.stderr[-4000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    queued, confirmed, cancelled, position = answers
    assert queued["queue"]["status"] == "WAITING" and queued["queue"]["position"] == 1
    assert confirmed["status"] == "CONFIRMED" and confirmed["userId"] == "ann"
    assert cancelled["status"] == "CANCELLED" and cancelled["refundPercentage"] == 100
    assert position["status"] == "NOTIFIED" and position["bookingId"]
    assert position["userId"] == "bob"
    # The server kept its embedded services under ./.slotengine, as the README says.
    assert (tmp_path / ".slotengine").is_dir()
