"""Replies across the Ray boundary: small ones travel as they are, large ones compressed."""

import pytest

from engine.shell.errors import ShardFailed
from engine.shell.limits import REPLY_COMPRESS_ABOVE_BYTES
from engine.shell.ray_actor import frame_reply, unframe_reply


def test_a_small_reply_travels_uncompressed() -> None:
    reply = b"\x91\x81small reply"

    framed = frame_reply(reply)

    assert framed[1:] == reply
    assert unframe_reply(framed) == reply


def test_a_large_reply_travels_compressed_and_comes_back_whole() -> None:
    reply = b"".join(b"booking %d RESERVED " % n for n in range(10_000))
    assert len(reply) > REPLY_COMPRESS_ABOVE_BYTES

    framed = frame_reply(reply)

    assert len(framed) < REPLY_COMPRESS_ABOVE_BYTES
    assert unframe_reply(framed) == reply


def test_an_unknown_frame_is_refused() -> None:
    with pytest.raises(ShardFailed, match="frame header"):
        unframe_reply(b"\x07whatever")
