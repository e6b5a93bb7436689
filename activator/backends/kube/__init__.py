"""Machinery of the Kubernetes backend (activator.backends.kubernetes): the per-app
cluster connection, shared informers, retried API calls, the pure pod/event rules, and
per model its workload's pods (`pods`) and its scale writes (`scale`)."""
