"""``slotengine demo`` runs as the README prints it and tells the scripted story."""

import subprocess
import sys


def test_demo_tells_the_burst_the_expiry_and_the_offer() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "engine.cli", "demo", "--hold-ttl-seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = completed.stdout
    burst = out.split("users reserve at once")[1].split("holders decide")[0]
    assert burst.count(" 201 ") == 3
    assert burst.count(" 202 ") == 6
    assert burst.count("QueueFull") == 3
    assert "user-03's hold is EXPIRED; user-04 was offered hold" in out
    assert "user-04 claims the offer: booking CONFIRMED, queue entry CONVERTED" in out
    queue = out.split("the queue after the offer")[1]
    assert "user-05  WAITING   1" in queue
    assert "user-09  WAITING   5" in queue
