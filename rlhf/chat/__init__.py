"""Talking to an OpenAI-compatible chat-completions endpoint (a closed API, `vllm serve`).

client.py   one request per answer, with retries, back-off and the key kept out of every message
cache.py    the answers on disk, keyed by the request, so a rerun never pays twice
"""
