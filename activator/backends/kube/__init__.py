"""Machinery of the Kubernetes backend (activator.backends.kubernetes): the per-app
cluster connection, shared informers, retried API calls and the pure pod/event rules."""
