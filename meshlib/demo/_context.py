"""What every step of the demo shares: the shop, the callers' clients, and how close a measurement must be.

The checks are the promises a step's explanation makes (a 50/50 split is within a few
points of 50/50...), with tolerances wide enough for honest randomness and no wider: a
broken mesh fails them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx

from ._resources import NAMESPACE
from ._shop import Shop

__all__ = ["Context", "fqdn", "tolerance"]


@dataclass
class Context:
    """What every step uses: the shop, and the clients of the two callers (made in the driver's loop)."""

    shop: Shop
    frontend: httpx.AsyncClient
    orders: httpx.AsyncClient
    scale: float = 1.0

    def n(self, count: int) -> int:
        """A request count, scaled by ``--scale`` (never below 20: fewer would measure nothing)."""
        return max(20, round(count * self.scale))

    async def order(self, i: int) -> httpx.Response:
        return await self.frontend.post("http://orders/orders", json={"item": i})


def fqdn(host: str) -> str:
    return f"{host}.{NAMESPACE}.svc.cluster.local"


def tolerance(share: float, n: int) -> float:
    """Allowed gap in percentage points between a measured share and the one set: 4 sigma, at least 2 points.

    Each draw is random, so a share measured over n requests has a standard deviation
    of sqrt(p(1-p)/n); 4 of them fail an honest mesh once in 16,000 runs, and catch a
    broken one (400 requests at 50/50: within 10 points). A share of 0 or 1 must be
    exact: no request may go where weight 0 points.
    """
    if share <= 0 or share >= 1:
        return 0.0
    sigma = math.sqrt(share * (1 - share) / max(n, 1)) * 100
    return max(2.0, 4 * sigma)
