"""The collector's tuning, in the shard actors and in every gateway worker.

Each check runs in a fresh interpreter: tuning freezes what exists and changes
the thresholds process-wide, which must not leak into the test process.
"""

import json
import subprocess
import sys
import textwrap

from engine.shell import limits


def _run(script: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_tuning_raises_the_young_threshold_and_freezes_what_exists() -> None:
    result = _run(
        """
        import gc, json
        before = gc.get_threshold()
        from engine.shell.gc_tuning import tune_gc
        tune_gc()
        print(json.dumps({"before": before, "after": gc.get_threshold(),
                          "frozen": gc.get_freeze_count()}))
        """
    )
    before, after = result["before"], result["after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert after == [limits.GC_GEN0_THRESHOLD, before[1], before[2]]
    assert isinstance(result["frozen"], int) and result["frozen"] > 0


def test_a_gateway_worker_serves_with_the_tuned_collector() -> None:
    """What ``serve`` runs in each worker: the app is served with the collector tuned."""
    result = _run(
        """
        import gc, json
        from config.settings import Settings
        from gateway import server
        from gateway.auth.settings import AuthSettings
        from gateway.ratelimit import RateLimits

        class Logs:
            def stop(self):
                pass

        seen = {}
        server.configure_logging = lambda level: Logs()
        server.build_app = lambda *args, **kwargs: "app"
        def serve_app(app, **options):
            seen["threshold"] = gc.get_threshold()
            seen["frozen"] = gc.get_freeze_count()
        server.serve_app = serve_app
        options = server.ServeOptions(host="127.0.0.1", port=0, engine="inproc", workers=1)
        server._run_worker(Settings(), AuthSettings(secret="s" * 32), RateLimits(), options)
        print(json.dumps(seen))
        """
    )
    threshold = result["threshold"]
    assert isinstance(threshold, list) and threshold[0] == limits.GC_GEN0_THRESHOLD
    assert isinstance(result["frozen"], int) and result["frozen"] > 0
