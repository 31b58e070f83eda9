"""--nodeport-addresses: which local addresses get NodePorts."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from aproxy.core.node_addresses import NodePortAddresses

LOCAL = [ip_address(text) for text in ("127.0.0.1", "::1", "fe80::1", "192.168.50.1", "10.0.0.5", "fd00::5")]
PRIMARY = [ip_address("192.0.2.10")]


@pytest.mark.parametrize(
    ("flag", "chosen"),
    [
        pytest.param(
            (), {"192.168.50.1", "10.0.0.5", "fd00::5"}, id="default-all-but-loopback-and-link-local"
        ),
        pytest.param(("192.168.0.0/16",), {"192.168.50.1"}, id="one-cidr"),
        pytest.param(("10.0.0.0/8", "fd00::/8"), {"10.0.0.5", "fd00::5"}, id="dual-stack-cidrs"),
        pytest.param(("0.0.0.0/0",), {"192.168.50.1", "10.0.0.5"}, id="a-family-of-its-own"),
        pytest.param(("primary",), {"192.0.2.10"}, id="primary"),
    ],
)
def test_selection(flag: tuple[str, ...], chosen: set[str]) -> None:
    assert NodePortAddresses.parse(flag).select(LOCAL, PRIMARY) == {ip_address(text) for text in chosen}


@pytest.mark.parametrize("flag", [("office",), ("primary", "10.0.0.0/8"), ("10.0.0.0/33",)])
def test_anything_else_is_refused_with_the_value(flag: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        NodePortAddresses.parse(flag)


@pytest.mark.parametrize(
    ("flag", "every"),
    [
        pytest.param((), True, id="unset"),
        pytest.param(("0.0.0.0/0",), True, id="ipv4-unspecified"),
        pytest.param(("10.0.0.0/8", "::/0"), True, id="ipv6-unspecified-among-others"),
        pytest.param(("10.0.0.0/8",), False, id="a-cidr"),
        pytest.param(("primary",), False, id="primary"),
    ],
)
def test_every_address_is_kube_proxys_match_all(flag: tuple[str, ...], every: bool) -> None:
    """Where kube-proxy's health-check node ports listen on every address rather than on the selection."""
    assert NodePortAddresses.parse(flag).every_address is every
