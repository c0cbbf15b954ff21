"""Which `Host` and `Origin` values name the control API: those of the site's `api.listen`.

A web page in a browser on the pocd host must not drive the API. A page of another site
(`Origin: https://evil.example`) is refused by its Origin; a page that rebinds its own name to
127.0.0.1 (DNS rebinding) sends its own name in `Host` and is refused by that. The pocd CLI,
curl and Prometheus send the address they connected to, which is accepted. Pure: no I/O here
(the machine's own names, for an API listening on every interface, are given by the caller).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Authority"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOPBACK: frozenset[IPAddress] = frozenset(
    {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
)
# host[:port], the host a name, an IPv4 address or a bracketed IPv6 address (RFC 9110 s7.2).
# Anything else (user info, a path, spaces) is not an authority.
_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Authority:
    """The names of this API: what a request's Host, and a browser's Origin, may say."""

    listen: str  # api.listen as configured, for messages
    port: int
    names: frozenset[str]  # host names, lower case
    addresses: frozenset[IPAddress]
    any_address: bool  # listening on every interface: any address literal is this machine

    @classmethod
    def of_listen(cls, listen: str, machine_names: Iterable[str] = ()) -> Authority:
        """The names of `listen` (host:port, as api.listen): the host itself; for a loopback
        address or `localhost`, every loopback name (localhost, 127.0.0.1, [::1]); for every
        interface (0.0.0.0, [::]), those, any address literal, and `machine_names` (the
        machine's host names)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]").lower()
        address = _address(host)
        names: set[str] = set()
        addresses: set[IPAddress] = set()
        if address is None:
            names.add(host)
        else:
            addresses.add(address)
        any_address = address is not None and address.is_unspecified
        if host == "localhost" or any_address or (address is not None and address.is_loopback):
            names.add("localhost")
            addresses |= _LOOPBACK
        if any_address:
            names |= {name.lower() for name in machine_names if name}
        return cls(listen, int(port), frozenset(names), frozenset(addresses), any_address)

    def names_this(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        address = _address(host)
        if address is None:
            return host.lower() in self.names
        # An address literal cannot be rebound: a page at http://<address>:<port> is served
        # by whatever listens there, which on every interface is this API.
        return self.any_address or address in self.addresses

    def accepts_host(self, header: str | None) -> bool:
        """Whether a Host header names this API (a request without one does not)."""
        if header is None:
            return False
        found = _HOST_PORT.fullmatch(header.strip())
        if found is None:
            return False
        host = found["v6"] or found["name"]
        port = int(found["port"]) if found["port"] else 80
        return self.names_this(host, port)

    def accepts_origin(self, origin: str) -> bool:
        """Whether a browser's Origin is a page of this API (the console to come): scheme
        http or https and an authority that names this API. `null` (a sandboxed page, a
        file) is not."""
        scheme, sep, authority = origin.strip().partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in _DEFAULT_PORTS:
            return False
        found = _HOST_PORT.fullmatch(authority)
        if found is None:
            return False
        host = found["v6"] or found["name"]
        port = int(found["port"]) if found["port"] else _DEFAULT_PORTS[scheme]
        return self.names_this(host, port)


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
