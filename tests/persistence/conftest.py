"""The storage tests' shared names and fixtures (the common ones live in ``tests/conftest.py``)."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence.services import stop_services
from tests.conftest import DATABASE_URL, REDIS_URL, with_database

__all__ = ["DATABASE_URL", "REDIS_URL", "with_database"]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory for embedded services, stopped and removed afterwards.

    Not tmp_path: started by root, pgserver opens read/traverse permission on
    every parent of its cluster, and pytest's base directory is private on
    purpose. A directory of its own under the system temp dir is harmless.
    """
    directory = Path(tempfile.mkdtemp(prefix="slotengine-embedded-test-"))
    try:
        yield directory
    finally:
        stop_services(directory)
        shutil.rmtree(directory, ignore_errors=True)
