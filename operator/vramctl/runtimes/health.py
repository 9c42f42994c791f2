"""Readiness probes shared by the runtimes."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

# Health checks go straight to the model server: never through a proxy taken
# from the environment (HTTP_PROXY would send 127.0.0.1 traffic elsewhere).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ready(host: str, port: int, path: str, timeout: float = 1.0) -> bool:
    """One GET of ``http://host:port/path``: True on any 2xx answer.

    Connection errors, timeouts, non-2xx statuses and malformed answers are
    all False; no exception escapes.
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
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False
    except Exception:
        return False
