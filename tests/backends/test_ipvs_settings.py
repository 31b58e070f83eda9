"""IPVSSettings refuses a device name the kernel would refuse, before anything is opened."""

from __future__ import annotations

import pytest

from aproxy.backends.ipvs import IPVSSettings, check_device_name


@pytest.mark.parametrize("name", ["kube-ipvs0", "a", "x" * 15, "aproxy.0", "dev_é"])
def test_names_the_kernel_takes_are_kept(name: str) -> None:
    assert check_device_name(name) == name
    assert IPVSSettings(device=name).device == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 16, id="16-bytes"),
        pytest.param("é" * 8, id="16-bytes-in-utf8"),
        pytest.param("a/b", id="slash"),
        pytest.param("a:b", id="colon"),
        pytest.param("a\tb", id="tab"),
        pytest.param(".", id="dot"),
    ],
)
def test_names_the_kernel_refuses_are_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="invalid device name"):
        IPVSSettings(device=name)
