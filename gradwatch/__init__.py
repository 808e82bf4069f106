"""gradwatch: are my gradients vanishing or exploding, where, why, and what fixes it?

The SDK imports torch, httpx and the standard library only.
"""
from gradwatch.probe import Probe

# Client (gradwatch/client.py) is added here by the lead: from gradwatch.client import Client
__all__ = ["Probe"]
