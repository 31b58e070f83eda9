"""Where the client's cluster configuration comes from, and keeping a kubeconfig's bearer token current.

``load_config`` picks the configuration the way kubectl and kube-proxy do (an explicit kubeconfig, the pod's
service account, ``~/.kube/config``, or ``--master`` alone) and returns it as a ``ClusterConfig``.

kubernetes_asyncio reads a kubeconfig's credentials once. Several of them do not last: an exec plugin's token
(EKS, GKE's gke-gcloud-auth-plugin, ...) has an ``expirationTimestamp``; a ``tokenFile`` (kubeadm's kube-proxy
kubeconfig points at the pod's projected service-account token) is rewritten by the kubelet before it expires;
gcp and oidc auth-provider tokens expire too. Without renewal the daemon's watches start failing with 401 an
hour or so after start, and stay failed.

``CredentialRenewal.run()`` re-reads the credentials every ``interval`` seconds through the same kubeconfig
loader (which re-runs an exec plugin only within 5 minutes of its token's expiry, re-reads a token file,
refreshes gcp/oidc tokens near their expiry) into a scratch configuration, and copies only the token into the
live one: the server URL (``--master`` may have replaced it) and TLS files stay as they were. Requests made
after that use the new token (the client reads it per request); an open watch keeps its connection until it
ends.

A token file's surrounding whitespace (a trailing newline) is dropped, as client-go does: kubernetes_asyncio
would send it inside the Authorization header.

A renewal that fails (the plugin exits non-zero, the token file is gone) is logged and counted; the current
token is kept and the next round tries again. Client certificates from an exec plugin are not renewed: the
client's TLS context is made once per connection pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import aiohttp

from aproxy.sources.kube.client import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    ConfigException,
    Configuration,
    InClusterConfigLoader,
    KubeConfigLoader,
    KubeConfigMerger,
)
from aproxy.sources.kube.errors import KubernetesConfigError

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG: Final = "~/.kube/config"
DEFAULT_RENEWAL_INTERVAL: Final = 60.0  # seconds; exec tokens are renewed 5 minutes before they expire
_TOKEN_KEY: Final = "BearerToken"
# What a credential source can raise: a refused or broken exec plugin or provider (ConfigException,
# ValueError), an unreadable token file (OSError), an unreachable oidc issuer (aiohttp.ClientError).
_RENEWAL_FAILURES: Final = (ConfigException, OSError, ValueError, aiohttp.ClientError)


# --- loading ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The client configuration and, when it came from a kubeconfig, what keeps its token current (run it
    beside the clients that use ``configuration``: ``KubernetesSource`` does). In a pod, kubernetes_asyncio
    re-reads the service-account token by itself."""

    configuration: Configuration
    renewal: CredentialRenewal | None = None


async def load_config(
    kubeconfig: Path | None = None,
    master: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    token_file: Path = Path(SERVICE_TOKEN_FILENAME),
    cert_file: Path = Path(SERVICE_CERT_FILENAME),
    renewal_interval: float = DEFAULT_RENEWAL_INTERVAL,
) -> ClusterConfig:
    """The client configuration, from the first of:

    1. ``kubeconfig`` (``--kubeconfig``), then the ``KUBECONFIG`` variable (paths joined by ``os.pathsep``):
       an explicit kubeconfig wins even inside a pod;
    2. the pod's service account, when ``KUBERNETES_SERVICE_HOST`` is set and the token file exists;
    3. ``~/.kube/config`` when it exists;
    4. ``master`` alone (an unauthenticated URL, e.g. ``kubectl proxy``).

    ``master`` (``--master``) replaces the server URL in every case. Files are read in a worker thread.
    From a kubeconfig (1 or 3), ``ClusterConfig.renewal`` re-reads its token every ``renewal_interval``
    seconds once it runs (``KubernetesSource`` runs it).
    """
    env = os.environ if environ is None else environ
    explicit = str(kubeconfig) if kubeconfig is not None else env.get("KUBECONFIG", "")
    # Existence checks and file reads happen in a worker thread: the loop never waits on the disk.
    origin = await asyncio.to_thread(_config_origin, explicit, env, token_file)
    configuration = Configuration()
    renewal = None
    try:
        if origin == "in-cluster":
            loader = InClusterConfigLoader(str(token_file), str(cert_file), environ=dict(env))
            await asyncio.to_thread(loader.load_and_set, configuration)
        elif origin:
            kubeconfig_loader = await _load_kubeconfig(origin, configuration)
            renewal = CredentialRenewal(kubeconfig_loader, configuration, renewal_interval)
        elif not master:
            raise KubernetesConfigError(
                "no cluster configuration: not running in a pod, no --kubeconfig, KUBECONFIG or "
                f"{DEFAULT_KUBECONFIG}, and no --master"
            )
    except ConfigException as error:
        raise KubernetesConfigError(f"invalid cluster configuration: {error}") from error
    if master:
        configuration.host = master.rstrip("/")
    return ClusterConfig(configuration, renewal)


def _config_origin(explicit: str, env: Mapping[str, str], token_file: Path) -> str:
    """Kubeconfig path(s) to load, "in-cluster", or "" for none."""
    if explicit:
        return explicit
    if env.get(SERVICE_HOST_ENV_NAME) and token_file.exists():
        return "in-cluster"
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    return str(default) if default.exists() else ""


async def _load_kubeconfig(paths: str, configuration: Configuration) -> KubeConfigLoader:
    merger = await asyncio.to_thread(KubeConfigMerger, paths)
    if merger.config is None:
        raise KubernetesConfigError(f"kubeconfig not found: {paths}")
    loader = KubeConfigLoader(config_dict=merger.config, config_base_path=None)
    await loader.load_and_set(configuration)
    bearer_token(configuration)  # strips a token file's trailing newline
    return loader


# --- renewal ------------------------------------------------------------------------------------------------


def bearer_token(configuration: Configuration) -> str | None:
    """The configuration's ``Authorization`` value, whitespace dropped (and written back so)."""
    token = configuration.api_key.get(_TOKEN_KEY)
    if not isinstance(token, str):
        return None
    configuration.api_key[_TOKEN_KEY] = token = token.strip()
    return token or None


class CredentialLoader(Protocol):
    """What renewal needs of kubernetes_asyncio's ``KubeConfigLoader``."""

    async def load_and_set(self, client_configuration: Configuration) -> None: ...


class CredentialRenewal:
    """Copies the kubeconfig's current token into ``configuration`` every ``interval`` seconds (``run``).

    Counters for logs, metrics and tests: ``renewals`` (rounds that changed the token), ``failures``.
    """

    def __init__(
        self,
        loader: CredentialLoader,
        configuration: Configuration,
        interval: float = DEFAULT_RENEWAL_INTERVAL,
    ) -> None:
        self._loader = loader
        self._configuration = configuration
        self._interval = interval
        self.renewals = 0
        self.failures = 0

    async def run(self) -> None:
        """Renew until cancelled; a failed round is logged and counted, never raised."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.renew()
            except _RENEWAL_FAILURES as exc:
                self.failures += 1
                log.error(
                    "could not renew the kubeconfig credentials; keeping the current token",
                    extra={"error": str(exc) or type(exc).__name__, "failures": self.failures},
                )

    async def renew(self) -> bool:
        """One round: True if the token changed. Raises what the credential source raised."""
        scratch = Configuration()
        # Token files are a few hundred bytes on a local tmpfs: reading them on the loop costs microseconds.
        await self._loader.load_and_set(scratch)
        token = bearer_token(scratch)
        if token is None or token == self._configuration.api_key.get(_TOKEN_KEY):
            return False
        self._configuration.api_key[_TOKEN_KEY] = token
        self.renewals += 1
        log.info("renewed the kubeconfig bearer token", extra={"renewals": self.renewals})
        return True
