"""kubetune: the control plane (API models, planning, Kopf handlers, backends, CLI)."""

__version__ = "0.1.0"
