"""The seam between a model's lifecycle and the thing that runs its engine.

A backend owns one model's engine (a local process, or a Kubernetes workload) and nothing
else: it does not decide when to start or stop, it does not probe readiness through the
proxy path and it never sees a client request. `activator.model.lifecycle.Model` owns those
decisions and drives the backend through this interface; the backend reports what it
sees on its own (the engine died, someone scaled it by hand, the API is unreachable)
through a `BackendListener` given to it at construction.
"""

from __future__ import annotations

from typing import Protocol

# Re-exported while callers move to activator.core.errors (issue 19); placement code below
# the backends raises and catches it too, so it is defined there.
from activator.core.errors import BackendError as BackendError


class BackendListener(Protocol):
    """Implemented by the model lifecycle. Calls are synchronous and must not block."""

    def backend_phase(self, phase: str) -> None:
        """A wake phase was reached ("spawned", "scheduled", "image_pulled", "started"...).

        Used for the wake_phase_duration metric and the admin API.
        """

    def backend_progress(self) -> None:
        """Something happened that may mean the engine just became ready (it printed a
        line, a pod condition changed): the readiness probe runs now instead of waiting
        for its next interval. Cheap; may be called often."""

    def backend_failed(self, reason: str) -> None:
        """The engine died or cannot come up (exit, CrashLoopBackOff, ImagePullBackOff...).

        `reason` is one human-readable line; the caller attaches `log_tail()`. Calling it
        while the model is starting fails the start at once (held requests get a 503).
        """

    def backend_blocked(self, blocked: bool) -> None:
        """True while the engine being started cannot be placed yet (its pod is
        unschedulable: on a GPU node, possibly because a sleeping engine still holds the
        GPU). The pool may then stop a sleeping model to make room."""

    def backend_appeared(self) -> None:
        """An engine we did not start is running (manual scale-up): adopt it."""

    def backend_reverted(self) -> None:
        """Someone else scaled the engine to zero while it was wanted (a GitOps revert);
        the backend is scaling it up again. Logged with the fix and counted. A model that
        was serving stops serving at once, as for `backend_lost` (counted once, as a
        revert)."""

    def backend_lost(self, reason: str) -> None:
        """The engine was serving and no longer can, though nothing failed: its last
        Ready pod was deleted, evicted or turned not Ready (node loss). The backend (or
        the cluster) is bringing one back. The model stops serving at once: new requests
        are held, requests in flight on the lost engine end as they will, and the model
        is ready again once `serving()` holds and the URL answers."""

    def backend_unknown(self, unknown: bool) -> None:
        """True while the backend cannot observe the engine (API unreachable).

        A model in unknown state is never stopped for idleness.
        """


class Backend(Protocol):
    """One model's engine. Only `activator.model.lifecycle.Model` calls these, one at a time."""

    kind: str  # "process" or "kubernetes": a metrics label

    @property
    def keep_on_shutdown(self) -> bool:
        """On activator shutdown: True leaves the engine running for the next activator
        to adopt (Kubernetes with `kubernetes.on_shutdown: keep`); False stops it (a local
        process is never left behind: nothing could adopt it)."""

    async def discover(self) -> str | None:
        """At activator start: return the upstream URL if the engine is already running
        (it is then adopted as running, and must still pass the readiness probe), else
        None. May raise BackendError."""

    def place(self, gpus: tuple[int, ...]) -> None:
        """The GPUs of the model's pool (0..gpus-1) that the next `start` runs the engine
        on, chosen by the pool when it packs models by memory. A backend that can choose
        the device does (a local process: CUDA_VISIBLE_DEVICES); one where the platform
        places it (Kubernetes: the device plugin) ignores it: the pool's memory accounting
        still holds."""

    async def start(self) -> str:
        """Begin running the engine and return the base URL requests will be sent to
        (scheme://host:port, no trailing slash). Returns once the engine is launched,
        not when it is ready: readiness is probed by the caller. Idempotent when the
        engine already runs. Cancel-safe: a cancelled start is followed by `stop()`."""

    async def stop(self) -> None:
        """Stop the engine and return only when it is really gone (process exited, pods
        deleted: the GPU is free). Idempotent; bounded by the backend's own grace."""

    def serving(self) -> bool:
        """Whether, as far as the backend itself can see, the engine it runs is up and
        could serve: our process is alive; a pod of the workload is Ready and not
        terminating. Cheap and synchronous. The model is made ready only while this holds,
        checked before and after the URL probe, so a server we did not start (another
        process on the port, a terminating pod behind a lagging Service) never makes a
        model ready. When it turns true, the backend calls `backend_progress()`."""

    def log_tail(self) -> list[str]:
        """The last lines the engine printed (or the last events seen), oldest first."""

    async def aclose(self) -> None:
        """Release watches and clients. Does not stop the engine."""
