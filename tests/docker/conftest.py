"""Fixtures of the docker runtime tests (a real engine, no mocks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors
import pytest

from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import ComposeConfig


@pytest.fixture
def make_runtime(docker_client: docker.DockerClient, standin_image: str) -> Iterator[Callable[..., DockerRuntime]]:
    """``make_runtime(instance, compose=None)`` -> a DockerRuntime on the shared client."""
    made: list[DockerRuntime] = []

    def make(instance: str, compose: ComposeConfig | None = None) -> DockerRuntime:
        made.append(DockerRuntime(docker_client, instance=instance, compose=compose))
        return made[-1]

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def runtime(make_runtime: Callable[..., DockerRuntime], instance: str) -> DockerRuntime:
    """A DockerRuntime of this test's unique instance."""
    return make_runtime(instance)
