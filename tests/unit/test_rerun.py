"""Reruns repair: a deleted cell folder is recomputed, and a corrupt cached artefact stops the next run (even one
with nothing to do) naming the command that rebuilds it; that command then runs.

A finished sweep is stood in for by sealed placeholder files at every output path of the DAG, written upstream
first (mtimes in DAG order) and judged by `--rerun-triggers mtime`: Snakemake's decisions, without the minutes of
a real run on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moesweep import io

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "run": "r",
    "seed": 1,
    "model": {"id": str(REPO / "resources/models/tiny-qwen3-moe"), "name": "tiny", "dtype": "float32"},
    "dataset": {"source": "synthetic", "split": "test", "limit": 4},
    "prompt": {"preset": "zeroshot", "max_new_tokens": 8},
    "evaluate": {"batch_size": 4, "device": "cpu", "repeats": 1, "threads": 1},
    "calibration": {"n_samples": 4, "n_heldout": 2, "max_length": 32, "batch_size": 4},
    "quantization": {"method": "rtn", "bits": [8], "group_size": 32, "min_tokens": 1},
    "profile": {"n_samples": 4, "max_length": 32, "batch_size": 4},
    "grid": [{"routing": {"policy": "native"}, "precision": {"policy": "full"}},
             {"routing": {"policy": "topk", "top_k": 1}, "precision": {"policy": "full"}}],
}
STAGE_ORDER = ("results/r/calibration", "results/r/quantization/rtn", "results/r/profile", "results/r/cells",
               "results/r/summary", "results/r/quantization/error", "results/r/figures")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
           f"--configfile={workdir / 'config' / 'config.yaml'}", "--replace-workflow-config",
           "--rerun-triggers", "mtime", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def planned(workdir: Path, *args: str) -> dict[str, int]:
    proc = snakemake(workdir, "-n", "--quiet", "rules", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


def placeholder(path: Path) -> None:
    if path.suffix == ".json":
        io.write_json(path, {"cell": path.parent.name, "n": 4})
    elif path.suffix == ".parquet":
        io.write_parquet(path, pd.DataFrame({"a": [1, 2, 3]}))
    elif path.suffix == ".safetensors":
        io.save_safetensors(path, {"t": torch.zeros(16)}, {})
    else:
        io.write_text(path, "placeholder\n")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workdir whose every output exists and is up to date by mtime."""
    workdir = tmp_path_factory.mktemp("finished")
    (workdir / "config").mkdir()
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    proc = snakemake(workdir, "--summary")
    outputs = [line.split("\t")[0] for line in proc.stdout.splitlines()[1:] if line.startswith("results/")]
    assert len(outputs) > 20, proc.stdout + proc.stderr
    base = max(p.stat().st_mtime for p in Path(CONFIG["model"]["id"]).iterdir()) + 1  # newer than the model
    for out in outputs:
        placeholder(workdir / out)
        rank = next(i for i, prefix in enumerate(STAGE_ORDER) if out.startswith(prefix))
        t = base + rank
        os.utime(workdir / out, (t, t))
    assert planned(workdir) == {}
    return workdir


def copy(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)  # copy2: the mtimes come along
    return workdir


def test_a_deleted_cell_folder_is_recomputed(finished, tmp_path):
    workdir = copy(finished, tmp_path)
    shutil.rmtree(workdir / "results/r/cells/top1-w16")
    assert planned(workdir) == {"evaluate": 1, "aggregate": 1, "plot_trade_off": 1, "all": 1}


def test_a_corrupt_artefact_stops_the_next_run_until_the_named_command_rebuilds_it(finished, tmp_path):
    workdir = copy(finished, tmp_path)
    hotness = workdir / "results/r/profile/hotness.parquet"
    st = hotness.stat()
    data = bytearray(hotness.read_bytes())
    data[len(data) // 3] ^= 0x01
    hotness.write_bytes(bytes(data))
    os.utime(hotness, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    proc = snakemake(workdir, "-n")
    assert proc.returncode != 0
    assert ("invalid cache: results/r/profile/hotness.parquet: content hash mismatch" in proc.stdout + proc.stderr
            and "rebuild it and what used it: snakemake --forcerun results/r/profile/hotness.parquet" in proc.stdout + proc.stderr)
    assert planned(workdir, "--forcerun", "results/r/profile/hotness.parquet") == {"profile": 1, "plot_hotness": 1, "all": 1}
    assert planned(workdir, "--forcerun", "profile") == {"profile": 1, "plot_hotness": 1, "all": 1}


def test_verification_is_cached_by_stat_and_redone_after_any_write(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    io.write_parquet(path, pd.DataFrame({"a": range(10)}))
    calls = []
    digest = io._digest
    monkeypatch.setattr(io, "_digest", lambda p, at: calls.append(p) or digest(p, at))
    cache = tmp_path / "verified.json"
    io.verify_cached({str(path): "rebuild"}, cache)
    io.verify_cached({str(path): "rebuild"}, cache)
    assert len(calls) == 1
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves
    with pytest.raises(io.ArtefactError, match=f"{path}: content hash mismatch .*; rebuild$"):
        io.verify_cached({str(path): "rebuild"}, cache)
    io.verify_cached({str(tmp_path / "absent.parquet"): "rebuild"}, cache)  # missing: Snakemake's business
