"""Config reload while activator runs: nothing dropped (docs/reload.md).

Layer 8: may import every layer up to activator.fleet.
"""

from activator.reload.reloader import Reloader, ReloadResult
from activator.reload.source import ConfigFile

__all__ = ["ConfigFile", "ReloadResult", "Reloader"]
