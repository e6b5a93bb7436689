from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.config import new_client_from_config

from tests.fakekube.server import FakeKube
from tests.harness import Running, start_activator

ActivatorFactory = Callable[[dict[str, Any]], Awaitable[Running]]

# The runtime dir of the user who runs the suite, before the suite takes its own: where a
# demo they run (`activator serve`) holds its lock.
USER_RUNTIME_DIR = os.environ.get("XDG_RUNTIME_DIR")


@pytest.fixture(autouse=True, scope="session")
def private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's own runtime dir, where `activator serve` keeps its one-activator-per-
    config locks (activator.cli.runtime_dir): the suite passes beside a running demo (the
    README's first command holds the embedded config's lock in the user's runtime dir).
    Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
        yield


@pytest.fixture
async def activator() -> AsyncIterator[ActivatorFactory]:
    """Start activators from config dicts; all are shut down (engines stopped) after."""
    started: list[Running] = []

    async def start(config: dict[str, Any]) -> Running:
        running = await start_activator(config)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.close()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    """A fake Kubernetes cluster on loopback. Bookmarks (only to watches that ask for them)
    every 0.2 s, so a test waiting for one is short. A module needing other options
    defines a `kube` of its own."""
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


@pytest.fixture
async def api(kube: FakeKube) -> AsyncIterator[client.ApiClient]:
    """kubernetes_asyncio's client on `kube`, through its kubeconfig as a pod would be."""
    api_client = await new_client_from_config(config_file=kube.kubeconfig)
    async with api_client:
        yield api_client
