"""The Kubernetes source as the daemon starts it: the cluster configuration, the list/watch source, this
node's Node and the coroutine that watches it, from aproxy run's settings in one call."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aproxy.sources.kube.config import load_config
from aproxy.sources.kube.node import ThisNode, watch_node
from aproxy.sources.kube.watch import KubernetesSource


@dataclass(frozen=True, slots=True)
class Connection:
    source: KubernetesSource
    node: ThisNode
    watch_node: Callable[[], Coroutine[Any, Any, None]]  # follows the Node until cancelled


async def connect(
    kubeconfig: Path | None,
    master: str | None,
    *,
    node_name: str,
    fixed_addresses: bool,
    renewal_interval: float,
) -> Connection:
    """Load the cluster configuration (kubeconfig/master, else in-cluster, KUBECONFIG, ~/.kube/config) and
    build the source and the Node's follower on it. Raises KubernetesConfigError."""
    cluster = await load_config(kubeconfig, master, renewal_interval=renewal_interval)
    source = KubernetesSource(cluster.configuration, renewal=cluster.renewal)
    node = ThisNode(node_name, cluster.configuration, fixed_addresses=fixed_addresses)
    return Connection(source, node, functools.partial(watch_node, source, node_name, node.changed))
