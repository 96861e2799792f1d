"""schemathesis over /openapi.json of a served gateway: no 5xx, answers as documented."""

import re
import subprocess
import sys
from pathlib import Path

from tests.gateway.test_serve import Served

EXAMPLES_PER_OPERATION = 100
CASES_MIN = 1_000


async def test_generated_requests_never_get_a_server_error_and_conform_to_the_schema(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    served = Served(database_url, tmp_path)
    async with served:
        admin = served.token("root", "admin")
        done = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run",
                f"{served.base}/openapi.json",
                "--header", f"Authorization: Bearer {admin}",
                "--checks",
                "not_a_server_error,response_schema_conformance,status_code_conformance,"
                "content_type_conformance",
                "--max-examples", str(EXAMPLES_PER_OPERATION),
                "--phases", "examples,fuzzing",
                "--seed", "20261121",
                # A stream answers for as long as the client listens.
                "--exclude-path-regex", "/queue/events$",
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    summary = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert done.returncode == 0, done.stdout[-4000:]
    assert summary is not None, done.stdout[-2000:]
    generated, passed = int(summary.group(1)), int(summary.group(2))
    assert generated == passed >= CASES_MIN
