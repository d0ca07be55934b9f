"""Load balancers: which endpoint of a (host, subset) takes the next attempt.

Sans-IO like every engine: a balancer never reads the clock or draws from the
global ``random``; the caller passes a ``random.Random`` to :meth:`Balancer.pick`
(balancers only ever call its ``random()``, so a test can script it). Everything
that depends only on the endpoint set (the hash ring, the Maglev table, the keys)
is built once by :func:`make_balancer`; ``pick`` is a few list lookups.

**Endpoints are identified by key strings.** ``Endpoint`` holds mappings, so it is
not hashable, and object identity does not survive a snapshot swap (a new snapshot
builds new, equal endpoints). A key does: by default :func:`endpoint_key` (address
plus named ports), or whatever keys the caller passes. Callers exclude endpoints
(tried by an earlier attempt of the request, ejected by outlier detection) by
passing a set of keys as ``exclude``: one hash lookup per candidate looked at.

**Defaults follow Istio.** No ``loadBalancer``, or ``simple: UNSPECIFIED``, means
LEAST_REQUEST: Istio 1.14 changed its default from ROUND_ROBIN to LEAST_REQUEST
(release note "new_lb_algorithm_default"; the API calls LEAST_REQUEST "a drop-in
replacement for ROUND_ROBIN" that "outperforms [it] in nearly all cases").
``LEAST_CONN`` is Istio's deprecated name for LEAST_REQUEST. Endpoint weights are
not enforced (docs/istio-support.md): every endpoint counts as weight 1.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Final

from ..policy import Endpoint
from ..policy._networking import ConsistentHashLB, LoadBalancerSettings
from ._hashring import HashRing, MaglevTable, ring_points_per_endpoint, stable_hash

__all__ = [
    "DEFAULT_POLICY",
    "LEAST_REQUEST_CHOICES",
    "Balancer",
    "InFlight",
    "cookie_value",
    "endpoint_key",
    "hash_key_for",
    "make_balancer",
]

DEFAULT_POLICY: Final = "LEAST_REQUEST"
"""What ``simple: UNSPECIFIED`` (or no load balancer at all) means, as in Istio since 1.14."""

LEAST_REQUEST_CHOICES: Final = 2
"""Envoy's ``choice_count`` default: the power of two choices."""

_TRIES: Final = 4
"""Random draws that may land on excluded endpoints before scanning for the live ones."""

_NO_EXCLUSIONS: frozenset[str] = frozenset()


def endpoint_key(endpoint: Endpoint) -> str:
    """A stable identity for an endpoint: its address, plus its named ports if it has any.

    The ports are part of it because several endpoints often share an address (local
    processes on one machine); labels and service account are not, so relabelling an
    endpoint keeps its hash position, its load and its ejection.
    """
    if not endpoint.ports:
        return endpoint.address
    ports = ",".join(f"{name}={port}" for name, port in sorted(endpoint.ports.items()))
    return f"{endpoint.address}|{ports}"


def _unique_keys(endpoints: Sequence[Endpoint]) -> tuple[str, ...]:
    keys: list[str] = []
    seen: dict[str, int] = {}
    for endpoint in endpoints:
        key = endpoint_key(endpoint)
        count = seen.get(key, 0) + 1
        seen[key] = count
        # The same endpoint listed twice stays two entries (that is what the
        # configuration asks for); a suffix keeps their keys apart, deterministically.
        keys.append(key if count == 1 else f"{key}#{count}")
    return tuple(keys)


class InFlight:
    """Requests in flight per endpoint key.

    One instance per destination, handed from balancer to balancer when a snapshot
    swap rebuilds the balancer (``make_balancer(..., in_flight=old.in_flight)``): the
    load survives, and a request started before the swap finishes against the same
    counts it was added to.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def start(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def finish(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            # Never below zero (an unmatched finish must not make an endpoint look
            # idle forever), and no entry for idle endpoints: the dict stays small.
            self._counts.pop(key, None)

    def as_dict(self) -> dict[str, int]:
        """A copy of the non-zero counts (for metrics and tests)."""
        return dict(self._counts)


class Balancer:
    """Picks endpoints of one (host, subset) endpoint list. Build with :func:`make_balancer`.

    Not locked: in a threaded adapter a race on the round-robin cursor or a count
    costs a little evenness, never a wrong answer.
    """

    policy: str = ""
    """The algorithm in force: ROUND_ROBIN, RANDOM, LEAST_REQUEST, PASSTHROUGH, RING_HASH or MAGLEV."""

    __slots__ = ("_by_id", "_endpoints", "_in_flight", "_keys", "_n")

    def __init__(self, endpoints: Sequence[Endpoint], keys: Sequence[str], in_flight: InFlight) -> None:
        self._endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._keys: tuple[str, ...] = tuple(keys)
        self._n = len(self._endpoints)
        self._in_flight = in_flight
        # The balancer holds the endpoints, so their ids stay valid while it lives.
        self._by_id: dict[int, str] = {id(e): k for e, k in zip(self._endpoints, self._keys, strict=True)}

    # -- what it balances over ----------------------------------------------------

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def keys(self) -> tuple[str, ...]:
        """The endpoints' keys, in the order of :attr:`endpoints`."""
        return self._keys

    @property
    def in_flight(self) -> InFlight:
        return self._in_flight

    def key_of(self, endpoint: Endpoint) -> str:
        """The key of an endpoint this balancer returned (others fall back to :func:`endpoint_key`)."""
        key = self._by_id.get(id(endpoint))
        return key if key is not None else endpoint_key(endpoint)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.policy} endpoints={self._n}>"

    # -- the hot path -------------------------------------------------------------

    def pick(
        self,
        rng: random.Random,
        *,
        exclude: Container[str] = _NO_EXCLUSIONS,
        hash_key: bytes | str | None = None,
    ) -> Endpoint | None:
        """The endpoint for the next attempt, or None when there is none that is not excluded.

        ``exclude`` holds endpoint *keys* (see :attr:`keys`, :meth:`key_of`); a set or
        frozenset makes each check O(1). ``hash_key`` (from :func:`hash_key_for`)
        matters only to consistent-hash balancers; the others ignore it.
        """
        index = self._choose(rng, exclude, hash_key)
        return None if index < 0 else self._endpoints[index]

    def start(self, endpoint: Endpoint) -> None:
        """An attempt was sent to ``endpoint`` (call once per attempt, before sending)."""
        self._in_flight.start(self.key_of(endpoint))

    def finish(self, endpoint: Endpoint, duration: float) -> None:
        """The attempt on ``endpoint`` ended, whatever its outcome, after ``duration`` seconds.

        ``duration`` is taken now so adapters report it from the start; a
        latency-aware balancer (peak EWMA) can use it without changing callers.
        """
        self._in_flight.finish(self.key_of(endpoint))

    # -- helpers for the algorithms ---------------------------------------------

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        raise NotImplementedError

    def _live(self, exclude: Container[str]) -> list[int]:
        keys = self._keys
        return [i for i in range(self._n) if keys[i] not in exclude]

    def _random_live(self, rng: random.Random, exclude: Container[str]) -> int:
        """A uniformly random endpoint that is not excluded (-1 if none).

        Rejection sampling first: with few exclusions it costs one or two draws;
        only when the draws keep hitting excluded endpoints does it scan them all.
        """
        n = self._n
        if n == 0:
            return -1
        keys = self._keys
        for _ in range(_TRIES):
            i = int(rng.random() * n)
            if keys[i] not in exclude:
                return i
        live = self._live(exclude)
        return live[int(rng.random() * len(live))] if live else -1


class _RoundRobin(Balancer):
    """Cycles through the endpoints, starting at a random one so replicas do not march in step."""

    policy = "ROUND_ROBIN"
    __slots__ = ("_next",)

    def __init__(self, endpoints: Sequence[Endpoint], keys: Sequence[str], in_flight: InFlight) -> None:
        super().__init__(endpoints, keys, in_flight)
        self._next = -1

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        n = self._n
        if n == 0:
            return -1
        i = self._next
        if i < 0:
            i = int(rng.random() * n)
        keys = self._keys
        for _ in range(n):
            if keys[i] not in exclude:
                self._next = i + 1 if i + 1 < n else 0
                return i
            i = i + 1 if i + 1 < n else 0
        return -1


class _Random(Balancer):
    """A uniformly random endpoint: no shared state, so nothing to synchronise."""

    policy = "RANDOM"
    __slots__ = ()

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        return self._random_live(rng, exclude)


class _LeastRequest(Balancer):
    """Envoy's least request: draw ``choices`` endpoints at random (with replacement),
    keep the one with fewest requests in flight, the first drawn on a tie.

    Two choices avoid both the herd that "always the least loaded" causes when many
    clients see the same counts and the blindness of random; with equal loads it is
    exactly random.
    """

    policy = "LEAST_REQUEST"
    __slots__ = ("_choices",)

    def __init__(self, endpoints: Sequence[Endpoint], keys: Sequence[str], in_flight: InFlight, choices: int) -> None:
        super().__init__(endpoints, keys, in_flight)
        self._choices = choices

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        best = self._random_live(rng, exclude)
        if best < 0:
            return -1
        keys = self._keys
        counts = self._in_flight._counts
        best_load = counts.get(keys[best], 0)
        for _ in range(self._choices - 1):
            candidate = self._random_live(rng, exclude)
            load = counts.get(keys[candidate], 0)
            if load < best_load:
                best, best_load = candidate, load
        return best


class _Passthrough(Balancer):
    """PASSTHROUGH: no balancing decision.

    Istio forwards to the address the caller asked for. meshlib always has the
    endpoint list, so it returns the first endpoint in configuration order that is
    not excluded: no spreading, and a retry that excludes it fails over down the
    list. An adapter that wants the caller's own address (a host with no endpoints)
    gets None here and sends to the request's authority itself.
    """

    policy = "PASSTHROUGH"
    __slots__ = ()

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        keys = self._keys
        for i in range(self._n):
            if keys[i] not in exclude:
                return i
        return -1


def _hash_of(hash_key: bytes | str) -> int:
    data = hash_key.encode("utf-8", "surrogateescape") if isinstance(hash_key, str) else hash_key
    return stable_hash(data)


class _HashBalancer(Balancer):
    """Consistent hashing: the same key goes to the same endpoint while that endpoint is live."""

    __slots__ = ()

    def _live_mask(self, exclude: Container[str]) -> list[bool] | None:
        """Which endpoints are live, by index; None when none is (the walk would never end)."""
        mask = [k not in exclude for k in self._keys]
        return mask if any(mask) else None


class _RingHash(_HashBalancer):
    """Consistent hashing on a ring; an excluded owner passes the key on to the next point's owner."""

    policy = "RING_HASH"
    __slots__ = ("_ring",)

    def __init__(self, endpoints: Sequence[Endpoint], keys: Sequence[str], in_flight: InFlight, ring_size: int) -> None:
        super().__init__(endpoints, keys, in_flight)
        self._ring = HashRing(self._keys, ring_points_per_endpoint(ring_size, self._n))

    @property
    def ring(self) -> HashRing:
        return self._ring

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        if hash_key is None or self._n == 0:
            # No key (e.g. the cookie is not set yet): no affinity to keep, pick at random.
            return self._random_live(rng, exclude)
        ring = self._ring
        pos = ring.position(_hash_of(hash_key))
        owner = ring.owners[pos]
        if self._keys[owner] not in exclude:
            return owner
        return _walk(ring.owners, pos, self._live_mask(exclude))


class _Maglev(_HashBalancer):
    """Consistent hashing through a Maglev table; an excluded owner passes the key to the next slot's owner."""

    policy = "MAGLEV"
    __slots__ = ("_table",)

    def __init__(
        self, endpoints: Sequence[Endpoint], keys: Sequence[str], in_flight: InFlight, table_size: int
    ) -> None:
        super().__init__(endpoints, keys, in_flight)
        self._table = MaglevTable(self._keys, table_size)

    @property
    def table(self) -> MaglevTable:
        return self._table

    def _choose(self, rng: random.Random, exclude: Container[str], hash_key: bytes | str | None) -> int:
        if hash_key is None or self._n == 0:
            return self._random_live(rng, exclude)
        table = self._table
        slot = _hash_of(hash_key) % table.size
        owner = table.slots[slot]
        if self._keys[owner] not in exclude:
            return owner
        return _walk(table.slots, slot, self._live_mask(exclude))


def _walk(owners: list[int], start: int, live: list[bool] | None) -> int:
    """The first live owner at or after ``start``, wrapping; -1 when nothing is live."""
    if live is None:
        return -1
    i = start
    size = len(owners)
    while True:
        i = i + 1 if i + 1 < size else 0
        owner = owners[i]
        if live[owner]:
            return owner


def make_balancer(
    settings: LoadBalancerSettings | None,
    endpoints: Sequence[Endpoint],
    *,
    keys: Sequence[str] | None = None,
    in_flight: InFlight | None = None,
) -> Balancer:
    """The balancer a ``loadBalancer`` setting asks for, over one endpoint list.

    Build it once per (host, subset) and snapshot, not per request: ring and table
    are built here. ``keys`` identify the endpoints (default :func:`endpoint_key`,
    made unique); pass the previous balancer's ``in_flight`` to keep its load across a
    swap. ``settings=None`` or ``simple: UNSPECIFIED`` is :data:`DEFAULT_POLICY`.
    """
    if keys is None:
        key_tuple = _unique_keys(endpoints)
    else:
        key_tuple = tuple(keys)
        if len(key_tuple) != len(endpoints):
            raise ValueError(f"{len(key_tuple)} keys for {len(endpoints)} endpoints")
        if len(set(key_tuple)) != len(key_tuple):
            raise ValueError("endpoint keys must be unique")
    counts = in_flight if in_flight is not None else InFlight()
    consistent = settings.consistent_hash if settings is not None else None
    if consistent is not None:
        if consistent.maglev is not None:
            return _Maglev(endpoints, key_tuple, counts, consistent.maglev.table_size)
        return _RingHash(endpoints, key_tuple, counts, consistent.ring_size)
    simple = settings.simple if settings is not None else None
    if simple is None or simple == "UNSPECIFIED":
        simple = DEFAULT_POLICY
    if simple == "ROUND_ROBIN":
        return _RoundRobin(endpoints, key_tuple, counts)
    if simple == "RANDOM":
        return _Random(endpoints, key_tuple, counts)
    if simple == "PASSTHROUGH":
        return _Passthrough(endpoints, key_tuple, counts)
    # LEAST_REQUEST, and LEAST_CONN: Istio's deprecated alias of it.
    return _LeastRequest(endpoints, key_tuple, counts, LEAST_REQUEST_CHOICES)


# -- the hash key of a request ------------------------------------------------------


def hash_key_for(
    settings: ConsistentHashLB,
    *,
    headers: Mapping[str, str],
    query_params: Mapping[str, str],
    source_ip: str | None,
) -> bytes | None:
    """The consistent-hash key of a request, or None when the request has none.

    A present-but-empty header, cookie or parameter is a key (the empty one), as in
    Envoy; an absent one is None and the balancer picks at random. Header names match
    case-insensitively; query parameter names exactly.

    ``httpCookie``: when the cookie is absent, Envoy would generate one (with the
    ``ttl`` and ``path``) and set it on the response. meshlib does not set cookies
    yet, so such a request has no key and gets a random endpoint; affinity starts
    once the application itself sets the cookie.
    """
    value: str | None
    if settings.http_header_name is not None:
        value = _header(headers, settings.http_header_name)
    elif settings.http_cookie is not None:
        value = cookie_value(_header(headers, "cookie"), settings.http_cookie.name)
    elif settings.http_query_parameter_name is not None:
        value = query_params.get(settings.http_query_parameter_name)
    elif settings.use_source_ip:
        value = source_ip or None
    else:
        value = None  # useSourceIp: false
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    value = headers.get(lower)
    if value is not None:
        return value
    # A case-insensitive mapping (httpx.Headers) already answered; a plain dict
    # with other casing needs a scan.
    for key, item in headers.items():
        if key.lower() == lower:
            return item
    return None


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, surrounding quotes removed.

    A small parser, not ``http.cookies``: that one rejects a whole header for one
    malformed pair, where a proxy must still find the pair it needs. Pairs split on
    ``;``, and on ``,`` too, because clients that join repeated Cookie headers
    (HTTP/2, httpx) use a comma, which RFC 6265 forbids inside a value.
    """
    if not cookie_header:
        return None
    for pair in _split_cookies(cookie_header):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def _split_cookies(header: str) -> Iterable[str]:
    for part in header.split(";"):
        yield from part.split(",")
