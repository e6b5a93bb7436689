"""Placement: where a model's work goes: on which GPUs, and on how many replicas."""
