"""TURN server configuration, relay port pool, rate limiter and entropy sources."""

from __future__ import annotations

import pytest

from tsunagu.turn.config import (
    TurnServerConfig,
    format_address,
    load_config,
    parse_address,
    parse_external_ip,
)
from tsunagu.turn.entropy import SeededEntropy, SystemEntropy
from tsunagu.turn.relay import BIND_ATTEMPTS, PortPool
from tsunagu.turn.transport import Address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3478", ("127.0.0.1", 3478)),
        ("0.0.0.0", ("0.0.0.0", 3478)),
        ("[::1]:5349", ("::1", 5349)),
        ("[::]", ("::", 3478)),
        ("::1", ("::1", 3478)),
        ("[2001:DB8::1]:0", ("2001:db8::1", 0)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(expected)) == expected


@pytest.mark.parametrize("text", ["localhost:3478", "1.2.3.4:99999", "[::1", "1.2.3.4:x", ""])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_parse_external_ip() -> None:
    assert parse_external_ip("203.0.113.5") == ("203.0.113.5", None)
    assert parse_external_ip("203.0.113.5/10.0.0.5") == ("203.0.113.5", "10.0.0.5")
    with pytest.raises(ValueError, match="mixes"):
        parse_external_ip("203.0.113.5/::1")
    with pytest.raises(ValueError):
        parse_external_ip("example.com")


def test_load_config_from_toml_with_overrides() -> None:
    text = """
listen = ["127.0.0.1:3478", "[::1]:3478"]
relay-ip = ["127.0.0.1"]
min-port = 40000
max_port = 40100
realm = "example.org"
user = ["alice:secret"]
auth-secret = "s3cret"
allow-peer = ["127.0.0.0/8"]
external-ip = "198.51.100.1/127.0.0.1"
nonce-lifetime = 300
max-allocations-per-user = 5
"""
    config = load_config(text, realm="override.example")
    assert config.listen == (("127.0.0.1", 3478), ("::1", 3478))
    assert config.relay_ips == ("127.0.0.1",)
    assert (config.min_port, config.max_port) == (40000, 40100)
    assert config.realm == "override.example"
    assert config.users == ("alice:secret",)
    assert config.auth_secrets == ("s3cret",)
    assert config.allow_peers == ("127.0.0.0/8",)
    assert config.external_ips == (("198.51.100.1", "127.0.0.1"),)
    assert config.nonce_lifetime == 300.0
    assert config.max_allocations_per_user == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown settings: bogus"),
        ("min-port = 'low'", "min-port: expected an integer"),
        ("realm = 5", "realm: expected a string"),
        ("min-port = 60000\nmax-port = 50000", "bad relay port range"),
        ("relay-ip = ['1.2.3.4', '5.6.7.8']", "one --relay-ip per address family"),
        ("tls-listen = ['0.0.0.0:5349']", "needs --cert"),
        ("nonce-lifetime = 7200", "nonce lifetime"),
        ("listen = [", "not valid TOML"),
    ],
)
def test_load_config_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(text)


def test_config_defaults_are_documented_values() -> None:
    config = TurnServerConfig()
    assert config.listen == (("0.0.0.0", 3478),)
    assert (config.min_port, config.max_port) == (49152, 65535)
    assert (config.default_lifetime, config.max_lifetime) == (600, 3600)
    assert not config.has_credentials


class Binder:
    def __init__(self, taken: set[int] | None = None) -> None:
        self.taken = taken or set()
        self.bound: set[int] = set()
        self.calls = 0

    @property
    def supports_dont_fragment(self) -> bool:
        return True

    def bind(self, address: Address) -> bool:
        self.calls += 1
        if address[1] in self.taken:
            return False
        self.bound.add(address[1])
        return True

    def unbind(self, address: Address) -> None:
        self.bound.remove(address[1])


def test_port_pool_is_random_and_never_hands_out_a_port_twice() -> None:
    pool = PortPool("192.0.2.1", 1000, 1019, SeededEntropy(b"pool"))
    binder = Binder()
    ports = []
    for _ in range(20):
        got = pool.acquire(binder.bind, binder.unbind)
        assert got is not None
        ports.append(got[0])
    assert sorted(ports) == list(range(1000, 1020))
    assert ports != sorted(ports)  # not handed out in order
    assert pool.acquire(binder.bind, binder.unbind) is None
    pool.release(binder.unbind, 1005)
    assert pool.acquire(binder.bind, binder.unbind) == (1005, None)


def test_port_pool_even_and_pairs() -> None:
    pool = PortPool("192.0.2.1", 1001, 1006, SeededEntropy(b"pairs"))
    binder = Binder(taken={1002})
    got = pool.acquire(binder.bind, binder.unbind, pair=True)
    assert got == (1004, 1005)
    assert (
        pool.acquire(binder.bind, binder.unbind, pair=True) is None
    )  # 1006 has no 1007; 1002 is taken
    even = pool.acquire(binder.bind, binder.unbind, even=True)
    assert even == (1006, None)


def test_port_pool_bounds_bind_attempts() -> None:
    pool = PortPool("192.0.2.1", 1000, 1999, SeededEntropy(b"busy"))
    binder = Binder(taken=set(range(1000, 2000)))
    assert pool.acquire(binder.bind, binder.unbind) is None
    assert binder.calls == BIND_ATTEMPTS


def test_entropy_sources() -> None:
    a, b = SeededEntropy(b"x"), SeededEntropy(b"x")
    assert a.token_bytes(40) == b.token_bytes(40)
    assert [a.randbelow(7) for _ in range(50)] == [b.randbelow(7) for _ in range(50)]
    assert {a.randbelow(3) for _ in range(200)} == {0, 1, 2}
    with pytest.raises(ValueError):
        a.randbelow(0)
    system = SystemEntropy()
    assert len(system.token_bytes(8)) == 8 and 0 <= system.randbelow(5) < 5
    assert {system.randbelow(3) for _ in range(200)} == {0, 1, 2}
    assert system.randbelow(1) == 0
    for bound in (2**16, 2**64, 2**64 + 1, 2**200):  # one 64-bit draw, and beyond it
        assert all(0 <= system.randbelow(bound) < bound for _ in range(20))
    with pytest.raises(ValueError):
        system.randbelow(0)
