"""The runtime layer: the parts owned by name, the commit loop, live reload, supervision."""

from agent.runtime.core import Runtime

__all__ = ["Runtime"]
