"""KubeCluster: one per app. Holds the API client and the shared informers.

Backends never open their own connections or watches: every model in a namespace shares
one pod watch, one event watch and one workload watch, so ten models cost three watches;
models scaled out (replicas.max > 1) share one EndpointSlice watch per namespace
(`endpoints`, activator.backends.kube.endpoints).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from activator.backends.kube.calls import ApiFunction, Obj, Op, RetryPolicy, call
from activator.backends.kube.endpoints import EndpointSliceWatch
from activator.backends.kube.informer import Informer, WatchPolicy
from activator.config.settings import KubernetesSettings
from activator.core.errors import BackendError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True, kw_only=True)
class KubeTuning:
    """Knobs of the Kubernetes backend that are not per-model settings."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    watch_backoff_initial: float = 0.2
    watch_backoff_max: float = 10.0
    unreachable_after: int = 3
    # How long a pod may sit in FailedScheduling with no word from a cluster autoscaler
    # before the start fails. The autoscaler scans every 10 s; 45 s leaves room for a slow
    # scan without keeping held requests waiting on a cluster that has no autoscaler.
    scheduling_grace: float = 45.0
    # stop(): scale to 0, then wait this long for the pods to be deleted (covers the
    # pod's terminationGracePeriodSeconds, 30 s by default, plus a vLLM drain).
    stop_timeout: float = 300.0
    # GitOps reverts tolerated per wake before the start fails: a controller that keeps
    # writing replicas: 0 will win every race, so fail with the fix instead of fighting.
    revert_limit: int = 3
    log_lines: int = 50


class KubeCluster:
    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        settings: KubernetesSettings,
        tuning: KubeTuning,
    ) -> None:
        self.api_client = api_client
        self.settings = settings
        self.tuning = tuning
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self._informers: dict[tuple[str, str], Informer] = {}
        # The pods behind each scaled-out model's Service: one watch per namespace, which
        # owns its informers (started on the first subscription).
        self.endpoints = EndpointSliceWatch(lambda ns: self.new_informer("endpointslices", ns))
        self._closed = False

    @classmethod
    async def connect(
        cls, settings: KubernetesSettings, *, tuning: KubeTuning | None = None
    ) -> KubeCluster:
        """Load credentials (kubeconfig, in-cluster service account, or auto) and build
        the client. Does not contact the API: that happens on first use, with retries."""
        configuration = client.Configuration()
        in_cluster = settings.in_cluster
        if in_cluster is None:
            in_cluster = settings.kubeconfig is None and _service_account_mounted()
        try:
            if in_cluster:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
                source = "in-cluster service account"
            else:
                await config.load_kube_config(
                    config_file=settings.kubeconfig,
                    context=settings.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
                source = f"kubeconfig {settings.kubeconfig or '(default)'}"
        except (ConfigException, OSError) as exc:
            raise BackendError(f"Kubernetes: cannot load credentials: {exc}") from exc
        log.info("kubernetes: using %s, API %s", source, configuration.host)
        return cls(
            client.ApiClient(configuration=configuration),
            settings=settings,
            tuning=tuning
            or KubeTuning(
                scheduling_grace=settings.scheduling_grace,
                stop_timeout=settings.stop_timeout,
                revert_limit=settings.revert_limit,
            ),
        )

    def list_function(self, resource: str) -> ApiFunction:
        functions: dict[str, ApiFunction] = {
            "deployments": self.apps.list_namespaced_deployment,
            "statefulsets": self.apps.list_namespaced_stateful_set,
            "pods": self.core.list_namespaced_pod,
            "events": self.core.list_namespaced_event,
            "endpointslices": self.discovery.list_namespaced_endpoint_slice,
        }
        return functions[resource]

    def new_informer(self, resource: str, namespace: str) -> Informer:
        """A list+watch of `resource` in `namespace` with the cluster's tuning, not
        started and not shared: its owner starts and closes it."""
        return Informer(
            resource=resource,
            namespace=namespace,
            list_fn=self.list_function(resource),
            policy=WatchPolicy(
                timeout=self.settings.watch_timeout,
                request_timeout=self.settings.request_timeout,
                backoff_initial=self.tuning.watch_backoff_initial,
                backoff_max=self.tuning.watch_backoff_max,
                unreachable_after=self.tuning.unreachable_after,
            ),
            retry=self.tuning.retry,
        )

    def informer(self, resource: str, namespace: str) -> Informer:
        """The shared list+watch of `resource` in `namespace`, started on first use."""
        if self._closed:
            raise BackendError("Kubernetes: cluster connection is closed")
        key = (resource, namespace)
        informer = self._informers.get(key)
        if informer is None:
            informer = self.new_informer(resource, namespace)
            self._informers[key] = informer
            informer.start()
        return informer

    async def call(
        self, op: Op, fn: ApiFunction, *args: Any, retry_conflict: bool = True, **kwargs: Any
    ) -> Obj:
        """One bounded, retried API call (see activator.backends.kube.calls.call)."""
        return await call(
            op,
            fn,
            *args,
            per_attempt=self.settings.request_timeout,
            retry=self.tuning.retry,
            retry_conflict=retry_conflict,
            **kwargs,
        )

    async def aclose(self) -> None:
        """Stop every watch, then close the client. Safe to call twice."""
        self._closed = True
        await self.endpoints.aclose()
        informers, self._informers = list(self._informers.values()), {}
        for informer in informers:
            await informer.aclose()
        await self.api_client.close()


def _service_account_mounted() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(SERVICE_ACCOUNT_TOKEN)
