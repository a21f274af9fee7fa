"""Config files are data: YTE templating, code tags, duplicate keys and alias bombs are refused before loading."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesweep.configfile import ConfigFileError, check_config_file

REPO = Path(__file__).resolve().parents[2]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

CASES = [
    ("__use_yte__: true\nseed: ?1+1\n", r"key '__use_yte__' asks Snakemake to run the file as a YTE template"),
    ("__use_yte__: false\nseed: 1\n", r"key '__use_yte__'"),
    ("dataset:\n  __use_yte__: true\n", r"key '__use_yte__'"),
    ('{"__use_yte__": true, "seed": 1}', r"key '__use_yte__'"),
    ("seed: !!python/object/apply:os.system ['true']\n", r"seed has tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("seed: !!python/name:os.system\n", r"seed has tag 'tag:yaml.org,2002:python/name:os.system'"),
    ("model: !custom {id: x}\n", r"model has tag '!custom'"),
    ("model:\n  revision: 2024-01-01\n", r"model.revision has tag 'tag:yaml.org,2002:timestamp'.*quote the value"),
    ("seed: 1\nseed: 2\n", r"key seed is given twice in one mapping \(line 2\)"),
    ("evaluate:\n  device: cpu\n  device: cuda\n", r"key evaluate.device is given twice"),
    ('{"seed": 1, "seed": 2}', r"key 'seed' is given twice"),
    (BOMB + "train: *i\n", r"expands to .* values .*; allowed: at most 100,000 values"),
    ("a: &a ['" + "x" * 200_000 + "']\nb: [" + ", ".join(["*a"] * 100) + "]\n", r"characters once its aliases"),
    ("a: &a [*a]\n", r"refers to itself through an alias"),
    ("- 1\n- 2\n", r"the top level must be a mapping"),
    ("seed: [1\n", r"not valid YAML"),
    ("", r"empty"),
]


@pytest.mark.parametrize("text,message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_refused_in_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigFileError, match=message) as err:
        check_config_file(path)
    assert time.perf_counter() - start < 0.5
    assert str(err.value).startswith(f"config file {path}: ") and "\n" not in str(err.value)


def test_merge_keys_and_plain_aliases_are_data(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {device: cpu, threads: 2}\nevaluate:\n  <<: *b\n  threads: 1\nbits: &w [8, 4]\nmore: *w\n")
    check_config_file(path)


def test_shipped_configs_pass():
    for p in [REPO / "config/config.yaml", *sorted((REPO / "config/presets").glob("*.yaml"))]:
        check_config_file(p)


def test_command_line_entry_point(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("seed: 1\nseed: 2\n")
    cmd = [sys.executable, "-m", "moesweep.configfile"]  # what `make run` runs before Snakemake
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    proc = subprocess.run([*cmd, str(REPO / "config/config.yaml"), str(bad)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"invalid config: config file {bad}: key seed is given twice in one mapping (line 2); give each key once")
    assert subprocess.run([*cmd, str(REPO / "config/config.yaml")], env=env).returncode == 0
    assert "-m moesweep.configfile config/config.yaml" in (REPO / "Makefile").read_text()
