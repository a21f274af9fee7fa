"""Cached artefacts: corrupted, truncated or foreign files fail with a message naming them and the rebuild;
evaluation is deterministic on CPU."""
import json

import pandas as pd
import pytest

from moesweep.evaluate import evaluate_cell, load_quantized_tiers, read_hotness
from moesweep.grid import expand_grid
from moesweep.io import ArtefactError
from moesweep.results import aggregate
from moesweep.stages import calibrate_stage, quantize_stage, read_calibration

DATASET = {"source": "synthetic", "split": "test", "limit": 4}
CALIB = {"n_samples": 4, "n_heldout": 2, "max_length": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def calibration(random_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    model = {"id": str(random_checkpoint)}
    calibrate_stage(model, DATASET, CALIB, 0, d / "h.safetensors", d / "ho.safetensors", d / "stats.json")
    return d


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_calibration_names_file_and_rebuild(calibration, random_checkpoint, tmp_path):
    bad = tmp_path / "h.safetensors"
    bad.write_bytes((calibration / "h.safetensors").read_bytes())
    truncate(bad)
    with pytest.raises(ArtefactError, match=rf"{bad}: content hash mismatch .* rerun the calibrate stage \(snakemake --forcerun calibrate\)"):
        read_calibration(str(bad), str(random_checkpoint))


def test_calibration_of_another_model_is_refused(calibration):
    with pytest.raises(ArtefactError, match="made for model .* rerun the calibrate stage"):
        read_calibration(str(calibration / "h.safetensors"), "Qwen/Qwen3-30B-A3B")


def test_quantized_file_truncated_or_foreign(calibration, random_checkpoint, tmp_path):
    model = {"id": str(random_checkpoint)}
    q = tmp_path / "w2.safetensors"
    quantize_stage(model, {"group_size": 32, "min_tokens": 1}, 2, "gptq", str(calibration / "h.safetensors"),
                   str(calibration / "ho.safetensors"), str(q), str(tmp_path / "err.parquet"))
    tiers, metas = load_quantized_tiers({2: str(q)}, str(random_checkpoint))
    assert tiers[2] and metas[0]["calibration_hash"]  # the calibration data's provenance travels with the weights
    with pytest.raises(ArtefactError, match="rerun the quantize stage"):
        load_quantized_tiers({2: str(q)}, "some/other-model")
    truncate(q)
    with pytest.raises(ArtefactError, match=f"{q}"):
        load_quantized_tiers({2: str(q)}, str(random_checkpoint))


def test_hotness_table_corrupt_or_for_another_model(tmp_path):
    path = tmp_path / "hotness.parquet"
    pd.DataFrame({"layer": [0] * 4, "expert": range(4), "hotness_rank": [2, 0, 1, 3],
                  "prob_share": [0.2, 0.4, 0.3, 0.1]}).to_parquet(path)
    order, shares = read_hotness(str(path), 4)
    assert order == {0: [1, 2, 0, 3]} and shares[0].tolist() == [0.2, 0.4, 0.3, 0.1]
    with pytest.raises(ArtefactError, match="does not rank 8 experts .* --forcerun profile"):
        read_hotness(str(path), 8)
    truncate(path)
    with pytest.raises(ArtefactError, match="unreadable hotness table"):
        read_hotness(str(path), 4)


def test_corrupt_cell_output_names_the_cell_to_rebuild(tmp_path):
    cell_dir = tmp_path / "results/cells/top1-w16"
    cell_dir.mkdir(parents=True)
    (cell_dir / "cell.json").write_text('{"cell": "top1-w16", "n": ')
    with pytest.raises(ArtefactError, match=r"cell.json: not valid JSON .*results/cells/top1-w16/cell.json --force"):
        aggregate([str(cell_dir / "cell.json")], [], [], *(str(tmp_path / f) for f in ("a", "b", "c", "d")))


def test_two_runs_give_identical_completions(random_checkpoint, tmp_path):
    cell = expand_grid([{"routing": {"policy": "topk", "top_k": 2, "capacity_factor": 1.0}, "precision": {"policy": "full"}}])[0]
    settings = {"seed": 5, "model": {"id": str(random_checkpoint)}, "dataset": DATASET,
                "prompt": {"preset": "zeroshot", "max_new_tokens": 12}, "evaluate": {"batch_size": 3, "device": "cpu"}}
    tables = []
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        evaluate_cell(cell.to_dict(), settings, {}, None, None, d / "cell.json", d / "p.parquet", d / "l.parquet", d / "t.parquet")
        tables.append(pd.read_parquet(d / "p.parquet"))
        summary = json.loads((d / "cell.json").read_text())
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert summary["config_hash"]
