"""The status page's session store and login throttle on a fake clock: expiry, revocation,
the key change, their bounds, and the throttle's window (the HTTP side is in test_ui.py)."""

from __future__ import annotations

import pytest

from activator.config.settings import ServerSettings
from activator.edge.credentials import Credentials
from activator.edge.sessions import SessionStore
from activator.ui.throttle import LoginThrottle, client_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lives_until_its_ttl_and_a_shorter_ttl_applies_at_once() -> None:
    clock = Clock()
    store = SessionStore(ttl=60.0, clock=clock)
    first = store.issue()
    assert store.is_live(first) and not store.is_live("") and not store.is_live("x" * 43)
    clock.now += 59.9
    assert store.is_live(first)
    clock.now += 0.1
    assert not store.is_live(first)
    assert len(store) == 0  # an expired session is dropped, not kept
    second = store.issue()
    clock.now += 30
    store.ttl = 20.0  # a reload shortened it
    assert not store.is_live(second)


def test_revoke_ends_one_session_and_clear_every_one() -> None:
    store = SessionStore(ttl=60.0, clock=Clock())
    a, b, c = store.issue(), store.issue(), store.issue()
    store.revoke(a)
    store.revoke("")  # a logout without a cookie
    store.revoke("not-a-session")
    assert (store.is_live(a), store.is_live(b), store.is_live(c)) == (False, True, True)
    store.clear()
    assert not store.is_live(b) and not store.is_live(c) and len(store) == 0


def test_the_store_is_bounded_and_evicts_the_oldest_session() -> None:
    clock = Clock()
    store = SessionStore(ttl=3600.0, max_sessions=3, clock=clock)
    ids = []
    for _ in range(5):
        ids.append(store.issue())
        clock.now += 1
    assert len(store) == 3
    assert [store.is_live(i) for i in ids] == [False, False, True, True, True]


def test_credentials_end_every_session_when_the_admin_key_changes_even_if_it_comes_back() -> None:
    clock = Clock()
    credentials = Credentials(ServerSettings(admin_api_key="key-1"), clock=clock)
    assert credentials.log_in("wrong") is None and credentials.log_in("") is None
    session = credentials.log_in("key-1")
    assert session is not None and credentials.sessions.is_live(session)
    credentials.update(ServerSettings(admin_api_key="key-1", ui_session_ttl=10.0))
    assert credentials.sessions.is_live(session)  # same key: sessions stay, new ttl applies
    clock.now += 10
    assert not credentials.sessions.is_live(session)
    session = credentials.log_in("key-1")
    assert session is not None
    credentials.update(ServerSettings(admin_api_key="key-2"))
    assert not credentials.sessions.is_live(session)
    credentials.update(ServerSettings(admin_api_key="key-1"))
    assert not credentials.sessions.is_live(session)  # the old key back: still ended
    credentials.update(ServerSettings())
    assert credentials.log_in("") is None  # no key: nothing to log in with


def test_the_throttle_refuses_after_the_limit_until_the_oldest_failure_leaves_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window=60.0, clock=clock)
    assert throttle.failed("10.0.0.1") is False
    clock.now += 5
    assert throttle.failed("10.0.0.1") is False
    assert throttle.wait("10.0.0.1") is None
    clock.now += 5
    assert throttle.failed("10.0.0.1") is True
    assert throttle.wait("10.0.0.1") == pytest.approx(50.0)  # the first failure, 60 s on
    assert throttle.wait("10.0.0.2") is None  # per address
    clock.now += 50
    assert throttle.wait("10.0.0.1") is None
    assert throttle.failed("10.0.0.1") is True  # the two later failures are still in it
    assert throttle.wait("10.0.0.1") == pytest.approx(5.0)
    throttle.succeeded("10.0.0.1")
    assert throttle.wait("10.0.0.1") is None and len(throttle) == 0


def test_the_throttle_is_bounded_and_forgets_stale_addresses() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, window=60.0, max_addresses=3, clock=clock)
    for i in range(5):
        throttle.failed(f"10.0.0.{i}")
        throttle.failed(f"10.0.0.{i}")
    assert len(throttle) == 3
    assert throttle.wait("10.0.0.0") is None  # the stalest was forgotten
    assert throttle.wait("10.0.0.4") is not None
    clock.now += 60
    throttle.failed("10.0.0.9")
    assert len(throttle) == 1  # the others' windows had passed


@pytest.mark.parametrize(
    ("remote", "client"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, ""),
        ("", ""),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_failures_count_per_ipv4_address_and_per_ipv6_slash_64(
    remote: str | None, client: str
) -> None:
    assert client_of(remote) == client
