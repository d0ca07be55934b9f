"""Bearer tokens: admin tokens, and bootstrap tokens bound to one workload identity.

Only a token's SHA-256 is stored, so the store (a file, etcd) never holds a credential
that works; the token itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TOKENS_PREFIX", "Principal", "hash_token", "new_token", "principal_from"]

TOKENS_PREFIX = "tokens/"
_SCHEME = "bearer "


@dataclass(frozen=True)
class Principal:
    """Who a token speaks for: an admin by name, or a workload identity (namespace, service account)."""

    admin: bool
    name: str
    namespace: str = ""
    service_account: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "admin": self.admin,
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Principal:
        return cls(
            bool(data.get("admin")),
            str(data.get("name", "")),
            str(data.get("namespace", "")),
            str(data.get("service_account", "")),
        )

    def may_act_as(self, namespace: str, service_account: str) -> bool:
        return self.admin or (self.namespace == namespace and self.service_account == service_account)

    def __str__(self) -> str:
        return f"admin:{self.name}" if self.admin else f"{self.namespace}/{self.service_account}"


def new_token() -> str:
    return "mlt_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def principal_from(authorization: str | None, tokens: Mapping[str, Principal]) -> Principal | None:
    """The principal of an ``Authorization: Bearer`` header, None when missing or unknown."""
    if not authorization or authorization[: len(_SCHEME)].lower() != _SCHEME:
        return None
    return tokens.get(hash_token(authorization[len(_SCHEME) :].strip()))
