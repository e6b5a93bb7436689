"""KubernetesBackend against the fake API server, through kubernetes_asyncio and a
generated kubeconfig, with a recording listener standing in for the model lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from activator.backends.base import BackendError
from activator.backends.kube.calls import RetryPolicy
from activator.backends.kube.status import SchedulingSignals, scheduling_failure, view_pod
from activator.backends.kubernetes import KubeCluster, KubernetesBackend, KubeTuning
from activator.config.settings import KubernetesSettings, KubernetesTarget, ModelSettings
from tests.fakekube.server import FakeKube

FAST = KubeTuning(
    retry=RetryPolicy(attempts=4, initial=0.01, max_wait=0.05, total=10.0),
    watch_backoff_initial=0.01,
    watch_backoff_max=0.05,
    unreachable_after=3,
    scheduling_grace=0.5,
    stop_timeout=30.0,
    revert_limit=2,
)


@dataclass
class Recorder:
    """The listener side of the seam: records what the backend reported, in order."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    progress: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _add(self, kind: str, value: Any = None) -> None:
        self.calls.append((kind, value))
        self._changed.set()
        self._changed = asyncio.Event()

    def backend_phase(self, phase: str) -> None:
        self._add("phase", phase)

    def backend_progress(self) -> None:
        self.progress += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def backend_failed(self, reason: str) -> None:
        self._add("failed", reason)

    def backend_appeared(self) -> None:
        self._add("appeared")

    def backend_blocked(self, blocked: bool) -> None:
        self._add("blocked", blocked)

    def backend_reverted(self) -> None:
        self._add("reverted")

    def backend_lost(self, reason: str) -> None:
        self._add("lost", reason)

    def backend_unknown(self, unknown: bool) -> None:
        self._add("unknown", unknown)

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.calls if k == kind]

    async def wait_for(self, predicate: Callable[[], bool], *, within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                await self._changed.wait()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5) as fake:
        yield fake


MakeBackend = Callable[..., Awaitable[tuple[KubernetesBackend, Recorder]]]


@pytest.fixture
async def cluster(kube: FakeKube) -> AsyncIterator[KubeCluster]:
    settings = KubernetesSettings(
        kubeconfig=kube.kubeconfig, request_timeout=2.0, watch_timeout=60.0
    )
    connected = await KubeCluster.connect(settings, tuning=FAST)
    yield connected
    await connected.aclose()


@pytest.fixture
async def make(kube: FakeKube, cluster: KubeCluster) -> AsyncIterator[MakeBackend]:
    made: list[KubernetesBackend] = []

    async def make_backend(
        name: str = "coder-chat", *, kind: str = "Deployment", **workload: Any
    ) -> tuple[KubernetesBackend, Recorder]:
        fake = kube.add_workload(name, kind=kind, **workload)  # type: ignore[arg-type]
        model = ModelSettings(
            name=name,
            served_model_name=name,
            kubernetes=KubernetesTarget(namespace="serving", name=name, url=fake.url, kind=kind),  # type: ignore[arg-type]
        )
        recorder = Recorder()
        backend = KubernetesBackend(model, cluster=cluster, listener=recorder)
        made.append(backend)
        return backend, recorder

    yield make_backend
    for backend in made:
        await backend.aclose()


def ready(kube: FakeKube, name: str = "coder-chat", kind: str = "Deployment") -> bool:
    return bool(kube.get(name, kind=kind)["status"].get("readyReplicas"))  # type: ignore[arg-type]


async def health(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
        return response.status


# -- 1. scale up through the scale subresource, idempotent ---------------------------------


async def test_start_merge_patches_only_the_scale_subresource(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _recorder = await make()
    url = await backend.start()
    assert url == kube.workload("coder-chat").url
    assert kube.replicas("coder-chat") == 1
    writes = [r for r in kube.requests if r.method not in ("GET",)]
    assert [(r.verb, r.resource, r.content_type, r.body) for r in writes] == [
        ("patch", "deployments/scale", "application/merge-patch+json", {"spec": {"replicas": 1}})
    ]
    await kube.wait_until(lambda: ready(kube))
    assert await health(url) == 200


async def test_wake_phases_are_reported_once_and_in_order(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    await recorder.wait_for(lambda: "started" in recorder.of("phase"))
    await kube.wait_until(lambda: ready(kube))
    assert recorder.of("phase") == ["scale_requested", "scheduled", "image_pulled", "started"]
    assert recorder.progress > 0
    assert recorder.of("failed") == []


async def test_start_when_already_scaled_up_does_not_patch(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make(replicas=1)
    await kube.wait_until(lambda: ready(kube))
    await backend.start()
    assert [r for r in kube.requests if r.verb == "patch"] == []
    await recorder.wait_for(lambda: "started" in recorder.of("phase"))
    assert "scale_requested" not in recorder.of("phase")


async def test_statefulset_scales_up_and_down(kube: FakeKube, make: MakeBackend) -> None:
    backend, _recorder = await make("ranker", kind="StatefulSet")
    await backend.start()
    await kube.wait_until(lambda: ready(kube, "ranker", "StatefulSet"))
    assert [r.resource for r in kube.requests if r.verb == "patch"] == ["statefulsets/scale"]
    await backend.stop()
    assert kube.pods("ranker", kind="StatefulSet") == []


# -- 4. scale down: return only once the pods are deleted ----------------------------------


async def test_stop_returns_only_after_the_pod_is_deleted_and_the_engine_exited(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    url = await backend.start()
    await kube.wait_until(lambda: ready(kube))
    await backend.stop()
    assert kube.replicas("coder-chat") == 0
    assert kube.pods("coder-chat") == []
    with pytest.raises(aiohttp.ClientConnectionError):
        await health(url)
    await backend.stop()  # idempotent
    assert recorder.of("appeared") == [] and recorder.of("reverted") == []
    assert recorder.of("lost") == []  # our own scale-down is no loss


async def test_stop_while_the_pod_is_still_pending(kube: FakeKube, make: MakeBackend) -> None:
    backend, _ = await make()
    kube.fail_scheduling("coder-chat", autoscaler="triggered")
    kube.update_plan("coder-chat", provision_delay=60.0)
    await backend.start()
    await kube.wait_until(lambda: bool(kube.pods("coder-chat")))
    await backend.stop()
    assert kube.pods("coder-chat") == []


async def test_start_stop_start_is_not_mistaken_for_other_actors(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    for _ in range(2):
        await backend.start()
        await kube.wait_until(lambda: ready(kube))
        await backend.stop()
    assert recorder.of("appeared") == [] and recorder.of("reverted") == []
    assert recorder.of("phase").count("scale_requested") == 2


# -- 3. failure reasons -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        (lambda k: k.fail_image_pull("coder-chat"), "ImagePullBackOff"),
        (lambda k: k.crash_loop("coder-chat"), "CrashLoopBackOff"),
        (lambda k: k.oom_kill("coder-chat"), "OOMKilled"),
        (lambda k: k.fail_scheduling("coder-chat", autoscaler="failed"), "GCE out of resources"),
        (
            lambda k: k.fail_scheduling("coder-chat", autoscaler="not_triggered"),
            "NotTriggerScaleUp",
        ),
        (lambda k: k.fail_scheduling("coder-chat", autoscaler=None), "FailedScheduling"),
    ],
    ids=["image-pull", "crash-loop", "oom", "failed-scale-up", "no-scale-up", "no-autoscaler"],
)
async def test_start_failure_is_reported_with_its_reason(
    kube: FakeKube, make: MakeBackend, inject: Callable[[FakeKube], None], expected: str
) -> None:
    backend, recorder = await make()
    inject(kube)
    await backend.start()
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert expected in recorder.of("failed")[0]
    assert any(expected.split()[0] in line for line in backend.log_tail())


async def test_crash_of_the_engine_process_is_a_crash_loop(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    kube.crash_loop("coder-chat")  # the stand-in engine exits while loading
    await backend.start()
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "CrashLoopBackOff" in recorder.of("failed")[0]
    assert "exited with code" in recorder.of("failed")[0]


async def test_pending_while_a_node_is_provisioned_is_not_a_failure(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    # The node takes longer than the scheduling grace to arrive: still not a failure.
    kube.fail_scheduling("coder-chat", autoscaler="triggered")
    kube.update_plan("coder-chat", provision_delay=FAST.scheduling_grace * 3)
    await backend.start()
    await kube.wait_until(lambda: ready(kube))
    await recorder.wait_for(lambda: "started" in recorder.of("phase"))
    assert recorder.of("failed") == []
    assert any("TriggeredScaleUp" in line for line in backend.log_tail())


async def test_engine_killed_while_serving_is_reported(kube: FakeKube, make: MakeBackend) -> None:
    backend, recorder = await make()
    await backend.start()
    await kube.wait_until(lambda: ready(kube))
    kube.kill_engine("coder-chat", oom=True)
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "OOMKilled" in recorder.of("failed")[0]


# -- 5. other actors: GitOps reverts and manual scale-ups --------------------------------------


async def test_revert_to_zero_while_wanted_is_scaled_up_again(
    kube: FakeKube, make: MakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend, recorder = await make()
    await backend.start()
    await kube.wait_until(lambda: ready(kube))
    kube.scale("coder-chat", 0)  # Argo CD syncing the manifest's replicas: 0
    await recorder.wait_for(lambda: recorder.of("reverted") == [None])
    await kube.wait_until(lambda: ready(kube))
    assert kube.replicas("coder-chat") == 1
    assert recorder.of("failed") == []
    assert "RespectIgnoreDifferences=true" in caplog.text


async def test_repeated_reverts_fail_the_model_with_the_fix(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    for revert in range(1, FAST.revert_limit + 2):
        await kube.wait_until(lambda: kube.replicas("coder-chat") == 1)
        kube.scale("coder-chat", 0)
        await recorder.wait_for(lambda n=revert: len(recorder.of("reverted")) == n)  # type: ignore[misc]
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "RespectIgnoreDifferences=true" in recorder.of("failed")[0]


async def test_revert_that_cannot_be_undone_fails_the_model(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    kube.forbid("patch", "deployments/scale")
    kube.scale("coder-chat", 0)
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "could not be restored" in recorder.of("failed")[0]
    assert "RBAC: cannot patch deployments/scale in namespace serving" in recorder.of("failed")[0]


async def test_losing_the_last_ready_pod_is_reported_and_serving_follows_the_pods(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    assert not backend.serving()  # scaled up, no pod Ready yet
    await recorder.wait_for(backend.serving)
    kube.set_pods_ready("coder-chat", False)  # node lost
    await recorder.wait_for(lambda: len(recorder.of("lost")) == 1)
    assert "is not Ready" in recorder.of("lost")[0]
    assert not backend.serving()
    kube.set_pods_ready("coder-chat", True)
    await recorder.wait_for(backend.serving)
    (pod,) = kube.pods("coder-chat")
    kube.evict("coder-chat")
    await recorder.wait_for(lambda: len(recorder.of("lost")) == 2)
    assert recorder.of("lost")[1] == f"pod {pod['metadata']['name']} is terminating"
    await recorder.wait_for(backend.serving)  # the replacement is Ready
    assert recorder.of("failed") == [] and recorder.of("reverted") == []
    # The replacement's wake phases are reported again (a new wake).
    assert recorder.of("phase").count("started") == 3


async def test_serving_is_not_blocked_while_the_api_cannot_be_observed(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    kube.break_api()
    kube.drop_watches(abrupt=True)
    await recorder.wait_for(lambda: recorder.of("unknown") == [True])
    assert backend.serving()  # the cache may be stale: the URL probe decides
    kube.heal_api()


async def test_models_are_kept_on_shutdown_unless_configured_to_stop(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _ = await make()
    assert backend.keep_on_shutdown
    settings = KubernetesSettings(kubeconfig=kube.kubeconfig, on_shutdown="stop")
    cluster = await KubeCluster.connect(settings, tuning=FAST)
    model = ModelSettings(
        name="x",
        served_model_name="x",
        kubernetes=KubernetesTarget(namespace="serving", name="x", url="http://127.0.0.1:9"),
    )
    assert not KubernetesBackend(model, cluster=cluster, listener=Recorder()).keep_on_shutdown
    await cluster.aclose()


async def test_manual_scale_up_while_not_wanted_is_adopted(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    assert await backend.discover() is None
    kube.scale("coder-chat", 1)  # kubectl scale by a person
    await recorder.wait_for(lambda: recorder.of("appeared") == [None])
    await recorder.wait_for(lambda: "started" in recorder.of("phase"))
    await backend.stop()
    assert kube.pods("coder-chat") == []


async def test_workload_deleted_while_wanted_fails(kube: FakeKube, make: MakeBackend) -> None:
    backend, recorder = await make()
    await backend.start()
    kube.delete_workload("coder-chat")
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "was deleted" in recorder.of("failed")[0]


# -- 6. discover -----------------------------------------------------------------------------


async def test_discover_adopts_a_running_workload(kube: FakeKube, make: MakeBackend) -> None:
    backend, recorder = await make(replicas=1)
    await kube.wait_until(lambda: ready(kube))
    assert await backend.discover() == kube.workload("coder-chat").url
    # Adopted means wanted: a revert is now fought, not ignored.
    kube.scale("coder-chat", 0)
    await recorder.wait_for(lambda: recorder.of("reverted") == [None])


async def test_discover_counts_a_pending_pod_as_running(kube: FakeKube, make: MakeBackend) -> None:
    backend, _ = await make(replicas=1)
    kube.fail_scheduling("coder-chat", autoscaler="triggered")
    kube.update_plan("coder-chat", provision_delay=60.0)
    kube.scale("coder-chat", 0)
    await kube.wait_until(lambda: not kube.pods("coder-chat"))
    kube.scale("coder-chat", 1)
    await kube.wait_until(lambda: bool(kube.pods("coder-chat")))
    assert not ready(kube)
    assert await backend.discover() is not None


async def test_discover_of_a_missing_workload_names_it(
    kube: FakeKube, cluster: KubeCluster
) -> None:
    model = ModelSettings(
        name="ghost",
        served_model_name="ghost",
        kubernetes=KubernetesTarget(namespace="serving", name="ghost", url="http://127.0.0.1:9"),
    )
    backend = KubernetesBackend(model, cluster=cluster, listener=Recorder())
    with pytest.raises(BackendError, match="deployments/ghost"):
        await backend.discover()
    await backend.aclose()


# -- 7. API faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inject",
    [
        lambda k: k.fail_next(2, status=500, verb="patch"),
        lambda k: k.fail_next(1, status=409, verb="patch"),
        lambda k: k.fail_next(2, status=503, verb="get", resource="deployments/scale"),
        lambda k: k.fail_next(1, status=429, verb="get", resource="deployments/scale"),
        lambda k: k.reset_next(2, verb="get", resource="deployments/scale"),
        lambda k: k.hang_next(1, verb="patch"),
    ],
    ids=["500", "409", "503", "429", "reset", "timeout"],
)
async def test_transient_api_faults_are_retried(
    kube: FakeKube, make: MakeBackend, inject: Callable[[FakeKube], None]
) -> None:
    backend, _ = await make()
    await backend.discover()  # watches established first: the fault hits the start's calls
    inject(kube)
    await backend.start()
    assert kube.replicas("coder-chat") == 1
    assert kube.faults.pending() == 0


async def test_faults_that_outlast_the_retries_fail_clearly(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _ = await make()
    await backend.discover()
    kube.fail_next(FAST.retry.attempts, status=500, verb="patch")
    with pytest.raises(BackendError, match="patch deployments/scale/coder-chat"):
        await backend.start()


async def test_forbidden_patch_names_the_missing_verb(kube: FakeKube, make: MakeBackend) -> None:
    backend, _ = await make()
    kube.forbid("patch", "deployments/scale")
    with pytest.raises(
        BackendError, match="RBAC: cannot patch deployments/scale in namespace serving"
    ):
        await backend.start()
    assert len([r for r in kube.requests if r.verb == "patch"]) == 1  # 403 is not retried


async def test_forbidden_watch_list_fails_the_start_at_once(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _ = await make()
    kube.forbid("list", "events")
    with pytest.raises(BackendError, match="RBAC: cannot list events in namespace serving"):
        await backend.start()


async def test_unreachable_api_makes_the_state_unknown_until_it_recovers(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    await backend.start()
    kube.break_api()
    kube.drop_watches(abrupt=True)
    await recorder.wait_for(lambda: recorder.of("unknown") == [True])
    kube.heal_api()
    await recorder.wait_for(lambda: recorder.of("unknown") == [True, False])
    # Watches are back: changes are seen again.
    kube.scale("coder-chat", 0)
    await recorder.wait_for(lambda: recorder.of("reverted") == [None])


async def test_watch_drop_and_410_relist_keep_the_backend_informed(
    kube: FakeKube, make: MakeBackend, cluster: KubeCluster
) -> None:
    backend, recorder = await make()
    assert await backend.discover() is None
    informer = cluster.informer("deployments", "serving")
    relists = informer.relists
    kube.compact()
    kube.gone_next_watches(3)
    kube.drop_watches()
    async with asyncio.timeout(30):
        while informer.relists == relists:
            await informer.attempted().wait()
    kube.scale("coder-chat", 1)
    await recorder.wait_for(lambda: recorder.of("appeared") == [None])
    assert recorder.of("unknown") == []


async def test_models_in_one_namespace_share_the_watches(kube: FakeKube, make: MakeBackend) -> None:
    first, _ = await make("coder-chat")
    second, _ = await make("embedder")
    await first.discover()
    await second.discover()
    watches = [r.resource for r in kube.requests if r.verb == "watch"]
    assert sorted(watches) == ["deployments", "events", "pods"]


async def test_log_tail_holds_the_workloads_events_and_pod_states(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, recorder = await make()
    other, _ = await make("embedder")
    kube.fail_image_pull("coder-chat")
    await backend.start()
    await other.start()
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    tail = backend.log_tail()
    assert any("Failed" in line and "manifest unknown" in line for line in tail)
    assert any("ImagePullBackOff" in line for line in tail)
    assert not any("embedder" in line for line in tail)
    assert len(tail) <= FAST.log_lines


async def test_cluster_close_ends_every_watch_task(
    kube: FakeKube, make: MakeBackend, cluster: KubeCluster
) -> None:
    backend, _ = await make()
    await backend.start()
    await backend.aclose()
    await cluster.aclose()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(n.startswith("kube-") for n in names)


# -- the pure rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signals", "waited", "fails_with"),
    [
        (SchedulingSignals(failed_scheduling="0/3 nodes"), 0.0, None),
        (SchedulingSignals(failed_scheduling="0/3 nodes"), 60.0, "no cluster autoscaler"),
        (
            SchedulingSignals(failed_scheduling="0/3 nodes", triggered_scale_up="gpu 0->1"),
            600.0,
            None,
        ),
        (
            SchedulingSignals(
                failed_scheduling="x",
                triggered_scale_up="gpu 0->1",
                failed_scale_up="GCE out of resources",
            ),
            0.0,
            "GCE out of resources",
        ),
        (SchedulingSignals(failed_scale_up="quota exceeded"), 0.0, "FailedScaleUp: quota"),
        (
            SchedulingSignals(failed_scheduling="0/3 nodes", not_triggered="max size reached"),
            0.0,
            "max size reached",
        ),
        (SchedulingSignals(), 600.0, None),
    ],
)
def test_scheduling_rule(signals: SchedulingSignals, waited: float, fails_with: str | None) -> None:
    failure = scheduling_failure(signals, waited=waited, grace=45.0)
    if fails_with is None:
        assert failure is None
    else:
        assert failure is not None and fails_with in failure


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m-abcdef123-xyz12"}, "spec": {}, "status": status}


@pytest.mark.parametrize(
    ("pod", "failure"),
    [
        (_pod(phase="Pending"), None),
        (
            _pod(
                phase="Pending",
                containerStatuses=[
                    {"name": "engine", "state": {"waiting": {"reason": "ErrImagePull"}}}
                ],
            ),
            None,
        ),
        (
            _pod(
                phase="Pending",
                containerStatuses=[
                    {"name": "engine", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
                ],
            ),
            "ImagePullBackOff",
        ),
        (
            _pod(
                phase="Running",
                containerStatuses=[
                    {
                        "name": "engine",
                        "restartCount": 1,
                        "state": {"running": {}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ],
            ),
            "OOMKilled",
        ),
        (
            _pod(
                phase="Running",
                containerStatuses=[
                    {
                        "name": "engine",
                        "restartCount": 3,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
                    }
                ],
            ),
            "exited with code 1",
        ),
        (_pod(phase="Failed", reason="Evicted", message="node low on memory"), "Evicted"),
    ],
)
def test_pod_failure_reading(pod: dict[str, Any], failure: str | None) -> None:
    view = view_pod(pod)
    if failure is None:
        assert view.failure is None
    else:
        assert view.failure is not None and failure in view.failure


# -- several replicas: fenced, conditional scale writes ----------------------------------


def scale_patches(kube: FakeKube) -> list[Any]:
    return [r.body for r in kube.requests if r.verb == "patch" and r.resource.endswith("/scale")]


async def test_a_fenced_scale_write_carries_the_version_it_read_and_rereads_on_conflict(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _ = await make()
    backend.attach_fence(lambda: 5.0)  # leading, for 5 s more
    kube.fail_next(status=409, verb="patch", resource="deployments/scale")
    await backend.start()
    assert kube.replicas("coder-chat") == 1
    first, second = scale_patches(kube)
    # Each write names the resourceVersion of the scale it read: the 409 was answered
    # by reading again, never by repeating a write over someone else's.
    for body in (first, second):
        assert body["spec"] == {"replicas": 1}
        assert body["metadata"]["resourceVersion"]
    reads = [r for r in kube.requests if r.verb == "get" and r.resource.endswith("/scale")]
    assert len(reads) == 2


async def test_a_fenced_write_that_would_change_nothing_is_not_made(
    kube: FakeKube, make: MakeBackend
) -> None:
    backend, _ = await make()
    backend.attach_fence(lambda: 5.0)
    kube.scale("coder-chat", 1)  # someone (the previous leader) already scaled it
    await backend.start()
    assert scale_patches(kube) == []


async def test_without_leadership_the_backend_writes_nothing(
    kube: FakeKube, make: MakeBackend
) -> None:
    from activator.backends.kubernetes import NotLeader

    backend, recorder = await make()
    backend.attach_fence(lambda: 0.0)  # a follower, or a leader past its deadline
    with pytest.raises(NotLeader):
        await backend.start()
    kube.scale("coder-chat", 1)  # the leader scales: not a manual scale-up to adopt here
    await kube.wait_until(lambda: bool(kube.get("coder-chat")["status"].get("readyReplicas")))
    assert await backend.discover() is not None  # a follower finds it, read-only
    kube.scale("coder-chat", 0)  # the leader stops it: not a revert to fight
    await recorder.wait_for(lambda: bool(recorder.of("lost")))  # but it stops serving here
    await backend.stop()  # stops following; no write, no wait
    assert scale_patches(kube) == []
    assert recorder.of("appeared") == recorder.of("reverted") == []
