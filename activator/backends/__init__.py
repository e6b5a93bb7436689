"""Backends: how an engine is started, stopped and adopted. `base` is the interface the
model sees; `process` runs a local process, `kubernetes` (with its machinery in `kube/`)
scales a Deployment or StatefulSet. One module (or folder) per backend.

Layer 5: may import activator.core, config, observability, engine and placement.
"""
