"""Observability: the Prometheus registry and every metric (`metrics`, one per app),
the rendering of a scrape (`exposition`), GPU time and cost (`cost`) and token usage
read from engines' answers (`usage`).

Layer 2: may import activator.core and activator.config.
"""
