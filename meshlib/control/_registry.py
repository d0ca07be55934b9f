"""The service registry: workloads that announced themselves, mixed into the configuration's ServiceEntries.

A registration is pure data with a time-to-live kept by the store; this module only
turns the live ones into endpoints. A workload's endpoint joins the ServiceEntry of its
host (static endpoints stay beside it) or, when no entry names the host, an entry is
made for it, the way Kubernetes makes a Service's endpoints from its pods.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..policy import Workload, canonical_host
from ..policy._networking import ServicePort as _PortModel

__all__ = ["Registration", "TLS_MODE_LABEL", "merge_registry"]

TLS_MODE_LABEL = "security.istio.io/tlsMode"
_PROTOCOLS = {"HTTP", "HTTP2", "HTTPS", "GRPC", "TCP", "TLS"}


@dataclass(frozen=True)
class Registration:
    """One serving instance of a workload, as it announced itself."""

    node: str
    workload: str
    namespace: str
    service_account: str
    address: str
    port: int
    service_port: int = 80
    protocol: str = "HTTP"
    host: str = ""
    tls: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Registration:
        """From a request body; ValueError names the bad field."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        for name in ("node", "workload", "address"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"{name}: a non-empty string is required")
        labels = data.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValueError("labels: a map of strings to strings is required")
        ports = {}
        for name, default in (("port", None), ("service_port", 80)):
            value = data.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
                raise ValueError(f"{name}: a port number 1..65535 is required, not {value!r}")
            ports[name] = value
        protocol = str(data.get("protocol") or "HTTP").upper()
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol: one of {', '.join(sorted(_PROTOCOLS))}, not {protocol!r}")
        namespace = str(data.get("namespace") or "default")
        # Workload checks the names as Kubernetes would.
        workload = Workload(
            data["workload"], namespace=namespace, service_account=str(data.get("service_account") or "")
        )
        return cls(
            node=data["node"],
            workload=workload.name,
            namespace=workload.namespace,
            service_account=workload.service_account,
            address=data["address"],
            port=ports["port"],
            service_port=ports["service_port"],
            protocol=protocol,
            host=str(data.get("host") or ""),
            tls=bool(data.get("tls", False)),
            labels=dict(labels),
        )

    @property
    def id(self) -> str:
        """Stable for an instance (same workload, address and port), so a re-registration is a heartbeat."""
        key = f"{self.namespace}/{self.workload}/{self.address}/{self.port}"
        return f"{self.workload}.{self.namespace}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    @property
    def fqdn(self) -> str:
        return canonical_host(self.host or self.workload, self.namespace)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = dict(self.labels)
        return data

    def endpoint(self, port_names: Iterable[str]) -> dict[str, Any]:
        labels = dict(self.labels)
        labels.setdefault("app", self.workload)
        if self.tls:
            labels[TLS_MODE_LABEL] = "istio"
        return {
            "address": self.address,
            "ports": dict.fromkeys(port_names, self.port),
            "labels": labels,
            "serviceAccount": self.service_account,
        }


def _port_name(protocol: str) -> str:
    return protocol.lower()


def merge_registry(
    documents: Iterable[Mapping[str, Any]], registrations: Iterable[Registration]
) -> list[dict[str, Any]]:
    """The configuration's documents with every registered endpoint added (inputs untouched)."""
    docs = [dict(d) for d in documents]
    by_host: dict[str, list[Registration]] = {}
    for reg in sorted(registrations, key=lambda r: r.id):
        by_host.setdefault(reg.fqdn, []).append(reg)
    if not by_host:
        return docs
    for i, doc in enumerate(docs):
        if doc.get("kind") != "ServiceEntry":
            continue
        namespace = (doc.get("metadata") or {}).get("namespace") or "default"
        spec = doc.get("spec") or {}
        hosts = [canonical_host(h, namespace) for h in spec.get("hosts") or ()]
        joining = [reg for h in hosts for reg in by_host.pop(h, ())]
        if not joining:
            continue
        spec = copy.deepcopy(spec)
        if spec.get("resolution", "NONE") == "NONE":
            spec["resolution"] = "STATIC"  # endpoints now exist; NONE would refuse them
        ports = spec.setdefault("ports", [])
        if not ports:
            first = joining[0]
            ports.append({"number": first.service_port, "name": _port_name(first.protocol), "protocol": first.protocol})
        names = [str(p.get("name")) for p in ports]
        endpoints = spec.setdefault("endpoints", [])
        endpoints.extend(reg.endpoint(names) for reg in joining)
        docs[i] = {**doc, "spec": spec}
    for fqdn, regs in sorted(by_host.items()):
        first = regs[0]
        name = _port_name(first.protocol)
        _PortModel(number=first.service_port, name=name, protocol=first.protocol)  # the same checks as YAML's
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {
                    "name": f"registry.{fqdn}",
                    "namespace": first.namespace,
                    "labels": {"meshlib.io/source": "registry"},
                },
                "spec": {
                    "hosts": [fqdn],
                    "location": "MESH_INTERNAL",
                    "resolution": "STATIC",
                    "ports": [{"number": first.service_port, "name": name, "protocol": first.protocol}],
                    "endpoints": [reg.endpoint([name]) for reg in regs],
                },
            }
        )
    return docs
