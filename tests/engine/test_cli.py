"""``slotengine``'s own refusals: the option the user typed, and what it allows."""

from pathlib import Path

import pytest

from engine.cli import EXIT_UNUSABLE, main
from gateway.auth.settings import TOKEN_TTL_MAX_S


@pytest.mark.parametrize("ttl", ["0", "-5", str(TOKEN_TTL_MAX_S + 1)])
def test_a_token_ttl_out_of_range_is_refused_naming_the_option(
    ttl: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path))
    assert main(["token", "--sub", "ann", "--ttl", ttl]) == EXIT_UNUSABLE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"slotengine token: --ttl: expected seconds from 1 to {TOKEN_TTL_MAX_S} (366 days),"
        f" got {ttl}\n"
    )
    assert "ttl_s" not in captured.err


def test_a_token_ttl_in_range_is_signed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SLOTENGINE_JWT_SECRET", "a-secret-for-the-test-0123456789abcdef")
    assert main(["token", "--sub", "ann", "--ttl", "1"]) == 0
    assert capsys.readouterr().out.count(".") == 2  # one JWT
