"""A model: the one owner of a model's state, its held requests and its engine.
`transitions` is the table of its moves; `lifecycle.Model` carries them out, with its
parts split by subject (the transition tasks, reload, leases and held requests, the
LoRA adapters loaded on its engine: `adapters`).

Layer 6: may import every layer up to activator.backends.
"""
