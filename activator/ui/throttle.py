"""Failed status-page logins, throttled per client address.

After MAX_FAILURES wrong keys from one address within WINDOW seconds, that address's
logins are refused (429 with Retry-After) until the oldest of those failures is WINDOW
old; the key is not even compared meanwhile (a throttled guess that could still succeed
would be a guess). A right key clears the address's failures.

The address is the TCP peer (`request.remote`). X-Forwarded-For is not trusted:
activator has no trusted-proxy setting, and a client could write any address there to
get a fresh budget per request. Behind a proxy every client shares the proxy's address,
so a guesser there throttles the page's logins for everyone behind it until its window
passes: the price of not trusting a header anyone can send. Bearer access to /admin/* is
not throttled (no login is involved).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from activator.core.errors import ActivatorError

# 10 wrong keys a minute is more than a person mistypes, and it takes guessing from the
# 1,660 a second a script reached unthrottled to 10 a minute per address.
MAX_FAILURES = 10
WINDOW = 60.0
# Addresses tracked at once. Each costs a deque of at most MAX_FAILURES floats (well
# under 1 KiB), so this caps the state near a few MiB; past it the address whose last
# failure is oldest is forgotten. An attacker with that many addresses has that many
# budgets anyway.
MAX_ADDRESSES = 4096
# IPv6 clients are counted per /64: one host commonly holds a whole /64, and counting per
# address would give it 2**64 budgets.
IPV6_PREFIX = 64


class LoginThrottled(ActivatorError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_login_attempts"
    retryable = True


class LoginThrottle:
    """Owns the failure counts of one app's login form. Event loop only (no locks)."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        # client -> times of its recent failures (oldest first); clients in the order of
        # their last failure, so the stalest is first to go.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def wait(self, remote: str | None) -> float | None:
        """Seconds until `remote` may try again, or None when it may now."""
        times = self._failures.get(client_of(remote))
        if times is None or len(times) < self.max_failures:
            return None
        left = times[0] + self.window - self._clock()
        return left if left > 0 else None

    def failed(self, remote: str | None) -> bool:
        """Count a wrong key from `remote`; True when this failure throttles it."""
        now = self._clock()
        self._prune(now)
        client = client_of(remote)
        times = self._failures.pop(client, None) or deque(maxlen=self.max_failures)
        while times and now - times[0] >= self.window:
            times.popleft()
        times.append(now)
        while len(self._failures) >= self.max_addresses:
            self._failures.popitem(last=False)
        self._failures[client] = times  # to the end: the latest failure
        return len(times) >= self.max_failures

    def succeeded(self, remote: str | None) -> None:
        """A right key from `remote`: its failures are forgiven."""
        self._failures.pop(client_of(remote), None)

    def _prune(self, now: float) -> None:
        """Forget clients whose last failure is a window old (they are at the front)."""
        while self._failures:
            times = next(iter(self._failures.values()))
            if now - times[-1] < self.window:
                break
            self._failures.popitem(last=False)


def client_of(remote: str | None) -> str:
    """The key failures are counted under: the IPv4 address, the IPv6 /64 (an
    IPv4-mapped IPv6 address counts as its IPv4 one); "" for a peer with no IP address
    (a Unix socket)."""
    if not remote:
        return ""
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
