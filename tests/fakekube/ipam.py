"""Pod IPs on loopback: every address of 127.0.0.0/8 reaches lo on Linux, so each pod
gets its own IP and its engine listens on <pod IP>:<containerPort>, like a real pod.

The simulated node owns a /24 pod CIDR, as a node's spec.podCIDR does. By default it is
a random 127.X.Y.0/24 (X >= 1, away from 127.0.0.1 and systemd-resolved's 127.0.0.53),
so fake clusters of tests running side by side on one machine do not collide; an
address whose port is taken anyway is skipped. Addresses are not reused within a
cluster's life (a real cluster reuses them; nothing here depends on it).
"""

from __future__ import annotations

import ipaddress
import random
import socket


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            return False
        return True


class PodNetwork:
    def __init__(self, *, cidr: str | None = None) -> None:
        """cidr: a /24 (or smaller) network inside 127.0.0.0/8; None picks a random one."""
        self._fixed = cidr is not None
        self._net = ipaddress.ip_network(cidr) if cidr else self._random_net()
        if not self._net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):  # type: ignore[arg-type]
            raise ValueError(f"pod CIDR {cidr} is not on loopback (127.0.0.0/8)")
        self._next = 2  # .1 is the gateway on a real node

    @staticmethod
    def _random_net() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.0/24")

    @property
    def cidr(self) -> str:
        return str(self._net)

    def allocate(self, *, port: int) -> str:
        """The next address whose `port` is free."""
        for _ in range(4096):
            if self._next >= self._net.num_addresses - 1:
                if self._fixed:
                    raise RuntimeError(f"pod CIDR {self._net} is exhausted")
                self._net, self._next = self._random_net(), 2
            ip = str(self._net.network_address + self._next)
            self._next += 1
            if _bindable(ip, port):
                return ip
        raise RuntimeError("no free pod IP found")
