"""The catalogue of bad inputs: every one refused when the DAG is built, in one line naming the key or file, the
value and what is allowed, before any job and with nothing left in results/ or logs/.

Each case runs through the DAG-time checks exactly as common.smk calls them (`dag_checks`, direct and fast on 2
cores); a representative handful also runs through `snakemake -n` itself on the embedded model.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moesweep.checks import FAST_WIDTHS, ConfigError, check_all, cuda_device_count
from moesweep.configfile import ConfigFileError, check_config_file
from moesweep.costmodel import HARDWARE_FILE, CostModelError, load_cost_model

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "resources" / "models" / "tiny-qwen3-moe"  # hidden 128, expert intermediate 64, 16 experts, k 4
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

BASE = {
    "seed": 1,
    "model": {"id": str(MODEL), "name": "tiny-qwen3-moe", "dtype": "float32"},
    "dataset": {"source": "synthetic", "split": "test", "limit": 12},
    "prompt": {"preset": "zeroshot", "max_new_tokens": 96},
    "evaluate": {"batch_size": 6, "device": "cpu", "repeats": 1, "threads": 1},
    "calibration": {"n_samples": 16, "n_heldout": 8, "max_length": 128, "batch_size": 8},
    "quantization": {"method": "gptq", "bits": [8, 2], "group_size": 32, "min_tokens": 4},
    "profile": {"n_samples": 16, "max_length": 128, "batch_size": 8},
    "grid": [
        {"family": "native", "routing": {"policy": "native"}, "precision": {"policy": "full"}},
        {"family": "top1-capacity", "routing": {"policy": "topk", "top_k": 1, "capacity_factor": [1.0, None]},
         "precision": {"policy": "full"}},
        {"family": "static-uniform", "routing": {"policy": "native"}, "precision": {"policy": "uniform", "bits": 2}},
        {"family": "static-hotcold", "routing": {"policy": "native"},
         "precision": {"policy": "hotcold", "bits_high": 8, "bits_low": 2, "memory_budget": 0.3}},
    ],
}


def dag_checks(cfg: dict) -> None:
    """What common.smk runs on the config when the DAG is built (same functions, same order)."""
    cells = check_all(cfg, SCHEMA)
    assert cells
    if cfg.get("cost_model"):
        load_cost_model(cfg["cost_model"], str(HARDWARE_FILE))


# ---- mutations: each takes (config, tmp_path) and changes the config or the files it names

def at(path: str, value):
    def mutate(cfg, tmp):
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value(tmp) if callable(value) else value
    return mutate


def both(*mutations):
    def mutate(cfg, tmp):
        for m in mutations:
            m(cfg, tmp)
    return mutate


def model_copy(change):
    """A copy of the embedded model in tmp/model, changed by change(folder), as model.id."""
    def mutate(cfg, tmp):
        folder = tmp / "model"
        shutil.copytree(MODEL, folder)
        change(folder)
        cfg["model"]["id"] = str(folder)
    return mutate


def data_file(name, content):
    def make(tmp):
        if content is not None:
            (tmp / name).write_text(content)
        return str(tmp / name)
    return make


def truncate(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])


def sharded_with_one_missing(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def pickle_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")


HOTCOLD = {"policy": "hotcold", "bits_high": 8, "bits_low": 2}
CATALOGUE = [  # (id, mutation, the one line expected)
    # issue 22, item 6: refused late before
    ("fast-engine-cpu-device", at("evaluate.engine", "fast"),
     r"^evaluate\.engine 'fast' with evaluate\.device 'cpu': the fast engine runs on CUDA only; allowed: "),
    ("fast-engine-float32", both(at("evaluate.engine", "fast"), at("evaluate.device", "auto")),
     r"^evaluate\.engine 'fast' with model\.dtype 'float32': the fast engine computes in bfloat16; allowed: "),
    ("hqq-group-48", both(at("quantization.method", "hqq"), at("quantization.group_size", 48)),
     r"^quantization\.group_size 48 with method 'hqq': does not divide the checkpoint's hidden_size 128; allowed: "
     r"a divisor of 128 and 64 \(16, 32, 64\), or -1 \(per channel\)$"),
    ("hqq-group-128", both(at("quantization.method", "hqq"), at("quantization.group_size", 128)),
     r"^quantization\.group_size 128 .* moe_intermediate_size 64; allowed"),
    ("budget-gb-inf", at("grid.3.precision", {**HOTCOLD, "memory_budget_gb": float("inf")}),
     r"^grid\[3\]\.precision\.memory_budget_gb: inf is not a finite number; allowed: finite numbers$"),
    ("budget-nan", at("grid.3.precision.memory_budget", float("nan")),
     r"^grid\[3\]\.precision\.memory_budget: nan is not a finite number"),
    ("capacity-factor-inf", at("grid.1.routing.capacity_factor", [float("inf")]),
     r"^grid\[1\]\.routing\.capacity_factor\[0\]: inf is not a finite number"),
    ("seed-2**64", at("seed", 2**64), r"^seed: 18446744073709551616 is greater than the maximum of 18446744073709551615$"),
    ("synthetic-seed-2**64", at("dataset.synthetic_seed", 2**64), r"^dataset\.synthetic_seed: 18446744073709551616 is greater"),
    ("tilde-data-path", at("dataset.source", "~/gsm8k.jsonl"),
     r"^dataset\.source '~/gsm8k\.jsonl': '~' is not expanded .*; allowed: an absolute or relative path, e\.g\. '/"),
    ("tilde-model-path", at("model.id", "~/models/qwen"), r"^model\.id '~/models/qwen': '~' is not expanded"),
    ("tilde-calibration", at("calibration.source", "~/c.jsonl"), r"^calibration\.source '~/c\.jsonl': '~'"),
    ("model-without-weights", model_copy(lambda d: (d / "model.safetensors").unlink()),
     r"^model\.id '.*/model': no weights in that directory; allowed: \*\.safetensors files$"),
    ("model-pickle-only", model_copy(pickle_only), r"no weights .* \(found pytorch_model\.bin: pickle weights are never loaded\)$"),
    ("config-json-corrupt", model_copy(lambda d: (d / "config.json").write_text('{"model_type": "qwen3_moe",')),
     r"^model\.id '.*': .*/model/config\.json is not valid JSON \(.*line 1.*\); allowed: the checkpoint's config\.json"),
    ("config-json-list", model_copy(lambda d: (d / "config.json").write_text("[1, 2]")),
     r"^model\.id '.*': .*/config\.json holds a JSON list; allowed: the checkpoint's config\.json, a JSON object$"),
    ("weights-truncated", model_copy(truncate),
     r"^model\.id '.*': weights file .*/model\.safetensors is unusable \(tensors need 3,8\d\d,\d+ bytes of data, the file "
     r"holds 3,8\d\d,\d+ \(truncated\?\)\); download it again$"),
    ("weights-header-garbage", model_copy(lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64)),
     r"weights file .*/model\.safetensors is unusable \(header length .* does not fit"),
    ("shard-missing", model_copy(sharded_with_one_missing),
     r"model-00002-of-00002\.safetensors \(named in model\.safetensors\.index\.json\) is missing"),
    ("grid-above-cap", at("grid.1.routing.capacity_factor", [0.1 * i for i in range(1, 2001)]),
     r"^grid: expands to 2,003 cells, above max_cells 1,000; allowed: at most max_cells cells"),
    ("grid-above-configured-cap", at("max_cells", 4), r"^grid: expands to 5 cells, above max_cells 4"),
    ("max-cells-zero", at("max_cells", 0), r"^max_cells: 0 is less than the minimum of 1$"),
    # schema violations, one line each
    ("unknown-key", at("evaluate.batch_sise", 4), r"^evaluate: Additional properties are not allowed \('batch_sise' was unexpected\)$"),
    ("wrong-type", at("evaluate.batch_size", "four"), r"^evaluate\.batch_size: 'four' is not of type 'integer'$"),
    ("cf-zero", at("grid.1.routing.capacity_factor", [0.0]), r"^grid\[1\]\.routing\.capacity_factor\[0\]: 0\.0 is less than or equal to the minimum of 0$"),
    ("width-5", at("quantization.bits", [8, 5]), r"^quantization\.bits\[1\]: 5 is not one of \[2, 3, 4, 8\]$"),
    ("uniform-16", at("grid.2.precision.bits", 16), r"^grid\[2\]\.precision\.bits: 16 is not one of \[2, 3, 4, 8\]$"),
    ("unknown-policy", at("grid.0.routing.policy", "top_k"), r"^grid\[0\]\.routing\.policy: 'top_k' is not one of \['native', 'topk', 'skip', 'top_p'\]$"),
    ("top-p-above-1", at("grid.0.routing", {"policy": "top_p", "top_p": 1.5}), r"^grid\[0\]\.routing\.top_p: 1\.5 is greater than the maximum of 1$"),
    ("alpha-1.5", at("grid.3.precision.alpha", 1.5), r"^grid\[3\]\.precision\.alpha: 1\.5 is greater than or equal to the maximum of 1$"),
    ("preset-unknown", at("prompt.preset", "gsm8k_5shot"), r"^prompt\.preset: 'gsm8k_5shot' is not one of"),
    ("device-gpu", at("profile.device", "gpu"), r"^profile\.device: 'gpu' does not match"),
    ("seed-negative", at("seed", -1), r"^seed: -1 is less than the minimum of 0$"),
    ("empty-grid", at("grid", []), r"^grid: \[\] should be non-empty$"),
    ("section-not-a-mapping", at("model", "tiny"), r"^model: 'tiny' is not of type 'object'$"),
    # refusals that existed before (grid meaning, files named)
    ("top-k-above-checkpoint", at("grid.1.routing.top_k", 8), r"top_k=8 exceeds the checkpoint's num_experts_per_tok=4; allowed: 1\.\.4$"),
    ("budget-below-feasible", at("grid.3.precision.memory_budget", 0.05), r"memory_budget 0\.05 is below the smallest feasible"),
    ("rate-limit-with-hotcold", at("grid.3.precision.rate_limit", 4), r"rate_limit not allowed with precision policy 'hotcold'"),
    ("duplicate-cell", at("grid.1", {"routing": {"policy": "native"}, "precision": {"policy": "full"}}), r"is already produced by"),
    ("model-missing", at("model.id", "/nonexistent/model"), r"^model\.id '/nonexistent/model': no such directory"),
    ("model-not-moe", model_copy(lambda d: (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))),
     r"model_type 'qwen3' is not a supported MoE family; supported: qwen3_moe"),
    ("tokenizer-missing", model_copy(lambda d: (d / "tokenizer.json").unlink()), r"tokenizer missing"),
    ("data-missing", at("dataset.source", "/nonexistent/gsm8k.jsonl"), r"^dataset\.source '/nonexistent/gsm8k\.jsonl': no such file$"),
    ("data-empty", at("dataset.source", data_file("e.jsonl", "")), r"^dataset\.source '.*e\.jsonl': the file is empty$"),
    ("data-suffix", at("dataset.source", data_file("d.csv", "q,a\n")), r"^dataset\.source '.*d\.csv': a local file must end in \.jsonl, \.json, \.parquet"),
    ("text-calibration-without-source", at("calibration.format", "text"), r"calibration"),
    ("unknown-hardware-profile", at("cost_model", {"profiles": ["tpu_v9"]}), r"tpu_v9"),
]


@pytest.mark.parametrize("mutation,message", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_catalogue(tmp_path, mutation, message):
    cfg = json.loads(json.dumps(BASE))
    mutation(cfg, tmp_path)
    start = time.perf_counter()
    with pytest.raises((ConfigError, CostModelError)) as err:
        dag_checks(cfg)
    assert time.perf_counter() - start < 1.0
    text = str(err.value)
    assert "\n" not in text, text
    assert re.search(message, text), text


def test_the_base_config_passes():
    dag_checks(json.loads(json.dumps(BASE)))


def test_fast_engine_without_cuda_refused_here_but_not_for_a_cluster():
    cfg = json.loads(json.dumps(BASE))
    cfg["model"]["dtype"] = "bfloat16"
    cfg["evaluate"].update(engine="fast", device="auto")
    cfg["grid"] = [g for g in cfg["grid"] if g["family"] != "static-hotcold"] + [
        {"routing": {"policy": "native"}, "precision": {"policy": "uniform", "bits": 3}}]
    with pytest.raises(ConfigError, match=r"^evaluate\.engine 'fast' with cell native-w3: width 3 bit; the fast engine serves 16/8/4/2"):
        check_all(cfg, SCHEMA, local_exec=False)
    cfg["grid"].pop()
    check_all(cfg, SCHEMA, local_exec=False)  # DAG on a login node, jobs on GPU nodes: not refused
    if cuda_device_count():
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(ConfigError, match=r"^evaluate\.engine 'fast' with evaluate\.device 'auto': no CUDA device is "
                                          r"visible on this machine, where the jobs would run; allowed: "):
        check_all(cfg, SCHEMA)


def test_fast_widths_are_the_engines():
    from moesweep.fast import FAST_BITS

    assert tuple(FAST_WIDTHS) == tuple(FAST_BITS)


def test_several_schema_violations_one_line_each(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["evaluate"]["batch_sise"] = 4
    cfg["grid"][0]["routing"] = {"policy": "top_p", "top_p": 1.5}
    with pytest.raises(ConfigError) as err:
        check_all(cfg, SCHEMA)
    assert str(err.value).splitlines() == [
        "evaluate: Additional properties are not allowed ('batch_sise' was unexpected)",
        "grid[0].routing.top_p: 1.5 is greater than the maximum of 1"]


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else 'x'}]\n" for i in range(9))
CONFIG_FILES = [  # (id, text appended to a valid config file, the one line expected)
    ("yte", '__use_yte__: true\nseed: ?__import__("pathlib").Path("PWNED").touch() or 1\n',
     r"key '__use_yte__' asks Snakemake to run the file as a YTE template \(Python code\)"),
    ("python-tag", "train: !!python/object/apply:os.system ['touch PWNED']\n", r"train has tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("duplicate-key", "seed: 2\n", r"key seed is given twice in one mapping \(line \d+\); give each key once"),
    ("alias-bomb", BOMB + "train: {x: *l8}\n", r"expands to .* values .* once its aliases are resolved; allowed: at most 100,000"),
]


@pytest.mark.parametrize("text,message", [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES])
def test_config_file_catalogue(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False) + text)
    start = time.perf_counter()
    with pytest.raises(ConfigFileError, match=message) as err:
        check_config_file(path)
    assert time.perf_counter() - start < 0.5 and "\n" not in str(err.value)


# ---- the same refusals through Snakemake itself: non-zero exit, the line on the terminal, nothing written

def snakemake_n(workdir: Path, config_text: str, *args: str) -> subprocess.CompletedProcess:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(config_text)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
           f"--configfile={workdir / 'config' / 'config.yaml'}", "--replace-workflow-config", "-n", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=120)


def _mutated(case_id: str, tmp: Path) -> str:
    cfg = json.loads(json.dumps(BASE))
    dict((c[0], c[1]) for c in CATALOGUE)[case_id](cfg, tmp)
    return yaml.safe_dump(cfg, sort_keys=False)


THROUGH_SNAKEMAKE = [  # (id, config text from a catalogue case or a config-file case, expected line)
    ("fast-engine-cpu-device", None, "invalid config: evaluate.engine 'fast' with evaluate.device 'cpu': the fast engine runs on CUDA only"),
    ("tilde-data-path", None, "invalid config: dataset.source '~/gsm8k.jsonl': '~' is not expanded"),
    ("weights-truncated", None, "(truncated?)); download it again"),
    ("budget-gb-inf", None, "invalid config: grid[3].precision.memory_budget_gb: inf is not a finite number"),
    ("unknown-key", None, "invalid config: evaluate: Additional properties are not allowed ('batch_sise' was unexpected)"),
    ("yte", CONFIG_FILES[0][1], "key '__use_yte__' asks Snakemake to run the file as a YTE template"),
    ("duplicate-key", CONFIG_FILES[2][1], "key seed is given twice in one mapping"),
]


@pytest.mark.parametrize("case_id,appended,line", THROUGH_SNAKEMAKE, ids=[c[0] for c in THROUGH_SNAKEMAKE])
def test_through_snakemake(tmp_path, case_id, appended, line):
    workdir = tmp_path / "run"
    workdir.mkdir()
    text = yaml.safe_dump(BASE, sort_keys=False) + appended if appended else _mutated(case_id, tmp_path)
    proc = snakemake_n(workdir, text)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and line in out, out[-3000:]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    # A --configfile file is loaded (its YTE template run) by Snakemake before the Snakefile: the run is refused,
    # but only `make run`, which checks the file first, keeps the template from running at all.
    if case_id == "yte":
        check = subprocess.run([sys.executable, "-m", "moesweep.configfile", str(workdir / "config" / "config.yaml")],
                               capture_output=True, text=True, cwd=tmp_path)
        assert check.returncode == 1 and line in check.stderr


def test_trust_remote_code_is_warned_on_the_terminal(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["model"]["trust_remote_code"] = True
    proc = snakemake_n(tmp_path, yaml.safe_dump(cfg, sort_keys=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: model.trust_remote_code is true: the jobs will run Python code shipped with" in proc.stdout + proc.stderr
