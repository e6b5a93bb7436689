"""The status page's routes on their own, for tests that script its data."""

from __future__ import annotations

from aiohttp import web

from activator.edge.body import BodyReads
from activator.observability.metrics import Metrics
from activator.ui import EventStreams, ui_routes


def open_ui_routes(streams: EventStreams) -> list[web.RouteDef]:
    """The status page's routes with no admin key (so no login), serving `streams`."""
    return ui_routes(
        admin_key=lambda: None,
        is_admin=lambda r: True,
        log_in=lambda key: None,
        log_out=lambda session_id: None,
        streams=streams,
        metrics=Metrics(),
        body_reads=BodyReads(body_timeout=10.0, per_client=16),
    )
