"""Fixtures and hooks of the whole suite (helpers live in tests/support).

- Markers by folder: every test under ``tests/<folder>/`` gets the marker
  ``<folder>`` (unit, process, docker, k8s, images, e2e; registered in
  pyproject.toml), so ``-m unit`` or ``-m "not images"`` picks a part.
- No process left behind: the session marks its environment
  (tests/support/processes.py); at its end, any process still alive that
  descends from pytest or carries the mark (re-parented to init or not) is
  named with the test that started it, killed, and fails the run.
- Figures a test reported (tests/support/figures.py) are shown in the summary.
- ``docker_client``: the local engine; FAILS (never skips) when it does not answer.
- ``standin_image``: builds vramctl/standin:dev once per session (no pull).
- ``instance`` / ``make_instance``: unique vramctl instance names; teardown
  force-removes every container of that instance (vramctl's label, the compose
  project of the same name, or the test-only ``vramctl-test.owner`` label).
- ``free_port``: a callable giving a fresh free TCP port on 127.0.0.1.
- ``exclusivity``: the invariant recorder (tests/support/exclusivity.py).
  Every test under tests/docker and tests/e2e is checked by the autouse
  ``_exclusivity_guard``: a violation during the test fails it at teardown,
  and one left uncleared fails the session.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors
import pytest

from tests.support import figures, processes
from tests.support.docker_engine import STANDIN_TAG, remove_owned_by
from tests.support.exclusivity import ExclusivityRecorder
from tests.support.images import Timings
from tests.support.images import summary as image_summary
from tests.support.ports import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
FOLDER_MARKERS = ("unit", "process", "docker", "k8s", "images", "e2e")
# Tests that share what only one process may hold run in one xdist worker,
# one after the other (`--dist loadgroup`); every other test goes wherever.
XDIST_GROUPS = {
    # The local bases and the images built on them: made once per session by
    # build-local.sh and `docker build`, which must not run twice at once.
    "tests/images/test_image_builds.py": "image-builds",
    # The demo stack's fixed ports (vramctl.demo.config: 18000, 17860, 19880).
    "tests/e2e/test_demo.py": "demo-ports",
    # The two bounded chaos runs judge timings (converged within stop + load
    # + 2 s): one after the other, not against each other.
    "tests/e2e/test_chaos.py": "chaos",
}
# Handed out first, in this order (xdist hands out in collection order): the
# longest chains and tests begin at once instead of being left for the end.
FIRST = (
    "image-builds",
    "tests/process/test_warm_proof.py",
    "chaos",
    "tests/images/test_sdxl_benchmark.py",
    "sdxl-real",
)
FIXTURE_GROUPS = {
    "real": "sdxl-real",  # the real SDXL server on the CPU: torch loaded once per session
}
_GUARDED_DIRS = ("docker", "e2e")


# -- markers, leftover processes, figures -------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # Before any test and any xdist worker starts: all they start inherits it.
    processes.mark_session()


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first: dict[str, int] = {}
    for item in items:
        try:
            path = Path(str(item.path)).resolve().relative_to(ROOT)
        except ValueError:
            continue
        if path.parts[0] == "tests" and len(path.parts) > 2 and path.parts[1] in FOLDER_MARKERS:
            item.add_marker(path.parts[1])
        group = XDIST_GROUPS.get(path.as_posix()) or next(
            (g for f, g in FIXTURE_GROUPS.items() if f in getattr(item, "fixturenames", ())), None
        )
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        key = group if group in FIRST else path.as_posix()
        if key in FIRST:
            first[item.nodeid] = FIRST.index(key)
    items.sort(key=lambda item: first.get(item.nodeid, len(FIRST)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: its controller checks once every worker is gone
    found = processes.wait_for_none(processes.mark_session())
    if not found:
        return
    processes.kill(found)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.section("processes left behind by the tests (now killed)", red=True)
        for p in found:
            tr.write_line(str(p))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "teardown":
        report.user_properties.extend(("figure", line) for line in figures.take())


_FIGURES_SEEN: list[str] = []
_IMAGE_TIMINGS = Timings()  # tests/images/conftest.py attaches them to its reports


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "figure":
            _FIGURES_SEEN.append(str(value))
        elif key == "image_timings":
            _IMAGE_TIMINGS.update_from_json(str(value))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    image_summary(terminalreporter, _IMAGE_TIMINGS)
    if _FIGURES_SEEN:
        terminalreporter.section("end-to-end figures (chaos, gateway)")
        for line in _FIGURES_SEEN:
            terminalreporter.write_line(line)


# -- fixtures ---------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as err:
        pytest.fail(f"the Docker engine does not answer ({err}); run `bash .ci/setup-infra.sh` to install and start it", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def standin_image(docker_client: docker.DockerClient) -> str:
    res = subprocess.run(["bash", str(ROOT / "images/standin/build.sh")], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.fail(f"images/standin/build.sh failed:\n{res.stdout}\n{res.stderr}", pytrace=False)
    return STANDIN_TAG


_MADE_HERE: set[str] = set()  # instance names made by this process (an xdist worker's own)


@pytest.fixture
def make_instance(docker_client: docker.DockerClient) -> Iterator[Callable[[], str]]:
    names: list[str] = []

    def make() -> str:
        names.append(f"t{uuid.uuid4().hex[:8]}")
        _MADE_HERE.add(names[-1])
        return names[-1]

    yield make
    for name in names:
        remove_owned_by(docker_client, name)


@pytest.fixture
def instance(make_instance: Callable[[], str]) -> str:
    """A vramctl instance name unique to this test (also usable as a compose project)."""
    return make_instance()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a TCP port free on 127.0.0.1, never the same twice in a session."""
    return _free_port


@pytest.fixture(scope="session")
def exclusivity(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Iterator[ExclusivityRecorder]:
    # Under xdist each worker has one, answering for the instances its tests made.
    owns = _MADE_HERE.__contains__ if hasattr(request.config, "workerinput") else None
    rec = ExclusivityRecorder(docker.from_env(timeout=30), owns)  # its own connection: it streams
    yield rec
    try:
        rec.assert_no_violations()
    finally:
        rec.close()


@pytest.fixture(autouse=True)
def _exclusivity_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under tests/docker and tests/e2e: fail a test during which two heavy
    containers held one GPU (checked after the test's own teardown)."""
    try:
        parts = Path(str(request.node.path)).resolve().relative_to(ROOT).parts
    except ValueError:
        parts = ()
    if len(parts) < 2 or parts[0] != "tests" or parts[1] not in _GUARDED_DIRS:
        yield
        return
    rec: ExclusivityRecorder = request.getfixturevalue("exclusivity")
    start = rec.seq
    yield
    rec.assert_no_violations(since_seq=start)
