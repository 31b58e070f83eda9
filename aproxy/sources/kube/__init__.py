"""The Kubernetes API source: Services and EndpointSlices from the API server, and this node's Node.

- ``config``: where the cluster configuration comes from (``load_config``) and keeping a kubeconfig's token
  current (``CredentialRenewal``);
- ``errors``: the source's exceptions, one per way a request fails, and their RBAC messages;
- ``resources``: what is listed and watched, the requests that do it, and how objects are trimmed;
- ``watch``: the list/watch loop (``KubernetesSource``) and the one-shot ``snapshot``;
- ``node``: this node's Node: ``fetch_node``, its eligibility, and the Node watch (``ThisNode``).
"""
