"""The status page at /ui: static HTML, CSS and JavaScript served from the package, the
login that puts an admin session cookie in the browser, and the live data it reads
(/admin/events, /admin/wake-durations). No build step, nothing fetched from elsewhere.

Layer 10: may import every layer up to activator.edge.
"""

from activator.edge.auth import SESSION_COOKIE, UI_HEADER
from activator.ui.events import EventStreams
from activator.ui.routes import ui_routes

__all__ = ["SESSION_COOKIE", "UI_HEADER", "EventStreams", "ui_routes"]
