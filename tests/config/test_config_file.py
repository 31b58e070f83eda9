"""--config: kubeadm's kube-proxy ConfigMap loads unchanged; every rejected case has its message."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from aproxy.config_file import ConfigFileError, go_duration, load_config_files, parse_documents
from aproxy.web.server import ListenAddress

HERE = Path(__file__).parent
CONFIGMAP = HERE / "kubeadm-kube-proxy-configmap.yaml"


def kubeadm_config() -> dict[str, Any]:
    """config.conf of kubeadm's kube-proxy ConfigMap, as the DaemonSet mounts it."""
    configmap = yaml.safe_load(CONFIGMAP.read_text())
    document = yaml.safe_load(configmap["data"]["config.conf"])
    assert isinstance(document, dict)
    return document


def parse(document: dict[str, Any], *more: dict[str, Any]) -> Any:
    return parse_documents([document, *more], "config.conf")


def with_field(path: str, value: object) -> dict[str, Any]:
    document = kubeadm_config()
    *parents, last = path.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    target[last] = value
    return document


def test_kubeadm_configmap_loads_with_only_its_three_settings(tmp_path: Path) -> None:
    configmap = yaml.safe_load(CONFIGMAP.read_text())
    path = tmp_path / "config.conf"
    path.write_text(configmap["data"]["config.conf"])
    config = load_config_files([path])
    # kubeadm sets bindAddress 0.0.0.0 (the Node's addresses are used), the kubeconfig and clusterCIDR;
    # every other field is a zero value: aproxy's defaults stay.
    assert dict(config.values) == {
        "kubeconfig": Path("/var/lib/kube-proxy/kubeconfig.conf"),
        "cluster_cidr": ("10.244.0.0/16",),
    }
    assert config.warnings == ()


def test_implemented_fields_take_effect() -> None:
    document = kubeadm_config()
    document.update(
        mode="ipvs",
        hostnameOverride="node-a",
        bindAddress="192.0.2.10",
        healthzBindAddress="0.0.0.0:10256",
        metricsBindAddress="0.0.0.0",
        clusterCIDR="10.244.0.0/16,fd00:10:244::/56",
    )
    document["ipvs"].update(
        scheduler="lc",
        syncPeriod="1m",
        minSyncPeriod="500ms",
        strictARP=True,
        tcpTimeout="15m",
        tcpFinTimeout="30s",
        udpTimeout="5s",
    )
    document["iptables"]["masqueradeAll"] = True
    document["logging"].update(format="json", verbosity=4)
    values = parse(document).values
    assert values["node_name"] == "node-a"
    assert values["node_ip"] == [ipaddress.ip_address("192.0.2.10")]
    assert values["healthz_bind_address"] == ListenAddress("0.0.0.0", 10256)
    assert values["metrics_bind_address"] == ListenAddress("0.0.0.0", 10249)  # kube-proxy's port appended
    assert values["cluster_cidr"] == ("10.244.0.0/16", "fd00:10:244::/56")
    assert values["ipvs_scheduler"] == "lc"
    assert (values["sync_period"], values["min_sync_period"]) == (60.0, 0.5)
    assert values["strict_arp"] is True
    assert values["masquerade_all"] is True
    assert (values["ipvs_tcp_timeout"], values["ipvs_tcpfin_timeout"], values["ipvs_udp_timeout"]) == (
        900.0,
        30.0,
        5.0,
    )
    assert (values["log_format"], values["verbosity"]) == ("json", 4)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("conntrack.maxPerCore", 32768, "conntrack.maxPerCore=32768 is ignored"),
        ("conntrack.tcpEstablishedTimeout", "24h0m0s", "conntrack.tcpEstablishedTimeout=24h0m0s is ignored"),
        ("oomScoreAdj", -999, "oomScoreAdj=-999 is ignored"),
        ("clientConnection.qps", 5, "clientConnection.qps=5 is ignored"),
        ("detectLocalMode", "InterfaceNamePrefix", "detectLocalMode=InterfaceNamePrefix is ignored"),
        ("featureGates", {"SomeGate": True}, "featureGates={'SomeGate': True} is ignored"),
    ],
)
def test_an_unimplemented_field_that_changes_behaviour_is_a_warning_naming_it(
    path: str, value: object, named: str
) -> None:
    config = parse(with_field(path, value))
    assert len(config.warnings) == 1
    assert named in config.warnings[0]
    assert config.warnings[0].startswith("config.conf: ")


@pytest.mark.parametrize("value", [["192.0.2.0/24", "2001:db8::/64"], ["primary"]])
def test_node_port_addresses_take_effect(value: list[str]) -> None:
    config = parse(with_field("nodePortAddresses", value))
    assert config.warnings == ()
    assert config.values["nodeport_addresses"] == tuple(value)


def test_exclude_cidrs_are_accepted_without_a_warning() -> None:
    # kube-proxy needs them to spare other programs' virtual servers; aproxy never touches those anyway.
    config = parse(with_field("ipvs.excludeCIDRs", ["10.0.0.0/8"]))
    assert config.warnings == ()
    assert config.values["exclude_cidrs"] == ("10.0.0.0/8",)


def test_fields_of_other_modes_are_accepted_silently() -> None:
    document = with_field("nftables.masqueradeAll", True)
    document["winkernel"]["networkName"] = "l2bridge"
    document["iptables"]["syncPeriod"] = "30s"
    config = parse(document)
    assert config.warnings == ()
    assert "masquerade_all" not in config.values


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("ipvs.tcpTimout", "1s", "config.conf: ipvs.tcpTimout: unknown field"),
        ("bogus", 1, "config.conf: bogus: unknown field"),
        (
            "nodePortAddresses",
            ["bogus"],
            "config.conf: nodePortAddresses: not a CIDR (nor 'primary' alone): 'bogus'",
        ),
        ("ipvs.strictARP", "yes", "config.conf: ipvs.strictARP: expected true or false, got 'yes' (str)"),
        (
            "ipvs.syncPeriod",
            30,
            'config.conf: ipvs.syncPeriod: expected a duration string such as "30s", got 30',
        ),
        ("ipvs.syncPeriod", "30 seconds", "config.conf: ipvs.syncPeriod: invalid duration '30 seconds'"),
        ("ipvs", [], "config.conf: ipvs: expected a mapping, got [] (list)"),
        ("clientConnection.burst", 1.5, "config.conf: clientConnection.burst: expected an integer, got 1.5"),
        ("ipvs.scheduler", "fastest", "config.conf: ipvs.scheduler: unknown IPVS scheduler 'fastest'"),
        ("mode", "iptables", "config.conf: mode: 'iptables': aproxy implements only the ipvs mode"),
        ("mode", "nftables", "config.conf: mode: 'nftables': aproxy implements only the ipvs mode"),
        ("clusterCIDR", "10.244.0.0/33", "config.conf: clusterCIDR: '10.244.0.0/33' is not a CIDR"),
        ("bindAddress", "node-a", "config.conf: bindAddress: 'node-a' is not an IP address"),
        ("healthzBindAddress", "0.0.0.0:99999", "config.conf: healthzBindAddress: bind address"),
        ("hostnameOverride", None, "config.conf: hostnameOverride: expected a string, got null"),
    ],
)
def test_unknown_fields_wrong_types_and_bad_values_are_one_line_errors_naming_the_field(
    path: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        parse(with_field(path, value))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_wrong_api_version_or_kind_is_an_error() -> None:
    with pytest.raises(ConfigFileError, match=r"apiVersion/kind 'kubeproxy\.config\.k8s\.io/v1beta1'"):
        parse(with_field("apiVersion", "kubeproxy.config.k8s.io/v1beta1"))
    with pytest.raises(ConfigFileError, match="expected a mapping, got list"):
        parse_documents([[1]], "config.conf")


def test_aproxy_section_sets_aproxys_own_settings_zero_included() -> None:
    aproxy = {
        "apiVersion": "aproxy.io/v1alpha1",
        "kind": "AproxyConfiguration",
        "nodeIPs": ["192.0.2.10", "2001:db8::10"],
        "auditPeriod": "2m",
        "drainGracePeriod": "0s",
        "device": "aproxy0",
        "backend": "dry-run",
    }
    values = parse(kubeadm_config(), aproxy).values
    assert values["node_ip"] == [ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::10")]
    assert values["audit_period"] == 120.0
    assert values["drain_grace_period"] == 0.0  # written by the operator, not a marshalled zero
    assert (values["device"], values["backend"]) == ("aproxy0", "dry-run")
    assert values["kubeconfig"] == Path("/var/lib/kube-proxy/kubeconfig.conf")


def test_aproxy_section_has_the_same_rules() -> None:
    base = {"apiVersion": "aproxy.io/v1alpha1", "kind": "AproxyConfiguration"}
    with pytest.raises(ConfigFileError, match=r"document 2: auditPeriods: unknown field"):
        parse(kubeadm_config(), {**base, "auditPeriods": "1m"})
    with pytest.raises(ConfigFileError, match=r"document 2: backend: 'kernel' is not one of ipvs, dry-run"):
        parse(kubeadm_config(), {**base, "backend": "kernel"})
    with pytest.raises(ConfigFileError, match=r"nodeIPs: expected a list of strings, got '192.0.2.1'"):
        parse_documents([{**base, "nodeIPs": "192.0.2.1"}], "aproxy.yaml")


def test_two_documents_setting_one_option_is_an_error() -> None:
    aproxy = {"apiVersion": "aproxy.io/v1alpha1", "kind": "AproxyConfiguration", "nodeIPs": ["192.0.2.11"]}
    with pytest.raises(ConfigFileError, match=r"document 2: nodeIPs: sets what .*document 1: bindAddress"):
        parse(with_field("bindAddress", "192.0.2.10"), aproxy)


def test_files_are_read_in_order_and_an_empty_one_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigFileError, match=r"empty\.yaml: no configuration in the file"):
        load_config_files([empty])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("100us", 1e-4),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1d", "-1s", "1s2", "s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        go_duration(text)
