"""Fixtures every test package may use: one real local Ray for the whole run."""

import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real local Ray for the whole test run; yields its namespace."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-")
    namespace = f"slotengine-test-{uuid.uuid4().hex[:12]}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace=namespace,
        log_to_driver=False,
    )
    try:
        yield namespace
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
