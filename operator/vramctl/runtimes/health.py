"""Readiness probes shared by the runtimes."""

from __future__ import annotations

import errno
import http.client
import urllib.error
import urllib.request

# This machine ran out of something (descriptors, buffers): the check says
# nothing about the model.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LocalResourceError(OSError):
    """A health check could not be made for a reason of vramctl's own machine."""


def _local(err: BaseException) -> OSError | None:
    reason = getattr(err, "reason", None) if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, OSError) and reason.errno in _LOCAL_ERRNOS:
        return reason
    return None

# Health checks go straight to the model server: never through a proxy taken
# from the environment (HTTP_PROXY would send 127.0.0.1 traffic elsewhere).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ready(host: str, port: int, path: str, timeout: float = 1.0) -> bool:
    """One GET of ``http://host:port/path``: True on any 2xx answer.

    Connection errors, timeouts, non-2xx statuses and malformed answers are
    all False. Raises LocalResourceError when this machine could not make the
    check (out of descriptors or buffers): that is not the model's fault.
    """
    if not path.startswith("/"):
        path = "/" + path
    netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{netloc}:{port}{path}"
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            status = int(resp.status)
            return 200 <= status < 300
    except urllib.error.HTTPError:
        return False  # 3xx that was not followed, 4xx, 5xx
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        local = _local(err)
        if local is not None:
            raise LocalResourceError(local.errno, f"health check of {url}: {local.strerror}") from err
        return False
    except Exception:
        return False
