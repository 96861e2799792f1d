"""Bearer tokens with real keys: HS256, RS256, ES256, JWKS, the secret file, roles."""

import base64
import datetime
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

from config.settings import ConfigError
from gateway.auth.environment import auth_settings_from_env
from gateway.auth.issue import issue_token
from gateway.auth.keys import Key
from gateway.auth.principal import (
    AuthError,
    Forbidden,
    Principal,
    acting_user,
    bearer_token,
    require_role,
)
from gateway.auth.secret import SECRET_FILE_NAME, load_or_create_secret
from gateway.auth.settings import (
    ENV_ALGORITHMS,
    ENV_AUDIENCE,
    ENV_ISSUER,
    ENV_JWKS_FILE,
    ENV_LEEWAY_SECONDS,
    ENV_PUBLIC_KEY_FILE,
    ENV_SECRET,
    TOKEN_TTL_MAX_S,
    AuthSettings,
)
from gateway.auth.verify import TOKEN_CHARS_MAX, Verifier, decode_base64url_segment

SECRET = "unit-test-secret-0123456789abcdef0123456789"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789ab"
HOUR_S = 3_600


# -- keys and files --------------------------------------------------------------
class Keys(msgspec.Struct, frozen=True):
    rsa_key: rsa.RSAPrivateKey
    other_rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65_537, key_size=2_048),
        other_rsa_key=rsa.generate_private_key(public_exponent=65_537, key_size=2_048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
    )


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, **members: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **members}


def _jwks_file(path: Path, *jwks: dict[str, Any]) -> Path:
    return _write(path, json.dumps({"keys": list(jwks)}))


def _claims(sub: str = "alice", ttl_s: int = HOUR_S, **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + ttl_s, **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Any) -> str:
    return _b64(json.dumps(value).encode())


def _rejected(verifier: Verifier, token: str) -> str:
    """The message of the ``AuthError`` the token gets; it never shows the token."""
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    message = caught.value.message
    assert (not token or token not in message) and str(caught.value) == message
    assert caught.value.status == 401 and caught.value.code == "Unauthorized"
    return message


@pytest.fixture
def hs256() -> Verifier:
    return Verifier(AuthSettings(secret=SECRET))


@pytest.fixture
def rs256(tmp_path: Path, keys: Keys) -> Verifier:
    return Verifier(
        AuthSettings(public_key_file=_write(tmp_path / "rsa.pem", _public_pem(keys.rsa_key)))
    )


# -- the Authorization header ------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["Bearer abc.def.ghi", "bearer abc.def.ghi", " BEARER  abc.def.ghi "]
)
def test_bearer_token_takes_the_scheme_in_any_case(value: str) -> None:
    assert bearer_token(value) == "abc.def.ghi"


@pytest.mark.parametrize(
    "value", [None, "", "   ", "Bearer", "Bearer ", "Bearer a b", "Basic abc", "abc", "Bearerabc"]
)
def test_bearer_token_refuses_a_missing_or_malformed_header(value: str | None) -> None:
    with pytest.raises(AuthError, match=r"^missing or malformed Authorization header$"):
        bearer_token(value)


# -- HS256 -----------------------------------------------------------------------------
def test_a_valid_hs256_token_names_its_subject_role_id_and_expiry(hs256: Verifier) -> None:
    now_s = int(time.time())
    token = issue_token(SECRET, "alice", "admin", HOUR_S, now_s=now_s)
    principal = hs256.verify(token)
    assert principal.subject == "alice" and principal.role == "admin"
    assert principal.expires_at_s == now_s + HOUR_S
    assert (
        principal.token_id
        and principal.token_id == jwt.decode(token, options={"verify_signature": False})["jti"]
    )
    assert hs256.algorithms == ("HS256",)


def test_the_role_defaults_to_user_and_every_known_role_is_accepted(hs256: Verifier) -> None:
    claims = _claims()
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert hs256.verify(token) == Principal(
        subject="alice", role="user", token_id=None, expires_at_s=claims["exp"]
    )
    for role in ("user", "admin", "service"):
        assert hs256.verify(issue_token(SECRET, "svc", role, 60)).role == role


@pytest.mark.parametrize("role", ["root", "Admin", "", None, 1, ["admin"]])
def test_an_unknown_role_is_rejected(hs256: Verifier, role: Any) -> None:
    token = jwt.encode(_claims(role=role), SECRET, algorithm="HS256")
    assert _rejected(hs256, token) == "token role must be one of user, admin, service"


def test_a_missing_or_oversized_token_is_rejected(hs256: Verifier) -> None:
    assert _rejected(hs256, "") == "missing token"
    assert _rejected(hs256, "a" * (TOKEN_CHARS_MAX + 1)) == "token is too long"


@pytest.mark.parametrize(
    "token",
    ["abc", "a.b", "a.b.c", "...", "e30.e30.", f"{_segment([1])}.{_segment({})}.", "Bearer x"],
)
def test_a_malformed_token_is_rejected(hs256: Verifier, token: str) -> None:
    assert _rejected(hs256, token) in ("token is malformed", "token algorithm is not allowed")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none_is_rejected(hs256: Verifier, alg: str, signature: str) -> None:
    token = f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(_claims(role='admin'))}.{signature}"
    assert _rejected(hs256, token) == "token algorithm is not allowed"


def test_a_token_without_alg_is_rejected(hs256: Verifier) -> None:
    good = issue_token(SECRET, "alice", "user", 60)
    token = ".".join([_segment({"typ": "JWT"}), *good.split(".")[1:]])
    assert _rejected(hs256, token) == "token algorithm is not allowed"


def test_an_expired_token_is_rejected_unless_within_the_leeway() -> None:
    token = issue_token(SECRET, "alice", "user", 10, now_s=int(time.time()) - 15)
    assert _rejected(Verifier(AuthSettings(secret=SECRET)), token) == "token has expired"
    assert Verifier(AuthSettings(secret=SECRET, leeway_s=60)).verify(token).subject == "alice"


def test_a_token_signed_with_another_secret_is_rejected(hs256: Verifier) -> None:
    token = issue_token(OTHER_SECRET, "alice", "admin", 60)
    assert _rejected(hs256, token) == "token signature is invalid"


def test_a_tampered_payload_is_rejected(hs256: Verifier) -> None:
    header, _, signature = issue_token(SECRET, "alice", "user", 60).split(".")
    forged = f"{header}.{_segment(_claims(role='admin'))}.{signature}"
    assert _rejected(hs256, forged) == "token signature is invalid"


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_exp_and_sub_are_required(hs256: Verifier, claim: str) -> None:
    claims = _claims()
    del claims[claim]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert _rejected(hs256, token) == f"token lacks the {claim} claim"


@pytest.mark.parametrize("sub", ["", "x" * 129, "al\nice", 42])
def test_a_subject_must_be_a_short_printable_string(hs256: Verifier, sub: Any) -> None:
    token = jwt.encode(_claims(sub=sub), SECRET, algorithm="HS256")
    assert _rejected(hs256, token) in (
        "token subject must be 1 to 128 printable characters",
        "token is invalid",
    )


def test_tokens_sharing_a_known_header_are_still_checked_in_full(hs256: Verifier) -> None:
    # The header of the first token is remembered; what follows it never is.
    first = jwt.encode(_claims("alice"), SECRET, algorithm="HS256")
    assert hs256.verify(first).subject == "alice"
    forged = jwt.encode(_claims("mallory"), OTHER_SECRET, algorithm="HS256")
    assert forged.partition(".")[0] == first.partition(".")[0]
    assert _rejected(hs256, forged) == "token signature is invalid"
    header, _, rest = first.partition(".")
    signature = rest.partition(".")[2]
    tampered = f"{header}.{_segment(_claims('mallory'))}.{signature}"
    assert _rejected(hs256, tampered) == "token signature is invalid"
    assert hs256.verify(jwt.encode(_claims("bob"), SECRET, algorithm="HS256")).subject == "bob"


def test_a_refused_header_is_refused_every_time(jwks: Verifier, keys: Keys) -> None:
    for _ in range(2):
        assert _rejected(jwks, _signed(keys.rsa_key, "RS256", "k9")) == (
            "token is signed with an unknown key (kid)"
        )
    assert jwks.verify(_signed(keys.rsa_key, "RS256", "k1", sub="one")).subject == "one"
    # The kid's header is known now; another key's signature under it still fails.
    assert _rejected(jwks, _signed(keys.other_rsa_key, "RS256", "k1")) == (
        "token signature is invalid"
    )


def test_the_secret_is_checked_once_not_with_every_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    original = HMACAlgorithm.prepare_key

    def counting(self: HMACAlgorithm, key: str | bytes) -> bytes:
        calls.append(key if isinstance(key, bytes) else key.encode())
        return original(self, key)

    tokens = [jwt.encode(_claims(f"user-{n}"), SECRET, algorithm="HS256") for n in range(5)]
    forged = jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256")
    monkeypatch.setattr(HMACAlgorithm, "prepare_key", counting)
    verifier = Verifier(AuthSettings(secret=SECRET))
    for n, token in enumerate(tokens):
        assert verifier.verify(token).subject == f"user-{n}"
    assert calls == [SECRET.encode()]
    assert _rejected(verifier, forged) == "token signature is invalid"


def test_an_hs256_token_is_refused_when_only_hs512_is_allowed() -> None:
    long_secret = SECRET * 2
    verifier = Verifier(AuthSettings(secret=long_secret, algorithms=("HS512",)))
    assert _rejected(verifier, issue_token(long_secret, "a", "user", 60)) == (
        "token algorithm is not allowed"
    )
    token = jwt.encode(_claims(), long_secret, algorithm="HS512")
    assert verifier.verify(token).subject == "alice"


def test_issuer_and_audience_are_checked_when_configured() -> None:
    verifier = Verifier(AuthSettings(secret=SECRET, issuer="https://idp", audience="slots"))
    good = issue_token(SECRET, "alice", "user", 60, issuer="https://idp", audience="slots")
    assert verifier.verify(good).subject == "alice"
    listed = jwt.encode(_claims(iss="https://idp", aud=["other", "slots"]), SECRET)
    assert verifier.verify(listed).subject == "alice"

    wrong_issuer = issue_token(SECRET, "alice", "user", 60, issuer="https://evil", audience="slots")
    assert _rejected(verifier, wrong_issuer) == "token issuer is not accepted"
    wrong_audience = issue_token(SECRET, "a", "user", 60, issuer="https://idp", audience="other")
    assert _rejected(verifier, wrong_audience) == "token audience is not accepted"
    assert _rejected(verifier, issue_token(SECRET, "a", "user", 60, audience="slots")) == (
        "token lacks the iss claim"
    )
    assert _rejected(verifier, issue_token(SECRET, "a", "user", 60, issuer="https://idp")) == (
        "token lacks the aud claim"
    )


def test_issuer_and_audience_are_ignored_when_not_configured(hs256: Verifier) -> None:
    token = issue_token(SECRET, "alice", "user", 60, issuer="https://any", audience="any")
    assert hs256.verify(token).subject == "alice"


VALUES = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.floats())


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC-_0123456789=", max_size=40)).map(
            ".".join
        ),
        st.tuples(
            st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), VALUES),
            st.dictionaries(st.sampled_from(["sub", "exp", "role", "jti", "iss", "aud"]), VALUES),
        ).map(lambda parts: f"{_segment(parts[0])}.{_segment(parts[1])}.c2ln"),
    )
)
def test_any_garbage_gets_an_auth_error_and_nothing_else(token: str) -> None:
    verifier = Verifier(AuthSettings(secret=SECRET))
    with pytest.raises(AuthError):
        verifier.verify(token)


# -- RS256 / ES256 from a PEM file ------------------------------------------------------
def test_a_valid_rs256_token_from_a_pem_public_key(rs256: Verifier, keys: Keys) -> None:
    token = jwt.encode(_claims(role="service", jti="t-1"), keys.rsa_key, algorithm="RS256")
    principal = rs256.verify(token)
    assert (principal.subject, principal.role, principal.token_id) == ("alice", "service", "t-1")
    assert rs256.algorithms == ("RS256",)
    # A single PEM key ignores the kid header.
    with_kid = jwt.encode(_claims(), keys.rsa_key, algorithm="RS256", headers={"kid": "whatever"})
    assert rs256.verify(with_kid).subject == "alice"


def test_an_rs256_token_signed_with_another_key_is_rejected(rs256: Verifier, keys: Keys) -> None:
    token = jwt.encode(_claims(), keys.other_rsa_key, algorithm="RS256")
    assert _rejected(rs256, token) == "token signature is invalid"


def test_hs256_signed_with_the_public_key_pem_is_rejected(
    tmp_path: Path, rs256: Verifier, keys: Keys
) -> None:
    """The classic key confusion: the attacker knows the public key and HMACs with its PEM."""
    pem = _public_pem(keys.rsa_key)
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(_claims(role='admin'))}"
    forged = (
        f"{signing_input}.{_b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"
    )
    assert _rejected(rs256, forged) == "token algorithm is not allowed"
    # Even with HS256 allowed (a secret configured as well), the public key never
    # serves as the HMAC key: the forged token meets the secret and fails.
    both = Verifier(AuthSettings(secret=SECRET, public_key_file=tmp_path / "rsa.pem"))
    assert both.algorithms == ("HS256", "RS256")
    assert _rejected(both, forged) == "token signature is invalid"
    assert both.verify(jwt.encode(_claims(), keys.rsa_key, algorithm="RS256")).subject == "alice"
    assert both.verify(issue_token(SECRET, "bob", "user", 60)).subject == "bob"


def test_a_key_never_pairs_a_public_key_with_hmac_or_a_secret_with_rsa(keys: Keys) -> None:
    with pytest.raises(RuntimeError):
        Key(keys.rsa_key.public_key(), ("HS256",), None)
    with pytest.raises(RuntimeError):
        Key(keys.rsa_key.public_key(), ("RS256", "HS256"), None)
    with pytest.raises(RuntimeError):
        Key(SECRET.encode(), ("RS256",), None)
    with pytest.raises(RuntimeError):
        Key(SECRET.encode(), (), None)


def test_a_valid_es256_token_from_a_pem_public_key(tmp_path: Path, keys: Keys) -> None:
    verifier = Verifier(
        AuthSettings(public_key_file=_write(tmp_path / "ec.pem", _public_pem(keys.ec_key)))
    )
    assert verifier.algorithms == ("ES256",)
    assert verifier.verify(jwt.encode(_claims(), keys.ec_key, algorithm="ES256")).subject == "alice"
    rsa_token = jwt.encode(_claims(), keys.rsa_key, algorithm="RS256")
    assert _rejected(verifier, rsa_token) == "token algorithm is not allowed"


def test_the_public_key_may_come_from_a_certificate(tmp_path: Path, keys: Keys) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(keys.rsa_key, hashes.SHA256())
    )
    path = _write(tmp_path / "idp.crt", certificate.public_bytes(serialization.Encoding.PEM))
    verifier = Verifier(AuthSettings(public_key_file=path))
    assert (
        verifier.verify(jwt.encode(_claims(), keys.rsa_key, algorithm="RS256")).subject == "alice"
    )


def test_an_explicit_list_allows_pss(tmp_path: Path, keys: Keys) -> None:
    path = _write(tmp_path / "rsa.pem", _public_pem(keys.rsa_key))
    verifier = Verifier(AuthSettings(public_key_file=path, algorithms=("PS256",)))
    assert (
        verifier.verify(jwt.encode(_claims(), keys.rsa_key, algorithm="PS256")).subject == "alice"
    )
    rs = jwt.encode(_claims(), keys.rsa_key, algorithm="RS256")
    assert _rejected(verifier, rs) == "token algorithm is not allowed"


def test_verify_reads_no_file(tmp_path: Path, keys: Keys) -> None:
    path = _write(tmp_path / "rsa.pem", _public_pem(keys.rsa_key))
    verifier = Verifier(AuthSettings(public_key_file=path))
    path.unlink()
    assert (
        verifier.verify(jwt.encode(_claims(), keys.rsa_key, algorithm="RS256")).subject == "alice"
    )


# -- JWKS --------------------------------------------------------------------------------
@pytest.fixture
def jwks(tmp_path: Path, keys: Keys) -> Verifier:
    path = _jwks_file(
        tmp_path / "jwks.json",
        _jwk(keys.rsa_key, kid="k1", use="sig"),
        _jwk(keys.other_rsa_key, kid="k2", alg="RS256"),
        _jwk(keys.ec_key, kid="k3"),
    )
    return Verifier(AuthSettings(jwks_file=path))


def _signed(key: Any, algorithm: str, kid: str | None, **claims: Any) -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(_claims(**claims), key, algorithm=algorithm, headers=headers)


def test_a_jwks_picks_the_key_by_kid(jwks: Verifier, keys: Keys) -> None:
    assert jwks.algorithms == ("RS256", "ES256")
    assert jwks.verify(_signed(keys.rsa_key, "RS256", "k1", sub="one")).subject == "one"
    assert jwks.verify(_signed(keys.other_rsa_key, "RS256", "k2", sub="two")).subject == "two"
    assert jwks.verify(_signed(keys.ec_key, "ES256", "k3", sub="three")).subject == "three"


def test_a_jwks_rejects_a_wrong_kid_an_unknown_kid_and_a_missing_kid(
    jwks: Verifier, keys: Keys
) -> None:
    assert _rejected(jwks, _signed(keys.rsa_key, "RS256", "k2")) == "token signature is invalid"
    assert _rejected(jwks, _signed(keys.rsa_key, "RS256", "k9")) == (
        "token is signed with an unknown key (kid)"
    )
    assert (
        _rejected(jwks, _signed(keys.rsa_key, "RS256", None)) == "token names no signing key (kid)"
    )
    # An RSA kid with an EC algorithm: the key's algorithms decide, not the token.
    assert _rejected(jwks, _signed(keys.ec_key, "ES256", "k1")) == (
        "token algorithm does not match its key"
    )


def test_a_jwks_with_one_key_takes_tokens_without_kid(tmp_path: Path, keys: Keys) -> None:
    path = _jwks_file(tmp_path / "one.json", _jwk(keys.rsa_key))
    verifier = Verifier(AuthSettings(jwks_file=path))
    assert verifier.verify(_signed(keys.rsa_key, "RS256", None)).subject == "alice"
    assert _rejected(verifier, _signed(keys.rsa_key, "RS256", "k1")) == (
        "token is signed with an unknown key (kid)"
    )


def test_a_jwks_leaves_out_encryption_keys_and_keys_of_unlisted_algorithms(
    tmp_path: Path, keys: Keys
) -> None:
    path = _jwks_file(
        tmp_path / "mixed.json",
        _jwk(keys.rsa_key, kid="enc", use="enc"),
        _jwk(keys.other_rsa_key, kid="ps", alg="PS256"),
        _jwk(keys.ec_key, kid="ec"),
    )
    verifier = Verifier(AuthSettings(jwks_file=path))
    assert verifier.algorithms == ("ES256",)
    assert verifier.verify(_signed(keys.ec_key, "ES256", None)).subject == "alice"
    assert _rejected(verifier, _signed(keys.rsa_key, "RS256", "enc")) == (
        "token algorithm is not allowed"
    )


# -- settings from the environment ---------------------------------------------------------
def test_without_any_setting_the_secret_comes_from_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    loaded = auth_settings_from_env({}, data_dir)
    assert loaded.algorithms == ("HS256",) and loaded.secret is not None
    assert loaded.public_key_file is None and loaded.jwks_file is None
    assert loaded.secret == (data_dir / SECRET_FILE_NAME).read_text().strip()
    assert auth_settings_from_env({}, data_dir) == loaded
    # What ``slotengine token`` prints verifies on the server.
    token = issue_token(load_or_create_secret(data_dir), "alice", "admin", 60)
    assert Verifier(loaded).verify(token).role == "admin"


def test_every_variable_is_read(tmp_path: Path, keys: Keys) -> None:
    pem = _write(tmp_path / "rsa.pem", _public_pem(keys.rsa_key))
    environ = {
        ENV_SECRET: f"  {SECRET}  ",
        ENV_PUBLIC_KEY_FILE: str(pem),
        ENV_ALGORITHMS: " rs256, hs256 ,PS256,RS256, ",
        ENV_ISSUER: "https://idp",
        ENV_AUDIENCE: "slots",
        ENV_LEEWAY_SECONDS: "30",
        ENV_JWKS_FILE: "",
        "UNRELATED": "x",
    }
    assert auth_settings_from_env(environ, tmp_path / "data") == AuthSettings(
        secret=SECRET,
        public_key_file=pem,
        algorithms=("RS256", "HS256", "PS256"),
        issuer="https://idp",
        audience="slots",
        leeway_s=30,
    )
    assert not (tmp_path / "data").exists()


def test_a_public_key_without_secret_accepts_no_hmac_and_creates_no_secret(
    tmp_path: Path, keys: Keys
) -> None:
    pem = _write(tmp_path / "ec.pem", _public_pem(keys.ec_key))
    loaded = auth_settings_from_env({ENV_PUBLIC_KEY_FILE: str(pem)}, tmp_path / "data")
    assert loaded.secret is None and loaded.algorithms == ("ES256",)
    assert not (tmp_path / "data").exists()
    jwks = _jwks_file(
        tmp_path / "jwks.json", _jwk(keys.rsa_key, kid="a"), _jwk(keys.ec_key, kid="b")
    )
    loaded = auth_settings_from_env({ENV_JWKS_FILE: str(jwks)}, tmp_path / "data")
    assert loaded.algorithms == ("RS256", "ES256")


def test_the_settings_repr_hides_the_secret() -> None:
    shown = repr(AuthSettings(secret=SECRET, issuer="https://idp"))
    assert SECRET not in shown and "secret='***'" in shown and "https://idp" in shown


EnvFactory = Callable[[Path, Keys], dict[str, str]]


def _pem_env(name: str, data: Callable[[Keys], bytes | str]) -> EnvFactory:
    return lambda tmp, keys: {ENV_PUBLIC_KEY_FILE: str(_write(tmp / name, data(keys)))}


def _jwks_env(document: Callable[[Keys], Any]) -> EnvFactory:
    def make(tmp: Path, keys: Keys) -> dict[str, str]:
        path = _write(tmp / "jwks.json", json.dumps(document(keys)))
        return {ENV_JWKS_FILE: str(path)}

    return make


def _private_pem(keys: Keys) -> bytes:
    return keys.rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _small_rsa_pem(_: Keys) -> bytes:
    return _public_pem(rsa.generate_private_key(public_exponent=65_537, key_size=1_024))


def _p384_pem(_: Keys) -> bytes:
    return _public_pem(ec.generate_private_key(ec.SECP384R1()))


BAD_ENVIRONMENTS: dict[str, tuple[str, EnvFactory]] = {
    "none": (ENV_ALGORITHMS, lambda tmp, keys: {ENV_ALGORITHMS: "none"}),
    "none among others": (ENV_ALGORITHMS, lambda tmp, keys: {ENV_ALGORITHMS: "HS256, None"}),
    "unknown algorithm": (ENV_ALGORITHMS, lambda tmp, keys: {ENV_ALGORITHMS: "HS256,XS999"}),
    "empty list": (ENV_ALGORITHMS, lambda tmp, keys: {ENV_ALGORITHMS: " , ,"}),
    "hmac with a public key only": (
        ENV_ALGORITHMS,
        lambda tmp, keys: {
            ENV_ALGORITHMS: "HS256,RS256",
            **_pem_env("rsa.pem", lambda k: _public_pem(k.rsa_key))(tmp, keys),
        },
    ),
    "listed algorithm no key verifies": (
        ENV_ALGORITHMS,
        lambda tmp, keys: {
            ENV_ALGORITHMS: "RS256,ES256",
            **_pem_env("rsa.pem", lambda k: _public_pem(k.rsa_key))(tmp, keys),
        },
    ),
    "key that fits no listed algorithm": (
        ENV_PUBLIC_KEY_FILE,
        lambda tmp, keys: {
            ENV_ALGORITHMS: "ES256",
            **_pem_env("rsa.pem", lambda k: _public_pem(k.rsa_key))(tmp, keys),
        },
    ),
    "ES384 key with the default list": (ENV_PUBLIC_KEY_FILE, _pem_env("p384.pem", _p384_pem)),
    "missing key file": (
        ENV_PUBLIC_KEY_FILE,
        lambda tmp, keys: {ENV_PUBLIC_KEY_FILE: str(tmp / "absent.pem")},
    ),
    "key file is a directory": (
        ENV_PUBLIC_KEY_FILE,
        lambda tmp, keys: {ENV_PUBLIC_KEY_FILE: str(tmp)},
    ),
    "garbage key file": (ENV_PUBLIC_KEY_FILE, _pem_env("junk.pem", lambda k: "not a key")),
    "private key file": (ENV_PUBLIC_KEY_FILE, _pem_env("private.pem", _private_pem)),
    "short RSA key": (ENV_PUBLIC_KEY_FILE, _pem_env("small.pem", _small_rsa_pem)),
    "key file and JWKS": (
        ENV_JWKS_FILE,
        lambda tmp, keys: {
            **_pem_env("rsa.pem", lambda k: _public_pem(k.rsa_key))(tmp, keys),
            **_jwks_env(lambda k: {"keys": [_jwk(k.rsa_key)]})(tmp, keys),
        },
    ),
    "missing JWKS": (ENV_JWKS_FILE, lambda tmp, keys: {ENV_JWKS_FILE: str(tmp / "absent.json")}),
    "JWKS not JSON": (
        ENV_JWKS_FILE,
        lambda tmp, keys: {ENV_JWKS_FILE: str(_write(tmp / "j.json", "{"))},
    ),
    "JWKS without keys": (ENV_JWKS_FILE, _jwks_env(lambda k: {"keys": []})),
    "JWKS a list": (ENV_JWKS_FILE, _jwks_env(lambda k: [_jwk(k.rsa_key)])),
    "JWKS symmetric key": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [{"kty": "oct", "k": _b64(SECRET.encode())}]}),
    ),
    "JWKS private key": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [RSAAlgorithm.to_jwk(k.rsa_key, as_dict=True)]}),
    ),
    "JWKS broken key": (ENV_JWKS_FILE, _jwks_env(lambda k: {"keys": [{"kty": "RSA", "n": "x"}]})),
    "JWKS unknown key type": (ENV_JWKS_FILE, _jwks_env(lambda k: {"keys": [{"kty": "XYZ"}]})),
    "JWKS alg that does not fit": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [_jwk(k.rsa_key, alg="ES256")]}),
    ),
    "JWKS duplicate kid": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [_jwk(k.rsa_key, kid="a"), _jwk(k.other_rsa_key, kid="a")]}),
    ),
    "JWKS several keys without kid": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [_jwk(k.rsa_key, kid="a"), _jwk(k.other_rsa_key)]}),
    ),
    "JWKS with no usable key": (
        ENV_JWKS_FILE,
        _jwks_env(lambda k: {"keys": [_jwk(k.rsa_key, alg="PS256")]}),
    ),
    "short secret": (ENV_SECRET, lambda tmp, keys: {ENV_SECRET: "tiny-secret-value"}),
    "secret too short for HS512": (
        ENV_SECRET,
        lambda tmp, keys: {ENV_SECRET: SECRET, ENV_ALGORITHMS: "HS512"},
    ),
    "leeway not a number": (ENV_LEEWAY_SECONDS, lambda tmp, keys: {ENV_LEEWAY_SECONDS: "abc"}),
    "leeway negative": (ENV_LEEWAY_SECONDS, lambda tmp, keys: {ENV_LEEWAY_SECONDS: "-1"}),
    "leeway too large": (ENV_LEEWAY_SECONDS, lambda tmp, keys: {ENV_LEEWAY_SECONDS: "301"}),
}


@pytest.mark.parametrize("case", list(BAD_ENVIRONMENTS))
def test_a_bad_setting_fails_with_one_line_naming_the_variable(
    tmp_path: Path, keys: Keys, case: str
) -> None:
    variable, make_environ = BAD_ENVIRONMENTS[case]
    environ: Mapping[str, str] = make_environ(tmp_path, keys)
    with pytest.raises(ConfigError) as caught:
        auth_settings_from_env(environ, tmp_path / "data")
    message = str(caught.value)
    assert message.startswith(variable), message
    assert "\n" not in message
    secret = environ.get(ENV_SECRET)
    assert secret is None or secret not in message


@pytest.mark.parametrize(
    "auth_settings",
    [
        AuthSettings(),
        AuthSettings(secret=SECRET, algorithms=("none",)),
        AuthSettings(secret=SECRET, algorithms=("RS256",)),
        AuthSettings(secret="short"),
        AuthSettings(secret=SECRET, leeway_s=-5),
    ],
)
def test_a_verifier_checks_settings_built_by_hand(auth_settings: AuthSettings) -> None:
    with pytest.raises(ConfigError):
        Verifier(auth_settings)


def test_an_explicit_ec_p384_list_works(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    environ = {ENV_PUBLIC_KEY_FILE: str(_write(tmp_path / "p384.pem", _public_pem(key)))}
    environ[ENV_ALGORITHMS] = "ES384"
    verifier = Verifier(auth_settings_from_env(environ, tmp_path / "data"))
    assert verifier.verify(jwt.encode(_claims(), key, algorithm="ES384")).subject == "alice"


# -- the secret file ------------------------------------------------------------------------
@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask, so the file's mode is the code's doing."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_the_secret_file_is_created_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    secret = load_or_create_secret(data_dir)
    path = data_dir / SECRET_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 43 and set(secret) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert load_or_create_secret(data_dir) == secret
    assert [p.name for p in data_dir.iterdir()] == [SECRET_FILE_NAME]
    assert load_or_create_secret(tmp_path / "elsewhere") != secret


def test_an_existing_secret_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / SECRET_FILE_NAME
    path.write_text(f"{SECRET}\n")
    path.chmod(0o600)
    assert load_or_create_secret(tmp_path) == SECRET


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [
        (SECRET, 0o644, "other users may read it"),
        ("short", 0o600, "fewer than 32 bytes"),
        ("", 0o600, "fewer than 32 bytes"),
    ],
)
def test_an_unusable_secret_file_is_refused(
    tmp_path: Path, content: str, mode: int, reason: str
) -> None:
    path = tmp_path / SECRET_FILE_NAME
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"^{ENV_SECRET} is unset .*{reason}") as caught:
        auth_settings_from_env({}, tmp_path)
    assert SECRET not in str(caught.value)


def test_a_data_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    blocker = _write(tmp_path / "file", "x")
    with pytest.raises(ConfigError, match=f"^{ENV_SECRET} is unset"):
        load_or_create_secret(blocker / "data")


# -- issuing -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("secret", "sub", "role", "ttl_s"),
    [
        ("short", "alice", "user", 60),
        (SECRET, "", "user", 60),
        (SECRET, "x" * 129, "user", 60),
        (SECRET, "alice", "root", 60),
        (SECRET, "alice", "user", 0),
        (SECRET, "alice", "user", TOKEN_TTL_MAX_S + 1),
    ],
)
def test_issue_token_refuses_what_the_verifier_would(
    secret: str, sub: str, role: Any, ttl_s: int
) -> None:
    with pytest.raises(ValueError):
        issue_token(secret, sub, role, ttl_s)


def test_issue_token_carries_issuer_audience_and_times() -> None:
    token = issue_token(SECRET, "alice", "service", 90, issuer="i", audience="a", now_s=1_000)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert {k: claims[k] for k in ("sub", "role", "iat", "exp", "iss", "aud")} == {
        "sub": "alice", "role": "service", "iat": 1_000, "exp": 1_090, "iss": "i", "aud": "a"
    }  # fmt: skip


# -- roles ---------------------------------------------------------------------------------
def _principal(role: Any, subject: str = "alice") -> Principal:
    return Principal(subject=subject, role=role, token_id=None, expires_at_s=0)


def test_require_role() -> None:
    require_role(_principal("admin"), "admin")
    require_role(_principal("service"), "user", "service")
    with pytest.raises(Forbidden) as caught:
        require_role(_principal("user"), "admin")
    assert caught.value.status == 403 and caught.value.code == "Forbidden"
    with pytest.raises(Forbidden):
        require_role(_principal("service"), "admin")
    with pytest.raises(ValueError):
        require_role(_principal("admin"))


def test_a_service_acts_for_the_user_named_in_the_body() -> None:
    assert acting_user(_principal("service", "billing"), "alice") == "alice"
    assert acting_user(_principal("service", "billing"), "billing") == "billing"
    for missing in (None, ""):
        with pytest.raises(Forbidden, match="must name the userId"):
            acting_user(_principal("service", "billing"), missing)


@pytest.mark.parametrize("role", ["user", "admin"])
def test_users_and_admins_act_only_as_themselves(role: str) -> None:
    assert acting_user(_principal(role), None) == "alice"
    assert acting_user(_principal(role), "alice") == "alice"
    with pytest.raises(Forbidden, match="only a service may act for another user"):
        acting_user(_principal(role), "bob")


def test_a_remembered_token_still_expires_and_a_changed_one_is_checked_afresh(
    hs256: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    first = hs256.verify(token)
    assert hs256.verify(token) is first  # remembered
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(AuthError, match="signature"):
        hs256.verify(f"{header}.{payload}.{flipped}")
    monkeypatch.setattr("gateway.auth.verify.time.time", lambda: first.expires_at_s + 1.0)
    with pytest.raises(AuthError, match="expired"):
        hs256.verify(token)


_SEGMENT_BYTES = st.binary(max_size=40) | st.text(
    alphabet="ABCXYZabcxyz0189-_=+/!. \n", max_size=40
).map(str.encode)


def _assert_decoded_as_pyjwt_decodes(segment: bytes) -> None:
    def outcome(decode: Any) -> tuple[str, Any]:
        try:
            return "decoded", decode(segment, "payload")
        except jwt.DecodeError as error:
            return "refused", str(error)

    assert outcome(decode_base64url_segment) == outcome(jwt.PyJWS._decode_base64url_segment)


@hypothesis_settings(max_examples=2_000, deadline=None)
@given(segment=_SEGMENT_BYTES)
def test_segments_decode_exactly_as_pyjwt_decodes_them(segment: bytes) -> None:
    _assert_decoded_as_pyjwt_decodes(segment)


@pytest.mark.parametrize(
    "segment",
    [b"", b"eyJ", b"eyJhIjoxfQ", b"eyJhIjoxfQ==", b"eyJhIjoxfQ=", b"QQ", b"QQ==", b"QR",
     b"QQ===", b"Q", b"Q!==", b"a+b/", b"ab\ncd", b"QUJD", b"QUJD===="],
)  # fmt: skip
def test_known_segments_decode_exactly_as_pyjwt_decodes_them(segment: bytes) -> None:
    _assert_decoded_as_pyjwt_decodes(segment)


def test_the_verifier_decodes_segments_with_the_faster_check() -> None:
    verifier = Verifier(AuthSettings(secret=SECRET))
    jws = verifier._decoder._jws
    assert jws._decode_base64url_segment is decode_base64url_segment
