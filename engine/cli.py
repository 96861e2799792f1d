"""The ``slotengine`` command: one entry point for every operator task.

Each subcommand lives in its own module and is imported only when chosen, so
``slotengine demo`` does not pay for Ray and ``slotengine bench`` does not pay
for the demo.
"""

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotengine",
        description="Actor-based slot booking engine: timed holds, FIFO queues, no double booking.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from engine import demo

    demo_parser = commands.add_parser(
        "demo", help="a scripted burst on one slot: holds, queue, an expiry and an offer"
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)

    bench_parser = commands.add_parser(
        "bench", help="load scenarios (the same as python -m bench)", add_help=False
    )
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench_parser.set_defaults(run=_bench)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench_main

    result: int = bench_main(args.bench_args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
