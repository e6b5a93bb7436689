"""The config file a reload reads, and the fingerprint of its content.

A change is a change of content: the file is read and hashed, never stat()ed. That is
what survives the ways a file gets replaced: a Kubernetes ConfigMap volume swaps the
`..data` symlink that `config.yaml` points through (the inode, mtime and even the path
that open() resolves all change, the path given does not), an editor writes a new file
and renames it over the old one, and `cat > config.yaml` writes in place. open() follows
the symlinks on every read, so each read sees the file as it is now.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from activator.config import ConfigError, load_config
from activator.settings import Settings

# A config file is kilobytes; reading it for its digest is bounded all the same.
MAX_READ = 16 * 1024 * 1024
# The digest shown in metrics and answers: enough to tell configs apart at a glance.
SHOWN_DIGITS = 16


class ConfigFile:
    """The file `activator serve --config` read; `adjust` re-applies what the command line
    overrides (--host, --port), so that a reload compares like with like."""

    def __init__(
        self, path: str | os.PathLike[str], *, adjust: Callable[[Settings], Settings] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._adjust = adjust

    def digest(self) -> str:
        """sha256 of the content (hex), or a stand-in naming why it cannot be read: a file
        that goes missing, or comes back, is a change too. Blocking (file I/O)."""
        try:
            with open(self.path, "rb") as stream:
                data = stream.read(MAX_READ)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        return hashlib.sha256(data).hexdigest()

    def load(self) -> tuple[str, Settings | ConfigError]:
        """(the content's digest, its settings or the ConfigError listing every problem).
        The digest is taken first: a file replaced while it is parsed is seen as changed
        again by the next look, so a watcher converges on the last content. Blocking."""
        digest = self.digest()
        try:
            settings = load_config(self.path)
        except ConfigError as error:
            return digest, error
        return digest, self._adjust(settings) if self._adjust is not None else settings


def settings_digest(settings: Settings) -> str:
    """A digest for settings that came from no file (built in code): of their repr,
    which masks secrets."""
    return hashlib.sha256(repr(settings).encode()).hexdigest()
