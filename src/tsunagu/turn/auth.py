"""Long-term credentials for the TURN server (RFC 8656 §5, RFC 8489 §9.2).

* Static users, from ``--user NAME:PASSWORD`` or a users file. Passwords are turned into
  keys at load time (RFC 8656 §6: "the server MUST NOT store the password explicitly");
  a users file may also hold the keys themselves (``NAME:0x<hex>``, as coturn's
  ``turnadmin -k`` prints them: 16 bytes for MD5, 32 for SHA-256).
* TURN REST API ephemeral users (``--auth-secret``): username ``EXPIRY:USER`` (or just
  ``EXPIRY``), password ``base64(HMAC-SHA1(secret, username))``. Nothing is stored per user,
  so any number of servers sharing the secret accept the same credentials; several secrets
  may be configured at once to rotate them.
* Nonces are stateless (:class:`~tsunagu.stun.credentials.NonceFactory`: an HMAC over the
  client's transport address and the issue time), and carry the RFC 8489 §9.2 security
  feature cookie advertising PASSWORD-ALGORITHMS (bit 0) and, when every user is a static
  one, USERHASH (bit 1).
* Password algorithms (RFC 8489 §9.2.4, §18.5.1): SHA-256 and MD5 are offered, in that
  order unless some static user only has an MD5 key. A client that names none gets MD5.
* Keys that just authenticated a request are kept prepared (:class:`IntegrityKey`, the HMAC
  key schedule done) in a bounded least-recently-used table, so that the next requests of
  the same credential -- the Allocate's success response, Refresh, CreatePermission,
  ChannelBind -- skip the key schedule and, for REST API users, the key derivation. Only
  keys that verified a request go in (an unauthenticated request adds nothing), and the
  table belongs to one :class:`Authenticator`: new credentials (SIGHUP) start a new one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tsunagu.stun.attributes import (
    Attribute,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    Userhash,
    Username,
)
from tsunagu.stun.constants import ErrorCode
from tsunagu.stun.credentials import (
    CredentialError,
    NonceFactory,
    NonceStatus,
    SecurityFeatures,
    long_term_key,
    opaque_string,
    rest_api_expired,
    rest_api_password,
    userhash,
)
from tsunagu.stun.credentials import PasswordAlgorithm as Algorithm
from tsunagu.stun.message import IntegrityAlgorithm, IntegrityKey, Message
from tsunagu.turn.transport import Address

_KEY_LENGTHS = {16: Algorithm.MD5, 32: Algorithm.SHA256}

PREPARED_KEYS = 4096
"""Credentials whose prepared key an :class:`Authenticator` keeps (least recently used
dropped first): at about 1 KiB each (four hash states), a few MiB at most."""


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The long-term keys of one static user; either may be unknown when the users file
    held a key rather than a password."""

    md5: bytes | None = None
    sha256: bytes | None = None

    def key(self, algorithm: Algorithm) -> bytes | None:
        return self.md5 if algorithm == Algorithm.MD5 else self.sha256


def user_keys(username: str, realm: str, password: str) -> UserKeys:
    """Both long-term keys of a user (RFC 8489 §9.2.2, §18.5.1)."""
    return UserKeys(
        md5=long_term_key(username, realm, password, Algorithm.MD5),
        sha256=long_term_key(username, realm, password, Algorithm.SHA256),
    )


def parse_user(spec: str, realm: str) -> tuple[str, UserKeys]:
    """``NAME:PASSWORD`` or ``NAME:0xHEXKEY`` -> (name, keys). Raises ValueError."""
    name, sep, secret = spec.partition(":")
    if not sep or not name or not secret:
        raise ValueError(f"user must be NAME:PASSWORD, got {spec.split(':', 1)[0]!r}:...")
    try:
        name = opaque_string(name)
    except CredentialError as exc:
        raise ValueError(f"user name {name!r}: {exc}") from None
    if secret.startswith("0x") and len(secret) in (2 + 32, 2 + 64):
        try:
            raw = bytes.fromhex(secret[2:])
        except ValueError:
            raise ValueError(f"user {name!r}: key is not hexadecimal") from None
        if _KEY_LENGTHS[len(raw)] == Algorithm.MD5:
            return name, UserKeys(md5=raw)
        return name, UserKeys(sha256=raw)
    try:
        return name, user_keys(name, realm, secret)
    except CredentialError as exc:
        raise ValueError(f"user {name!r}: {exc}") from None


def parse_users_file(text: str, realm: str) -> dict[str, UserKeys]:
    """A users file: one ``NAME:PASSWORD`` or ``NAME:0xKEY`` per line; blank lines and
    lines starting with ``#`` are ignored. Raises ValueError naming the bad line."""
    users: dict[str, UserKeys] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            name, keys = parse_user(stripped, realm)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        users[name] = keys
    return users


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The request carried valid long-term credentials."""

    username: str
    key: IntegrityKey
    integrity: IntegrityAlgorithm
    """Which MESSAGE-INTEGRITY the response must carry (the request's, RFC 8489 §9.2.4)."""
    account: str
    """Whom quotas count (RFC 8656 §7.2 step 10: by username): the username of a static
    user; for a TURN REST API username ``EXPIRY:USER`` the USER part, since every fresh
    credential of one user has another username."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """Answer with ``code`` and ``attributes``, without MESSAGE-INTEGRITY."""

    code: int
    attributes: tuple[Attribute, ...]
    username: str | None
    reason: str


class Authenticator:
    """RFC 8489 §9.2.4 checks, in the RFC's order, for one realm."""

    __slots__ = (
        "_algorithms",
        "_by_hash",
        "_nonces",
        "_prepared",
        "_realm",
        "_realm_attribute",
        "_secrets",
        "_users",
    )

    def __init__(
        self,
        realm: str,
        users: Mapping[str, UserKeys],
        *,
        rest_secrets: Iterable[str] = (),
        nonce_secret: bytes,
        nonce_lifetime: float,
    ) -> None:
        self._realm = realm
        self._realm_attribute = Realm(realm)
        self._users = dict(users)
        self._secrets = tuple(s.encode() for s in rest_secrets)
        # Clients pick the first algorithm they support (RFC 8489 §9.2.5), so SHA-256 goes
        # first unless a static user has only an MD5 key.
        md5_only = any(k.sha256 is None for k in self._users.values())
        order = (Algorithm.MD5, Algorithm.SHA256) if md5_only else (Algorithm.SHA256, Algorithm.MD5)
        self._algorithms = PasswordAlgorithms(tuple((int(a), b"") for a in order))
        # USERHASH (RFC 8489 §14.4) can only name static users.
        self._by_hash: dict[bytes, str] = {}
        for name in self._users:
            try:
                self._by_hash[userhash(name, realm)] = name
            except CredentialError:
                continue
        features = SecurityFeatures(
            password_algorithms=True,
            username_anonymity=bool(self._users) and not self._secrets,
        )
        self._nonces = NonceFactory(nonce_secret, lifetime=nonce_lifetime, features=features)
        # (username, password algorithm) -> the outcome of the last request whose key
        # verified, holding the prepared key; see the module notes.
        self._prepared: OrderedDict[tuple[str, Algorithm], Authenticated] = OrderedDict()

    @property
    def realm(self) -> str:
        return self._realm

    @property
    def prepared_keys(self) -> int:
        """Credentials whose key is kept prepared (at most :data:`PREPARED_KEYS`)."""
        return len(self._prepared)

    def challenge(self, client: Address, now: float) -> tuple[Attribute, ...]:
        """REALM, a fresh NONCE and PASSWORD-ALGORITHMS for a 401 or 438 (§9.2.4)."""
        return (self._realm_attribute, Nonce(self._nonces.issue(client, now)), self._algorithms)

    def _reject(
        self, code: int, client: Address, now: float, username: str | None, reason: str
    ) -> Rejected:
        attributes = () if code == ErrorCode.BAD_REQUEST else self.challenge(client, now)
        return Rejected(code, attributes, username, reason)

    def _keys(self, username: str, unix_now: float) -> UserKeys | tuple[bytes, ...] | None:
        """Static keys, or the REST API secrets to try, or None for an unknown user."""
        keys = self._users.get(username)
        if keys is not None:
            return keys
        if self._secrets and not rest_api_expired(username, unix_now):
            return self._secrets
        return None

    def _verified(
        self,
        username: str,
        algorithm: Algorithm,
        key: bytes,
        integrity: IntegrityAlgorithm,
        account: str,
    ) -> Authenticated:
        """``key`` verified the request: keep it prepared for the next ones."""
        auth = Authenticated(username, IntegrityKey(key), integrity, account)
        prepared = self._prepared
        prepared[(username, algorithm)] = auth
        if len(prepared) > PREPARED_KEYS:
            prepared.popitem(last=False)
        return auth

    def authenticate(
        self, request: Message, client: Address, now: float, unix_now: float
    ) -> Authenticated | Rejected:
        """Check a request's credentials. ``now`` is the core's clock (nonces),
        ``unix_now`` the wall clock in Unix seconds (REST API expiry times)."""
        algorithm_used = request.integrity_algorithm
        if algorithm_used is None:
            return self._reject(ErrorCode.UNAUTHENTICATED, client, now, None, "no credentials")
        username_attr = request.get(Username)
        hash_attr = request.get(Userhash)
        realm = request.get(Realm)
        nonce = request.get(Nonce)
        claimed = username_attr.value if username_attr is not None else None
        if (username_attr is None and hash_attr is None) or realm is None or nonce is None:
            return self._reject(
                ErrorCode.BAD_REQUEST, client, now, claimed, "USERNAME, REALM or NONCE missing"
            )
        # §9.2.4: our nonces always set the "password algorithms" feature bit.
        chosen = request.get(PasswordAlgorithm)
        offered = request.get(PasswordAlgorithms)
        algorithm = Algorithm.MD5
        if chosen is not None or offered is not None:
            # An RFC 8489 erratum lets PASSWORD-ALGORITHMS be absent; when present it must be
            # what we sent (a man in the middle may have stripped SHA-256), and the chosen
            # algorithm must be one of ours.
            if offered is not None and offered.algorithms != self._algorithms.algorithms:
                return self._reject(
                    ErrorCode.BAD_REQUEST, client, now, claimed, "PASSWORD-ALGORITHMS altered"
                )
            if chosen is None or chosen.params or chosen.algorithm not in (1, 2):
                return self._reject(
                    ErrorCode.BAD_REQUEST, client, now, claimed, "bad PASSWORD-ALGORITHM"
                )
            algorithm = Algorithm(chosen.algorithm)
        status = self._nonces.check(nonce.value, client, now)
        if status is not NonceStatus.VALID:
            # An INVALID nonce is typically one from before a restart (new nonce secret):
            # 438 lets the client retry at once, which 401 would not.
            return self._reject(
                ErrorCode.STALE_NONCE, client, now, claimed, f"nonce {status.value}"
            )
        if realm.value != self._realm:
            return self._reject(ErrorCode.UNAUTHENTICATED, client, now, claimed, "wrong realm")
        if username_attr is not None:
            username = username_attr.value
        else:
            assert hash_attr is not None
            found = self._by_hash.get(hash_attr.value)
            if found is None:
                return self._reject(
                    ErrorCode.UNAUTHENTICATED, client, now, None, "unknown USERHASH"
                )
            username = found
        keys = self._keys(username, unix_now)
        if keys is None:
            return self._reject(
                ErrorCode.UNAUTHENTICATED, client, now, username, "unknown or expired user"
            )
        # This credential's prepared key, if it verified a request lately: a key the lines
        # below would derive again. When it does not verify, they still run, and decide.
        entry = self._prepared.get((username, algorithm))
        if entry is not None and request.verify_integrity(entry.key):
            self._prepared.move_to_end((username, algorithm))
            if entry.integrity == algorithm_used:
                return entry
            return Authenticated(username, entry.key, algorithm_used, entry.account)
        if isinstance(keys, UserKeys):
            key = keys.key(algorithm)
            if key is not None and request.verify_integrity(key):
                return self._verified(username, algorithm, key, algorithm_used, username)
        else:
            for secret in keys:
                try:
                    password = rest_api_password(secret, username)
                    key = long_term_key(username, self._realm, password, algorithm)
                except CredentialError:
                    break
                if request.verify_integrity(key):
                    account = username.partition(":")[2] or username
                    return self._verified(username, algorithm, key, algorithm_used, account)
        return self._reject(
            ErrorCode.UNAUTHENTICATED, client, now, username, "MESSAGE-INTEGRITY mismatch"
        )
