"""gradwatch: are my gradients vanishing or exploding, where, why, and what fixes it?

The SDK imports torch, httpx and the standard library only.
"""
from gradwatch.probe import Probe
from gradwatch.client import Client

__all__ = ["Client", "Probe"]
