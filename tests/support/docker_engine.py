"""The local Docker engine as the tests use it: the stand-in image's tag, the
labels that own containers, removing what a test made, restarting the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors

from tests.support.processes import unmarked_env

STANDIN_TAG = "vramctl/standin:dev"
TEST_OWNER_LABEL = "vramctl-test.owner"  # on helper containers tests create by hand
MANAGED = "app.kubernetes.io/managed-by=vramctl"


def remove_owned_by(client: docker.DockerClient, name: str) -> None:
    for label in (f"vramctl.io/instance={name}", f"com.docker.compose.project={name}", f"{TEST_OWNER_LABEL}={name}"):
        for c in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as err:
                if err.status_code != 409:  # already being removed
                    raise


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _this_dockerd() -> tuple[int, list[str]]:
    """The dockerd serving DOCKER_HOST (the default socket when unset), and its command line."""
    want = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    for text in subprocess.check_output(["pidof", "dockerd"], text=True).split():
        argv = [a.decode() for a in Path(f"/proc/{text}/cmdline").read_bytes().split(b"\0") if a]
        hosts = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-H", "--host")]
        hosts += [a.split("=", 1)[1] for a in argv if a.startswith("--host=")]
        if any(h.removeprefix("unix://") == want for h in hosts) or (not hosts and want == "/var/run/docker.sock"):
            return int(text), argv
    raise AssertionError(f"no dockerd serves {want}")


def restart_docker_daemon(timeout: float = 90.0) -> float:
    """Stop the Docker daemon with SIGTERM (as systemd does), start it again
    with the same command line, and wait until it answers; returns the
    seconds it was gone. Containers with restart policies come back by the
    daemon's own doing."""
    pid, argv = _this_dockerd()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    deadline = t0 + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            raise AssertionError("dockerd did not stop")
        time.sleep(0.05)
    # Started from a shell that exits at once: the daemon is init's child, not
    # this process's (a stopped child of ours would linger as a zombie).
    log = "/var/log/vramctl-dockerd.log" if "-H" not in argv and "--host" not in argv else "/dev/null"
    # Unmarked: the daemon is meant to outlive the session (see tests/support/processes.py).
    subprocess.run(["sh", "-c", f'setsid "$@" >>{log} 2>&1 </dev/null &', "sh", *argv], check=True, env=unmarked_env())
    while True:
        try:
            client = docker.from_env(timeout=5)  # asks the server for its API version: fails while it is down
            try:
                client.ping()
            finally:
                client.close()
            return time.monotonic() - t0
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError("dockerd did not come back") from None
            time.sleep(0.1)
