"""Fixtures of the Kubernetes source's tests: the fake API server, a recording sink, the source under test."""

from __future__ import annotations

import pytest

from aproxy.sources.kube.watch import KubernetesSource
from tests.fakeapi.fixtures import fake_api  # noqa: F401 (the fixture, found by pytest here)
from tests.fakeapi.server import FakeApiServer
from tests.sources.kube.helpers import RecordingSink, make_source


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def source(fake_api: FakeApiServer) -> KubernetesSource:  # noqa: F811 (the fixture above, requested)
    """The source under test, against ``fake_api``, with retries in milliseconds."""
    return make_source(fake_api)
