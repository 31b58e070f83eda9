"""Keeping a kubeconfig's bearer token current while aproxy runs.

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
from typing import Final, Protocol

import aiohttp
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config.config_exception import ConfigException

log = logging.getLogger(__name__)

DEFAULT_RENEWAL_INTERVAL: Final = 60.0  # seconds; exec tokens are renewed 5 minutes before they expire
_TOKEN_KEY: Final = "BearerToken"
# What a credential source can raise: a refused or broken exec plugin or provider (ConfigException,
# ValueError), an unreadable token file (OSError), an unreachable oidc issuer (aiohttp.ClientError).
_RENEWAL_FAILURES: Final = (ConfigException, OSError, ValueError, aiohttp.ClientError)


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
