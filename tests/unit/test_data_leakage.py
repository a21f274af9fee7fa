"""Issue 19, item 1: no evaluated problem reaches calibration or profiling.

A local evaluation file without separate calibration/profile sources is refused at DAG time (check_config and a
real `snakemake -n`); with train sources set, the problems calibration, held-out and profiling read are compared
with the evaluated ones by content hash, and a train file that hides a test question is refused."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moesweep.checks import ConfigError, check_data_leakage
from moesweep.data.sources import (calibration_problems, evaluated_problems, profile_problems, question_key,
                                   problems_hash)
from moesweep.data.synthetic import generate_problems

REPO = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def gsm8k_files(tmp_path: Path, n_train=300, n_test=60) -> tuple[str, str]:
    """Real-format GSM8K files (question/answer, no ids, answer ending '#### N'), train and test disjoint."""
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n"
                                for p in generate_problems(split, n, 7)))
        paths.append(str(path))
    return paths[0], paths[1]


def local_config(test_file: str, **sections) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["dataset"] = {"source": test_file, "split": "test", "limit": None}
    for name, extra in sections.items():
        cfg[name] = {**cfg[name], **extra}
    return cfg


def test_local_test_file_without_sources_is_refused_naming_the_keys(tmp_path):
    _, test = gsm8k_files(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_data_leakage(local_config(test))
    message = str(err.value)
    assert "calibration.source and profile.source" in message and test in message
    assert "\n" not in message
    # one of the two set: the other one is still named
    with pytest.raises(ConfigError, match=r"so profile\.source cannot fall back"):
        check_data_leakage(local_config(test, calibration={"source": test.replace("test", "train")}))


def test_the_evaluated_file_named_as_a_source_is_refused(tmp_path):
    train, test = gsm8k_files(tmp_path)
    with pytest.raises(ConfigError, match=r"calibration\.source .* is the evaluated data"):
        check_data_leakage(local_config(test, calibration={"source": test}, profile={"source": train}))


def test_train_sources_give_zero_overlap(tmp_path):
    train, test = gsm8k_files(tmp_path)
    cfg = local_config(test, calibration={"source": train}, profile={"source": train})
    check_data_leakage(cfg)  # passes
    evaluated = {question_key(p) for p in evaluated_problems(cfg["dataset"], cfg["seed"])}
    calib = calibration_problems(cfg["dataset"], cfg["calibration"], cfg["seed"])
    prof = profile_problems(cfg["dataset"], cfg["profile"], cfg["seed"])
    assert len(evaluated) == 60 and len(calib) == 160 and len(prof) == 128
    assert evaluated.isdisjoint(question_key(p) for p in calib)
    assert evaluated.isdisjoint(question_key(p) for p in prof)


def test_default_synthetic_config_has_zero_overlap():
    check_data_leakage(DEFAULT)
    ds, seed = DEFAULT["dataset"], DEFAULT["seed"]
    evaluated = {question_key(p) for p in evaluated_problems(ds, seed)}
    assert evaluated.isdisjoint(question_key(p) for p in calibration_problems(ds, DEFAULT["calibration"], seed))
    assert evaluated.isdisjoint(question_key(p) for p in profile_problems(ds, DEFAULT["profile"], seed))


def test_a_test_question_hidden_in_the_train_file_is_found_by_content(tmp_path):
    train, test = gsm8k_files(tmp_path, n_train=40)
    leaked = json.loads(Path(test).read_text().splitlines()[5])
    # another id, other whitespace and case: still the same problem
    leaked = {"id": "train-copy", "question": "  " + leaked["question"].upper().replace(" ", "  "),
              "answer": leaked["answer"]}
    with open(train, "a") as f:
        f.write(json.dumps(leaked) + "\n")
    cfg = local_config(test, calibration={"source": train, "n_samples": 30, "n_heldout": 11},
                       profile={"source": train, "n_samples": 8})
    with pytest.raises(ConfigError, match=r"calibration \(incl\. held-out\): 1 of its 41 problems are evaluated "
                                          r"problems too \(train-copy = evaluated test-00005\)"):
        check_data_leakage(cfg)


def test_problems_hash_is_order_free_and_content_sensitive():
    problems = generate_problems("train", 5, 0)
    assert problems_hash(problems) == problems_hash(problems[::-1])
    changed = [dict(problems[0], answer=problems[0]["answer"] + " ")] + problems[1:]
    assert problems_hash(changed) != problems_hash(problems)


def test_snakemake_dry_run_refuses_a_local_test_file(tmp_path):
    _, test = gsm8k_files(tmp_path)
    cfg = local_config(test)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           f"--configfile={tmp_path / 'config' / 'config.yaml'}", "--replace-workflow-config",
                           "--cores", "1", "-n"], capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "set calibration.source and profile.source to a train file" in out
    assert not (tmp_path / "results").exists()
