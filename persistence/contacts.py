"""Users' contact details (the ``contacts`` table), sealed at rest, and re-sealing.

A user's email comes from the token's ``email`` claim (``source = 'token'``)
or from ``PUT /api/me/contact`` (``source = 'api'``); one the user set
through the API is never replaced by a token's claim. The address is sealed
with the ring's primary key under ``contact_purpose(user_id)``
(``persistence.sealing``), and the row names the key (``key_id``), so
``reseal`` finds what an older key sealed. ``reseal`` also moves the webhook
endpoints' signing secrets (``webhook_secret_purpose``) to the primary key.

It must never log, return in an error, or write anywhere but the ``contacts``
table an address in the clear; contacts are not the engine's and are never
audited. Erasure (``delete_contact``) deletes the row.
"""

import logging
import re
from collections.abc import Iterable
from typing import Final, Literal

import asyncpg
import msgspec

from persistence.sealing import (
    KeyRing,
    SealingError,
    contact_purpose,
    webhook_secret_purpose,
)

logger = logging.getLogger("slotengine.contacts")

Source = Literal["token", "api"]
# RFC 5321's bound on a forward path, less its angle brackets.
EMAIL_CHARS_MAX: Final = 254
# A plausible address: a local part of at most 64 of the characters RFC 5322's
# dot-atoms take, an '@', then a domain of two or more labels of letters,
# digits and inner hyphens (HTML's "valid e-mail address", with RFC 1035's
# label length). JSON Schema's (ECMA) and Python's readings agree on it.
EMAIL_PATTERN: Final = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
# Python's "$" also matches before a final newline: the whole text must match.
_EMAIL: Final = re.compile(EMAIL_PATTERN.removesuffix("$") + r"\Z")
# Rows re-sealed per transaction by ``reseal``.
RESEAL_BATCH_DEFAULT: Final = 500


def plausible_email(text: str) -> bool:
    """An address ``EMAIL_PATTERN`` takes, at most ``EMAIL_CHARS_MAX`` characters."""
    return len(text) <= EMAIL_CHARS_MAX and _EMAIL.match(text) is not None


class Contact(msgspec.Struct, frozen=True, kw_only=True):
    email: str
    source: Source
    updated_at_ms: int

    def __repr__(self) -> str:  # never the address itself
        return f"Contact(source={self.source!r}, updated_at_ms={self.updated_at_ms})"


async def put_contact(
    pool: asyncpg.Pool | asyncpg.Connection,
    ring: KeyRing,
    user_id: str,
    email: str,
    source: Source,
    now_ms: int,
) -> bool:
    """Store ``user_id``'s address, sealed; False when it was left as it was
    (a token's claim never replaces an address set through the API)."""
    sealed = ring.seal(email.encode(), contact_purpose(user_id))
    status: str = await pool.execute(
        """
        INSERT INTO contacts (user_id, email, key_id, source, updated_at_ms)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (user_id) DO UPDATE
            SET email = EXCLUDED.email, key_id = EXCLUDED.key_id,
                source = EXCLUDED.source, updated_at_ms = EXCLUDED.updated_at_ms
            WHERE EXCLUDED.source = 'api' OR contacts.source = 'token'
        """,
        user_id,
        sealed,
        ring.primary_id,
        source,
        now_ms,
    )
    return status.endswith(" 1")


async def get_contact(
    pool: asyncpg.Pool | asyncpg.Connection, ring: KeyRing, user_id: str
) -> Contact | None:
    """``user_id``'s address, opened; None when there is none.

    Raises ``SealingError`` when it was sealed with a key the ring lacks.
    """
    row = await pool.fetchrow(
        "SELECT email, source, updated_at_ms FROM contacts WHERE user_id = $1", user_id
    )
    if row is None:
        return None
    email = ring.open(row["email"], contact_purpose(user_id)).decode()
    return Contact(email=email, source=row["source"], updated_at_ms=row["updated_at_ms"])


async def delete_contact(pool: asyncpg.Pool | asyncpg.Connection, user_id: str) -> bool:
    """Erase ``user_id``'s contact details; False when there were none."""
    status: str = await pool.execute("DELETE FROM contacts WHERE user_id = $1", user_id)
    return status == "DELETE 1"


async def contact_emails(
    connection: asyncpg.Pool | asyncpg.Connection, ring: KeyRing, user_ids: Iterable[str]
) -> dict[str, str]:
    """The addresses of those of ``user_ids`` who have one (for the delivery workers).

    An address that does not open (a key the ring lacks) is left out, with a
    warning naming the key, never the address nor the user (personal data).
    """
    rows = await connection.fetch(
        "SELECT user_id, email FROM contacts WHERE user_id = ANY($1::text[])", list(user_ids)
    )
    emails: dict[str, str] = {}
    for row in rows:
        user_id = row["user_id"]
        try:
            emails[user_id] = ring.open(row["email"], contact_purpose(user_id)).decode()
        except SealingError as error:
            logger.warning("a contact left out: %s", error)
    return emails


async def reseal(pool: asyncpg.Pool, ring: KeyRing, batch: int = RESEAL_BATCH_DEFAULT) -> int:
    """Re-seal under the ring's primary key every contact and every webhook
    secret another key sealed; the number re-sealed.

    In batches of ``batch`` rows, each in a transaction of its own; a row
    changed meanwhile (a new address, sealed with the primary already) is left
    as it is. Raises ``SealingError`` when a value was sealed with a key the
    ring lacks: that key must stay in the ring until this has run.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    return await _reseal_contacts(pool, ring, batch) + await _reseal_webhook_secrets(
        pool, ring, batch
    )


async def _reseal_contacts(pool: asyncpg.Pool, ring: KeyRing, batch: int) -> int:
    done = 0
    while True:
        async with pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT user_id, email, key_id FROM contacts WHERE key_id <> $1"
                " ORDER BY user_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                ring.primary_id,
                batch,
            )
            for row in rows:
                purpose = contact_purpose(row["user_id"])
                sealed = ring.seal(ring.open(row["email"], purpose), purpose)
                await connection.execute(
                    "UPDATE contacts SET email = $2, key_id = $3 WHERE user_id = $1",
                    row["user_id"],
                    sealed,
                    ring.primary_id,
                )
        done += len(rows)
        if len(rows) < batch:
            return done


async def _reseal_webhook_secrets(pool: asyncpg.Pool, ring: KeyRing, batch: int) -> int:
    # The key id is in the sealed value itself: byte 1 is its length, then the id.
    primary = ring.primary_id.encode()
    done = 0
    while True:
        async with pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT id, secret FROM webhook_endpoints"
                " WHERE substring(secret FROM 3 FOR get_byte(secret, 1)) <> $1"
                " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                primary,
                batch,
            )
            for row in rows:
                purpose = webhook_secret_purpose(row["id"])
                sealed = ring.seal(ring.open(row["secret"], purpose), purpose)
                await connection.execute(
                    "UPDATE webhook_endpoints SET secret = $2 WHERE id = $1", row["id"], sealed
                )
        done += len(rows)
        if len(rows) < batch:
            return done
