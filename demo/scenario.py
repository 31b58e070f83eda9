"""`make run`'s story, told as it happens: aproxy programs a real IPVS kernel from examples/cluster.yaml.

Runs inside the user-mode Linux guest the kernel tests use (demo/run.py boots it), as root, with the test lab
(tests/kernel/netlab.py): every pod of the example is a network namespace at the example's address running
small TCP and UDP echo servers, and a client namespace sends real connections through the virtual IPs. The
story: start ``aproxy run`` on a copy of the example, show the programmed table and traffic spread over the
backends, then edit the copy the way an EndpointSlice controller would (scale up, remove a backend that holds
a connection, scale down) and show each change arrive as a handful of kernel operations, the graceful drain,
and the metrics that moved; stop, clean up, and leave nothing behind.

``--dry-run`` tells the same story without a kernel (``aproxy run --backend dry-run``): where the guest cannot
run, what would be programmed is shown instead of the kernel's table, and there is no traffic.

Narration goes to standard output and, with ``--narration FILE``, to FILE as well, each line synced to disk at
once: the host reads it while the guest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any, TextIO

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
NODE_IP = "172.30.0.2"  # the guest's own address (tests/kernel/guest_init.sh)
FRONTEND_VIP = ip_address("10.96.10.30")  # shop/frontend: round robin, no session affinity
FRONTEND_SLICE = "frontend-2kq8d"
# Short, so the story does not wait out the two minutes IPVS counts a closed connection (TIME_WAIT).
DRAIN_GRACE = "5s"
# What the metrics step compares before and after each change.
MOVED = (
    "aproxy_ipvs_operations_total",
    "aproxy_sync_proxy_rules_endpoint_changes_total",
    "aproxy_draining_real_servers",
)


class Narrator:
    def __init__(self, copy_to: Path | None) -> None:
        self._file: TextIO | None = copy_to.open("a") if copy_to is not None else None

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())  # through hostfs to the host, which is reading it now

    def step(self, title: str) -> None:
        self.say()
        self.say(f"== {title}")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up waiting for {what}")
        time.sleep(0.05)


def http_status(address: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def free_address() -> str:
    """A loopback address:port nothing listens on (kube-proxy's own ports may be taken on a host)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


HEALTHZ = free_address()
METRICS = free_address()


def metrics() -> dict[str, float]:
    """The samples of the metrics the story follows, keyed ``name{labels}``."""
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=2) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in MOVED:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class Cluster:
    """The example's objects, as a file aproxy watches; edits replace the file atomically (write, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.documents = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d is not None]
        self._write()

    def slice(self, name: str) -> dict[str, Any]:
        slices = (d for d in self.documents if d.get("kind") == "EndpointSlice")
        return next(d for d in slices if d["metadata"]["name"] == name)

    def endpoints(self, name: str) -> list[str]:
        return [endpoint["addresses"][0] for endpoint in self.slice(name)["endpoints"]]

    def add_endpoint(self, slice_name: str, address: str, node: str) -> None:
        endpoint = {"addresses": [address], "conditions": {"ready": True}, "nodeName": node}
        self.slice(slice_name)["endpoints"].append(endpoint)
        self._write()

    def remove_endpoint(self, slice_name: str, address: str) -> None:
        endpoints = self.slice(slice_name)["endpoints"]
        endpoints[:] = [e for e in endpoints if e["addresses"][0] != address]
        self._write()

    def pods(self) -> Iterator[tuple[str, list[int], list[int]]]:
        """Every IPv4 endpoint address of the example, with the TCP and UDP ports its slices name."""
        ports: dict[str, tuple[set[int], set[int]]] = {}
        for document in self.documents:
            if document.get("kind") != "EndpointSlice" or document.get("addressType") != "IPv4":
                continue
            for endpoint in document.get("endpoints") or []:
                tcp, udp = ports.setdefault(endpoint["addresses"][0], (set(), set()))
                for port in document.get("ports") or []:
                    (udp if port.get("protocol") == "UDP" else tcp).add(port["port"])
        for address, (tcp, udp) in sorted(ports.items(), key=lambda item: IPv4Address(item[0])):
            yield address, sorted(tcp), sorted(udp)

    def _write(self) -> None:
        staged = self.path.with_name("." + self.path.name)
        staged.write_text(yaml.safe_dump_all(self.documents, sort_keys=False))
        staged.replace(self.path)  # atomic: aproxy never reads a half-written file


class Story:
    def __init__(self, narrator: Narrator, cluster: Cluster, aproxy_log: Path, *, kernel: bool) -> None:
        self.say, self.step = narrator.say, narrator.step
        self.cluster = cluster
        self.aproxy_log = aproxy_log
        self.kernel = kernel
        self._log_seen = 0

    # --- what aproxy said and did ------------------------------------------------------------------------

    def new_log_lines(self) -> list[str]:
        lines = self.aproxy_log.read_text(errors="replace").splitlines()
        fresh, self._log_seen = lines[self._log_seen :], len(lines)
        return fresh

    def wait_synced(self, what: str, kind: str = "sync", timeout: float = 20.0) -> None:
        """Wait for aproxy's next pass of ``kind`` (start, sync, drain) that changed the kernel, and show its
        log line."""
        shown: list[str] = []

        def synced() -> bool:
            lines = self.new_log_lines()
            shown.extend(line for line in lines if "msg=synced" in line and f"kind={kind} " in line)
            return bool(shown)

        wait_for(f"aproxy to sync {what}", synced, timeout)
        for line in shown:
            self.say(f"   aproxy: {line.split(' ', 1)[-1]}")

    def wait_drained(self) -> None:
        """Wait until nothing drains any more, showing the drain checks' log lines on the way."""

        def drained() -> bool:
            for line in self.new_log_lines():
                if "msg=synced" in line and "kind=drain " in line:
                    self.say(f"   aproxy: {line.split(' ', 1)[-1]}")
            return metrics().get("aproxy_draining_real_servers") == 0

        wait_for("the drain to end", drained, timeout=40)

    def show_moved(self, before: dict[str, float]) -> dict[str, float]:
        after = metrics()
        for key in sorted(after):
            delta = after[key] - before.get(key, 0.0)
            if delta:
                self.say(f"   metric {key} {delta:+g} (now {after[key]:g})")
        return after

    def show_table(self, only: str | None = None) -> None:
        if not self.kernel:
            lines = plan(self.cluster.path, "text").splitlines()
        else:
            lines = annotated_ipvsadm(self.cluster.path)
        if only is not None:
            lines = section(lines, only)
        for line in lines:
            self.say(f"   {line}")

    # --- traffic ------------------------------------------------------------------------------------------

    def spread(self, client: str, count: int = 12) -> None:
        if not self.kernel:
            self.say("   (dry run: no kernel, so no traffic)")
            return
        from tests.kernel import netlab

        replies = netlab.tcp_replies(FRONTEND_VIP, 80, count, netns=client)
        counts = Counter(reply.backend for reply in replies)
        self.say(f"   {count} connections to {FRONTEND_VIP}:80 from the client, answered by:")
        for backend, n in sorted(counts.items()):
            self.say(f"     {backend:<14} {'#' * n} {n}")


def section(lines: list[str], address: str) -> list[str]:
    """The lines of the virtual servers on ``address`` (a header line and its real-server lines)."""
    picked, inside = [], False
    for line in lines:
        if line.startswith(("TCP", "UDP", "SCTP")):
            inside = line.split()[1].startswith(address + ":")
        elif not line.startswith("  ->"):
            inside = False
        if inside:
            picked.append(line)
    return picked


def annotated_ipvsadm(source: Path) -> list[str]:
    """The kernel's IPVS table (``ipvsadm -Ln``), each virtual server annotated with the service aproxy
    programmed it for (from ``aproxy plan``'s JSON of the same file)."""
    services = {}
    for vs in json.loads(plan(source, "json"))["virtual_servers"]:
        address = f"[{vs['address']}]" if ":" in vs["address"] else vs["address"]
        services[f"{vs['protocol']} {address}:{vs['port']}"] = vs["service"]
    table = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in table.splitlines()[3:]:  # the version and the two column headers
        words = line.split()
        key = " ".join(words[:2])
        lines.append(f"{line:<60} # {services[key]}" if key in services else line)
    return lines


def plan(source: Path, output: str) -> str:
    command = [sys.executable, "-m", "aproxy.cli", "plan", "--source", str(source)]
    command += ["--node-name", "node-a", "--node-ip", NODE_IP, "--output", output]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout


@contextmanager
def aproxy_running(source: Path, log: Path, *, kernel: bool) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        *(sys.executable, "-m", "aproxy.cli", "run", "--source", str(source)),
        *("--node-name", "node-a", "--node-ip", NODE_IP, "--backend", "ipvs" if kernel else "dry-run"),
        # Without the guest the example's pods are addresses on no network of ours: nothing may probe them.
        *(() if kernel else ("--no-health-checks",)),
        *("--healthz-bind-address", HEALTHZ, "--metrics-bind-address", METRICS),
        *("--min-sync-period", "100ms", "--drain-check-period", "1s", "--drain-grace-period", DRAIN_GRACE),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)


def tell(narrator: Narrator, workdir: Path, *, kernel: bool) -> int:
    say, step = narrator.say, narrator.step
    cluster = Cluster(workdir / "cluster.yaml")
    log = workdir / "aproxy.log"
    story = Story(narrator, cluster, log, kernel=kernel)
    pods: dict[str, str] = {}
    with ExitStack() as stack:
        if kernel:
            from tests.kernel import netlab

            step(f"A node: Linux {os.uname().release} (user-mode) with IPVS; pods are network namespaces")
            lab = stack.enter_context(netlab.Lab())
            for index, (address, tcp, udp) in enumerate(cluster.pods()):
                pods[f"pod{index}"] = address  # the echo servers answer with the pod's name
                lab.add_pod(f"pod{index}", tcp_ports=tcp, udp_ports=udp, address=IPv4Address(address))
                say(f"   pod{index:<3} {address:<12} echo servers on TCP {tcp} UDP {udp}")
            client = lab.add_client().netns
        else:
            step("Dry run: no kernel here, so aproxy programs an in-memory table and nothing carries traffic")
            client = ""

        step(
            "Start aproxy run on a copy of examples/cluster.yaml (node-a, this node's address "
            + NODE_IP
            + ")"
        )
        process = stack.enter_context(aproxy_running(cluster.path, log, kernel=kernel))
        wait_for("/readyz", lambda: http_status(HEALTHZ, "/readyz") == 200)
        story.wait_synced("the whole cluster", kind="start")
        say(f"   /healthz {http_status(HEALTHZ, '/healthz')}, /readyz {http_status(HEALTHZ, '/readyz')}")
        before = metrics()

        step("The programmed table" + (" (ipvsadm -Ln, annotated)" if kernel else " (aproxy plan)"))
        story.show_table()

        step("Real connections through shop/frontend's virtual IP are spread over its backends (rr)")
        story.spread(client)

        step("Scale up: the slice gains 10.244.2.21 (written elsewhere, then renamed over the file)")
        cluster.add_endpoint(FRONTEND_SLICE, "10.244.2.21", "node-c")
        if kernel:
            pods["pod-new"] = "10.244.2.21"
            lab.add_pod("pod-new", tcp_ports=[3000], udp_ports=[], address=IPv4Address("10.244.2.21"))
        story.wait_synced("the new endpoint")
        before = story.show_moved(before)
        story.show_table(only=str(FRONTEND_VIP))
        story.spread(client)

        step("Remove a backend that holds an open connection: it drains at weight 0, the connection goes on")
        if kernel:
            held = stack.enter_context(netlab.hold(FRONTEND_VIP, 80, netns=client))
            address = pods[held.first.backend]
            say(f"   a connection is open to {held.first.backend} ({address})")
        else:
            address = cluster.endpoints(FRONTEND_SLICE)[0]
        cluster.remove_endpoint(FRONTEND_SLICE, address)
        story.wait_synced("the removal")
        before = story.show_moved(before)
        story.show_table(only=str(FRONTEND_VIP))
        if kernel:
            say(f"   the held connection still answers: {held.exchange().backend}")
            story.spread(client)
            step(
                "The held connection closes: a drained real server is deleted once IPVS has no connection"
                f" on it (recently closed ones count), or after --drain-grace-period ({DRAIN_GRACE})"
            )
            held.reset()
        else:
            step("No connection holds it in a dry run: the next drain check deletes it")
        story.wait_drained()
        before = story.show_moved(before)
        story.show_table(only=str(FRONTEND_VIP))

        step("Scale down: one more backend goes to weight 0 at once, and is deleted when it has drained")
        cluster.remove_endpoint(FRONTEND_SLICE, cluster.endpoints(FRONTEND_SLICE)[-1])
        story.wait_synced("the scale-down")
        story.wait_drained()
        before = story.show_moved(before)
        story.show_table(only=str(FRONTEND_VIP))
        story.spread(client)

        step("Stop: SIGTERM leaves the rules in place (a restart drops no traffic)")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
        say(f"   aproxy run exited with {code}")
        if kernel:
            count = len([line for line in annotated_ipvsadm(cluster.path) if line.startswith(("TCP", "UDP"))])
            say(f"   {count} virtual servers still in the kernel")
            step("aproxy cleanup removes what aproxy made, and nothing else")
            subprocess.run([sys.executable, "-m", "aproxy.cli", "cleanup"], check=True, cwd=ROOT)
            left = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True, check=True).stdout
            say(
                f"   virtual servers left: {len(left.splitlines()) - 3}; kube-ipvs0 present: "
                f"{Path('/sys/class/net/kube-ipvs0').exists()}"
            )
    step("Done: the lab's namespaces are gone too" if kernel else "Done")
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no kernel: aproxy's dry-run backend")
    parser.add_argument("--narration", type=Path, help="also write the narration here, synced line by line")
    args = parser.parse_args(argv)
    narrator = Narrator(args.narration)
    workdir = Path(tempfile.mkdtemp(prefix="aproxy-demo-"))
    try:
        return tell(narrator, workdir, kernel=not args.dry_run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
