"""The demo's seven steps, in the order it walks through them, and how one is run.

The steps themselves are in ``_step_security`` and ``_step_traffic``; a failure in
one (a check, an exception, a timeout) becomes its FAILED reason and the demo moves on
to the next, so the report shows every step's outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._context import Context
from ._report import StepResult
from ._step_security import AUTHZ, IDENTITIES, RATE_LIMIT, authorization, identities, rate_limit
from ._step_traffic import CANARY, FAILOVER, FAULTS, LATENCY, canary, failover, faults, latency

__all__ = ["STEPS", "Step", "run_step"]


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    explanation: str
    run: Callable[[Context, StepResult], Awaitable[None]]


STEPS: tuple[Step, ...] = (
    Step("identities", "mTLS identities: who is who", IDENTITIES, identities),
    Step("canary", "canary payments v2: 95/5 -> 50/50 -> 100, applied live", CANARY, canary),
    Step("failover", "a failing payments instance: retries and outlier ejection", FAILOVER, failover),
    Step("authorization", "AuthorizationPolicy: frontend may not write to the ledger", AUTHZ, authorization),
    Step("rate_limit", "RateLimitPolicy: 429 over the limit", RATE_LIMIT, rate_limit),
    Step("faults", "fault injection: aborts and delays, measured", FAULTS, faults),
    Step("latency", "latency: in-process vs sidecar", LATENCY, latency),
)


async def run_step(ctx: Context, number: int, step: Step, timeout: float = 90.0) -> StepResult:
    """Run one step; an exception or a timeout is the step's FAILED reason, never hidden."""
    result = StepResult(number, step.key, step.title)
    started = time.monotonic()
    try:
        await asyncio.wait_for(step.run(ctx, result), timeout)
    except TimeoutError:
        result.fail(f"did not finish in {timeout:g} s")
    except Exception as exc:
        result.fail(f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result
