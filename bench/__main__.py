"""``python -m bench <scenario> [options]``: finds the scenarios and runs the one asked for.

A scenario is any public module of the ``bench`` package with
``add_arguments(parser)`` and ``run(args) -> dict`` (or ``main(args)``, which
may return a dict or an exit status). Its module docstring's first line is its
help. The result dict is printed as one JSON object, the last line of output,
with the machine's speed during the run under ``machine`` (``bench._machine``).

Like every module of ``bench``, it must never be imported by the engine, the
gateway, persistence or config (an import contract holds it; ``slotengine
bench`` hands its arguments over when that command runs).
"""

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import bench
from bench._machine import MachineWatch


def discover_scenarios() -> dict[str, ModuleType]:
    scenarios: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "add_arguments") and (hasattr(module, "run") or hasattr(module, "main")):
            scenarios[info.name] = module
    return scenarios


def build_parser(
    scenarios: dict[str, ModuleType], prog: str = "python -m bench"
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Load scenarios; each prints its result as one JSON object on the last line.",
    )
    commands = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, module in sorted(scenarios.items()):
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(scenario_module=module)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """Run the scenario ``argv`` names; ``prog`` is the command shown in usage and help."""
    scenarios = discover_scenarios()
    args = build_parser(scenarios, prog).parse_args(argv)
    module: ModuleType = args.scenario_module
    entry: Callable[[argparse.Namespace], Any] = getattr(module, "run", None) or module.main
    watch = MachineWatch()
    outcome = entry(args)
    if isinstance(outcome, dict):
        # How fast the machine was: results of different runs compare by it.
        outcome.setdefault("machine", watch.summary())
        sys.stdout.flush()
        print(json.dumps(outcome, sort_keys=True), flush=True)
        return 0
    return int(outcome or 0)


if __name__ == "__main__":
    sys.exit(main())
