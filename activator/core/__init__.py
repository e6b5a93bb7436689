"""Core: the vocabulary every layer shares. Typed errors (`errors`: each carries its
HTTP status, OpenAI error type/code and whether a retry may help; they become responses
in one place, activator.edge.responses), guarded background tasks (`tasks`), and the
names of a model's states (`states`).

Layer 0: imports nothing of activator.
"""
