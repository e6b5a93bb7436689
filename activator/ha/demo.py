"""Run one LeaderElector against a kubeconfig and print its transitions, one JSON object a
line, for tests that need replicas in separate processes (SIGKILL, SIGTERM):

    python -m activator.ha.demo --kubeconfig K --namespace activator --identity a \\
        --lease-duration 3 --renew-deadline 2 --retry-period 1

Lines: {"event": "started", ...}, then {"event": "leadership", "is_leader": ...,
"leader": ..., "t": <time.monotonic()>} at every change (CLOCK_MONOTONIC is shared by
the processes of one host, so a test can line them up with the API server's record),
and {"event": "stopped"} after a graceful stop (SIGTERM/SIGINT: the lease is released).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from activator.backends.kube.cluster import KubeCluster
from activator.config.ha import HaSettings
from activator.config.settings import KubernetesSettings
from activator.ha.election import LeaderElector, Leadership


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    settings = HaSettings(
        namespace=args.namespace,
        lease_name=args.lease_name,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
    )
    cluster = await KubeCluster.connect(
        KubernetesSettings(kubeconfig=args.kubeconfig, in_cluster=False, request_timeout=5.0)
    )
    elector = LeaderElector(cluster, settings=settings, identity=args.identity)

    def changed(event: Leadership) -> None:
        emit(
            "leadership",
            identity=event.identity,
            is_leader=event.is_leader,
            leader=event.leader,
            term=event.term,
            reason=event.reason,
        )

    elector.subscribe(changed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    elector.start()
    emit("started", identity=elector.identity)
    try:
        await stop.wait()
    finally:
        await elector.aclose()
        await cluster.aclose()
    emit("stopped", identity=elector.identity)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m activator.ha.demo")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease-name", default="activator-leader")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--renew-deadline", type=float, default=10.0)
    parser.add_argument("--retry-period", type=float, default=2.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
