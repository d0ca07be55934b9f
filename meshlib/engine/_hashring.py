"""Consistent-hash structures: a Ketama-style ring and a Maglev lookup table.

Both are built once per endpoint set from the endpoints' *keys* (stable strings,
never Python's salted ``hash()``), so every process of the mesh, the sidecar and
the in-process client alike, sends the same request key to the same endpoint.
Building is the expensive part; a lookup is one ``blake2b`` of the request key plus
a bisect (ring) or an index (Maglev).
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Sequence
from hashlib import blake2b

__all__ = [
    "MAGLEV_MAX_TABLE_SIZE",
    "MAX_RING_POINTS",
    "HashRing",
    "MaglevTable",
    "is_prime",
    "ring_points_per_endpoint",
    "stable_hash",
]

MAX_RING_POINTS = 1 << 16
"""The most points a ring holds (Envoy's ``maximum_ring_size`` is 8M; in Python 64K keeps a build under ~50 ms)."""

MAGLEV_MAX_TABLE_SIZE = 5000011
"""Istio's bound: ``tableSize`` must be a prime below this."""

_POINTS_PER_DIGEST = 8
_UNPACK = struct.Struct(">8Q").unpack


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike ``hash()``)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def is_prime(n: int) -> bool:
    """Trial division: table sizes are below 5,000,011, so this is at most ~1,100 divisions."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def ring_points_per_endpoint(minimum_ring_size: int, n_endpoints: int) -> int:
    """Points each endpoint puts on the ring.

    Envoy spreads ``minimumRingSize`` points over all hosts, so adding a host takes
    points away from every other host and moves keys between hosts that did not
    change. meshlib gives *each* endpoint ``minimumRingSize`` points (so the ring has
    at least that many), which makes an endpoint's points independent of the others:
    removing one moves exactly its keys, adding one moves about 1/(N+1). Past
    :data:`MAX_RING_POINTS` the per-endpoint count halves, a step that only changes
    when N crosses a power-of-two boundary.
    """
    per = max(1, minimum_ring_size)
    while per > 1 and per * max(1, n_endpoints) > MAX_RING_POINTS:
        per //= 2
    return per


class HashRing:
    """A Ketama-style ring: ``points`` pseudo-random positions per key, sorted; a key
    belongs to the first point at or after its hash (wrapping around)."""

    __slots__ = ("hashes", "owners")

    def __init__(self, keys: Sequence[str], points_per_key: int) -> None:
        hashes: list[int] = []
        owners: list[int] = []
        blocks = -(-points_per_key // _POINTS_PER_DIGEST)
        for owner, key in enumerate(keys):
            prefix = key.encode("utf-8", "surrogateescape") + b"_"
            left = points_per_key
            for block in range(blocks):
                # One 64-byte digest gives eight points; point i of a key never depends
                # on how many points the key has, so a smaller ring is a subset of a larger.
                values = _UNPACK(blake2b(prefix + str(block).encode(), digest_size=64).digest())
                take = min(left, _POINTS_PER_DIGEST)
                hashes.extend(values[:take])
                owners.extend([owner] * take)
                left -= take
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        self.hashes: list[int] = [hashes[i] for i in order]
        """Point positions, ascending."""
        self.owners: list[int] = [owners[i] for i in order]
        """The key index owning each point."""

    def __len__(self) -> int:
        return len(self.hashes)

    def position(self, key_hash: int) -> int:
        """The index of the point that owns a 64-bit hash."""
        pos = bisect_left(self.hashes, key_hash)
        return 0 if pos == len(self.hashes) else pos


class MaglevTable:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016), as Envoy builds it unweighted.

    Each key has a permutation of the slots, ``(offset + j * skip) % size``; keys
    take turns claiming their next free preferred slot until the table is full, so
    each owns ``size / N`` slots (±1) and a change of keys disturbs few slots. Keys
    take turns in sorted order, so the table does not depend on the order the
    endpoints were listed in.
    """

    __slots__ = ("size", "slots")

    def __init__(self, keys: Sequence[str], size: int) -> None:
        if not is_prime(size) or size >= MAGLEV_MAX_TABLE_SIZE:
            raise ValueError(f"maglev table size {size} must be a prime below {MAGLEV_MAX_TABLE_SIZE}")
        self.size = size
        self.slots: list[int] = _build_maglev(keys, size) if keys else []
        """The key index owning each slot."""


def _build_maglev(keys: Sequence[str], size: int) -> list[int]:
    n = len(keys)
    if n == 1:
        return [0] * size
    order = sorted(range(n), key=keys.__getitem__)
    offsets: list[int] = []
    skips: list[int] = []
    for owner in order:
        digest = blake2b(keys[owner].encode("utf-8", "surrogateescape"), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)

    table = [-1] * size
    current = offsets[:]  # the slot each key looks at next, (offset + j * skip) % size
    filled = 0
    # Phase 1: walk the permutations. Cheap while the table is sparse; near the end a
    # walk probes ~size/empty slots per claim, so switch strategies at size/4N empty
    # (measured: the cheapest point for N from 3 to 1000).
    switch_at = size - size // (4 * n)
    while filled < switch_at:
        for turn in range(n):
            c = current[turn]
            skip = skips[turn]
            while table[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            table[c] = order[turn]
            c += skip
            current[turn] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table
    # Phase 2: every slot before a key's cursor is taken, so a key's next claim is the
    # free slot earliest in its permutation. Rank the free slots per key once (by
    # j = (slot - offset) / skip mod size) instead of probing through the full table.
    empty = [s for s in range(size) if table[s] < 0]
    ranked: list[list[int]] = []
    for turn in range(n):
        off, inv = offsets[turn], pow(skips[turn], -1, size)
        ranked.append(sorted((s - off) * inv % size for s in empty))
    cursor = [0] * n
    while True:
        for turn in range(n):
            js = ranked[turn]
            k = cursor[turn]
            off, skip = offsets[turn], skips[turn]
            slot = (off + js[k] * skip) % size
            while table[slot] >= 0:
                k += 1
                slot = (off + js[k] * skip) % size
            table[slot] = order[turn]
            cursor[turn] = k + 1
            filled += 1
            if filled == size:
                return table
