"""Kubernetes objects a ModelDeployment owns: pure builders (children) and a server-side apply client."""
