"""Fuzzing what a client sends: any bytes, any JSON at any field, any query, any path.

Whatever arrives, the gateway answers with a decoded request whose every string and
metadata value PostgreSQL can store (``engine.core.storable``) and that crosses the
engine's wire, or with a 4xx in the contract's error shape: never another exception,
never a 5xx. The decoders are fuzzed directly (``decode_json``), and the query and path
parameters through the real handlers over an in-process engine that records every
command reaching a shard.
"""

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final
from urllib.parse import quote

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from engine.core import protocol as p
from engine.core.protocol import BatchCodec
from engine.core.storable import command_problems, metadata_problem, text_problem
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import InProcessHost
from engine.shell.runtime import RuntimeStatistics
from gateway import schemas as s
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.handling import decode_json
from gateway.http import BODY_BYTES_MAX, ApiError, error_response, validation_error
from tests.engine.shell.conftest import SHARDS
from tests.gateway.conftest import SECRET
from tests.support.domain import POLICIES
from tests.support.fuzz import (
    EDGE_INTEGERS,
    FUZZ,
    integers,
    json_texts,
    json_values,
    texts,
    to_bytes,
)

Schema = type[msgspec.Struct]

ERROR_KEYS: Final = {"error", "message", "details", "retryAfter"}
CONTENT_TYPES: Final = ("application/json", "text/plain", "application/octet-stream", "")
# Tomorrow: a slot the shards accept (within the booking horizon, in the future).
TOMORROW: Final = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
# A body each schema accepts; the fuzz changes, drops and adds fields from here.
VALID_FIELDS: Final[dict[Schema, dict[str, Any]]] = {
    s.CreateSlotBody: {
        "resourceId": "room-1",
        "startTime": TOMORROW.isoformat().replace("+00:00", "Z"),
        "endTime": (TOMORROW + timedelta(hours=1))
        .astimezone(timezone(timedelta(hours=1)))
        .isoformat(),
        "capacity": 2,
        "domain": "default",
        "metadata": {"room": "1"},
        "blocked": False,
    },
    s.UpdateSlotBody: {
        "startTime": "2031-01-02T09:00:00Z",
        "endTime": "2031-01-02T10:00:00Z",
        "capacity": 3,
        "metadata": {},
        "blocked": True,
    },
    s.ReserveBody: {"slotId": "0000abcd-sroom", "userId": "ann"},
    s.CancelBody: {"reason": "ill", "userId": "ann"},
    s.ActingBody: {"userId": "ann"},
}
SCHEMAS: Final = tuple(VALID_FIELDS)


@st.composite
def bodies(draw: st.DrawFn, schema: Schema) -> bytes:
    """A body of ``schema`` with some fields replaced by any JSON text, dropped or added."""
    fields = {name: json.dumps(value) for name, value in VALID_FIELDS[schema].items()}
    names = sorted(fields)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([*names, "metadata member", "unknown field", "drop"]))
        if where == "drop":
            fields.pop(draw(st.sampled_from(names)), None)
        elif where == "unknown field":
            fields[draw(texts())] = draw(json_texts())
        elif where == "metadata member":
            fields["metadata"] = f"{{{json.dumps(draw(texts()))}: {draw(json_texts())}}}"
        else:
            fields[where] = draw(json_texts())
    text = "{" + ", ".join(f"{json.dumps(name)}: {value}" for name, value in fields.items()) + "}"
    raw = to_bytes(text)
    if draw(st.integers(0, 19)) == 0:
        # Past the size limit with its content intact (whitespace is valid JSON).
        raw = raw[:1] + b" " * BODY_BYTES_MAX + raw[1:]
    return raw


def any_body(schema: Schema) -> st.SearchStrategy[bytes]:
    return st.one_of(
        bodies(schema),
        json_texts().map(to_bytes),
        st.binary(max_size=64),
        st.sampled_from([b"", b"  \n", b"{}", b"[]", b"null"]),
    )


def assert_error_shape(status: int, body: Any) -> None:
    """docs/api.md's error answer for a client's mistake: a 4xx, never a 5xx."""
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) <= ERROR_KEYS, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body.get("details", {}), dict), body
    if status == 422:
        assert body["details"], body


def assert_storable(decoded: msgspec.Struct) -> None:
    """Every string and the metadata of a decoded body: storable, and it crosses the wire."""
    for name in decoded.__struct_fields__:
        value = getattr(decoded, name)
        if isinstance(value, str):
            assert text_problem(value) is None, (name, value)
        elif isinstance(value, dict):
            assert metadata_problem(value) is None, (name, value)
    msgspec.msgpack.encode(decoded)


def decode_outcome(
    raw: bytes, content_type: str, schema: Schema, *, optional: bool
) -> msgspec.Struct | ApiError:
    """What ``decode_body`` makes of a body: the body, or the error it answers with."""
    try:
        return decode_json(raw, content_type, schema, optional=optional)
    except ApiError as error:
        return error
    except msgspec.ValidationError as error:
        return validation_error(error)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
@settings(FUZZ, max_examples=400)
@given(data=st.data(), content_type=st.sampled_from(CONTENT_TYPES), optional=st.booleans())
def test_any_body_decodes_to_storable_values_or_a_4xx(
    schema: Schema, data: st.DataObject, content_type: str, optional: bool
) -> None:
    raw = data.draw(any_body(schema), label="raw")
    outcome = decode_outcome(raw, content_type, schema, optional=optional)
    if isinstance(outcome, ApiError):
        response = error_response(outcome)
        assert isinstance(response.body, bytes)
        assert_error_shape(response.status, json.loads(response.body))
    else:
        assert isinstance(outcome, schema)
        assert_storable(outcome)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
@settings(FUZZ, max_examples=200)
@given(data=st.data(), value=json_values())
def test_any_json_value_at_any_field_is_taken_as_sent_or_refused_naming_it(
    schema: Schema, data: st.DataObject, value: Any
) -> None:
    """The structured case: one field of a valid body (or a new one) holds any value."""
    field = data.draw(st.sampled_from([*sorted(VALID_FIELDS[schema]), "unknownField"]))
    body = {**VALID_FIELDS[schema], field: value}
    raw = to_bytes(json.dumps(body, ensure_ascii=False, allow_nan=True))
    outcome = decode_outcome(raw, "application/json", schema, optional=False)
    if isinstance(outcome, ApiError):
        assert outcome.status in (400, 422), outcome.message
        if outcome.status == 422:
            named = next(iter(outcome.details))
            assert named.split(".")[0].split("[")[0] == field, (field, outcome.details)
    else:
        assert_storable(outcome)
        kept = msgspec.structs.asdict(outcome)[_snake(field)]
        if isinstance(value, str | dict) and type(kept) is type(value):  # (not a time)
            assert kept == value


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def test_hostile_but_storable_values_decode() -> None:
    """Not everything odd is refused: astral characters, separators, 64-bit integers pass."""
    raw = to_bytes(
        json.dumps(
            {**VALID_FIELDS[s.CreateSlotBody], "metadata": {"\u2028": ["\U0001f9b7", 2**63 - 1]}},
            ensure_ascii=False,
        )
    )
    decoded = decode_outcome(raw, "application/json", s.CreateSlotBody, optional=False)
    assert isinstance(decoded, s.CreateSlotBody)
    assert_storable(decoded)


# -- through the handlers: queries, paths, bodies -------------------------------------


class Recorder:
    """The in-process engine behind a tap: keeps every command that reaches a shard."""

    def __init__(self, host: InProcessHost) -> None:
        self._host = host
        self._codec = BatchCodec()
        self.commands: list[p.AnyCommand] = []

    @property
    def shard_count(self) -> int:
        return self._host.shard_count

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        self.commands.extend(self._codec.decode_batch(data))
        return await self._host.call_batch(shard, data, timeout_ms, on_early)

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        return await self._host.statistics(shard, timeout_ms)

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        await self._host.check_invariants(shard, timeout_ms)


class Gateway:
    """One gateway over one in-process engine for a whole test, driven from sync code."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.host = InProcessHost(shard_count=SHARDS, policies=POLICIES)
        self.recorder = Recorder(self.host)
        self.client = self.runner.run(self._start())
        self.root = str(self.client.make_url("")).rstrip("/")
        self.headers = {
            role: {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}"}  # type: ignore[arg-type]
            for sub, role in (("ann", "user"), ("billing", "service"), ("root", "admin"))
        }
        self.headers["none"] = {}
        # A slot and a booking that exist, so that routes taking ids get past the lookup.
        self.known_ids = self.runner.run(self._seed())

    async def _start(self) -> TestClient[Any, Any]:
        app = create_app(EngineClient(self.recorder), Verifier(AuthSettings(secret=SECRET)))
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        return client

    async def _seed(self) -> tuple[str, str]:
        slot = {**VALID_FIELDS[s.CreateSlotBody], "capacity": 1_000}
        created = await self.client.post(
            "/api/admin/slots", json=slot, headers=self.headers["admin"]
        )
        assert created.status == 201, await created.text()
        slot_id = (await created.json())["id"]
        held = await self.client.post(
            "/api/bookings/reserve", json={"slotId": slot_id}, headers=self.headers["user"]
        )
        assert held.status == 201, await held.text()
        return slot_id, (await held.json())["booking"]["id"]

    def send(
        self, method: str, target: str, role: str, body: bytes | None, content_type: str
    ) -> tuple[int, bytes]:
        async def call() -> tuple[int, bytes]:
            headers = dict(self.headers[role])
            if content_type:
                headers["Content-Type"] = content_type
            # Sent as it is: the target's percent escapes (invalid UTF-8 too) reach the server.
            async with self.client.session.request(
                method,
                URL(self.root + target, encoded=True),
                data=body,
                headers=headers,
                skip_auto_headers=["Content-Type"],
            ) as response:
                return response.status, await response.read()

        return self.runner.run(call())

    def close(self) -> None:
        self.runner.run(self.client.close())
        self.host.close()
        self.runner.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    served = Gateway()
    yield served
    served.close()


def _escaped(text: str) -> str:
    return quote(to_bytes(text), safe="")


# Percent escapes a client may send raw: cut off, not hex, invalid UTF-8, a lone surrogate, NUL.
RAW_ESCAPES: Final = ("%", "%z", "%zz", "%FF%FE", "%ED%A0%80", "%C0%80", "%00", "%2F..%2F")


def cursors() -> st.SearchStrategy[str]:
    """A cursor is base64 of JSON ``[order, id]``: any such pair, with orders past 64 bits."""
    return st.tuples(st.one_of(st.sampled_from(EDGE_INTEGERS), integers()), texts()).map(
        lambda pair: base64.urlsafe_b64encode(to_bytes(json.dumps(list(pair)))).decode()
    )


# What a client means to send, one strategy per query parameter.
WELL_FORMED: Final[dict[str, st.SearchStrategy[str]]] = {
    "from": st.sampled_from(["2031-01-02T09:00:00Z", "0001-01-01T00:00:00+23:59"]),
    "to": st.sampled_from(["9999-12-31T23:59:59.999999-23:59", "2031-01-02T10:00:00.5+01:00"]),
    "status": st.sampled_from(["AVAILABLE", "BOOKED", "RESERVED", "CONFIRMED"]),
    "limit": st.one_of(integers().map(str), st.sampled_from(["9" * 5_000, "1_0", " 5 "])),
    "available": st.sampled_from(["true", "false", "1", "0", "TRUE"]),
    "force": st.sampled_from(["true", "false", "1", "0"]),
    "cursor": cursors(),
    "userId": st.sampled_from(["ann", "x" * 128]),
    "resourceId": st.sampled_from(["room-1", ""]),
    "token": st.just("e30.e30.c2ln"),
}


def hostile_values(name: str) -> st.SearchStrategy[str]:
    """Anything else: any text, JSON of any value where a cursor is expected, raw escapes."""
    values = [texts(max_size=20), json_texts().filter(lambda text: len(text) < 200)]
    if name == "cursor":
        values.append(
            json_values(max_leaves=4).map(
                lambda value: base64.urlsafe_b64encode(to_bytes(json.dumps(value))).decode()
            )
        )
    values.append(st.sampled_from(["PENDING", "available", "x" * 129, "null", "yes", "٣"]))
    # (Raw bytes outside ASCII are the HTTP parser's to refuse, before any route: escaped here.)
    return st.one_of(st.one_of(values).map(_escaped), st.sampled_from(RAW_ESCAPES))


@st.composite
def queries(draw: st.DrawFn, names: tuple[str, ...]) -> str:
    """A query as a client means it, with some parameters hostile, absent or repeated."""
    if not names:
        return ""
    values = {name: [_escaped(draw(WELL_FORMED[name]))] for name in names if draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2)):
        hostile = draw(hostile_values(name))
        if draw(st.integers(0, 4)) == 0:
            values.setdefault(name, []).append(hostile)  # repeated: the first one counts
        else:
            values[name] = [hostile]
    pairs = [f"{quote(name)}={value}" for name, given in values.items() for value in given]
    return "?" + "&".join(pairs) if pairs else ""


def path_ids(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(known),
        texts(max_size=20).map(_escaped),
        st.sampled_from(RAW_ESCAPES),
        st.sampled_from(["0000abcd-sroom", "0000abcd-b" + "0" * 32, "0000abcd-sroom%0A"]),
    )


# (method, path template, role, the query parameters it reads, the body it decodes)
Route = tuple[str, str, str, tuple[str, ...], Schema | None]
ROUTES: Final[tuple[Route, ...]] = (
    (
        "GET",
        "/api/slots",
        "user",
        ("resourceId", "from", "to", "status", "available", "limit", "cursor"),
        None,
    ),
    ("GET", "/api/slots/{id}", "user", (), None),
    ("GET", "/api/bookings/my", "service", ("userId", "status", "limit", "cursor"), None),
    ("GET", "/api/bookings/{id}", "service", ("userId",), None),
    ("DELETE", "/api/slots/{id}/queue", "service", ("userId",), None),
    ("GET", "/api/slots/{id}/queue/position", "service", ("userId",), None),
    # The live routes take their token from the query; a fuzzed one is never valid.
    ("GET", "/api/slots/{id}/queue/events", "none", ("token",), None),
    ("DELETE", "/api/admin/slots/{id}", "admin", ("force",), None),
    ("POST", "/api/admin/slots", "admin", (), s.CreateSlotBody),
    ("PUT", "/api/admin/slots/{id}", "admin", (), s.UpdateSlotBody),
    ("POST", "/api/bookings/reserve", "user", (), s.ReserveBody),
    ("POST", "/api/bookings/reserve", "service", (), s.ReserveBody),
    ("POST", "/api/bookings/{id}/confirm", "service", (), s.ActingBody),
    ("POST", "/api/bookings/{id}/cancel", "user", (), s.CancelBody),
    ("POST", "/api/bookings/{id}/cancel", "admin", (), s.CancelBody),
    ("POST", "/api/slots/{id}/queue", "service", (), s.ActingBody),
)


@pytest.mark.parametrize(
    "route", ROUTES, ids=[f"{method} {path} as {role}" for method, path, role, _, _ in ROUTES]
)
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_any_query_path_or_body_is_served_or_refused_with_a_4xx(
    gateway: Gateway, route: Route, data: st.DataObject
) -> None:
    method, template, role, names, schema = route
    target = template.replace("{id}", data.draw(path_ids(gateway.known_ids), label="id"))
    target += data.draw(queries(names), label="query")
    body = data.draw(any_body(schema), label="body") if schema is not None else None
    content_type = data.draw(st.sampled_from(CONTENT_TYPES)) if body is not None else ""
    gateway.recorder.commands.clear()

    status, answer = gateway.send(method, target, role, body, content_type)

    assert status < 500, (status, answer[:500])
    if status >= 400:
        assert_error_shape(status, json.loads(answer))
    # Whatever reached a shard to change it, the database can store.
    for command in gateway.recorder.commands:
        if type(command) not in p.READ_ONLY_COMMANDS:
            assert command_problems(command) is None, command
