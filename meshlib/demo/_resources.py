"""The Istio resources the demo applies, as the documents a user would write in YAML.

Only policy is written here: no ServiceEntry names an address or a port, because
every service announces itself to the control plane's registry when it starts
listening (on a free port), and the control plane adds it to its host.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "NAMESPACE",
    "base",
    "deny_frontend_to_ledger",
    "orders_faults",
    "orders_rate_limit",
    "payments_route",
]

NAMESPACE = "shop"
Document = dict[str, Any]

PAYMENTS_RETRIES: Document = {"attempts": 3, "perTryTimeout": "1s", "retryOn": "5xx,reset,connect-failure"}


def _meta(name: str, namespace: str = NAMESPACE) -> Document:
    return {"name": name, "namespace": namespace}


def payments_route(weights: dict[str, int]) -> Document:
    """payments' VirtualService: the canary weights per subset, with retries and a deadline."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta("payments"),
        "spec": {
            "hosts": ["payments"],
            "http": [
                {
                    "name": "canary",
                    "route": [
                        {"destination": {"host": "payments", "subset": subset}, "weight": weight}
                        for subset, weight in weights.items()
                    ],
                    "timeout": "3s",
                    "retries": PAYMENTS_RETRIES,
                }
            ],
        },
    }


def base() -> list[Document]:
    """Version 1: mTLS required in the shop, payments' subsets and outlier detection, all traffic to v1."""
    return [
        {
            "apiVersion": "meshlib.io/v1alpha1",
            "kind": "MeshConfig",
            "metadata": _meta("mesh", "istio-system"),
            "spec": {"trustDomain": "cluster.local"},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": _meta("default"),
            "spec": {"mtls": {"mode": "STRICT"}},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": _meta("payments"),
            "spec": {
                "host": "payments",
                "trafficPolicy": {
                    "loadBalancer": {"simple": "ROUND_ROBIN"},
                    "outlierDetection": {
                        "consecutive5xxErrors": 3,
                        "interval": "1s",
                        "baseEjectionTime": "30s",
                        "maxEjectionPercent": 50,
                    },
                    # Retries in flight at most max(10, 20% of the requests in flight): the default
                    # floor of 3 would refuse the 4th of 8 concurrent orders hitting the bad instance.
                    "retryBudget": {"percent": {"value": 20}, "minRetryConcurrency": 10},
                },
                "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
            },
        },
        payments_route({"v1": 100, "v2": 0}),
    ]


def deny_frontend_to_ledger() -> Document:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _meta("ledger-deny-frontend"),
        "spec": {
            "selector": {"matchLabels": {"app": "ledger"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/frontend"]}}]}],
        },
    }


def orders_rate_limit(rate: str) -> Document:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": _meta("orders-per-caller"),
        "spec": {
            "side": "SERVER",
            "selector": {"matchLabels": {"app": "orders"}},
            "limits": [{"name": "per-caller", "rate": rate, "key": "PRINCIPAL"}],
        },
    }


def orders_faults(abort_percent: float, abort_status: int, delay_percent: float, delay: str) -> Document:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta("orders-faults"),
        "spec": {
            "hosts": ["orders"],
            "http": [
                {
                    "name": "chaos",
                    "fault": {
                        "abort": {"percentage": {"value": abort_percent}, "httpStatus": abort_status},
                        "delay": {"percentage": {"value": delay_percent}, "fixedDelay": delay},
                    },
                    "route": [{"destination": {"host": "orders"}}],
                }
            ],
        },
    }
