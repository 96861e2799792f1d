"""Sealing with the data key: round trips, purposes, rotation, tampering."""

import pytest

from persistence.sealing import (
    KeyRing,
    SealingError,
    format_key,
    new_key,
    parse_keys,
    sealed_key_id,
)


def test_a_sealed_value_opens_only_for_its_purpose_and_hides_the_plaintext() -> None:
    ring = KeyRing([new_key("k1")])
    sealed = ring.seal(b"ann@example.com", "contact:ann")
    assert b"ann@example.com" not in sealed and sealed_key_id(sealed) == "k1"
    assert ring.open(sealed, "contact:ann") == b"ann@example.com"
    with pytest.raises(SealingError) as refused:
        ring.open(sealed, "contact:bob")
    assert "ann@example.com" not in str(refused.value)
    assert ring.seal(b"x", "p") != ring.seal(b"x", "p")  # a fresh nonce every time


def test_a_rotated_ring_seals_with_the_new_key_and_still_opens_the_old() -> None:
    old, new = new_key("k1"), new_key("k2")
    sealed_old = KeyRing([old]).seal(b"secret", "p")
    ring = KeyRing([new, old])
    assert ring.open(sealed_old, "p") == b"secret"
    assert sealed_key_id(ring.seal(b"secret", "p")) == "k2"
    with pytest.raises(SealingError, match="not in the ring"):
        KeyRing([new]).open(sealed_old, "p")


def test_tampering_and_garbage_are_refused() -> None:
    ring = KeyRing([new_key("k1")])
    sealed = bytearray(ring.seal(b"secret", "p"))
    sealed[-1] ^= 1
    with pytest.raises(SealingError):
        ring.open(bytes(sealed), "p")
    for garbage in (b"", b"\x02abc", b"\x01\x02k1"):
        with pytest.raises(SealingError):
            ring.open(garbage, "p")


def test_keys_are_written_and_read_as_the_setting_takes_them() -> None:
    first, second = new_key("k2"), new_key("k1")
    parsed = parse_keys(f"{format_key(first)}, {format_key(second)}")
    assert parsed == [first, second] and repr(first) == "DataKey('k2')"
    for bad in ("nocolon", "k1:!!!", "k1:AAAA", "bad id:" + format_key(first).split(":")[1]):
        with pytest.raises(SealingError):
            parse_keys(bad)
    with pytest.raises(SealingError):
        KeyRing([first, first])
