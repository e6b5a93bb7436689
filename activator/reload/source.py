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
from dataclasses import dataclass

from activator.config.load import ConfigError, load_config_bytes
from activator.config.settings import Settings

# A config file is kilobytes; reading it for its digest is bounded all the same.
MAX_READ = 16 * 1024 * 1024
# The digest shown in metrics and answers: enough to tell configs apart at a glance.
SHOWN_DIGITS = 16


@dataclass(frozen=True)
class Snapshot:
    """The file's content as one read saw it. A reload parses exactly these bytes: the
    digest it compares and the settings it applies are of the same content."""

    digest: str  # sha256 (hex), or "unreadable: <why>"
    content: bytes | None  # None: the file could not be read (or is too large)
    problem: str | None = None  # why content is None


class ConfigFile:
    """The file `activator serve --config` read; `adjust` re-applies what the command line
    overrides (--host, --port), so that a reload compares like with like."""

    def __init__(
        self, path: str | os.PathLike[str], *, adjust: Callable[[Settings], Settings] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._adjust = adjust

    def read(self) -> Snapshot:
        """The content and its digest; a file that goes missing, or comes back, is a
        change too (its digest names why it cannot be read). Blocking (file I/O)."""
        try:
            with open(self.path, "rb") as stream:
                data = stream.read(MAX_READ + 1)
        except OSError as exc:
            why = exc.strerror or str(exc)
            return Snapshot(f"unreadable: {why}", None, f"cannot read config: {why}")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) > MAX_READ:
            return Snapshot(digest, None, f"cannot read config: larger than {MAX_READ} bytes")
        return Snapshot(digest, data)

    def digest(self) -> str:
        """sha256 of the content (hex), or a stand-in naming why it cannot be read."""
        return self.read().digest

    def parse(self, snapshot: Snapshot) -> Settings | ConfigError:
        """The settings of a snapshot's content, or the ConfigError listing every problem
        (as `activator check-config` words them). Pure CPU work: no file is read."""
        if snapshot.content is None:
            return ConfigError([f"{self.path}: {snapshot.problem}"])
        try:
            settings = load_config_bytes(snapshot.content, source=self.path)
        except ConfigError as error:
            return error
        return self._adjust(settings) if self._adjust is not None else settings


def settings_digest(settings: Settings) -> str:
    """A digest for settings that came from no file (built in code): of their repr,
    which masks secrets."""
    return hashlib.sha256(repr(settings).encode()).hexdigest()
