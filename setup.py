"""Build hook: with SLOTENGINE_COMPILE=1 the core's hot modules are compiled by mypyc.

Everything else about the package lives in pyproject.toml. The default build
is pure Python (what development, tests and coverage use); a production image
sets SLOTENGINE_COMPILE=1 for a core about twice as fast (bench core).
"""

import os

from setuptools import setup

# The shard and every module its commands go through (the invariant checks
# too: the core's tests run them after each step, against this build in CI).
COMPILED_MODULES = [
    "engine/core/shard.py",
    "engine/core/slot_state.py",
    "engine/core/slot_admin.py",
    "engine/core/views.py",
    "engine/core/remembered.py",
    "engine/core/fingerprint.py",
    "engine/core/invariants.py",
    "engine/core/timer_wheel.py",
    "engine/core/waiting_line.py",
    "engine/core/states.py",
    "engine/core/storable.py",
]

ext_modules = []
if os.environ.get("SLOTENGINE_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(
        ["--config-file=", "--explicit-package-bases", *COMPILED_MODULES], opt_level="3"
    )

setup(ext_modules=ext_modules)
