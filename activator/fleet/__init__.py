"""The fleet: the models that exist (`registry`: by name and alias) and the GPU pools
that sequence them (`pool.PoolScheduler`: gathers views, asks activator.placement.policy,
carries out its decisions).

Layer 7: may import every layer up to activator.model.
"""
