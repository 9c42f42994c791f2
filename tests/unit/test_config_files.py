"""Config files on disk: good ones load, each bad one fails naming its field.

Every ``bad-*.yaml`` under ``configs/`` carries one mistake and says, in
``# expect: ...`` comment lines at its top, what the error must mention
(the first line is the field path, or the YAML position).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vramctl.spec.models import ConfigError, load_config

CONFIGS = Path(__file__).parent / "configs"
GOOD = sorted(CONFIGS.glob("good-*.yaml"))
BAD = sorted(CONFIGS.glob("bad-*.yaml"))
REPO = Path(__file__).resolve().parents[2]


def expectations(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# expect: "):
            out.append(line.removeprefix("# expect: "))
    assert out, f"{path.name} must say what it expects in a '# expect: ...' comment"
    return out


def validate_cli(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vramctl", "validate", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_fixture_sets_are_not_empty() -> None:
    assert [p.name for p in GOOD] == ["good-bare-gpu.yaml", "good-demo.yaml"]
    assert len(BAD) >= 10


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.gpus


def test_good_demo_contents() -> None:
    cfg = load_config(CONFIGS / "good-demo.yaml")
    (g,) = cfg.gpus
    assert g.display_name == "demo-gpu0" and g.active_model == "llm" and g.companions == ["tts"]
    assert {m: s.vram_mib for m, s in g.models.items()} == {"llm": 12000, "sdxl": 11000, "tts": 3500}
    assert g.models["tts"].health is not None and g.models["tts"].health.docker_healthcheck
    assert g.merged_env("llm")["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert cfg.gpu_probe.kind == "simulated" and cfg.gpu_probe.total_mib == 16303 and cfg.runtime == "process"


def test_good_bare_gpu_is_one_entry() -> None:
    (g,) = load_config(CONFIGS / "good-bare-gpu.yaml").gpus
    assert g.gpu == 0 and g.active_model == "sdxl" and g.models["llm"].compose_service == "llm"


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_config_names_the_field(path: Path) -> None:
    where, *words = expectations(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path)
    assert len(err.problems) == 1, err.problems
    assert err.problems[0][0] == where
    text = err.render()
    assert text.startswith(f"{path}: 1 problem(s)")
    assert f"  {where}: " in text
    for w in words:
        assert w in text, (w, text)
    assert str(err) == text


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "tabs.yaml"
    p.write_text("gpus:\n  - models:\n\t\tllm: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    ((where, msg),) = info.value.problems
    assert where == "line 3, column 1"
    assert msg.startswith("not valid YAML: ")


def test_missing_file_says_cannot_read(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.problems == [("(file)", "cannot read: No such file or directory")]
    assert str(p) in str(info.value)


def test_directory_says_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"], ids=["list", "scalar", "empty", "number"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.problems == [("(top level)", "expected a mapping with `gpus:` (or a single GPU's `models:`)")]


def test_mapping_without_gpus_or_models(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("runtime: docker\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.problems == [("gpus", "required field is missing")]


# ------------------------------------------------------------------ the real CLI


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_cli_validate_good_exits_0(path: Path) -> None:
    r = validate_cli(path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_cli_validate_bad_exits_2_and_names_the_field(path: Path) -> None:
    where, *words = expectations(path)
    r = validate_cli(path)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert where in out
    for w in words:
        assert w in out, (w, out)
    assert "Traceback" not in out


def test_cli_validate_missing_file_fails_cleanly(tmp_path: Path) -> None:
    r = validate_cli(tmp_path / "nope.yaml")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "cannot read" in out and "Traceback" not in out


# ------------------------------------------------------------------ hostile and broken files

MINIMAL = "gpus:\n  - activeModel: llm\n    models:\n      llm: {image: i, vramMiB: 100}\n"


def _only_problem(p: Path) -> tuple[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


def test_non_utf8_byte_in_a_comment_names_line_and_byte(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"# caf\xe9\n" + MINIMAL.encode())
    where, msg = _only_problem(p)
    assert where == "line 1, column 6"
    assert "0xe9" in msg and "UTF-8" in msg


def test_utf16_file_is_named_as_such(tmp_path: Path) -> None:
    p = tmp_path / "utf16.yaml"
    p.write_bytes(MINIMAL.encode("utf-16"))
    where, msg = _only_problem(p)
    assert where == "(file)" and "UTF-16" in msg and "UTF-8" in msg


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(p).gpus[0].active_model == "llm"


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000))], ids=["flow", "block"])
def test_very_deep_yaml_is_refused_with_its_line(tmp_path: Path, text: str) -> None:
    p = tmp_path / "deep.yaml"
    p.write_text(text)
    where, msg = _only_problem(p)
    assert where.startswith("line ") and "nested more than" in msg


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text("gpus:\n  - activeModel: llm\n    models:\n      llm: {image: i}\n      sdxl: {image: i}\n    activeModel: sdxl\n")
    where, msg = _only_problem(p)
    assert where == "line 6, column 5"
    assert "activeModel" in msg and "line 2" in msg and "line 6" in msg


def test_merge_keys_may_override(tmp_path: Path) -> None:
    p = tmp_path / "merge.yaml"
    p.write_text(
        "x-base: &base {image: i, vramMiB: 100}\ngpus:\n  - activeModel: llm\n    models:\n      llm: {<<: *base, vramMiB: 200}\n"
    )
    with pytest.raises(ConfigError) as info:  # x-base is an unknown field, but the merge itself is fine
        load_config(p)
    assert [w for w, _ in info.value.problems] == ["xBase"] or [w for w, _ in info.value.problems] == ["x-base"]


def test_numeric_env_values_are_converted_like_compose(tmp_path: Path) -> None:
    p = tmp_path / "env.yaml"
    p.write_text(
        "gpus:\n  - activeModel: llm\n    env: {GLOBAL_N: 3}\n    models:\n      llm: {image: i, env: {STANDIN_PORT: 18000, RATIO: 0.5}}\n"
    )
    (g,) = load_config(p).gpus
    assert g.models["llm"].env == {"STANDIN_PORT": "18000", "RATIO": "0.5"}
    assert g.env == {"GLOBAL_N": "3"}


def test_env_keys_are_kept_as_written_in_messages(tmp_path: Path) -> None:
    p = tmp_path / "env.yaml"
    p.write_text("gpus:\n  - activeModel: llm\n    models:\n      llm: {image: i, env: {STANDIN_PORT: [1]}}\n")
    where, _ = _only_problem(p)
    assert where == "gpus[0].models.llm.env.STANDIN_PORT"


def test_boolean_env_value_asks_for_quotes(tmp_path: Path) -> None:
    p = tmp_path / "env.yaml"
    p.write_text("gpus:\n  - activeModel: llm\n    models:\n      llm: {image: i, env: {USE_X: true}}\n")
    where, msg = _only_problem(p)
    assert where == "gpus[0].models.llm.env.USE_X" and "quote" in msg


def test_resync_seconds_has_a_floor(tmp_path: Path) -> None:
    p = tmp_path / "resync.yaml"
    p.write_text("resyncSeconds: 1e-9\n" + MINIMAL)
    where, msg = _only_problem(p)
    assert where == "resyncSeconds" and "0.5" in msg


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vramctl", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(
    "content",
    [b"# caf\xe9\n" + MINIMAL.encode(), MINIMAL.encode("utf-16"), ("[" * 3000 + "]" * 3000).encode()],
    ids=["latin1", "utf16", "deep"],
)
def test_validate_and_up_exit_2_without_a_traceback(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    for args in (("validate", str(p)), ("up", "--config", str(p), "--state", str(tmp_path / "s.json"), "--listen", "127.0.0.1:0")):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout + r.stderr)
        assert "Traceback" not in r.stderr and str(p) in r.stderr


UNFIT = """\
runtime: process
gpuProbe: {kind: simulated, totalMiB: 16000}
gpus:
  - activeModel: llm
    companions: [tts]
    models:
      llm: {command: [/bin/true], vramMiB: 13000}
      tts: {class: light, command: [/bin/true], vramMiB: 4000}
"""


def test_up_refuses_what_validate_refuses_with_the_same_message(tmp_path: Path) -> None:
    p = tmp_path / "unfit.yaml"
    p.write_text(UNFIT)
    v = _cli("validate", str(p))
    assert v.returncode == 2
    problem = next(line for line in v.stdout.splitlines() if "do not fit" in line)
    u = _cli("up", "--config", str(p), "--state", str(tmp_path / "s.json"), "--listen", "127.0.0.1:0")
    assert u.returncode == 2, u.stderr
    assert problem in u.stderr and "Traceback" not in u.stderr
