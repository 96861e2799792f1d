"""docs/api.md against what is served: the routes of the application ``slotengine
serve`` builds, the paths of ``/openapi.json``, the error codes the code can
answer, the settings it reads and the commands it takes.

The contract is a document people read; these checks keep it from drifting
from the code while both change. Nothing is started: the application is built
and its router read.
"""

import argparse
import ast
import re
from pathlib import Path
from typing import Final

import pytest

from config.settings import load_settings
from engine.cli import build_parser
from engine.core.errors import ERRORS_BY_CODE
from gateway.auth.settings import AuthSettings
from gateway.connection import _code
from gateway.openapi import build_document
from gateway.ratelimit import RateLimits
from gateway.server import build_app

ROOT: Final = Path(__file__).resolve().parent.parent
DOC: Final = ROOT / "docs" / "api.md"
# A route is documented by a heading of its own: #### `METHOD /path`.
_ROUTE_HEADING: Final = re.compile(r"^#{2,4} `(GET|POST|PUT|DELETE|PATCH) (/[^`\s]*)`", re.M)
# A row of the error codes table: | `Code` | status | meaning |
_CODE_ROW: Final = re.compile(r"^\| `([A-Za-z]+)` \| (\d{3}) \|", re.M)
_PLACEHOLDER: Final = re.compile(r"\{[^}]*\}")
# Statuses GatewayProtocol.handle_error answers with a code made from the
# status: the parser's refusals (400), the header timeout (408) and a failure
# that escaped the middleware (500).
_PROTOCOL_STATUSES: Final = (400, 408, 500)
# The root of the engine's exception tree: its subclasses are raised, never it.
_ROOT_ERROR: Final = "EngineError"


def _route(method: str, path: str) -> tuple[str, str]:
    """A route with its placeholders unnamed: ``{slot_id}``, ``{slotId}`` and
    ``{booking_id:regex}`` all read ``{}``."""
    return method.upper(), _PLACEHOLDER.sub("{}", path)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def documented_routes(text: str) -> set[tuple[str, str]]:
    return {_route(method, path) for method, path in _ROUTE_HEADING.findall(text)}


def served_routes() -> set[tuple[str, str]]:
    app = build_app(
        load_settings({}), AuthSettings(secret="d" * 32), RateLimits(), engine_kind="inproc"
    )
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp's companion of a GET
            continue
        canonical = route.resource.canonical if route.resource is not None else ""
        routes.add(_route(route.method, canonical))
    return routes


def openapi_routes() -> set[tuple[str, str]]:
    paths = build_document()["paths"]
    return {
        _route(method, path)
        for path, operations in paths.items()
        for method in operations
        if method in ("get", "post", "put", "delete", "patch")
    }


def _python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def raised_codes() -> dict[str, int | None]:
    """Every error code the code can answer, with its status where it is a literal.

    The engine's codes (``code = "..."`` in a class body of engine/core/errors.py
    or of the gateway), every ``ApiError(status, "Code", ...)`` in the gateway,
    and the codes the connection makes from a status.
    """
    codes: dict[str, int | None] = {}
    for path in [ROOT / "engine" / "core" / "errors.py", *_python_files("gateway")]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign | ast.AnnAssign)
                        and _assigned_name(statement) == "code"
                        and isinstance(statement.value, ast.Constant)
                        and isinstance(statement.value.value, str)
                        and statement.value.value != _ROOT_ERROR
                    ):
                        codes.setdefault(statement.value.value, None)
            elif (
                isinstance(node, ast.Call)
                and _called_name(node) == "ApiError"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                code = node.args[1].value
                status = node.args[0]
                assert isinstance(code, str), f"{path}:{node.lineno}"
                literal = (
                    status.value
                    if isinstance(status, ast.Constant) and isinstance(status.value, int)
                    else None
                )
                if codes.get(code) is None:
                    codes[code] = literal
    for code, error in ERRORS_BY_CODE.items():
        codes[code] = error.status
    for status in _PROTOCOL_STATUSES:
        codes.setdefault(_code(status), status)
    return codes


def _assigned_name(statement: ast.Assign | ast.AnnAssign) -> str | None:
    target = statement.targets[0] if isinstance(statement, ast.Assign) else statement.target
    return target.id if isinstance(target, ast.Name) else None


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def read_settings() -> set[str]:
    """Every environment variable the server reads (string literals shaped like one)."""
    names: set[str] = set()
    pattern = re.compile(r"^(?:SLOTENGINE_[A-Z_]*[A-Z]|DATABASE_URL|REDIS_URL|RAY_ADDRESS)$")
    sources = ("config/settings.py", "gateway/auth/settings.py", "gateway/ratelimit.py")
    for path in (ROOT / source for source in sources):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and pattern.match(node.value)
            ):
                names.add(node.value)
    return names


def test_every_served_route_is_documented() -> None:
    missing = served_routes() - documented_routes(_doc())
    assert not missing, f"served but not in docs/api.md: {sorted(missing)}"


def test_every_documented_route_is_served() -> None:
    extra = documented_routes(_doc()) - served_routes()
    assert not extra, f"in docs/api.md but not served: {sorted(extra)}"


def test_every_route_of_the_openapi_document_is_served_and_documented() -> None:
    described = openapi_routes()
    assert described <= served_routes(), sorted(described - served_routes())
    assert described <= documented_routes(_doc()), sorted(described - documented_routes(_doc()))


def test_every_error_code_is_in_the_table_with_its_status() -> None:
    table = {code: int(status) for code, status in _CODE_ROW.findall(_doc())}
    codes = raised_codes()
    missing = sorted(set(codes) - set(table))
    assert not missing, f"error codes missing from docs/api.md's table: {missing}"
    wrong = {
        code: (table[code], status)
        for code, status in codes.items()
        if status is not None and table[code] != status
    }
    assert not wrong, f"(documented, answered) statuses differ: {wrong}"


def test_every_setting_is_documented() -> None:
    text = _doc()
    missing = sorted(name for name in read_settings() if f"`{name}`" not in text)
    assert not missing, f"settings missing from docs/api.md: {missing}"


def test_every_command_is_documented() -> None:
    text = _doc()
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    missing = sorted(name for name in commands.choices if f"`slotengine {name}" not in text)
    assert not missing, f"commands missing from docs/api.md: {missing}"


def test_every_verb_of_a_command_is_documented() -> None:
    """``slotengine services stop``, ``slotengine cluster reset``: each verb by its full name."""
    text = _doc()
    verbs = [
        f"slotengine {name} {verb}"
        for name, command in _subparsers(build_parser()).choices.items()
        if any(isinstance(a, argparse._SubParsersAction) for a in command._actions)
        for verb in _subparsers(command).choices
    ]
    assert "slotengine cluster reset" in verbs
    missing = sorted(verb for verb in verbs if f"`{verb}" not in text)
    assert not missing, f"verbs missing from docs/api.md: {missing}"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_the_checks_see_what_they_compare() -> None:
    """Each side is read as intended: a check of two empty sets would pass on anything."""
    assert ("POST", "/api/bookings/reserve") in served_routes()
    assert ("GET", "/health") in documented_routes(_doc())
    assert ("GET", "/ws/queue/{}") in openapi_routes()
    codes = raised_codes()
    assert {"SlotFull", "TooManyConnections", "RequestTimeout", "Unauthorized"} <= set(codes)
    assert {"SLOTENGINE_JWT_ISSUER", "DATABASE_URL"} <= read_settings()


@pytest.mark.parametrize("route", [("DELETE", "/api/admin/slots/{slotId}")])
def test_a_route_missing_from_the_doc_is_caught(route: tuple[str, str]) -> None:
    method, path = route
    text = _doc()
    heading = f"#### `{method} {path}`"
    assert heading in text
    assert _route(method, path) not in documented_routes(text.replace(heading, ""))
