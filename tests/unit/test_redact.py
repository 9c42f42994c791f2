"""Secrets never reach status or logs: the one redaction function."""

from __future__ import annotations

import pytest

from vramctl.status.redact import MASK, redact, redact_argv, redact_env, redact_status, secrets_in


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("vllm serve m --api-key sk-abc123def456ghi789", "sk-abc123def456ghi789"),
        ("--api-key=hunter2-long-one", "hunter2-long-one"),
        ("args: --hf-token hf_abcdefghijklmnopqrstuvwxyz", "hf_abcdefghijklmnopqrstuvwxyz"),
        ("--token 'a b c'", "'a b c'"),
        ("HF_TOKEN=hf_zzzzzzzzzzzzzzzzzzzzzzzz started", "hf_zzzzzzzzzzzzzzzzzzzzzzzz"),
        ("OPENAI_API_KEY=plainvalue", "plainvalue"),
        ("non-default args: {'api_key': 'mysecretvalue', 'port': 8000}", "mysecretvalue"),
        ('{"password": "pa55word!"}', "pa55word!"),
        ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
        ("key AKIAABCDEFGHIJKLMNOP here", "AKIAABCDEFGHIJKLMNOP"),
        ("gh token ghp_abcdefghijklmnopqrstuvwx", "ghp_abcdefghijklmnopqrstuvwx"),
    ],
)
def test_secret_values_are_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and MASK in out


@pytest.mark.parametrize(
    "text",
    ["llm ready", "switch llm -> sdxl: success in 1.20s", "--port 8000 --max-model-len 8192", "tokens per second: 40", "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512"],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_known_values_are_masked_in_any_shape() -> None:
    assert redact("echo: value=Zq9-secret-77 (from config)", known=["Zq9-secret-77"]) == "echo: value=*** (from config)"
    assert redact("x 1 y", known=["1"]) == "x 1 y"  # too short to be a secret on its own


def test_argv_and_env() -> None:
    assert redact_argv(["serve", "--api-key", "abc123", "--port", "8000", "--token=t0ken"]) == [
        "serve", "--api-key", MASK, "--port", "8000", f"--token={MASK}"
    ]
    assert redact_env({"HF_TOKEN": "hf_x", "PORT": "1", "NOTE": "sk-abcdefghijklmnop"}) == {"HF_TOKEN": MASK, "PORT": "1", "NOTE": MASK}
    assert secrets_in(["--api-key", "abc123", "--hf-token=qq"], {"HF_TOKEN": "hf_x", "PORT": "1"}) == {"abc123", "qq", "hf_x"}


def test_status_documents_are_redacted_without_changing_the_input() -> None:
    doc = {"gpus": {"0": {"message": "failed\nlast log lines:\n--api-key sk-abcdefghijklmnopq", "n": 3, "l": ["--token xyz12345"]}}}
    out = redact_status(doc)
    assert "sk-abcdefghijklmnopq" not in str(out) and "xyz12345" not in str(out) and out["gpus"]["0"]["n"] == 3
    assert "sk-abcdefghijklmnopq" in doc["gpus"]["0"]["message"]
