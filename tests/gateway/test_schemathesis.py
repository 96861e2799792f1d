"""schemathesis over /openapi.json of a served gateway: every answer exactly as documented.

Every check over every phase: boundary values of each parameter, random
valid and invalid requests to each operation, then chains of valid calls
along the document's links (create a slot, reserve it, confirm, cancel; join
its queue, read the position). Not one failure is allowed, whatever its kind.
How it reaches the API (who calls what, how long a stream is read, the one
check that cannot apply to one operation) is in ``schemathesis.toml``; the
rules of a slot's times that no schema can state, in ``schemathesis_hooks.py``.

The chains run in runs of their own, one per seed: schemathesis ends a run of
chains as soon as replaying one no longer draws what it drew before, which a
live server's changing state soon causes, so several shorter runs reach
further than one. Each run is reproducible: the seeds are fixed.
"""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.test_serve import ROOT, Served

CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 20261121
CHAIN_SEEDS = (SEED, SEED + 1, SEED + 2)
CASES_MIN = 2_000
# Each limited endpoint's rate limit: off, or the thousands of requests one
# user sends would nearly all be answered 429 (documented, so no check fails)
# and never reach the engine.
RATE_LIMITED = ("RESERVE", "QUEUE_JOIN", "POSITION", "CANCEL")
# Every check schemathesis has: each must have run. (object_level_authorization
# compares identities listed as peers in a Web Fuzzing Commons file, which
# cannot be combined with an identity per operation: it runs and finds nothing
# to compare; another user's booking answering 404 is test_contract.py's.)
CHECKS = {
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
    "positive_data_acceptance", "missing_required_header", "unsupported_method",
    "allow_header_conformance", "use_after_free", "ensure_resource_availability",
    "ignored_auth", "object_level_authorization",
}  # fmt: skip
# Links the chains must have followed to a success: the booking flow, end to end.
LINKS_FOLLOWED = {"Reserve", "Confirm", "Cancel", "GetBooking", "GetSlot", "UpdateSlot"}


# Some four minutes on a quiet machine, over the API's 30-odd operations; a slow,
# busy machine takes twice that.
@pytest.mark.timeout(1200)
async def test_every_generated_request_is_answered_as_the_document_says(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    served = Served(database_url, tmp_path)
    served.env.update({f"SLOTENGINE_RATE_LIMIT_{name}_PER_MIN": "0" for name in RATE_LIMITED})
    served.env["SLOTENGINE_LOG_LEVEL"] = "warning"
    # Webhook endpoints on loopback (schemathesis_hooks.py): nothing leaves the machine.
    served.env["SLOTENGINE_WEBHOOK_ALLOW_PRIVATE"] = "true"
    runs = [(SEED, "examples,coverage,fuzzing"), *((seed, "stateful") for seed in CHAIN_SEEDS)]
    generated = 0
    checks: set[str] = set()
    followed: collections.Counter[tuple[str, int]] = collections.Counter()
    async with served:
        env = {
            **os.environ,
            "SCHEMATHESIS_ADMIN_TOKEN": served.token("root", "admin"),
            "SCHEMATHESIS_ANN_TOKEN": served.token("ann"),
            "SCHEMATHESIS_BOB_TOKEN": served.token("bob"),
        }
        for number, (seed, phases) in enumerate(runs):
            reports = tmp_path / f"reports-{number}"
            done = subprocess.run(
                [
                    sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
                    "run", f"{served.base}/openapi.json", "--seed", str(seed),
                    "--phases", phases, "--no-color",
                    "--report", "ndjson", "--report-dir", str(reports),
                ],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
            )  # fmt: skip
            summary = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
            assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
            assert summary is not None, done.stdout[-2000:]
            assert summary.group(1) == summary.group(2), done.stdout[-2000:]
            generated += int(summary.group(1))
            report = _read(next(reports.glob("*.ndjson")))
            checks |= report.checks
            followed += report.followed
    assert generated >= CASES_MIN
    assert checks == CHECKS
    succeeded = {link for (link, status) in followed if 200 <= status < 300}
    assert succeeded >= LINKS_FOLLOWED, followed


class _Report:
    def __init__(self) -> None:
        self.checks: set[str] = set()
        # (link, status) of every call the chains made along a link.
        self.followed: collections.Counter[tuple[str, int]] = collections.Counter()


def _read(path: Path) -> _Report:
    """The checks a run made, and the links it followed, from its NDJSON report."""
    report = _Report()
    with path.open() as lines:
        for line in lines:
            scenario = json.loads(line).get("ScenarioFinished")
            if scenario is None:
                continue
            recorder = scenario["recorder"]
            for results in (recorder.get("checks") or {}).values():
                report.checks.update(result["name"] for result in results)
            interactions = recorder.get("interactions") or {}
            for case_id, node in (recorder.get("cases") or {}).items():
                response = (interactions.get(case_id) or {}).get("response")
                if node.get("transition") is not None and response is not None:
                    # "POST /api/admin/slots -> [201] Reserve -> POST /api/bookings/reserve"
                    link = node["transition"]["id"].split(" -> ")[1].split("] ")[1]
                    report.followed[link, response["status_code"]] += 1
    return report
