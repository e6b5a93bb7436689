"""Talking to an engine over HTTP: the pooled client that forwards requests
(`http_client`), the readiness probe (`readiness`: /health and the model listed) and
vLLM's sleep API (`sleep`).

Layer 3: may import activator.core.
"""
