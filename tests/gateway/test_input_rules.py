"""What a client may send: every accepted value is storable, nesting is bounded, keys and
tokens mean exactly one thing, bodies are JSON.

Each rule is enforced where the data enters (decoding), with a 422 that names the field
or a 400 for a document that is not acceptable JSON; none of them may cost another user
an answer.
"""

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient

from config.settings import ConfigError
from engine.core.limits import JSON_DEPTH_MAX, SLOT_METADATA_BYTES_MAX
from engine.core.storable import NUL_MESSAGE
from gateway.auth.environment import auth_settings_from_env
from gateway.auth.principal import AuthError
from gateway.auth.settings import ENV_LIFETIME_MAX_SECONDS, TOKEN_TTL_MAX_S, AuthSettings
from gateway.auth.verify import Verifier
from tests.gateway.conftest import SECRET, Token
from tests.gateway.test_contract import _admin, _error, _json, _slot_body

Client = TestClient[Any, Any]


async def _slot(api: Client, token: Token, **fields: Any) -> dict[str, Any]:
    created: dict[str, Any] = await _json(
        await api.post("/api/admin/slots", json=_slot_body(**fields), headers=_admin(token)), 201
    )
    return created


async def _confirmed(api: Client, token: Token, slot_id: str, user: str) -> dict[str, Any]:
    reserved = await _json(
        await api.post("/api/bookings/reserve", json={"slotId": slot_id}, headers=token(user)), 201
    )
    booking_id = reserved["booking"]["id"]
    return dict(
        await _json(await api.post(f"/api/bookings/{booking_id}/confirm", headers=token(user)), 200)
    )


def _nested_metadata(depth: int) -> dict[str, Any]:
    """Metadata whose innermost container is ``depth`` levels down (itself counted)."""
    value: Any = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return dict(value)


# -- 1. every accepted string and JSON value is storable -----------------------------


async def test_a_nul_in_a_reason_is_refused_alone_and_others_in_the_same_flush_are_served(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token, capacity=30)
    booking = await _confirmed(api, token, slot["id"], "ann")

    async def reserve(user: str) -> int:
        response = await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token(user)
        )
        await response.read()
        return response.status

    bad_cancel, *others = await asyncio.gather(
        api.post(
            f"/api/bookings/{booking['id']}/cancel",
            data=b'{"reason": "a\\u0000b"}',
            headers={**token("ann"), "Content-Type": "application/json"},
        ),
        *(reserve(f"user-{n}") for n in range(20)),
    )

    body = await _error(bad_cancel, 422, "ValidationError")
    assert body["details"] == {"reason": NUL_MESSAGE}
    assert others == [201] * 20
    still = await _json(await api.get(f"/api/bookings/{booking['id']}", headers=token("ann")), 200)
    assert still["status"] == "CONFIRMED"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"resourceId": "dr\x00who"}, "resourceId"),
        ({"domain": "default\x00"}, "domain"),
        ({"metadata": {"room": "a\x00"}}, "metadata.room"),
        ({"metadata": {"rooms": [1, {"x": "\x00"}]}}, "metadata.rooms[1].x"),
        ({"metadata": {"bad\x00key": 1}}, "metadata"),
        ({"metadata": {"n": 2**70}}, "metadata.n"),
        ({"metadata": {"k": "x" * SLOT_METADATA_BYTES_MAX}}, "metadata"),
    ],
)
async def test_an_admin_cannot_create_a_slot_the_database_would_refuse(
    api: Client, token: Token, fields: dict[str, Any], field: str
) -> None:
    response = await api.post("/api/admin/slots", json=_slot_body(**fields), headers=_admin(token))
    body = await _error(response, 422, "ValidationError")
    assert field in body["details"], body


async def test_updates_follow_the_same_rules_and_metadata_up_to_the_limit_is_kept(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token)
    path = f"/api/admin/slots/{slot['id']}"
    await _error(
        await api.put(path, json={"metadata": {"k": "\x00"}}, headers=_admin(token)),
        422,
        "ValidationError",
    )
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    fits = {"k": "x" * (SLOT_METADATA_BYTES_MAX - overhead)}
    updated = await _json(await api.put(path, json={"metadata": fits}, headers=_admin(token)), 200)
    assert updated["metadata"] == fits
    too_big = {"k": "x" * (SLOT_METADATA_BYTES_MAX - overhead + 1)}
    await _error(
        await api.put(path, json={"metadata": too_big}, headers=_admin(token)),
        422,
        "ValidationError",
    )


async def test_a_service_acting_for_an_unstorable_user_is_refused(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token)
    service = token("billing", "service")
    body = await _error(
        await api.post(
            "/api/bookings/reserve",
            json={"slotId": slot["id"], "userId": "ann\x00"},
            headers=service,
        ),
        422,
        "ValidationError",
    )
    assert body["details"] == {"userId": NUL_MESSAGE}
    query = await _error(
        await api.get(
            f"/api/slots/{slot['id']}/queue/position",
            params={"userId": "ann\x00"},
            headers=service,
        ),
        422,
        "ValidationError",
    )
    assert query["details"] == {"userId": NUL_MESSAGE}


@pytest.mark.parametrize("order", [2**64, -(2**63) - 1])
async def test_a_cursor_the_engine_cannot_carry_is_422_and_costs_no_one_else_an_answer(
    api: Client, token: Token, order: int
) -> None:
    # A cursor is "<order>.<id>"; an order past 64 bits would fail to encode in the
    # engine's batch, a 500 for its request and every other command of that batch.
    slot = await _slot(api, token, capacity=30)
    cursor = f"{order}.x"

    async def reserve(user: str) -> int:
        response = await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token(user)
        )
        await response.read()
        return response.status

    bad_slots, bad_bookings, *others = await asyncio.gather(
        api.get("/api/slots", params={"cursor": cursor}, headers=token("ann")),
        api.get("/api/bookings/my", params={"cursor": cursor}, headers=token("ann")),
        *(reserve(f"user-{n}") for n in range(10)),
    )

    for response in (bad_slots, bad_bookings):
        body = await _error(response, 422, "ValidationError")
        assert list(body["details"]) == ["cursor"]
    assert others == [201] * 10


# -- 2. nesting is bounded at the door -------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5_000 + b"]" * 5_000,
        b'{"slotId": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        b"[" * 5_000,  # cut off, too
    ],
)
async def test_deeply_nested_reserve_bodies_are_400(api: Client, token: Token, raw: bytes) -> None:
    response = await api.post(
        "/api/bookings/reserve",
        data=raw,
        headers={**token("ann"), "Content-Type": "application/json"},
    )
    await _error(response, 400, "BadRequest")


async def test_slot_metadata_nests_up_to_the_limit_and_no_further(
    api: Client, token: Token
) -> None:
    await _slot(api, token, metadata=_nested_metadata(JSON_DEPTH_MAX))
    deeper = await api.post(
        "/api/admin/slots",
        json=_slot_body(metadata=_nested_metadata(JSON_DEPTH_MAX + 1)),
        headers=_admin(token),
    )
    await _error(deeper, 400, "BadRequest")
    # What the probe sent: 3.8 KB of metadata nested about 1,900 deep.
    probe = json.dumps(_slot_body(metadata={"m": 0})).replace('{"m": 0}', "[" * 1_900 + "]" * 1_900)
    answer = await api.post(
        "/api/admin/slots",
        data=probe,
        headers={**_admin(token), "Content-Type": "application/json"},
    )
    assert answer.status in (400, 422), await answer.text()


# -- 4. idempotency keys of different users never meet ---------------------------------


async def test_idempotency_keys_with_colons_do_not_collide_across_users(
    api: Client, token: Token
) -> None:
    first, second = await _slot(api, token), await _slot(api, token)
    one = await api.post(
        "/api/bookings/reserve",
        json={"slotId": first["id"]},
        headers={**token("x:y"), "Idempotency-Key": "k"},
    )
    other = await api.post(
        "/api/bookings/reserve",
        json={"slotId": second["id"]},
        headers={**token("x"), "Idempotency-Key": "y:k"},
    )
    assert (await _json(one, 201))["booking"]["userId"] == "x:y"
    assert (await _json(other, 201))["booking"]["userId"] == "x"


# -- 7. tokens, content types --------------------------------------------------------------


def _signed(**claims: Any) -> str:
    return jwt.encode({"sub": "ann", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "exp",
    [
        str(int(time.time()) + 600),  # a numeric string
        int(time.time()) + 10**30,  # valid for ever
        True,
    ],
)
def test_exp_must_be_a_number_within_the_lifetime_limit(exp: Any) -> None:
    verifier = Verifier(AuthSettings(secret=SECRET))
    with pytest.raises(AuthError):
        verifier.verify(_signed(exp=exp))


def test_iat_and_nbf_must_be_numbers_too() -> None:
    verifier = Verifier(AuthSettings(secret=SECRET))
    exp = int(time.time()) + 600
    assert verifier.verify(_signed(exp=exp, iat=int(time.time()))).subject == "ann"
    for claim in ("iat", "nbf"):
        with pytest.raises(AuthError, match=claim):
            verifier.verify(_signed(exp=exp, **{claim: "0"}))


def test_the_lifetime_limit_is_a_setting() -> None:
    verifier = Verifier(AuthSettings(secret=SECRET, lifetime_max_s=600))
    now = int(time.time())
    assert verifier.verify(_signed(exp=now + 500)).subject == "ann"
    with pytest.raises(AuthError, match="longer"):
        verifier.verify(_signed(exp=now + 700))
    settings = auth_settings_from_env(
        {"SLOTENGINE_JWT_SECRET": SECRET, ENV_LIFETIME_MAX_SECONDS: "3600"},
        data_dir=None,  # type: ignore[arg-type]
    )
    assert settings.lifetime_max_s == 3600
    assert auth_settings_from_env({"SLOTENGINE_JWT_SECRET": SECRET}, None).lifetime_max_s == (  # type: ignore[arg-type]
        TOKEN_TTL_MAX_S
    )
    for bad in ("0", "x", str(TOKEN_TTL_MAX_S + 1)):
        with pytest.raises(ConfigError, match=ENV_LIFETIME_MAX_SECONDS):
            auth_settings_from_env(
                {"SLOTENGINE_JWT_SECRET": SECRET, ENV_LIFETIME_MAX_SECONDS: bad},
                None,  # type: ignore[arg-type]
            )


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain"])
async def test_a_body_without_a_json_content_type_is_400(
    api: Client, token: Token, content_type: str | None
) -> None:
    slot = await _slot(api, token)
    headers = token("ann")
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await api.post(
        "/api/bookings/reserve",
        data=json.dumps({"slotId": slot["id"]}).encode(),
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    await _error(response, 400, "BadRequest")


@pytest.mark.parametrize(
    ("path", "body", "missing"),
    [
        ("/api/admin/slots", {}, ["resourceId", "startTime", "endTime", "capacity"]),
        ("/api/admin/slots", {"resourceId": "room-1", "capacity": 2}, ["startTime", "endTime"]),
        ("/api/bookings/reserve", {}, ["slotId"]),
    ],
)
async def test_a_422_names_every_missing_required_field(
    api: Client, token: Token, path: str, body: dict[str, Any], missing: list[str]
) -> None:
    error = await _error(
        await api.post(path, json=body, headers=_admin(token)), 422, "ValidationError"
    )
    assert list(error["details"]) == missing
    for field in missing:
        assert error["details"][field] == f"Object missing required field `{field}`"
        assert f"{field}: " in error["message"]
