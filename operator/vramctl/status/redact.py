"""Secrets out of everything vramctl shows: status, progress, logs.

A model's ``args`` (``--api-key sk-...``) and ``env`` (``HF_TOKEN``) reach the
server's own log lines, and a failed start copies the last of those into
``status.message``, which ``GET /status`` serves without a token. Redaction
is one pure function over text (``redact``) plus helpers for argv, env and
whole status documents, so every place that shows text calls the same rules.

What counts as a secret:

- the value after a secret-looking flag: ``--api-key``, ``--token``,
  ``--hf-token``, ``--password``, ``--secret``, ``--access-key``... written
  ``--flag value`` or ``--flag=value``;
- the value of a secret-looking name in ``NAME=value``, ``NAME: value`` or
  ``'name': 'value'`` (``HF_TOKEN``, ``OPENAI_API_KEY``, ``api_key``...);
- values shaped like well-known tokens wherever they appear (``sk-...``,
  ``hf_...``, ``ghp_...``, ``AKIA...``, ``Bearer ...``);
- any value passed in ``known`` (the secret values of the config itself), so
  a server that echoes its arguments in another shape is caught too.

It errs on the side of hiding: a false positive costs a ``***`` in a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASK = "***"

# Words that make a flag or a variable name secret.
_SECRET_WORDS = r"(?:api[-_]?key|apikey|token|secret|passw(?:or)?d|access[-_]?key|private[-_]?key|auth|credentials?|cookie|session[-_]?key)"
_SECRET_NAME = re.compile(rf"(?i)^[A-Za-z0-9_.-]*{_SECRET_WORDS}[A-Za-z0-9_.-]*$")
_FLAG = re.compile(rf"(?i)^--?[a-z0-9-]*{_SECRET_WORDS}[a-z0-9-]*$")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # --api-key=VALUE / --hf-token VALUE
    (re.compile(rf"(?i)(--?[a-z0-9-]*{_SECRET_WORDS}[a-z0-9-]*)(=|\s+)(?!-)(\"[^\"]*\"|'[^']*'|\S+)"), rf"\1\2{MASK}"),
    # Authorization: Bearer VALUE
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {MASK}"),
    # HF_TOKEN=VALUE, api_key: VALUE, 'api_key': 'VALUE', "token": "VALUE"
    (
        re.compile(rf"(?i)([\"']?\b[A-Za-z0-9_.]*{_SECRET_WORDS}[A-Za-z0-9_.]*[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;}}\]]+)"),
        rf"\1{MASK}",
    ),
    # Well-known token shapes, wherever they are.
    (re.compile(r"\bsk-[A-Za-z0-9_-]{12,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"), MASK),  # JWT
)

# A value shorter than this is not treated as a known secret on its own ("1", "true").
_MIN_KNOWN = 6


def is_secret_name(name: str) -> bool:
    """An environment variable or field name that holds a secret (HF_TOKEN, api_key)."""
    return bool(_SECRET_NAME.match(name))


def redact(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every secret replaced by ``***``. Pure; never raises."""
    for value in sorted({k for k in known if len(k) >= _MIN_KNOWN}, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_argv(argv: Sequence[str]) -> list[str]:
    """An argv with the values of secret flags (and token-shaped words) masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            out.append(MASK)
            hide_next = False
            continue
        hide_next = False
        flag, eq, _ = arg.partition("=")
        if _FLAG.match(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact(arg))
    return out


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """An environment with secret-named variables and token-shaped values masked."""
    return {k: MASK if is_secret_name(k) and v else redact(v) for k, v in env.items()}


def secrets_in(argv: Sequence[str], env: Mapping[str, str]) -> set[str]:
    """The secret values a model is configured with: what ``redact(known=...)`` hides verbatim."""
    found: set[str] = set()
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if _FLAG.match(flag):
            if eq and value:
                found.add(value)
            elif not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                found.add(argv[i + 1])
    found.update(v for k, v in env.items() if is_secret_name(k) and v)
    return found


def redact_status(doc: Any, known: Iterable[str] = ()) -> Any:
    """A JSON-shaped value (status, progress) with every string redacted; a new value, the input is not changed."""
    known = tuple(known)
    if isinstance(doc, str):
        return redact(doc, known)
    if isinstance(doc, Mapping):
        return {k: redact_status(v, known) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [redact_status(v, known) for v in doc]
    return doc
