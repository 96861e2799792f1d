"""Personal data and secrets at rest: sealed with AES-GCM under the data key.

A ``KeyRing`` holds one or more 256-bit keys by id; the first (the primary)
seals, any of them opens. A sealed value names the key that sealed it, so a
key rotation adds a new primary, re-seals what the old keys sealed, and only
then drops them (``docs/operations.md``, "Rotating the data key").

Sealed layout: ``v1`` marker byte, key id length, key id, 12-byte nonce, then
the ciphertext with its 16-byte tag. ``purpose`` is authenticated associated
data: a value sealed as one user's email cannot be opened as another's, nor as
a webhook secret. The purposes are ``contact_purpose`` (a user's email) and
``webhook_secret_purpose`` (an endpoint's signing secret): whatever seals or
opens one of those calls them, never spells the string itself.

The ring comes from ``SLOTENGINE_DATA_KEY`` or, when that is unset, from the
key kept in the data dir (``load_key_ring``, ``DATA_KEYS_FILE``).

It must never log, return or put into an exception a plaintext or a key.
"""

import base64
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from config.settings import ConfigError

FORMAT_V1: Final = b"\x01"
NONCE_BYTES: Final = 12
KEY_BYTES: Final = 32
# Key ids go into every sealed value and the contacts table's key_id column.
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# The setting holding the ring: ``id:base64[,id:base64...]``, the primary first.
DATA_KEY_SETTING: Final = "SLOTENGINE_DATA_KEY"
# Without the setting: the ring kept in the data dir, created (one generated
# key, mode 0600) at the first start and reused by every later one.
DATA_KEYS_FILE: Final = "data-keys"
_DATA_KEYS_FILE_MODE: Final = 0o600
# A ring file is a line or a few; anything larger is not one.
DATA_KEYS_FILE_BYTES_MAX: Final = 4_096


class SealingError(ValueError):
    """A key or a sealed value that cannot be used (never carries the value itself)."""


@dataclass(frozen=True)
class DataKey:
    key_id: str
    key: bytes

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise SealingError("a data key id is 1-32 letters, digits, '-' or '_'")
        if len(self.key) != KEY_BYTES:
            raise SealingError(f"a data key is {KEY_BYTES} bytes")

    def __repr__(self) -> str:  # never the key itself
        return f"DataKey({self.key_id!r})"


class KeyRing:
    """The data keys: the first seals, every one of them opens."""

    def __init__(self, keys: list[DataKey]) -> None:
        if not keys:
            raise SealingError("the data key ring is empty")
        ids = [key.key_id for key in keys]
        if len(set(ids)) != len(ids):
            raise SealingError("two data keys share an id")
        self._primary = keys[0]
        self._ciphers = {key.key_id: AESGCM(key.key) for key in keys}

    @property
    def primary_id(self) -> str:
        return self._primary.key_id

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        key_id = self._primary.key_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._primary.key_id].encrypt(nonce, plaintext, purpose.encode())
        return FORMAT_V1 + bytes([len(key_id)]) + key_id + nonce + sealed

    def open(self, sealed: bytes, purpose: str) -> bytes:
        key_id, nonce, ciphertext = _split(sealed)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SealingError(f"sealed with data key {key_id!r}, which is not in the ring")
        try:
            return cipher.decrypt(nonce, ciphertext, purpose.encode())
        except InvalidTag:
            raise SealingError(f"a value sealed with data key {key_id!r} does not open") from None

    def __repr__(self) -> str:
        return f"KeyRing({self.key_ids!r})"


def sealed_key_id(sealed: bytes) -> str:
    """Which key sealed a value."""
    return _split(sealed)[0]


def contact_purpose(user_id: str) -> str:
    """What a user's sealed email is bound to: opened as another user's, it fails."""
    return f"contact:{user_id}"


def webhook_secret_purpose(endpoint_id: str) -> str:
    """What a webhook endpoint's sealed signing secret is bound to."""
    return f"webhook-secret:{endpoint_id}"


def new_key_id(now_s: float | None = None) -> str:
    """A key id naming when the key was made: ``k20261207T203000`` (UTC)."""
    return time.strftime("k%Y%m%dT%H%M%S", time.gmtime(time.time() if now_s is None else now_s))


def new_key(key_id: str) -> DataKey:
    return DataKey(key_id, AESGCM.generate_key(bit_length=KEY_BYTES * 8))


def format_key(key: DataKey) -> str:
    """``id:base64`` as SLOTENGINE_DATA_KEY takes it."""
    return f"{key.key_id}:{base64.urlsafe_b64encode(key.key).decode()}"


def parse_keys(text: str) -> list[DataKey]:
    """``id:base64[,id:base64...]``, the primary first."""
    keys = []
    for part in text.split(","):
        key_id, sep, encoded = part.strip().partition(":")
        if not sep:
            raise SealingError("a data key is written id:base64 (the key's 32 bytes)")
        try:
            key = base64.urlsafe_b64decode(encoded.strip())
        except ValueError:
            raise SealingError(f"data key {key_id!r} is not base64") from None
        keys.append(DataKey(key_id.strip(), key))
    return keys


def load_key_ring(setting: str | None, data_dir: Path) -> KeyRing:
    """The data keys: ``SLOTENGINE_DATA_KEY`` when set (blank counts as unset),
    else the ring kept in ``data_dir/data-keys``, created with one generated key
    on first use (mode 0600, published atomically: two processes starting at
    once agree on one key) and reused on every later start.

    Raises ``ConfigError`` (one line naming the setting or the file, never a
    key) on a bad setting, or a file that is unreadable, readable by other
    users, or holds no valid ring.
    """
    if setting is not None and setting.strip():
        try:
            return KeyRing(parse_keys(setting))
        except SealingError as error:
            raise ConfigError(f"{DATA_KEY_SETTING}: {error}") from None
    path = data_dir.resolve() / DATA_KEYS_FILE
    try:
        return _read_ring_file(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise _ring_file_error(path, error.strerror or str(error)) from None
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _publish_ring_file(path, format_key(new_key(new_key_id())))
        return _read_ring_file(path)
    except OSError as error:
        raise _ring_file_error(path, error.strerror or str(error)) from None


def _read_ring_file(path: Path) -> KeyRing:
    with path.open("rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise _ring_file_error(
                path, f"other users may read it (mode {stat.S_IMODE(mode):o}); chmod 600 it"
            )
        data = file.read(DATA_KEYS_FILE_BYTES_MAX + 1)
    if len(data) > DATA_KEYS_FILE_BYTES_MAX:
        raise _ring_file_error(path, f"larger than {DATA_KEYS_FILE_BYTES_MAX} bytes")
    try:
        return KeyRing(parse_keys(data.decode("ascii").strip()))
    except UnicodeDecodeError:
        raise _ring_file_error(path, "not ASCII text") from None
    except SealingError as error:
        raise _ring_file_error(path, str(error)) from None


def _publish_ring_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless it exists, never exposing a partial file."""
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), _DATA_KEYS_FILE_MODE)
            file.write(text.encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another process won the race: its key stands
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temporary.unlink(missing_ok=True)


def _ring_file_error(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"{DATA_KEY_SETTING} is unset and the data key file {path} is unusable: {reason}"
    )


def _split(sealed: bytes) -> tuple[str, bytes, bytes]:
    if len(sealed) < 2 or sealed[:1] != FORMAT_V1:
        raise SealingError("not a sealed value")
    id_end = 2 + sealed[1]
    if len(sealed) < id_end + NONCE_BYTES + 16:
        raise SealingError("a sealed value is truncated")
    key_id = sealed[2:id_end].decode("ascii", "replace")
    return key_id, sealed[id_end : id_end + NONCE_BYTES], sealed[id_end + NONCE_BYTES :]
