"""kubernetes_asyncio without the ~700 model classes and ~60 API classes its package ``__init__`` files build.

aproxy reads every response as raw JSON (``_preload_content=False``, then orjson) and calls two API classes,
yet ``import kubernetes_asyncio`` imports every generated model and API: about 40 MB of memory in a pod that
runs on every node (the process is at 73 MB after that import, against 33 MB after aiohttp's; with the shells
below, 44 MB; the whole process's target is 200 MB at 10,000 services, docs/benchmarks.md).

So the packages whose ``__init__`` does that are registered as shells before anything from them is imported:
importing a submodule (``kubernetes_asyncio.client.api_client``) loads that module only. A shell is
transparent: the first attribute it lacks (``client.V1Pod``, ``kubernetes_asyncio.watch``) runs the
package's own ``__init__`` into it, so code that uses the whole package still works, only without the
saving. A package that is already imported is left as it is.

Every import of kubernetes_asyncio in aproxy goes through this module, so the shells are in place first.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import PathFinder
from typing import Any

# The packages whose __init__ imports every model or API class (the top one imports the client package).
_HEAVY_PACKAGES = (
    "kubernetes_asyncio",
    "kubernetes_asyncio.client",
    "kubernetes_asyncio.client.api",
    "kubernetes_asyncio.client.models",
)


def _shell(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)  # a parent is a shell already: nothing is run
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an installed package", name=name)
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(attribute: str) -> Any:
        if attribute.startswith("__"):  # probes by tools (__wrapped__, __all__, ...): no full import for them
            raise AttributeError(attribute)
        if PathFinder.find_spec(f"{name}.{attribute}", package.__path__) is not None:
            # A submodule (``from kubernetes_asyncio.client import rest`` asks for the attribute first): that
            # module alone.
            return importlib.import_module(f"{name}.{attribute}")
        del package.__getattr__
        loader.exec_module(package)  # the package's own __init__, into the module everyone already holds
        return getattr(package, attribute)

    package.__getattr__ = complete  # type: ignore[method-assign]  # module __getattr__ (PEP 562)
    sys.modules[name] = package


for _name in _HEAVY_PACKAGES:
    _shell(_name)

# After the shells, in this order (E402: the imports must follow them).
from kubernetes_asyncio.client.api.core_v1_api import CoreV1Api  # noqa: E402
from kubernetes_asyncio.client.api.discovery_v1_api import DiscoveryV1Api  # noqa: E402
from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402

# kube_config.py imports these two names from the client package itself.
_client = sys.modules["kubernetes_asyncio.client"]
for _value in (ApiClient, Configuration):
    vars(_client).setdefault(_value.__name__, _value)  # (hasattr would complete a shell)

from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402
from kubernetes_asyncio.config.incluster_config import (  # noqa: E402
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger  # noqa: E402

__all__ = [
    "SERVICE_CERT_FILENAME",
    "SERVICE_HOST_ENV_NAME",
    "SERVICE_TOKEN_FILENAME",
    "ApiClient",
    "ApiException",
    "ConfigException",
    "Configuration",
    "CoreV1Api",
    "DiscoveryV1Api",
    "InClusterConfigLoader",
    "KubeConfigLoader",
    "KubeConfigMerger",
]
