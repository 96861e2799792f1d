"""The bench as installed by the README (``.[embedded]``): without tqdm and matplotlib.

Each entry point runs in a fresh interpreter in which importing ``tqdm`` or
``matplotlib`` fails, as on a machine without the ``bench`` extra: every
level's ``--help`` answers, a tiny core run prints its result, and a report
is written without its plots.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("tqdm", "matplotlib")
# None in sys.modules makes every import of the name raise ImportError.
WITHOUT_EXTRAS = f"import sys\nfor name in {EXTRAS!r}: sys.modules[name] = None\n"
SLOTENGINE = WITHOUT_EXTRAS + "from engine.cli import main\nsys.exit(main(sys.argv[1:]))\n"
PYTHON_M_BENCH = WITHOUT_EXTRAS + "import runpy\nrunpy.run_module('bench', run_name='__main__')\n"
TINY_CORE = ["core", "--ops=500", "--slots=20", "--users=100", "--repeat=1"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_the_extras_are_unimportable_in_the_subprocess() -> None:
    done = _run(WITHOUT_EXTRAS + "import tqdm\n")
    assert done.returncode != 0 and "import of tqdm halted" in done.stderr


@pytest.mark.parametrize(
    ("script", "args", "usage"),
    [
        (SLOTENGINE, ["--help"], "usage: slotengine "),
        (SLOTENGINE, ["bench", "--help"], "usage: slotengine bench "),
        (SLOTENGINE, ["bench", "-h"], "usage: slotengine bench "),
        (SLOTENGINE, ["bench", "core", "--help"], "usage: slotengine bench core "),
        (SLOTENGINE, ["bench", "storm", "--help"], "usage: slotengine bench storm "),
        (SLOTENGINE, ["bench", "mixed", "--help"], "usage: slotengine bench mixed "),
        (SLOTENGINE, ["bench", "ws", "--help"], "usage: slotengine bench ws "),
        (PYTHON_M_BENCH, ["--help"], "usage: python -m bench "),
        (PYTHON_M_BENCH, ["core", "--help"], "usage: python -m bench core "),
        (PYTHON_M_BENCH, ["ray", "--help"], "usage: python -m bench ray "),
    ],
)
def test_help_answers_at_every_level(script: str, args: list[str], usage: str) -> None:
    done = _run(script, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout


@pytest.mark.parametrize("script", [SLOTENGINE, PYTHON_M_BENCH], ids=["slotengine", "python-m"])
def test_a_core_run_prints_its_result(script: str) -> None:
    args = ["bench", *TINY_CORE] if script is SLOTENGINE else TINY_CORE
    done = _run(script, *args)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["scenario"] == "core" and result["ops"] >= 500


def test_a_report_without_matplotlib_is_the_summary_alone(tmp_path: Path) -> None:
    script = WITHOUT_EXTRAS + (
        "from pathlib import Path\n"
        "from bench._http import Latencies\n"
        "from bench._report import write_report\n"
        "latencies = Latencies()\n"
        "latencies.record('reserve', 1_000_000, '201', 0.5)\n"
        "for path in write_report(Path(sys.argv[1]), 'storm', {'wall_s': 1.0}, latencies):\n"
        "    print(path.name)\n"
    )
    done = _run(script, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["storm.md"]
    summary = (tmp_path / "storm.md").read_text()
    assert "| wall_s | 1.0 |" in summary and "need matplotlib" in summary
