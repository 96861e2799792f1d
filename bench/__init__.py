"""The load harness: ``python -m bench <scenario>``.

Each scenario is a module of this package exposing ``add_arguments(parser)``
and ``run(args) -> dict`` (``main(args)`` is accepted too). The dispatcher
prints the scenario's result as one JSON object on the last line of output,
so scripts can read it with ``tail -n 1``. Performance is shown here, never
by timing assertions in tests.
"""
