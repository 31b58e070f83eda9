"""kubernetes_asyncio's client is imported without its model and API classes, and stays whole for others."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str) -> str:
    """``code`` in a fresh interpreter (this one has imported the whole package long ago): its output."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


def test_the_daemon_imports_no_model_or_api_class_it_does_not_use() -> None:
    output = run_fresh(
        """
        import sys
        import aproxy.cli, aproxy.app, aproxy.sources.kube.node
        loaded = [name for name in sys.modules if name.startswith("kubernetes_asyncio.client.")]
        print(sum(".models." in name for name in loaded), sorted(n for n in loaded if ".api." in n))
        """
    )
    assert output == (
        "0 ['kubernetes_asyncio.client.api.core_v1_api', 'kubernetes_asyncio.client.api.discovery_v1_api']"
    )


def test_code_that_uses_the_whole_package_afterwards_still_gets_it() -> None:
    output = run_fresh(
        """
        from aproxy.sources.kube.client import ApiClient, CoreV1Api
        import kubernetes_asyncio
        from kubernetes_asyncio import client, config, watch
        from kubernetes_asyncio.client import V1Pod
        from kubernetes_asyncio.client.models import V1Service
        print(client.ApiClient is ApiClient, client.CoreV1Api is CoreV1Api)
        print(kubernetes_asyncio.client is client)
        print(V1Pod.__name__, V1Service.__name__, callable(config.load_kube_config), watch.Watch.__name__)
        """
    )
    assert output.split() == ["True", "True", "True", "V1Pod", "V1Service", "True", "Watch"]
