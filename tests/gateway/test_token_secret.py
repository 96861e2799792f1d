"""Which secret signs a token and which one a server verifies with, said where it matters.

A token minted in another directory is signed with another data directory's
secret, and the server can only answer that its signature is invalid: the
command says which secret it signed with (and when it generated it), and the
server says which one it verifies with (and warns when it generated it).
"""

import logging
import os
from pathlib import Path

import jwt
import pytest

from engine.cli import main
from gateway.auth.environment import auth_settings_from_env
from gateway.auth.secret import SECRET_FILE_NAME, load_or_create_secret

SECRET = "s" * 32


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SLOTENGINE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def token_command(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """(the token printed on stdout, the one line on stderr)."""
    assert main(["token", "--sub", "ann"]) == 0
    captured = capsys.readouterr()
    (token,) = captured.out.splitlines()
    (note,) = captured.err.splitlines()
    return token, note


def test_the_token_command_says_which_secret_signed_and_when_it_generated_it(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = (tmp_path / "data").resolve()
    secret_file = data_dir / SECRET_FILE_NAME

    token, note = token_command(capsys)
    assert note == (
        f"slotengine token: signed with the secret in {secret_file} (generated now: a server "
        f"accepts it only if it runs with SLOTENGINE_DATA_DIR={data_dir} and no "
        "SLOTENGINE_JWT_SECRET)"
    )
    secret = load_or_create_secret(data_dir)
    assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "ann"

    token, note = token_command(capsys)
    assert note == f"slotengine token: signed with the secret in {secret_file}"
    assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "ann"


def test_the_token_command_says_when_the_configured_secret_signed(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SLOTENGINE_JWT_SECRET", SECRET)
    token, note = token_command(capsys)
    assert note == "slotengine token: signed with SLOTENGINE_JWT_SECRET"
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "ann"
    assert not (tmp_path / "data").exists()


def test_the_server_warns_when_it_generates_a_secret_and_says_which_it_verifies_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret_file = tmp_path.resolve() / SECRET_FILE_NAME
    with caplog.at_level(logging.INFO, logger="slotengine.auth"):
        auth_settings_from_env({}, tmp_path)
    ((level, message),) = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert level == logging.WARNING
    assert f"{secret_file} held no signing secret: generated a new one there" in message

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slotengine.auth"):
        auth_settings_from_env({}, tmp_path)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"HS256 tokens are verified with the secret in {secret_file}")
    ]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slotengine.auth"):
        auth_settings_from_env({"SLOTENGINE_JWT_SECRET": SECRET}, tmp_path / "unused")
    assert caplog.records == []
