"""The whole DAG on a micro config in a temporary directory, plus caching and rerun behaviour."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "resources" / "models" / "tiny-qwen3-moe"

MICRO = {
    "run": "micro",
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


def snakemake_cmd(workdir: Path, cores: int = 2) -> list[str]:
    """Snakemake on `workdir` with its config/config.yaml as the whole config (--replace-workflow-config: the
    shipped default is not merged under it); `--configfile=` so that targets after it stay targets."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            f"--configfile={workdir / 'config' / 'config.yaml'}", "--replace-workflow-config", "--cores", str(cores)]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*snakemake_cmd(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule → job count of a dry run (empty when nothing would run)."""
    out = snakemake(workdir, *args, "-n", "--quiet", "rules").stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("micro")
    write_config(workdir, MICRO)
    snakemake(workdir)
    return workdir


@pytest.mark.slow
def test_micro_sweep_writes_the_results_contract(micro_run):
    cells = pd.read_parquet(micro_run / "results/micro/summary/cells.parquet")
    contract = ["cell", "policy", "top_k", "capacity_factor", "bits_high", "bits_low", "memory_budget", "n",
                "accuracy_strict", "accuracy_flexible", "accuracy_ci_low", "accuracy_ci_high", "tokens_per_s",
                "ttft_ms", "tpot_ms", "drop_rate", "expert_weight_bytes", "batch_size", "max_new_tokens", "model",
                "dataset", "seed", "config_hash", "hardware", "torch_version", "transformers_version"]
    assert not set(contract) - set(cells.columns)
    from moesweep.results import table_schema

    assert cells.columns.tolist() == table_schema("cells").names  # the documented schema, in order
    assert sorted(cells["cell"]) == sorted(["native-w16", "top1-cf1-w16", "top1-w16", "native-w2", "native-hot8-cold2-b0.3"])
    assert (cells["n"] == 12).all()
    assert ((cells["accuracy_ci_low"] <= cells["accuracy_strict"]) & (cells["accuracy_strict"] <= cells["accuracy_ci_high"])).all()
    native = cells.set_index("cell").loc["native-w16"]
    assert native["accuracy_strict"] >= 0.5  # the embedded model solves most synthetic problems
    assert native["drop_rate"] == 0 and cells.set_index("cell").loc["top1-cf1-w16", "drop_rate"] > 0
    assert cells.set_index("cell").loc["native-w2", "expert_weight_bytes"] < native["expert_weight_bytes"] / 4
    problems = pd.read_parquet(micro_run / "results/micro/summary/problems.parquet")
    assert len(problems) == 5 * 12
    for col in ("problem_id", "gold", "prediction_strict", "prediction_flexible", "correct_strict", "completion"):
        assert col in problems.columns
    for col in ("prompt", "prompt_sha256", "prompt_tokens", "fewshot_ids"):  # what the model saw
        assert col in problems.columns
    assert (problems["prompt_tokens"] > 0).all()
    # issue 19: fixed-shape timing with spread, the headline cost, Holm over the non-reference cells
    assert (cells["fixed_repeats"] >= 3).all() and (cells["fixed_ms_per_step_min"] <= cells["fixed_ms_per_step"]).all()
    assert (cells["pareto_measure"] == "weight_bytes_per_token").all()
    by_cell = cells.set_index("cell")
    assert by_cell.loc["top1-w16", "weight_bytes_per_token"] < by_cell.loc["native-w16", "weight_bytes_per_token"]
    assert pd.isna(by_cell.loc["native-w16", "p_holm"]) and (cells["p_holm"].dropna() >= cells["p_vs_reference"][cells["p_holm"].notna()]).all()
    assert by_cell.loc["native-w2", "calibration_hash"] and by_cell.loc["native-hot8-cold2-b0.3", "profile_hash"]
    for fig in ("pareto", "throughput", "capacity_factor", "hotness", "quant_error", "precision_budget", "load_imbalance"):
        assert (micro_run / f"results/micro/figures/{fig}.png").stat().st_size > 10_000
    errors = pd.read_parquet(micro_run / "results/micro/quantization/error.parquet")
    med = errors.groupby("bits")["relative_error"].median()
    assert med[2] > med[8]


@pytest.mark.slow
def test_second_run_does_nothing_and_forcerun_reruns_downstream_only(micro_run):
    assert planned_jobs(micro_run) == {}
    forced = planned_jobs(micro_run, "--forcerun", "quantize")
    assert "calibrate" not in forced and "profile" not in forced
    assert forced["quantize"] == 2
    # only the cells that read quantized experts rerun, not native or top-1 ones
    assert forced["evaluate"] == 2 and forced["aggregate"] == 1


@pytest.mark.slow
def test_adding_a_capacity_factor_reruns_only_the_new_cell(micro_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(micro_run, workdir, symlinks=True)
    cfg = json.loads(json.dumps(MICRO))
    cfg["grid"][1]["routing"]["capacity_factor"] = [1.0, 2.0, None]
    write_config(workdir, cfg)
    jobs = planned_jobs(workdir)
    assert jobs.get("evaluate") == 1 and "calibrate" not in jobs and "quantize" not in jobs


def _bad(path: str, value):
    """MICRO with the value at a dotted path replaced (path parts that are digits index lists)."""
    cfg = json.loads(json.dumps(MICRO))
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return cfg


DELETE = object()
BAD_CONFIGS = [  # (path, value, words the one error message must contain)
    ("evaluate.batch_sise", 4, "batch_sise"),                       # unknown key
    ("evaluate.batch_size", "four", "batch_size"),                  # wrong type
    ("grid.1.routing.capacity_factor", [0.0], "capacity_factor"),   # CF ≤ 0
    ("quantization.bits", [8, 5], "bits"),                          # width not in {2, 3, 4, 8}
    ("grid.2.precision.bits", 16, "bits"),                          # uniform 16 is not a quantized width
    ("grid.0.routing.policy", "top_k", "policy"),                   # unknown policy name
    ("grid.1.routing.top_k", 8, "top_k=8 exceeds"),                 # k′ > k of the checkpoint
    ("grid.3.precision.memory_budget", 0.05, "below the smallest feasible"),
    ("grid", [], "grid"),                                           # empty grid
    ("grid.3.precision.alpha", 1.5, "alpha"),                        # α ∉ (0, 1)
    ("grid.3.precision.rate_limit", 4, "not allowed with precision policy 'hotcold'"),
    ("model.id", "/nonexistent/model", "no such directory"),
    ("dataset.source", "/nonexistent/gsm8k.jsonl", "no such file"),
    ("prompt.preset", "gsm8k_5shot", "preset"),
    ("profile.device", "gpu", "device"),                            # not auto | cpu | cuda | cuda:N
    ("seed", -1, "seed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,value,words", BAD_CONFIGS, ids=[b[0] + "=" + str(b[1]) for b in BAD_CONFIGS])
def test_bad_config_fails_before_any_job(tmp_path, path, value, words):
    write_config(tmp_path, _bad(path, value))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert words in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_bad_data_records_are_refused_before_any_job(tmp_path):
    """A local evaluation file is read when the DAG is built (to compare it with the calibration and profile
    problems by content hash), so a bad record stops the run there, naming the file and record."""
    from moesweep.data.synthetic import generate_problems

    data, train = tmp_path / "gsm.jsonl", tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "no final line"}) + "\n")
    train.write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n"
                             for p in generate_problems("train", 40, 0)))
    cfg = _bad("dataset.source", str(data))
    cfg["calibration"]["source"] = cfg["profile"]["source"] = str(train)
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "--until", "calibrate", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{data}: record 0 (id 'test-00000'): gold answer has no '#### N' line" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


# Evaluation-only settings: each must replan the cells and what aggregates them, never the expensive stages.
EVALUATION_ONLY = [
    ("dataset.limit", 13),
    ("model.name", "relabelled"),
    ("prompt.max_new_tokens", 97),
    ("prompt.preset", "lmeval_gsm8k"),
    ("prompt.chat_template", True),
    ("evaluate.batch_size", 5),
    ("evaluate.repeats", 2),
    ("evaluate.threads", 2),
    ("evaluate.engine", "reference"),
    ("evaluate.device", "auto"),
]
STAGE_RULES = {"calibrate", "quantize", "profile", "quantization_report", "plot_hotness"}


@pytest.fixture(scope="module")
def micro_copy(micro_run, tmp_path_factory):
    """The finished micro run, copied with Snakemake's metadata (its record of each output's params)."""
    copy = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(micro_run, copy, symlinks=True)
    return copy


@pytest.mark.slow
def test_finished_run_plans_nothing(micro_copy):
    assert planned_jobs(micro_copy) == {}


@pytest.mark.slow
@pytest.mark.parametrize("path,value", EVALUATION_ONLY, ids=[p for p, _ in EVALUATION_ONLY])
def test_evaluation_only_settings_replan_only_the_cells(micro_copy, path, value):
    cfg = json.loads(json.dumps(MICRO))
    section, key = path.split(".")
    cfg[section][key] = value
    write_config(micro_copy, cfg)
    try:
        jobs = planned_jobs(micro_copy)
    finally:
        write_config(micro_copy, MICRO)
    cells = len(list((micro_copy / "results/micro/cells").iterdir()))
    assert jobs.get("evaluate") == cells and "aggregate" in jobs, jobs
    assert not STAGE_RULES & set(jobs), jobs


@pytest.mark.slow
def test_calibration_settings_replan_the_stages(micro_copy):
    cfg = json.loads(json.dumps(MICRO))
    cfg["calibration"]["n_samples"] = 15
    write_config(micro_copy, cfg)
    try:
        jobs = planned_jobs(micro_copy)
    finally:
        write_config(micro_copy, MICRO)
    assert {"calibrate", "quantize"} <= set(jobs) and "profile" not in jobs, jobs


@pytest.mark.slow
def test_rerunning_one_cell_runs_only_that_cell(micro_run):
    assert planned_jobs(micro_run, "results/micro/cells/top1-w16/cell.json", "--force") == {"evaluate": 1}


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerun_finishes_only_the_rest(micro_run, tmp_path):
    import os
    import signal
    import time

    workdir = tmp_path / "killed"
    write_config(workdir, MICRO)
    # One core: one job in flight at the kill, so at most one finished-looking cell can be unrecorded.
    cmd = snakemake_cmd(workdir, cores=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells_dir = workdir / "results" / "micro" / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells_dir.glob("*/cell.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: Snakemake and its running jobs
    proc.wait()
    finished = {p.parent.name for p in cells_dir.glob("*/cell.json")}
    all_cells = {"native-w16", "top1-cf1-w16", "top1-w16", "native-w2", "native-hot8-cold2-b0.3"}
    assert 2 <= len(finished) < len(all_cells), "the kill did not land mid-grid"

    snakemake(workdir, "--unlock")
    first, second = snakemake(workdir), snakemake(workdir, "-n")
    rerun = first.stdout + first.stderr + second.stdout + second.stderr
    ran = set(re.findall(r"wildcards: cell=(\S+)", rerun))
    # Every unfinished cell ran again; at most the one whose output landed just before the kill (its job not
    # yet recorded as complete by Snakemake) is redone; no other finished cell is.
    assert all_cells - finished <= ran and len(ran & finished) <= 1

    cols = ["cell", "n", "accuracy_strict", "accuracy_flexible", "accuracy_ci_low", "accuracy_ci_high", "drop_rate"]
    resumed = pd.read_parquet(workdir / "results/micro/summary/cells.parquet")[cols].sort_values("cell", ignore_index=True)
    straight = pd.read_parquet(micro_run / "results/micro/summary/cells.parquet")[cols].sort_values("cell", ignore_index=True)
    pd.testing.assert_frame_equal(resumed, straight)
    by = ["cell", "problem_id"]
    p1 = pd.read_parquet(workdir / "results/micro/summary/problems.parquet").sort_values(by, ignore_index=True)
    p2 = pd.read_parquet(micro_run / "results/micro/summary/problems.parquet").sort_values(by, ignore_index=True)
    pd.testing.assert_series_equal(p1["completion"], p2["completion"])


@pytest.mark.slow
def test_corrupt_calibration_is_named_and_rebuilt(micro_run, tmp_path):
    workdir = tmp_path / "corrupt"
    shutil.copytree(micro_run, workdir, symlinks=True)
    hessians = workdir / "results/micro/calibration/hessians.safetensors"
    hessians.write_bytes(hessians.read_bytes()[: hessians.stat().st_size // 2])
    # Found when the DAG is built (content hash), before any job: no quantize job starts.
    failed = snakemake(workdir, "--forcerun", "quantize", check=False)
    assert failed.returncode != 0 and "invalid cache: " in failed.stdout + failed.stderr
    assert "rule quantize:" not in failed.stdout + failed.stderr
    rebuild = "snakemake --forcerun results/micro/calibration/hessians.safetensors"
    assert "results/micro/calibration/hessians.safetensors: content hash mismatch" in failed.stdout + failed.stderr
    assert rebuild in failed.stdout + failed.stderr
    snakemake(workdir, *rebuild.split()[1:])  # the rebuild the message names
    assert planned_jobs(workdir) == {}
    rebuilt = pd.read_parquet(workdir / "results/micro/summary/cells.parquet").sort_values("cell", ignore_index=True)
    original = pd.read_parquet(micro_run / "results/micro/summary/cells.parquet").sort_values("cell", ignore_index=True)
    pd.testing.assert_series_equal(rebuilt["accuracy_strict"], original["accuracy_strict"])


def test_directory_option_plans_the_shipped_config(tmp_path):
    """--directory: the default config is found from the Snakefile, and its relative paths (the embedded model,
    the cost model's target) from the repository when the working directory lacks them."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "results/tiny-qwen3-moe_synthetic_zeroshot/summary/cells.parquet" in proc.stdout


def test_configfile_that_swallowed_a_target_is_named(tmp_path):
    """`--configfile a.yaml <cell.json target>`: argparse reads the target as a config file, and a cell.json
    parses as one; refused with the fix. (A target that does not parse as a mapping, e.g. a .parquet, is refused
    by Snakemake itself before the Snakefile, with its own message.)"""
    write_config(tmp_path, MICRO)
    target = "results/micro/cells/native-w16/cell.json"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
           "--configfile", str(tmp_path / "config" / "config.yaml"), target]
    (tmp_path / target).parent.mkdir(parents=True)
    (tmp_path / target).write_text(json.dumps({"cell": "native-w16", "n": 12}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "did --configfile swallow a target? Write --configfile=PATH" in proc.stdout + proc.stderr
