"""The container image: built from the Dockerfile (base from Debian's packages, cached under build/image),
then smoke-tested by running its own filesystem, Python and entry point in a chroot: ``aproxy --version``,
``aproxy plan`` on the bundled example, ``aproxy run --backend dry-run`` answering /healthz.

No registry and no OCI runtime on these machines (see the README's image section): the base is
``debootstrap --variant=minbase`` imported into podman, the build runs with ``--isolation chroot``, and the
image is exported instead of started. Needs root, podman and debootstrap; skipped, with the reason, otherwise.
Cold (no cached base): about two to three minutes; warm: the layers podman cached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "image"
BASE_ROOTFS = CACHE / "base-rootfs"
BASE_IMAGE = "localhost/aproxy-base:bookworm"
IMAGE = "localhost/aproxy:test"
SUITE = "bookworm"
HOST_CERTS = Path("/etc/ssl/certs")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the image test needs root (debootstrap, podman, chroot)"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y podman debootstrap)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def run(*command: str, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, (
        f"{' '.join(command)}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def base_image() -> str:
    """A minbase Debian as a podman image: debootstrapped once into build/image, imported when missing."""
    if not (BASE_ROOTFS / "usr" / "bin" / "apt-get").exists():
        partial = BASE_ROOTFS.with_name("base-rootfs.partial")
        shutil.rmtree(partial, ignore_errors=True)
        run("debootstrap", "--variant=minbase", SUITE, str(partial), mirror())
        shutil.rmtree(BASE_ROOTFS, ignore_errors=True)
        partial.rename(BASE_ROOTFS)
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode != 0:
        tar = subprocess.Popen(["tar", "-C", str(BASE_ROOTFS), "-c", "."], stdout=subprocess.PIPE)
        run("podman", "import", "-q", "-", BASE_IMAGE, stdin=tar.stdout)
        assert tar.wait() == 0
    return BASE_IMAGE


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's filesystem, exported from a created (never started) container."""
    CACHE.mkdir(parents=True, exist_ok=True)
    build = [
        "podman",
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base_image()}",
    ]
    if (HOST_CERTS / "ca-certificates.crt").exists():
        # pip in the build trusts what this machine trusts (mounted aside: the image installs its own).
        build += [
            "-v",
            f"{HOST_CERTS}:/run/host-certs:ro",
            "--build-arg",
            "PIP_CERT=/run/host-certs/ca-certificates.crt",
        ]
    run(*build, "-t", IMAGE, str(ROOT))
    name = f"aproxy-image-test-{os.getpid()}"
    directory = tmp_path_factory.mktemp("rootfs")
    run("podman", "create", "--name", name, IMAGE)
    try:
        export = subprocess.Popen(["podman", "export", name], stdout=subprocess.PIPE)
        run("tar", "-C", str(directory), "-x", stdin=export.stdout)
        assert export.wait() == 0
    finally:
        run("podman", "rm", name)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def entrypoint(rootfs: Path) -> list[str]:
    """The image's ENTRYPOINT, resolved on its PATH."""
    config = run("podman", "image", "inspect", "--format", "{{json .Config.Entrypoint}}", IMAGE).stdout
    assert config.strip() == '["aproxy"]'
    return [
        "chroot",
        str(rootfs),
        "/usr/bin/env",
        "PATH=/opt/aproxy/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "aproxy",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def proc_mounted(rootfs: Path) -> Iterator[None]:
    target = rootfs / "proc"
    target.mkdir(exist_ok=True)
    run("mount", "-t", "proc", "proc", str(target))
    try:
        yield
    finally:
        run("umount", str(target))


def test_version(rootfs: Path) -> None:
    done = run(*entrypoint(rootfs), "--version")
    assert done.stdout.startswith("aproxy 0.")


def test_the_node_tools_are_there_with_kube_proxys_iptables_choice(rootfs: Path) -> None:
    for tool in ("ipset", "conntrack", "modprobe", "iptables-legacy", "iptables-nft", "ip6tables-nft"):
        assert (rootfs / "usr" / "sbin" / tool).exists(), tool
    for alternative in ("iptables", "iptables-restore", "ip6tables", "ip6tables-restore"):
        assert os.path.realpath(rootfs / "etc" / "alternatives" / alternative).endswith("iptables-wrapper")
    assert not (rootfs / "usr" / "bin" / "gcc").exists()
    assert not list((rootfs / "opt" / "aproxy").glob("lib/python3*/site-packages/pip"))


def on_the_example(rootfs: Path, command: str) -> list[str]:
    """``aproxy COMMAND`` in the image, on the bundled example copied into it, as node-a."""
    shutil.copy(ROOT / "examples" / "cluster.yaml", rootfs / "tmp" / "cluster.yaml")
    node = ["--node-name", "node-a", "--node-ip", "192.0.2.10"]
    return [*entrypoint(rootfs), command, "--source", "/tmp/cluster.yaml", *node]


def test_plan_on_the_bundled_example(rootfs: Path) -> None:
    done = run(*on_the_example(rootfs, "plan"), "--output", "text")
    assert "10.96.0.10:53" in done.stdout


def test_run_dry_run_answers_healthz(rootfs: Path) -> None:
    healthz, metrics = free_port(), free_port()
    command = [
        *on_the_example(rootfs, "run"),
        "--backend",
        "dry-run",
        "--no-health-checks",  # the example's pods are addresses on no network of ours: probe nothing
        "--healthz-bind-address",
        f"127.0.0.1:{healthz}",
        "--metrics-bind-address",
        f"127.0.0.1:{metrics}",
    ]
    with proc_mounted(rootfs):
        daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            status = 0
            deadline = time.monotonic() + 60
            while status != 200 and time.monotonic() < deadline and daemon.poll() is None:
                time.sleep(0.5)
                url = f"http://127.0.0.1:{healthz}/healthz"
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                    status = answer.status
            assert status == 200, daemon.stderr.read() if daemon.poll() is not None else "no 200 within 60 s"
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as answer:
                assert b"kubeproxy_sync_proxy_rules_duration_seconds_count 1.0" in answer.read()
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
