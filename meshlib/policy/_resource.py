"""The Kubernetes envelope every resource shares: apiVersion, kind, metadata, spec."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator

from ._base import MeshModel
from ._values import yaml_type

__all__ = ["ObjectMeta", "Resource"]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


class ObjectMeta(MeshModel):
    """``metadata``. Bookkeeping fields from ``kubectl get -o yaml`` are accepted and ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Written by Kubernetes, not by the policy author; carry no meaning for meshlib.
    uid: Any = None
    resource_version: Any = Field(default=None, alias="resourceVersion")
    generation: Any = None
    creation_timestamp: Any = Field(default=None, alias="creationTimestamp")
    managed_fields: Any = Field(default=None, alias="managedFields")
    owner_references: Any = Field(default=None, alias="ownerReferences")
    finalizers: Any = None
    generate_name: Any = Field(default=None, alias="generateName")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 253 or not _NAME.match(v):
            raise ValueError(f"invalid name {v!r}: use lower-case letters, digits, '-' and '.'")
        return v

    @field_validator("namespace", mode="before")
    @classmethod
    def _namespace(cls, v: Any) -> Any:
        if v is None or v == "":
            return "default"
        if not isinstance(v, str):
            # Not the value itself: a YAML alias can make a list whose text is exponential in size.
            raise ValueError(f"a namespace is a string (a DNS label), not {yaml_type(v)}")
        if len(v) > 63 or not _NAMESPACE.match(v):
            raise ValueError(f"invalid namespace {v!r}: use a DNS label (lower-case letters, digits, '-')")
        return v


class Resource(MeshModel):
    """One configuration resource. Subclasses fix ``KIND``, ``GROUP``, ``VERSIONS`` and the spec type."""

    KIND: ClassVar[str] = ""
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ()

    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: Any
    # ``kubectl get -o yaml`` adds a status; it describes the cluster, not the policy.
    status: Any = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def ref(self) -> str:
        """``kind/namespace/name``: how every message names this resource."""
        return f"{self.kind}/{self.metadata.namespace}/{self.metadata.name}"

    def to_document(self) -> dict[str, Any]:
        """The resource as a plain document (JSON-able, YAML field names): what a store or a push carries.

        Kubernetes bookkeeping and ``status`` are left out; parsing the document gives back an
        equal resource.
        """
        meta = self.metadata
        metadata: dict[str, Any] = {"name": meta.name, "namespace": meta.namespace}
        if meta.labels:
            metadata["labels"] = dict(meta.labels)
        if meta.annotations:
            metadata["annotations"] = dict(meta.annotations)
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": metadata,
            "spec": self.spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
        }
