"""What the tests of the fake Kubernetes API server (tests/test_fake_kube*.py) share:
kubernetes_asyncio API groups, a bounded wait for a watch event, a watch that starts where
a list left off, and a request made without the client. The `kube` and `api` fixtures are
in conftest.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch

from tests.fakekube.server import FakeKube

# Far longer than any event takes on the loopback fake; a lost event fails, not hangs.
EVENT_BUDGET_S = 10.0


def leases(api: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api)


def ready(kube: FakeKube, name: str, count: int) -> bool:
    return kube.get(name)["status"].get("readyReplicas") == count


async def next_event(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    async with asyncio.timeout(EVENT_BUDGET_S):
        return await anext(stream)


@asynccontextmanager
async def watch_from_list(
    list_call: Callable[..., Awaitable[Any]], namespace: str, *, timeout_seconds: int = 30
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The events of a watch on what `list_call` lists, from the resourceVersion of a list
    made first (as an informer does): changes after the list only."""
    listing = await list_call(namespace)
    async with watch.Watch() as stream:
        yield stream.stream(
            list_call,
            namespace,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=timeout_seconds,
        )


@asynccontextmanager
async def raw_request(
    kube: FakeKube,
    method: str,
    path: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A request made without kubernetes_asyncio, with the kubeconfig's bearer token;
    `body`, if any, goes as JSON text labelled `content_type`."""
    headers = {"Authorization": f"Bearer {kube._state.token}"}
    data = None
    if body is not None:
        data = json.dumps(body)
        headers["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, kube.url + path, data=data, headers=headers) as response,
    ):
        yield response
