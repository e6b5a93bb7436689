"""Placement: where a model's work goes. Pure policy (`policy`: which models start,
which are evicted or put to sleep, what is idle; `scaling`: how many replicas), routing
requests among a model's pods (`routing`) and the scale-out loop that applies
`scaling` (`scaleout`).

Layer 4: may import activator.core, config, observability and engine.
"""
