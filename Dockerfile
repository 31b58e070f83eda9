# aproxy's node image: Python, the locked runtime dependencies, and the node tools aproxy runs (iptables in
# both variants behind kube-proxy's wrapper, ipset, conntrack, kmod). `make image` builds it.
#
# BASE is overridable: where registries cannot be reached, build a base from Debian's packages
# (`debootstrap --variant=minbase bookworm DIR` imported as an image; tests/image does that).
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
# A CA bundle for pip where the build's network needs one (empty: pip's own).
ARG PIP_CERT=
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements-runtime.lock pyproject.toml README.md ./
COPY aproxy ./aproxy
# Hashed lock only: every wheel is checked; aproxy itself without dependencies (the lock has them all).
RUN python3 -m venv /opt/aproxy \
    && PIP_CERT="${PIP_CERT}" /opt/aproxy/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
       -r requirements-runtime.lock \
    && PIP_CERT="${PIP_CERT}" /opt/aproxy/bin/pip install --no-cache-dir --no-deps . \
    && /opt/aproxy/bin/pip uninstall -y -q pip \
    && find /opt/aproxy -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 iptables ipset conntrack kmod \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
COPY image/iptables-wrapper /usr/sbin/iptables-wrapper
RUN for family in iptables ip6tables; do \
        update-alternatives --quiet --install "/usr/sbin/$family" "$family" /usr/sbin/iptables-wrapper 100 \
          --slave "/usr/sbin/$family-restore" "$family-restore" /usr/sbin/iptables-wrapper \
          --slave "/usr/sbin/$family-save" "$family-save" /usr/sbin/iptables-wrapper; \
    done
COPY --from=build /opt/aproxy /opt/aproxy
ENV PATH=/opt/aproxy/bin:$PATH PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["aproxy"]
CMD ["--help"]
