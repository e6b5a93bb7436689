"""Internals of the fake Kubernetes API server; use `tests.fakekube.server.FakeKube`."""
