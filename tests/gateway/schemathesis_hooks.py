"""schemathesis hooks: the rules of a slot's times, and of a webhook endpoint's
URL and secret, that no JSON Schema can state.

A slot's ``endTime`` must be after its ``startTime``, at most
``SLOT_DURATION_MAX_MS`` later, and not in the past: rules across two fields
and the clock, which ``/openapi.json`` states in words (the 422 of the slot
routes) but cannot put in a schema. A positive case, which the server must
accept, is therefore moved onto times that keep them: the start between one
and fourteen days ahead (every shipped domain takes a hold and a cancellation
that far ahead), an hour after the previous one moved (so that slots of one
resource seldom overlap, which is a 409), the end after it within the hour the
generated length gives. The n-th case moved gets the same times in every run
of a seed. Negative cases, and every other operation, are left as generated.

A webhook endpoint's URL must name a host that resolves (the server resolves
it), and its secret must encode 24 to 64 bytes as base64 with its padding
right: a positive case's URL becomes ``WEBHOOK_URL`` (the discard port of
loopback, which the served gateway takes with private addresses allowed, and
where no delivery ever arrives), and a secret the server would refuse becomes
a fresh one.

Loaded by schemathesis as ``schemathesis.toml`` names it (``hooks``).
"""

import itertools
import time
from typing import Any

import schemathesis
from schemathesis import Case, HookContext

from engine.core.limits import SLOT_DURATION_MAX_MS
from engine.notify.webhooks import new_secret, secret_problem
from gateway.schemas import rfc3339, to_ms
from tests.support.domain import DAY_MS, HOUR_MS

START_AHEAD_MIN_MS = DAY_MS
START_AHEAD_SPREAD_MS = 13 * DAY_MS
_moved = itertools.count()
SLOT_ROUTES = frozenset({("POST", "/api/admin/slots"), ("PUT", "/api/admin/slots/{slotId}")})
WEBHOOK_ROUTE = ("POST", "/api/admin/webhooks")
WEBHOOK_URL = "http://127.0.0.1:9/slotengine-webhook"


@schemathesis.hook("map_case")
def webhook_endpoints_within_the_rules(context: HookContext, case: Case) -> Case:
    operation = context.operation
    if (
        operation is None
        or (operation.method.upper(), operation.path) != WEBHOOK_ROUTE
        or case.meta is None
        or not case.meta.generation.mode.is_positive
        or not isinstance(case.body, dict)
    ):
        return case
    body: dict[str, Any] = {**case.body, "url": WEBHOOK_URL}
    secret = body.get("secret")
    if isinstance(secret, str) and secret_problem(secret) is not None:
        body["secret"] = new_secret()
    case.body = body
    return case


@schemathesis.hook("map_case")
def slot_times_within_the_rules(context: HookContext, case: Case) -> Case:
    operation = context.operation
    if (
        operation is None
        or (operation.method.upper(), operation.path) not in SLOT_ROUTES
        or case.meta is None
        or not case.meta.generation.mode.is_positive
        or not isinstance(case.body, dict)
    ):
        return case
    body: dict[str, Any] = case.body
    start, end = body.get("startTime"), body.get("endTime")
    if start is None and end is None:
        return case
    # A change of one time alone would be judged against the stored other one,
    # which a generator cannot know: both are given.
    start_ms = to_ms(start, "startTime") if isinstance(start, str) else 0
    end_ms = to_ms(end, "endTime") if isinstance(end, str) else start_ms
    now_ms = int(time.time() * 1000)
    if start_ms > now_ms and 0 < end_ms - start_ms <= SLOT_DURATION_MAX_MS:
        return case
    length_ms = 1 + (end_ms - start_ms) % HOUR_MS
    start_ms = now_ms + START_AHEAD_MIN_MS + next(_moved) * HOUR_MS % START_AHEAD_SPREAD_MS
    end_ms = start_ms + length_ms
    case.body = {**body, "startTime": rfc3339(start_ms), "endTime": rfc3339(end_ms)}
    return case
