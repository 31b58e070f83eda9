"""The data-path flags (``_add_datapath_options``): what operators set reaches IPVSSettings."""

from __future__ import annotations

import pytest

from aproxy import cli
from aproxy.backends.ipvs import IPVSSettings
from aproxy.flags import ipvs_settings

RUN = ["run", "--node-name", "node-a"]


def test_defaults_keep_kube_proxys_defaults() -> None:
    settings = ipvs_settings(cli.build_parser().parse_args(RUN))

    assert (settings.masquerade_all, settings.cluster_cidrs) == (False, ())
    assert (settings.strict_arp, settings.manage_sysctls, settings.masquerade) == (False, True, True)


@pytest.mark.parametrize(
    "command", [RUN, ["sync", "--source", "x.yaml", "--node-name", "n", "--node-ip", "1.2.3.4"]]
)
def test_every_flag_reaches_the_settings(command: list[str]) -> None:
    flags = ["--masquerade-all", "--cluster-cidr", "10.244.0.0/16, fd00:10:244::/56", "--strict-arp"]
    more = ["--no-manage-sysctls", "--nodeport-addresses", "192.168.0.0/16,fd00::/8"]
    args = cli.build_parser().parse_args([*command, *flags, *more])

    assert ipvs_settings(args) == IPVSSettings(
        masquerade_all=True,
        cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/56"),
        strict_arp=True,
        manage_sysctls=False,
        nodeport_addresses=("192.168.0.0/16", "fd00::/8"),
    )


def test_a_cluster_cidr_that_is_not_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args([*RUN, "--cluster-cidr", "10.244.0.0/16,10.300.0.0/16"])

    assert exited.value.code == 2
    assert "--cluster-cidr: not a CIDR: '10.300.0.0/16'" in capsys.readouterr().err


def test_cleanup_takes_no_data_path_flag_and_builds_default_settings() -> None:
    args = cli.build_parser().parse_args(["cleanup"])

    assert ipvs_settings(args) == IPVSSettings()


def test_nodeport_addresses_take_primary_alone_or_cidrs() -> None:
    args = cli.build_parser().parse_args([*RUN, "--nodeport-addresses", "primary"])
    assert ipvs_settings(args).nodeport_addresses == ("primary",)

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*RUN, "--nodeport-addresses", "primary,10.0.0.0/8"])
