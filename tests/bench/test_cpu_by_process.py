"""The CPU of a server's processes by role (``bench._cpu``), and ``mixed``'s comparison of
several engines in one invocation."""

import argparse
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from bench import _cpu, mixed

# A child that listens on a port (as a gateway does), and a grandchild that burns CPU
# (as an engine process would); the parent itself is neither.
_TREE = """
import socket, subprocess, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
burner = subprocess.Popen([sys.executable, "-c", "import multiprocessing, time\\n"
    "end = time.time() + 30\\nwhile time.time() < end: pass"])
print("ready", flush=True)
time.sleep(30)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_processes_of_a_tree_are_told_apart_and_their_cpu_counted() -> None:
    port = _free_port()
    parent = subprocess.Popen(  # the serving parent: no listener of its own
        [sys.executable, "-c",
         "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])",
         _TREE, str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        watch = _cpu.CpuByRole(parent.pid, port, database=None, redis_port=None)
        before = watch.sample()
        # Until the busy grandchild has had a tenth of a second of CPU (the machine is
        # shared: it may take a while), at most 20 s.
        deadline = time.monotonic() + 20
        while True:
            time.sleep(0.2)
            after = watch.sample()
            spent = _cpu.spent(before, after)
            if spent.get("engine_process", {}).get("cpu_s", 0) >= 0.1:
                break
            assert time.monotonic() < deadline, spent
    finally:
        parent.kill()
        parent.wait()
    roles = {role for role, _ in after.values()}
    assert {"serve_parent", "gateways", "engine_process"} <= roles
    # The busy grandchild took the CPU; the one that only listens, less.
    assert spent["engine_process"]["processes"] == 1
    assert spent.get("gateways", {"cpu_s": 0.0})["cpu_s"] < spent["engine_process"]["cpu_s"]


def test_several_engines_are_named_comma_separated_each_once() -> None:
    parser = argparse.ArgumentParser()
    mixed.add_arguments(parser)
    assert parser.parse_args(["--engine", "ray,inproc"]).engine == "ray,inproc"
    assert parser.parse_args([]).engine == "inproc"
    for wrong in ("ray,ray", "ray,spark", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--engine", wrong])


def _run(engine: str, throughput: float) -> dict[str, Any]:
    return {"engine": engine, "throughput_rps": throughput,
            "server_cpu_us_per_request": 100.0, "services_cpu_us_per_request": 10.0}  # fmt: skip


def test_the_comparison_gives_each_rounds_ratio_and_that_of_the_medians() -> None:
    runs = [_run("ray", 2_000), _run("inproc", 4_000), _run("ray", 3_000), _run("inproc", 3_000)]
    compared = mixed._compare(runs, ["ray", "inproc"])
    assert compared["throughput_ratio"]["ray/inproc"] == {
        "per_round": [0.5, 1.0],
        "of_medians": round(2_500 / 3_500, 3),
    }
    assert compared["engines"]["ray"]["throughput_rps"] == [2_000, 3_000]
