"""An OpenAI-compatible gateway in front of the policy's engines: an application's chat calls become
recorded, batched engine requests, one API key per episode (server.py)."""

from rollouts.gateway.episode import EpisodeRecord, SegmentTrace
from rollouts.gateway.server import Gateway

__all__ = ["EpisodeRecord", "Gateway", "SegmentTrace"]
