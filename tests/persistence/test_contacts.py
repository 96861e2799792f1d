"""Contact details on the real PostgreSQL: sealed at rest, erased, re-sealed by a rotation;
and the data key ring the server loads (the setting, else the file in the data dir)."""

import asyncio
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from config.settings import ConfigError
from engine.cli import main
from persistence.contacts import (
    contact_emails,
    delete_contact,
    get_contact,
    put_contact,
    reseal,
)
from persistence.sealing import (
    DATA_KEYS_FILE,
    KeyRing,
    SealingError,
    format_key,
    load_key_ring,
    new_key,
    parse_keys,
    sealed_key_id,
    webhook_secret_purpose,
)

ANN = "ann@example.com"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def test_an_address_is_stored_sealed_and_opens_only_with_the_ring(
    pool: asyncpg.Pool,
) -> None:
    ring = KeyRing([new_key("k1")])
    assert await put_contact(pool, ring, "ann", ANN, "api", 1_000)
    raw = await pool.fetch("SELECT * FROM contacts")
    assert len(raw) == 1 and raw[0]["key_id"] == "k1"
    for value in raw[0].values():
        text = value if isinstance(value, bytes) else str(value).encode()
        assert b"ann@" not in text and b"example.com" not in text
    dump = await pool.fetchval("SELECT string_agg(c::text, ',') FROM contacts c")
    assert "example" not in dump
    contact = await get_contact(pool, ring, "ann")
    assert contact is not None and contact.email == ANN and contact.source == "api"
    assert contact.updated_at_ms == 1_000 and ANN not in repr(contact)
    assert await get_contact(pool, ring, "bob") is None
    with pytest.raises(SealingError):
        await get_contact(pool, KeyRing([new_key("k1")]), "ann")  # another key of that id
    # A row moved to another user does not open as theirs (the purpose is the user).
    await pool.execute("UPDATE contacts SET user_id = 'bob'")
    with pytest.raises(SealingError):
        await get_contact(pool, ring, "bob")


async def test_a_token_claim_never_replaces_an_address_set_through_the_api(
    pool: asyncpg.Pool,
) -> None:
    ring = KeyRing([new_key("k1")])
    assert await put_contact(pool, ring, "ann", "token@example.com", "token", 1)
    assert await put_contact(pool, ring, "ann", "newer-token@example.com", "token", 2)
    contact = await get_contact(pool, ring, "ann")
    assert contact is not None and contact.email == "newer-token@example.com"
    assert await put_contact(pool, ring, "ann", ANN, "api", 3)
    assert not await put_contact(pool, ring, "ann", "token@example.com", "token", 4)
    contact = await get_contact(pool, ring, "ann")
    assert contact is not None and (contact.email, contact.source) == (ANN, "api")
    assert contact.updated_at_ms == 3
    assert await put_contact(pool, ring, "ann", "other@example.com", "api", 5)
    contact = await get_contact(pool, ring, "ann")
    assert contact is not None and contact.email == "other@example.com"


async def test_erasure_removes_the_row(pool: asyncpg.Pool) -> None:
    ring = KeyRing([new_key("k1")])
    await put_contact(pool, ring, "ann", ANN, "api", 1)
    await put_contact(pool, ring, "bob", "bob@example.com", "token", 1)
    assert await delete_contact(pool, "ann")
    assert not await delete_contact(pool, "ann")
    assert await pool.fetchval("SELECT count(*) FROM contacts WHERE user_id = 'ann'") == 0
    assert await get_contact(pool, ring, "ann") is None
    async with pool.acquire() as connection:
        assert await contact_emails(connection, ring, ["ann", "bob", "carl"]) == {
            "bob": "bob@example.com"
        }


async def _add_endpoint(pool: asyncpg.Pool, ring: KeyRing, endpoint_id: str) -> None:
    await pool.execute(
        "INSERT INTO webhook_endpoints (id, url, events, secret, created_at_ms)"
        " VALUES ($1, 'https://example.com/hook', '{*}', $2, 1)",
        endpoint_id,
        ring.seal(f"whsec_{endpoint_id}".encode(), webhook_secret_purpose(endpoint_id)),
    )


async def test_a_rotation_reseals_every_contact_and_webhook_secret_under_the_new_key(
    pool: asyncpg.Pool,
) -> None:
    k1, k2 = new_key("k1"), new_key("k2")
    old = KeyRing([k1])
    users = [f"user-{n}" for n in range(7)]
    for user in users:
        await put_contact(pool, old, user, f"{user}@example.com", "api", 1)
    for endpoint in ("we-1", "we-2", "we-3"):
        await _add_endpoint(pool, old, endpoint)
    rotated = KeyRing([k2, k1])
    # Before the reseal, the rotated ring opens what the old key sealed...
    async with pool.acquire() as connection:
        assert await contact_emails(connection, rotated, users) == {
            user: f"{user}@example.com" for user in users
        }
    # ...and new addresses are sealed with the new key at once.
    await put_contact(pool, rotated, "new-user", "new@example.com", "api", 2)
    assert await reseal(pool, rotated, batch=3) == len(users) + 3
    assert await pool.fetchval("SELECT array_agg(DISTINCT key_id) FROM contacts") == ["k2"]
    for row in await pool.fetch("SELECT email FROM contacts"):
        assert sealed_key_id(row["email"]) == "k2"
    for row in await pool.fetch("SELECT secret FROM webhook_endpoints"):
        assert sealed_key_id(row["secret"]) == "k2"
    assert await reseal(pool, rotated) == 0  # nothing left to move
    # The old key can go: the new one alone opens everything.
    alone = KeyRing([k2])
    async with pool.acquire() as connection:
        emails = await contact_emails(connection, alone, [*users, "new-user"])
    assert emails == {user: f"{user}@example.com" for user in users} | {
        "new-user": "new@example.com"
    }
    for row in await pool.fetch("SELECT id, secret FROM webhook_endpoints"):
        opened = alone.open(row["secret"], webhook_secret_purpose(row["id"]))
        assert opened == f"whsec_{row['id']}".encode()
    with pytest.raises(SealingError, match="not in the ring"):
        KeyRing([k1]).open(row["secret"], webhook_secret_purpose(row["id"]))


async def test_a_reseal_with_a_key_missing_from_the_ring_stops_and_names_it(
    pool: asyncpg.Pool,
) -> None:
    await put_contact(pool, KeyRing([new_key("gone")]), "ann", ANN, "api", 1)
    with pytest.raises(SealingError, match="gone") as refused:
        await reseal(pool, KeyRing([new_key("k2")]))
    assert ANN not in str(refused.value)
    assert await pool.fetchval("SELECT key_id FROM contacts") == "gone"


def test_the_setting_is_the_ring_primary_first(tmp_path: Path) -> None:
    k1, k2 = new_key("k1"), new_key("k2")
    ring = load_key_ring(f"{format_key(k2)},{format_key(k1)}", tmp_path)
    assert ring.primary_id == "k2" and ring.key_ids == ["k2", "k1"]
    assert not (tmp_path / DATA_KEYS_FILE).exists()  # the setting wins: no file


def test_a_bad_setting_refuses_to_start_naming_it_and_never_the_key(tmp_path: Path) -> None:
    key = format_key(new_key("k1"))
    for bad in ("REPLACE-ME", "k1:c2hvcnQ=", f"{key},{key}", "bad id:" + key.split(":")[1]):
        with pytest.raises(ConfigError, match=r"^SLOTENGINE_DATA_KEY: ") as refused:
            load_key_ring(bad, tmp_path)
        assert key.split(":")[1] not in str(refused.value)


def test_without_the_setting_a_key_file_is_made_0600_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_key_ring(None, data_dir)
    path = data_dir / DATA_KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sealed = first.seal(ANN.encode(), "p")
    again = load_key_ring("  ", data_dir)  # blank counts as unset
    assert again.key_ids == first.key_ids and again.open(sealed, "p") == ANN.encode()
    assert path.read_text().strip().startswith(first.primary_id + ":")


def test_an_unusable_key_file_refuses_to_start_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / DATA_KEYS_FILE
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=re.escape(f"data key file {path} is unusable")):
        load_key_ring(None, tmp_path)
    path.write_text(format_key(new_key("k1")) + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="other users may read it"):
        load_key_ring(None, tmp_path)
    path.chmod(0o600)
    assert load_key_ring(None, tmp_path).key_ids == ["k1"]
    if os.geteuid() != 0:  # root reads whatever the mode says
        path.chmod(0o000)
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_key_ring(None, tmp_path)


def test_the_commands_make_a_key_and_reseal_under_it(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.startswith("SLOTENGINE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path / "data"))
    assert main(["data-key", "new", "--id", "k2"]) == 0
    printed = capsys.readouterr().out.strip()
    [k2] = parse_keys(printed)
    assert k2.key_id == "k2"
    assert main(["data-key", "new", "--id", "bad id"]) == 2
    assert "--id" in capsys.readouterr().err
    assert main(["data-key", "new"]) == 0
    assert parse_keys(capsys.readouterr().out.strip())[0].key_id.startswith("k20")
    k1 = new_key("k1")
    asyncio.run(_plant(database_url, KeyRing([k1])))
    # The new key first, the old after it: the reseal moves everything to k2.
    monkeypatch.setenv("SLOTENGINE_DATA_KEY", f"{printed},{format_key(k1)}")
    assert main(["data-key", "reseal"]) == 0
    assert capsys.readouterr().out.strip() == "re-sealed 2 values under data key k2"
    # The old key dropped: everything opens with k2 alone.
    monkeypatch.setenv("SLOTENGINE_DATA_KEY", printed)
    assert main(["data-key", "reseal"]) == 0
    assert "re-sealed 0 values" in capsys.readouterr().out
    assert asyncio.run(_emails(database_url, KeyRing([k2]))) == {"ann": ANN}
    # A ring lacking a key something is sealed with: named, exit 1.
    asyncio.run(_plant(database_url, KeyRing([new_key("k3")]), user="bob"))
    assert main(["data-key", "reseal"]) == 1
    assert "k3" in capsys.readouterr().err
    monkeypatch.setenv("SLOTENGINE_DATA_KEY", "REPLACE-ME")
    assert main(["data-key", "reseal"]) == 2
    assert "SLOTENGINE_DATA_KEY" in capsys.readouterr().err


async def _plant(database_url: str, ring: KeyRing, user: str = "ann") -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        await put_contact(pool, ring, user, f"{user}@example.com", "api", 1)
        if user == "ann":
            await _add_endpoint(pool, ring, "we-1")
    finally:
        await pool.close()


async def _emails(database_url: str, ring: KeyRing) -> dict[str, str]:
    connection = await asyncpg.connect(database_url)
    try:
        return await contact_emails(connection, ring, ["ann"])
    finally:
        await connection.close()
