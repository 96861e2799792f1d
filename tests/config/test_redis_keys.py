"""Every Redis name has one home (``config/redis_keys.py``) and stays as it was.

The names are a contract with running deployments (a renamed lease key would
let two owners take one shard across an upgrade), so each is pinned here as an
exact string; the components are shown to use them; and no module outside the
home builds a name of its own (a scan of the source, shown to catch one).
"""

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from config import redis_keys
from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys, slot_topic, user_topic
from engine.shell.events import EventPublisher
from engine.shell.lease import ShardLease
from engine.shell.owner import StorageSettings
from gateway.connlimit import ConnectionLimiter
from gateway.idempotency import KeyRegistry
from gateway.live.bus import EventBus
from gateway.ratelimit import RateLimiter, RateLimits

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "gateway", "persistence", "config", "bench")
HOME = ROOT / "config" / "redis_keys.py"

NS = "slotengine:0123456789ab"
# The names as deployments hold them today: change one only with a migration.
NAMES = [
    (RedisKeys(NS).shard_owner(3), "slotengine:0123456789ab:shard:3:owner"),
    (RedisKeys(NS).shard_token(3), "slotengine:0123456789ab:shard:3:token"),
    (RedisKeys(NS).shard_storage_lost(3), "slotengine:0123456789ab:shard:3:storage_lost"),
    (RedisKeys(NS).shard_events(3), "slotengine:0123456789ab:events:shard:3"),
    (RedisKeys(NS).bus_channel, "slotengine:0123456789ab:events:bus"),
    (RedisKeys(NS).rate_limit("reserve", "alice"), "slotengine:0123456789ab:rl:reserve:alice"),
    (
        RedisKeys(NS).idempotency("reserve", "al:ice", "k:1"),
        "slotengine:0123456789ab:idem:reserve:6:al:ice:k:1",
    ),
    (RedisKeys(NS).live_connections("alice"), "slotengine:0123456789ab:live:alice"),
    (RedisKeys(NS).rebalance_claim, "slotengine:0123456789ab:rebalance"),
    (redis_keys.MAP_CHANGED, b"partition-map-changed"),
    (slot_topic("s-1"), "s:s-1"),
    (user_topic("alice"), "u:alice"),
    (NAMESPACE_DEFAULT, "slotengine"),
    (RedisKeys().shard_owner(0), "slotengine:shard:0:owner"),
    (redis_keys.namespace_for_database("0123456789ab"), NS),
]


@pytest.mark.parametrize(("built", "expected"), NAMES, ids=[str(e) for _, e in NAMES])
def test_every_name_is_what_deployments_hold(built: str | bytes, expected: str | bytes) -> None:
    assert built == expected


def test_the_components_name_their_keys_through_the_home() -> None:
    client = aioredis.Redis()  # never connected: only names are asked for
    keys = RedisKeys(NS)
    lease = ShardLease(client, shard=3, owner="o", namespace=NS)
    assert (lease._owner_key, lease._token_key) == (keys.shard_owner(3), keys.shard_token(3))
    assert EventPublisher(client, NS, 3)._channel == keys.shard_events(3)
    assert EventBus(client, NS).keys.bus_channel == keys.bus_channel
    limiter = RateLimiter(client, RateLimits(period_s=60), namespace=NS)
    assert limiter.key("reserve", "alice") == keys.rate_limit("reserve", "alice")
    registry = KeyRegistry(client, NS)
    assert registry._record("reserve", "al:ice", "k:1") == keys.idempotency(
        "reserve", "al:ice", "k:1"
    )
    assert ConnectionLimiter(client, 1, namespace=NS).record("alice") == keys.live_connections(
        "alice"
    )
    assert StorageSettings(database_url="", redis_url="").namespace == NAMESPACE_DEFAULT


# A fragment of a literal that names a Redis key or channel: ":shard:", ":rl", ...
_NAME_PART = re.compile(r"(?:^|:)(?:shard|events|rl|idem|live)(?::|$)")
_TOPIC = re.compile(r"^[su]:$")


def builders(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each literal in ``source`` that builds a Redis name, and of
    each default namespace spelled out; docstrings and comments are not code."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    in_fstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v for v in node.values if isinstance(v, ast.Constant)]
            in_fstrings.update(id(v) for v in parts)
            texts = [str(v.value) for v in parts]
            first = node.values[0] if node.values else None
            topic = isinstance(first, ast.Constant) and _TOPIC.match(str(first.value))
            if topic or any(_NAME_PART.search(text) and ":" in text for text in texts):
                yield node.lineno, ast.unparse(node)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and id(node) not in in_fstrings
            and re.search(r":(?:shard|events|rl|idem|live):|^(?:rl|idem|live):", node.value)
        ):
            yield node.lineno, repr(node.value)
        defaults: list[tuple[str, ast.expr | None]] = []
        if isinstance(node, ast.arguments):
            positional = [*node.posonlyargs, *node.args]
            defaults += zip(
                [a.arg for a in positional[len(positional) - len(node.defaults) :]],
                node.defaults,
                strict=True,
            )
            defaults += zip([a.arg for a in node.kwonlyargs], node.kw_defaults, strict=True)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defaults.append((node.target.id, node.value))
        for name, value in defaults:
            if (
                "namespace" in name
                and isinstance(value, ast.Constant)
                and isinstance(value.value, str)
            ):
                yield value.lineno, f"{name} = {value.value!r}"


def _sources() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != HOME:
                yield path


def test_no_module_but_the_home_builds_a_redis_name() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in _sources()
        for line, text in builders(path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "planted",
    [
        'key = f"{namespace}:shard:{shard}:owner"',
        'prefix = f"{ns}:rl"',
        'key = f"{self._prefix}:idem:{endpoint}"',
        'channel = f"{ns}:events:bus"',
        'record = f"{ns}:live:{user}"',
        'topic = f"s:{slot_id}"',
        'channel = "slotengine:events:bus"',
        'def __init__(self, namespace: str = "slotengine") -> None: ...',
        'class S:\n    namespace: str = "slotengine"',
    ],
)
def test_the_scan_finds_a_name_built_elsewhere(planted: str) -> None:
    assert list(builders(planted)), planted


def test_the_scan_leaves_docstrings_and_other_strings_alone() -> None:
    source = (
        '"""Keys are ``{namespace}:rl:{endpoint}:{user}``."""\n'
        "def f(x: str) -> str:\n"
        '    """Reads ``{ns}:shard:{n}:owner``."""\n'
        '    return f"{x}: live updates at {x}"  # :shard: in a comment\n'
        'label = "shard"\n'
        'ray_namespace = f"{x}-demo"\n'
    )
    assert list(builders(source)) == []
    # Every home's name itself would be found, were it anywhere else.
    assert len(list(builders(HOME.read_text()))) >= 7
