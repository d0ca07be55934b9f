"""Load balancers: sans-IO, driven by a seeded or scripted ``random.Random``; no sockets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError

from meshlib.engine._balancer import (
    DEFAULT_POLICY,
    Balancer,
    InFlight,
    cookie_value,
    endpoint_key,
    hash_key_for,
    make_balancer,
)
from meshlib.engine._hashring import MAX_RING_POINTS, MaglevTable, ring_points_per_endpoint
from meshlib.policy import Endpoint
from meshlib.policy._networking import ConsistentHashLB, LoadBalancerSettings

# -- helpers ------------------------------------------------------------------------


def endpoints(n: int, *, first: int = 0) -> list[Endpoint]:
    return [
        Endpoint(f"10.0.0.{i}", ports=MappingProxyType({"http": 8080}), labels=MappingProxyType({"i": str(i)}))
        for i in range(first, first + n)
    ]


def lb(spec: dict[str, Any]) -> LoadBalancerSettings:
    return LoadBalancerSettings.model_validate(spec)


def chash(**spec: Any) -> ConsistentHashLB:
    return ConsistentHashLB.model_validate(spec)


RING = lb({"consistentHash": {"httpHeaderName": "x-user"}})
MAGLEV = lb({"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}})
HASHED = pytest.mark.parametrize("settings", [RING, MAGLEV], ids=["ring", "maglev"])

ALL_SETTINGS = [
    None,
    lb({"simple": "ROUND_ROBIN"}),
    lb({"simple": "RANDOM"}),
    lb({"simple": "LEAST_REQUEST"}),
    lb({"simple": "LEAST_CONN"}),
    lb({"simple": "PASSTHROUGH"}),
    lb({"simple": "UNSPECIFIED"}),
    RING,
    MAGLEV,
]
ALL_IDS = ["none", "rr", "random", "least-request", "least-conn", "passthrough", "unspecified", "ring", "maglev"]

USERS = [f"user-{i}".encode() for i in range(10_000)]


class ScriptedRandom(random.Random):
    """A Random whose ``random()`` returns the given values in order (balancers only call ``random()``)."""

    def __init__(self, values: Iterable[float]) -> None:
        super().__init__(0)
        self._values = iter(values)

    def random(self) -> float:
        try:
            return next(self._values)
        except StopIteration:
            raise AssertionError("the balancer drew more random numbers than the test scripted") from None


def index_value(i: int, n: int) -> float:
    """The ``random()`` value that makes a uniform draw over ``n`` land on index ``i``."""
    return (i + 0.5) / n


def address(balancer: Balancer, rng: random.Random, **kwargs: Any) -> str:
    """The address of the endpoint picked (the test fails if there is none)."""
    picked = balancer.pick(rng, **kwargs)
    assert picked is not None
    return picked.address


def mapping(balancer: Balancer, keys: Sequence[bytes] = USERS) -> list[str]:
    rng = random.Random(0)
    out = []
    for key in keys:
        picked = balancer.pick(rng, hash_key=key)
        assert picked is not None
        out.append(balancer.key_of(picked))
    return out


# -- the factory and the default ----------------------------------------------------


def test_default_is_least_request_as_in_istio() -> None:
    assert DEFAULT_POLICY == "LEAST_REQUEST"
    assert make_balancer(None, endpoints(3)).policy == "LEAST_REQUEST"
    assert make_balancer(lb({}), endpoints(3)).policy == "LEAST_REQUEST"
    assert make_balancer(lb({"simple": "UNSPECIFIED"}), endpoints(3)).policy == "LEAST_REQUEST"


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ({"simple": "ROUND_ROBIN"}, "ROUND_ROBIN"),
        ({"simple": "RANDOM"}, "RANDOM"),
        ({"simple": "LEAST_REQUEST"}, "LEAST_REQUEST"),
        ({"simple": "LEAST_CONN"}, "LEAST_REQUEST"),  # Istio's deprecated alias
        ({"simple": "PASSTHROUGH"}, "PASSTHROUGH"),
        ({"consistentHash": {"useSourceIp": True}}, "RING_HASH"),
        ({"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 64}}}, "RING_HASH"),
        ({"consistentHash": {"useSourceIp": True, "maglev": {}}}, "MAGLEV"),
    ],
)
def test_policy_per_setting(spec: dict[str, Any], policy: str) -> None:
    balancer = make_balancer(lb(spec), endpoints(3))
    assert balancer.policy == policy
    assert policy in repr(balancer)


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=ALL_IDS)
def test_no_endpoints_gives_none(settings: LoadBalancerSettings | None) -> None:
    balancer = make_balancer(settings, [])
    assert balancer.endpoints == ()
    assert balancer.pick(random.Random(1)) is None
    assert balancer.pick(random.Random(1), hash_key=b"alice") is None


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=ALL_IDS)
def test_everything_excluded_gives_none(settings: LoadBalancerSettings | None) -> None:
    balancer = make_balancer(settings, endpoints(4))
    everything = frozenset(balancer.keys)
    rng = random.Random(2)
    for _ in range(20):
        assert balancer.pick(rng, exclude=everything) is None
        assert balancer.pick(rng, exclude=everything, hash_key=b"alice") is None


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=ALL_IDS)
def test_never_picks_an_excluded_endpoint(settings: LoadBalancerSettings | None) -> None:
    balancer = make_balancer(settings, endpoints(5))
    excluded = frozenset(balancer.keys[1:4])
    rng = random.Random(3)
    seen = set()
    for i in range(400):
        picked = balancer.pick(rng, exclude=excluded, hash_key=f"user-{i}")
        assert picked is not None
        assert balancer.key_of(picked) not in excluded
        seen.add(picked.address)
    assert seen <= {"10.0.0.0", "10.0.0.4"}


# -- keys ---------------------------------------------------------------------------


def test_endpoint_keys_are_address_and_named_ports() -> None:
    assert endpoint_key(Endpoint("10.0.0.1")) == "10.0.0.1"
    two = Endpoint("127.0.0.1", ports=MappingProxyType({"http": 8001, "grpc": 9001}))
    assert endpoint_key(two) == "127.0.0.1|grpc=9001,http=8001"
    # Labels do not change the identity: relabelling keeps hash position, load, ejection.
    relabelled = Endpoint("127.0.0.1", ports=two.ports, labels=MappingProxyType({"version": "v2"}))
    assert endpoint_key(relabelled) == endpoint_key(two)


def test_same_address_different_ports_are_different_endpoints() -> None:
    local = [Endpoint("127.0.0.1", ports=MappingProxyType({"http": p})) for p in (8001, 8002, 8003)]
    balancer = make_balancer(lb({"simple": "ROUND_ROBIN"}), local)
    assert len(set(balancer.keys)) == 3
    rng = random.Random(0)
    picks = [balancer.pick(rng) for _ in range(3)]
    assert sorted(p.ports["http"] for p in picks if p is not None) == [8001, 8002, 8003]


def test_duplicate_endpoints_get_distinct_keys() -> None:
    same = [Endpoint("10.0.0.1"), Endpoint("10.0.0.1"), Endpoint("10.0.0.2")]
    balancer = make_balancer(None, same)
    assert balancer.keys == ("10.0.0.1", "10.0.0.1#2", "10.0.0.2")
    assert balancer.key_of(same[1]) == "10.0.0.1#2"


def test_caller_keys_identify_endpoints() -> None:
    eps = endpoints(3)
    balancer = make_balancer(lb({"simple": "ROUND_ROBIN"}), eps, keys=["a", "b", "c"])
    assert balancer.keys == ("a", "b", "c")
    assert balancer.key_of(eps[1]) == "b"
    rng = random.Random(0)
    assert all(balancer.pick(rng, exclude={"a", "c"}) is eps[1] for _ in range(5))


def test_key_of_a_foreign_endpoint_falls_back_to_endpoint_key() -> None:
    balancer = make_balancer(None, endpoints(2))
    twin = endpoints(2)[0]  # equal, not the same object (e.g. from a newer snapshot)
    assert balancer.key_of(twin) == endpoint_key(twin)


def test_bad_caller_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="2 keys for 3 endpoints"):
        make_balancer(None, endpoints(3), keys=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        make_balancer(None, endpoints(3), keys=["a", "b", "a"])


# -- round robin ----------------------------------------------------------------------


def test_round_robin_cycles_evenly_from_a_random_start() -> None:
    eps = endpoints(4)
    balancer = make_balancer(lb({"simple": "ROUND_ROBIN"}), eps)
    # One draw picks the start (index 2 here); after that the cycle needs no randomness.
    rng = ScriptedRandom([index_value(2, 4)])
    picks = [balancer.pick(rng) for _ in range(400)]
    assert picks[:5] == [eps[2], eps[3], eps[0], eps[1], eps[2]]
    counts = Counter(e.address for e in picks if e is not None)
    assert set(counts.values()) == {100}


def test_round_robin_replicas_start_at_different_offsets() -> None:
    starts = {
        address(make_balancer(lb({"simple": "ROUND_ROBIN"}), endpoints(8)), random.Random(seed)) for seed in range(40)
    }
    assert len(starts) > 4


def test_round_robin_skips_excluded() -> None:
    eps = endpoints(4)
    balancer = make_balancer(lb({"simple": "ROUND_ROBIN"}), eps)
    excluded = {balancer.key_of(eps[1]), balancer.key_of(eps[2])}
    rng = ScriptedRandom([index_value(0, 4)])
    picks = [balancer.pick(rng, exclude=excluded) for _ in range(6)]
    assert picks == [eps[0], eps[3], eps[0], eps[3], eps[0], eps[3]]
    # Lifting the exclusion resumes the cycle where it stands.
    assert [balancer.pick(rng) for _ in range(4)] == [eps[0], eps[1], eps[2], eps[3]]


# -- random ---------------------------------------------------------------------------


def test_random_is_roughly_uniform() -> None:
    balancer = make_balancer(lb({"simple": "RANDOM"}), endpoints(4))
    rng = random.Random(7)
    counts = Counter(address(balancer, rng) for _ in range(8000))
    assert len(counts) == 4
    for count in counts.values():
        assert 1800 <= count <= 2200  # 25% ± 2.5%


def test_random_stays_uniform_over_what_is_not_excluded() -> None:
    balancer = make_balancer(lb({"simple": "RANDOM"}), endpoints(6))
    excluded = frozenset(balancer.keys[:4])  # most draws land on excluded endpoints
    rng = random.Random(8)
    counts = Counter(address(balancer, rng, exclude=excluded) for _ in range(4000))
    assert set(counts) == {"10.0.0.4", "10.0.0.5"}
    assert 1800 <= counts["10.0.0.4"] <= 2200


# -- least request ------------------------------------------------------------------


def test_least_request_prefers_the_less_loaded_of_two() -> None:
    eps = endpoints(3)
    balancer = make_balancer(lb({"simple": "LEAST_REQUEST"}), eps)
    for _ in range(3):
        balancer.start(eps[0])
    balancer.start(eps[1])
    # Draws (0, 1): 1 has fewer in flight. Draws (1, 2): 2 is idle. Draws (2, 0): 2.
    assert balancer.pick(ScriptedRandom([index_value(0, 3), index_value(1, 3)])) is eps[1]
    assert balancer.pick(ScriptedRandom([index_value(1, 3), index_value(2, 3)])) is eps[2]
    assert balancer.pick(ScriptedRandom([index_value(2, 3), index_value(0, 3)])) is eps[2]
    # A tie keeps the first drawn.
    balancer.start(eps[2])
    assert balancer.pick(ScriptedRandom([index_value(2, 3), index_value(1, 3)])) is eps[2]


def test_least_request_follows_start_and_finish() -> None:
    eps = endpoints(2)
    balancer = make_balancer(None, eps)
    balancer.start(eps[0])
    balancer.start(eps[0])
    assert balancer.in_flight.as_dict() == {balancer.key_of(eps[0]): 2}
    rng = random.Random(5)
    loaded = Counter(address(balancer, rng) for _ in range(2000))
    # eps[0] wins only when drawn twice: 1/4 of the time.
    assert 400 <= loaded["10.0.0.0"] <= 600
    balancer.finish(eps[0], 0.01)
    balancer.finish(eps[0], 0.02)
    balancer.finish(eps[0], 0.0)  # unmatched: never below zero
    assert balancer.in_flight.as_dict() == {}
    idle = Counter(address(balancer, rng) for _ in range(2000))
    assert 900 <= idle["10.0.0.0"] <= 1100


def test_least_request_spreads_equal_load_like_random() -> None:
    balancer = make_balancer(None, endpoints(5))
    rng = random.Random(11)
    counts = Counter(address(balancer, rng) for _ in range(10_000))
    assert all(1700 <= c <= 2300 for c in counts.values()), counts


def test_least_request_keeps_in_flight_counts_close() -> None:
    eps = endpoints(5)
    balancer = make_balancer(None, eps)
    rng = random.Random(12)
    for _ in range(500):  # requests that never finish: load only grows
        picked = balancer.pick(rng)
        assert picked is not None
        balancer.start(picked)
    loads = [balancer.in_flight.get(k) for k in balancer.keys]
    assert sum(loads) == 500
    assert max(loads) - min(loads) <= 6, loads  # random alone would spread far wider


def test_in_flight_survives_a_rebuild() -> None:
    old = make_balancer(None, endpoints(2))
    first = old.pick(random.Random(0))
    assert first is not None
    old.start(first)
    # A new snapshot: new (equal) endpoint objects, one more endpoint, the same counts.
    new = make_balancer(None, endpoints(3), in_flight=old.in_flight)
    assert new.in_flight is old.in_flight
    assert new.in_flight.get(endpoint_key(first)) == 1
    old.finish(first, 0.1)  # the request started before the swap ends after it
    assert new.in_flight.get(endpoint_key(first)) == 0


def test_in_flight_counts() -> None:
    counts = InFlight()
    counts.start("a")
    counts.start("a")
    counts.finish("a")
    counts.finish("b")
    assert counts.get("a") == 1
    assert counts.get("b") == 0
    assert counts.as_dict() == {"a": 1}


# -- passthrough ----------------------------------------------------------------------


def test_passthrough_makes_no_balancing_decision() -> None:
    eps = endpoints(3)
    balancer = make_balancer(lb({"simple": "PASSTHROUGH"}), eps)
    rng = ScriptedRandom([])  # it must not even draw
    assert [balancer.pick(rng) for _ in range(3)] == [eps[0]] * 3
    assert balancer.pick(rng, exclude={balancer.key_of(eps[0])}) is eps[1]


# -- the hash key of a request --------------------------------------------------------


def test_hash_key_from_header_case_insensitively() -> None:
    settings = chash(httpHeaderName="X-User")
    none: dict[str, str] = {}
    assert hash_key_for(settings, headers={"x-user": "alice"}, query_params=none, source_ip=None) == b"alice"
    assert hash_key_for(settings, headers={"X-USER": "bob"}, query_params=none, source_ip=None) == b"bob"
    assert hash_key_for(settings, headers={"X-User": ""}, query_params=none, source_ip=None) == b""
    assert hash_key_for(settings, headers={"x-other": "1"}, query_params=none, source_ip="10.1.1.1") is None


def test_hash_key_from_cookie() -> None:
    settings = chash(httpCookie={"name": "session", "ttl": "0s"})

    def key(cookie: str | None) -> bytes | None:
        headers = {} if cookie is None else {"Cookie": cookie}
        return hash_key_for(settings, headers=headers, query_params={}, source_ip="10.1.1.1")

    assert key("a=1; session=abc123; b=2") == b"abc123"
    assert key('session="quoted"') == b"quoted"
    assert key("a=1, session=joined") == b"joined"  # repeated Cookie headers joined by a client
    assert key("sessionx=1; xsession=2") is None
    # Absent: Envoy would set a cookie; meshlib does not yet, so no key (a random pick).
    assert key("a=1") is None
    assert key(None) is None
    assert cookie_value("broken; =x; session=v", "session") == "v"


def test_hash_key_from_query_parameter_and_source_ip() -> None:
    by_query = chash(httpQueryParameterName="tenant")
    assert hash_key_for(by_query, headers={}, query_params={"tenant": "t1"}, source_ip=None) == b"t1"
    assert hash_key_for(by_query, headers={}, query_params={"Tenant": "t1"}, source_ip=None) is None
    by_ip = chash(useSourceIp=True)
    assert hash_key_for(by_ip, headers={}, query_params={}, source_ip="10.1.1.7") == b"10.1.1.7"
    assert hash_key_for(by_ip, headers={}, query_params={}, source_ip=None) is None
    assert hash_key_for(chash(useSourceIp=False), headers={}, query_params={}, source_ip="10.1.1.7") is None


@HASHED
@pytest.mark.parametrize(
    ("spec", "request_args"),
    [
        ({"httpHeaderName": "x-user"}, {"headers": {"x-user": "alice"}}),
        ({"httpCookie": {"name": "sid"}}, {"headers": {"cookie": "sid=alice"}}),
        ({"httpQueryParameterName": "u"}, {"query_params": {"u": "alice"}}),
        ({"useSourceIp": True}, {"source_ip": "192.0.2.10"}),
    ],
    ids=["header", "cookie", "query", "source-ip"],
)
def test_consistent_hash_sticks_per_key_kind(
    settings: LoadBalancerSettings, spec: dict[str, Any], request_args: dict[str, Any]
) -> None:
    assert settings.consistent_hash is not None
    algorithm: dict[str, Any] = {"maglev": {}} if settings.consistent_hash.maglev is not None else {}
    config = lb({"consistentHash": {**spec, **algorithm}})
    assert config.consistent_hash is not None
    balancer = make_balancer(config, endpoints(7))
    args: dict[str, Any] = {"headers": {}, "query_params": {}, "source_ip": None, **request_args}
    key = hash_key_for(config.consistent_hash, **args)
    assert key is not None
    first = balancer.pick(random.Random(0), hash_key=key)
    assert first is not None
    assert all(balancer.pick(random.Random(seed), hash_key=key) is first for seed in range(50))


# -- consistent hashing ---------------------------------------------------------------


@HASHED
def test_same_key_same_endpoint_and_str_equals_bytes(settings: LoadBalancerSettings) -> None:
    balancer = make_balancer(settings, endpoints(5))
    rng = random.Random(0)
    assert balancer.pick(rng, hash_key="alice") is balancer.pick(rng, hash_key=b"alice")
    first = balancer.pick(rng, hash_key=b"alice")
    assert all(balancer.pick(rng, hash_key=b"alice") is first for _ in range(100))


@HASHED
def test_no_key_picks_at_random(settings: LoadBalancerSettings) -> None:
    balancer = make_balancer(settings, endpoints(5))
    rng = random.Random(4)
    counts = Counter(address(balancer, rng) for _ in range(5000))
    assert all(800 <= c <= 1200 for c in counts.values()), counts


@HASHED
def test_excluded_owner_passes_its_keys_to_a_stable_next_endpoint(settings: LoadBalancerSettings) -> None:
    balancer = make_balancer(settings, endpoints(5))
    owner = balancer.pick(random.Random(0), hash_key=b"alice")
    assert owner is not None
    excluded = {balancer.key_of(owner)}
    fallback = balancer.pick(random.Random(0), hash_key=b"alice", exclude=excluded)
    assert fallback is not None
    assert fallback is not owner
    assert all(balancer.pick(random.Random(s), hash_key=b"alice", exclude=excluded) is fallback for s in range(20))


@HASHED
def test_keys_spread_evenly(settings: LoadBalancerSettings) -> None:
    counts = Counter(mapping(make_balancer(settings, endpoints(5))))
    assert len(counts) == 5
    for count in counts.values():
        assert 1500 <= count <= 2500, counts  # 20% ± 5% of 10,000 keys


@HASHED
def test_adding_an_endpoint_moves_about_one_in_n_plus_one(settings: LoadBalancerSettings) -> None:
    n = 5
    before = mapping(make_balancer(settings, endpoints(n)))
    grown = make_balancer(settings, endpoints(n + 1))
    after = mapping(grown)
    newcomer = grown.keys[-1]
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert 0.5 / (n + 1) < len(moved) / len(USERS) < 2 / (n + 1)
    # Almost every moved key went to the newcomer (all of them on the ring).
    to_newcomer = sum(b == newcomer for _, b in moved)
    assert to_newcomer >= 0.95 * len(moved)


@HASHED
def test_removing_an_endpoint_moves_only_its_keys(settings: LoadBalancerSettings) -> None:
    eps = endpoints(5)
    before = mapping(make_balancer(settings, eps))
    gone = endpoint_key(eps[2])
    after = mapping(make_balancer(settings, eps[:2] + eps[3:]))
    others_moved = sum(a != b for a, b in zip(before, after, strict=True) if a != gone)
    assert gone not in after
    if settings.consistent_hash is not None and settings.consistent_hash.maglev is None:
        assert others_moved == 0  # ring: an endpoint's points never depend on the others
    else:
        assert others_moved <= 0.01 * len(USERS)  # maglev: close to it


@HASHED
def test_mapping_is_independent_of_build_and_list_order(settings: LoadBalancerSettings) -> None:
    eps = endpoints(6)
    shuffled = endpoints(6)  # fresh objects
    random.Random(9).shuffle(shuffled)
    assert mapping(make_balancer(settings, eps)) == mapping(make_balancer(settings, shuffled))


_CHILD = """
import json, random, sys
from types import MappingProxyType
from meshlib.engine._balancer import make_balancer
from meshlib.policy import Endpoint
from meshlib.policy._networking import LoadBalancerSettings
settings = LoadBalancerSettings.model_validate(json.loads(sys.argv[1]))
eps = [Endpoint(f"10.0.0.{i}", ports=MappingProxyType({"http": 8080})) for i in range(5)]
b = make_balancer(settings, eps)
rng = random.Random(0)
print(json.dumps([b.key_of(b.pick(rng, hash_key=f"user-{i}")) for i in range(2000)]))
"""


@HASHED
def test_mapping_is_the_same_in_another_process(settings: LoadBalancerSettings) -> None:
    # A different PYTHONHASHSEED would change anything built on hash(); the mapping must not move.
    spec = settings.model_dump(mode="json", by_alias=True, exclude_none=True)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
    )
    here = mapping(make_balancer(settings, endpoints(5)), [f"user-{i}".encode() for i in range(2000)])
    assert json.loads(out.stdout) == here


# -- the structures -------------------------------------------------------------------


def test_ring_size_honours_minimum_ring_size() -> None:
    small = make_balancer(
        lb({"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 64}}}), endpoints(3)
    )
    assert len(small.ring) == 3 * 64  # type: ignore[attr-defined]  # the ring is the RING_HASH balancer's own
    assert len(make_balancer(RING, endpoints(3)).ring) == 3 * 1024  # type: ignore[attr-defined]
    assert ring_points_per_endpoint(1024, 1) == 1024
    assert ring_points_per_endpoint(1024, 64) == 1024
    assert ring_points_per_endpoint(1024, 65) == 512
    assert ring_points_per_endpoint(1024, 100_000) == 1
    assert ring_points_per_endpoint(10**7, 1) <= MAX_RING_POINTS


def _naive_maglev(keys: Sequence[str], size: int) -> list[int]:
    """The textbook population loop, to check the faster build against."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    perms = []
    for owner in order:
        digest = blake2b(keys[owner].encode(), digest_size=16).digest()
        offset = int.from_bytes(digest[:8], "big") % size
        skip = int.from_bytes(digest[8:], "big") % (size - 1) + 1
        perms.append((owner, offset, skip))
    table = [-1] * size
    nxt = [0] * len(keys)
    filled = 0
    while True:
        for turn, (owner, offset, skip) in enumerate(perms):
            slot = (offset + nxt[turn] * skip) % size
            while table[slot] >= 0:
                nxt[turn] += 1
                slot = (offset + nxt[turn] * skip) % size
            table[slot] = owner
            nxt[turn] += 1
            filled += 1
            if filled == size:
                return table


@pytest.mark.parametrize(("n", "size"), [(1, 13), (2, 7), (3, 251), (5, 65537), (10, 65537), (40, 4099), (20, 11)])
def test_maglev_table_matches_the_textbook_build(n: int, size: int) -> None:
    keys = [endpoint_key(e) for e in endpoints(n)]
    table = MaglevTable(keys, size)
    assert table.slots == _naive_maglev(keys, size)
    shares = Counter(table.slots)
    if n <= size:
        assert max(shares.values()) - min(shares.values()) <= 1  # Maglev's near-perfect balance


def test_maglev_table_size_must_be_prime() -> None:
    with pytest.raises(ValueError, match="must be a prime"):
        MaglevTable(["a"], 65536)
    # The policy layer refuses it first, naming the field.
    with pytest.raises(ValidationError, match="tableSize 65536 must be a prime"):
        lb({"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 65536}}})
