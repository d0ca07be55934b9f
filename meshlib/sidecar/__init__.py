"""The sidecar: the mesh on the wire for an app that cannot change a line (``meshlib sidecar``)."""

from ._admin import admin_app
from ._inbound import AppForwarder
from ._outbound import OutboundProxy
from ._run import Sidecar, SidecarOptions

__all__ = ["AppForwarder", "OutboundProxy", "Sidecar", "SidecarOptions", "admin_app"]
