"""Configuration: the YAML loader (`load`: parsing, ${VAR} substitution, cross-section
checks, one line per problem naming the key), the frozen typed settings (`settings`,
their value types in `types`, leader election's in `ha`, GPU memory resolved
against a pool in `gpu_memory`).

Layer 1: may import activator.core.
"""
