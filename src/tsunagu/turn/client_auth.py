"""The TURN client's long-term credential state (RFC 8489 §9.2), shared by the control
connection (:mod:`tsunagu.turn.client`) and the RFC 6062 data connections
(:mod:`tsunagu.turn.tcp_client`), which "MUST use the same method and credentials as for the
control connection" (RFC 6062 §4.3, §4.4).

What a 401 or 438 taught the client -- REALM, NONCE, the PASSWORD-ALGORITHMS the server
offered and the one chosen, whether USERHASH is wanted -- and the key derived from them, plus
the attributes every authenticated request then carries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tsunagu.stun.attributes import (
    Attribute,
    Nonce,
    PasswordAlgorithms,
    Realm,
    Username,
)
from tsunagu.stun.attributes import PasswordAlgorithm as PasswordAlgorithmAttr
from tsunagu.stun.attributes import Userhash as UserhashAttr
from tsunagu.stun.credentials import (
    CredentialError,
    PasswordAlgorithm,
    long_term_key,
    parse_security_features,
    userhash,
)
from tsunagu.stun.message import IntegrityAlgorithm

__all__ = ["LongTermAuth", "password_algorithms_stripped"]

_SUPPORTED_ALGORITHMS = frozenset(int(a) for a in PasswordAlgorithm)


def password_algorithms_stripped(nonce: str, offered: PasswordAlgorithms | None) -> bool:
    """The nonce cookie advertises PASSWORD-ALGORITHMS but the response carries none:
    someone bid the client down (RFC 8489 §9.2.5: no retry, the response is ignored)."""
    features = parse_security_features(nonce)
    return features is not None and features.password_algorithms and offered is None


@dataclass(slots=True)
class LongTermAuth:
    """Long-term credential state (RFC 8489 §9.2) learnt from a 401 or 438."""

    realm: str
    nonce: str
    offered: tuple[tuple[int, bytes], ...] | None
    """PASSWORD-ALGORITHMS as received, echoed in every request (§9.2.4)."""
    algorithm: PasswordAlgorithm
    key: bytes
    use_userhash: bool
    integrity: IntegrityAlgorithm
    proven: bool = False
    """A response authenticated with this key arrived: the server accepts the password."""

    @classmethod
    def from_challenge(
        cls,
        username: str,
        password: str,
        realm: str,
        nonce: str,
        offered: PasswordAlgorithms | None,
    ) -> LongTermAuth:
        """The state after a challenge with REALM, NONCE and maybe PASSWORD-ALGORITHMS;
        ``username`` is already OpaqueString-prepared. Raises
        :class:`~tsunagu.stun.credentials.CredentialError` when no offered algorithm is
        supported (RFC 8489 §9.2.5: "MUST NOT retry")."""
        features = parse_security_features(nonce)
        algorithm = PasswordAlgorithm.MD5
        integrity: IntegrityAlgorithm = "sha1"
        algorithms: tuple[tuple[int, bytes], ...] | None = None
        if offered is not None:
            algorithms = offered.algorithms
            # RFC 8489 §9.2.5: "the first algorithm supported on the list"; none supported
            # means "MUST NOT retry". With PASSWORD-ALGORITHMS, only MESSAGE-INTEGRITY-SHA256.
            chosen = next((a for a, _ in algorithms if a in _SUPPORTED_ALGORITHMS), None)
            if chosen is None:
                raise CredentialError("the server offers no password algorithm we support")
            algorithm = PasswordAlgorithm(chosen)
            integrity = "sha256"
        return cls(
            realm=realm,
            nonce=nonce,
            offered=algorithms,
            algorithm=algorithm,
            key=long_term_key(username, realm, password, algorithm),
            use_userhash=features is not None and features.username_anonymity,
            integrity=integrity,
        )

    @classmethod
    def for_retry(
        cls,
        current: LongTermAuth | None,
        username: str,
        password: str,
        *,
        realm: str,
        nonce: str,
        offered: PasswordAlgorithms | None,
    ) -> LongTermAuth:
        """The state to retry with after a 401 or 438 (RFC 8489 §9.2.5): ``current`` with
        the fresh nonce when the key stays (:meth:`same_key`), else the state
        :meth:`from_challenge` derives, which may raise CredentialError."""
        if current is not None and current.same_key(realm, offered):
            current.nonce = nonce
            return current
        return cls.from_challenge(username, password, realm, nonce, offered)

    def same_key(self, realm: str, offered: PasswordAlgorithms | None) -> bool:
        """Whether a challenge with this REALM and PASSWORD-ALGORITHMS keeps the key, so
        that only the nonce changes (RFC 8489 §9.2.5, 438 Stale Nonce)."""
        return (
            realm == self.realm
            and (offered.algorithms if offered is not None else None) == self.offered
        )

    def attributes(self, username: str) -> list[Attribute]:
        """USERNAME or USERHASH, REALM, NONCE and the algorithm negotiation (§9.2.4)."""
        attributes: list[Attribute] = []
        if self.use_userhash:  # RFC 8489 §9.2.5: "Username anonymity" bit set
            attributes.append(UserhashAttr(userhash(username, self.realm)))
        else:
            attributes.append(Username(username))
        attributes.append(Realm(self.realm))
        attributes.append(Nonce(self.nonce))
        if self.offered is not None:
            # §9.2.4 server check: PASSWORD-ALGORITHMS as received, plus our choice.
            attributes.append(PasswordAlgorithms(self.offered))
            attributes.append(PasswordAlgorithmAttr(self.algorithm))
        return attributes

    def copy(self) -> LongTermAuth:
        """An independent copy (a data connection may learn its own nonce)."""
        return dataclasses.replace(self)
