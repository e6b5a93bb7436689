"""Internals of the fake Kubernetes API server; use `activator.testing.fake_kube.FakeKube`."""
