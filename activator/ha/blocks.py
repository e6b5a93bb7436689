"""The HA blocks of one started replica, as one value.

activator.ha.wiring builds them (Replica.start) and owns them; activator.ha.status reads
them for /admin/ha. Kept apart from both so that status need not import wiring. Imports
only the blocks' own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from activator.ha.election import LeaderElector
from activator.ha.intent import IntentPublisher, IntentWatcher
from activator.ha.replicas import ClusterDemand, DemandPublisher


@dataclass(frozen=True)
class Blocks:
    """The HA blocks of one started replica."""

    elector: LeaderElector
    publisher: IntentPublisher
    watcher: IntentWatcher
    demand: DemandPublisher
    cluster: ClusterDemand
