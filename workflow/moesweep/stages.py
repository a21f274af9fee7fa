"""Stage entry points called by the workflow scripts: calibrate, quantize, profile.

Each takes plain config sections and paths, does one stage's work through the library, and writes its
artefacts atomically with metadata naming the model and the config hash that produced them.
"""
from __future__ import annotations

import logging

import pandas as pd
import torch

from . import io
from .calibrate import collect_calibration, profile_hotness
from .data.sources import load_split, training_text
from .grid import config_hash
from .model import load_model, model_fingerprint

log = logging.getLogger(__name__)
CALIBRATION_FORMAT = "moesweep-calibration"
CALIBRATION_VERSION = "1"


def _load(model_cfg: dict, device: str = "cpu"):
    return load_model(model_cfg["id"], model_cfg.get("dtype", "float32"), device, model_cfg.get("revision"),
                      model_cfg.get("trust_remote_code", False))


def calibrate_stage(model_cfg: dict, dataset_cfg: dict, calib_cfg: dict, seed: int, out_hessians: str,
                    out_heldout: str, out_stats: str, progress=None) -> None:
    torch.manual_seed(seed)
    n, n_ho = calib_cfg["n_samples"], calib_cfg["n_heldout"]
    source = {**dataset_cfg, "source": calib_cfg.get("source") or dataset_cfg["source"],
              "config_name": calib_cfg.get("config_name") or dataset_cfg.get("config_name", "main")}
    # bad data fails here, before the model loads
    problems = load_split(source, calib_cfg.get("split", "train"), n + n_ho, seed, "calibration")
    model, tokenizer, adapter = _load(model_cfg)
    texts = [training_text(p) for p in problems]
    meta = {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION,
            "config_hash": config_hash(model_cfg, dataset_cfg, calib_cfg, seed), **{k: str(v) for k, v in model_fingerprint(model_cfg["id"]).items()}}
    results = {}
    for part, sub, out in (("calibration", texts[:n], out_hessians), ("heldout", texts[n:], out_heldout)):
        res = results[part] = collect_calibration(model, tokenizer, adapter, sub, calib_cfg["max_length"],
                                  calib_cfg.get("batch_size", 8), progress=progress,
                                  expert_inputs=calib_cfg.get("expert_inputs", "routed"))
        log.info("%s: %d tokens through %d layers", part, res.tokens, len(res.token_counts))
        tensors = {f"hessian.{k}": v for k, v in res.hessians.items()}
        tensors.update({f"tokens.{k}": v for k, v in res.token_counts.items()})
        io.save_safetensors(out, tensors, {**meta, "part": part, "tokens": str(res.tokens), "samples": str(len(sub))})
    cal = results["calibration"]
    io.write_json(out_stats, {"skip_beta": {str(k): v for k, v in cal.skip_beta.items()}, "tokens": cal.tokens,
                              "samples": n, "config_hash": meta["config_hash"]})


def read_calibration(path: str, model_id: str) -> tuple[dict, dict, dict]:
    """(hessians by 'layers.i.proj', token counts by 'layers.i', metadata); refuses another model's file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated / garbage files
        raise io.ArtefactError(f"{path}: unreadable calibration file ({err}); rerun the calibrate stage "
                               f"(snakemake --forcerun calibrate)") from None
    if meta.get("format") != CALIBRATION_FORMAT or meta.get("format_version") != CALIBRATION_VERSION:
        raise io.ArtefactError(f"{path}: not a moesweep calibration file of format version {CALIBRATION_VERSION}; "
                               f"rerun the calibrate stage")
    if meta.get("model_id") != str(model_id):
        raise io.ArtefactError(f"{path}: made for model {meta.get('model_id')!r}, not {model_id!r}; rerun the calibrate stage")
    hess = {k[len("hessian."):]: v for k, v in tensors.items() if k.startswith("hessian.")}
    counts = {k[len("tokens."):]: v for k, v in tensors.items() if k.startswith("tokens.")}
    return hess, counts, meta


def _relative_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per expert ||X ΔWᵀ||_F / ||X Wᵀ||_F, computed from the held-out H = XᵀX as tr(ΔW H ΔWᵀ)."""
    num = torch.einsum("eoi,eij,eoj->e", delta.double(), hessian.double(), delta.double())
    den = torch.einsum("eoi,eij,eoj->e", weight.double(), hessian.double(), weight.double())
    return (num.clamp_min(0) / den.clamp_min(1e-30)).sqrt().float()


def quantize_stage(model_cfg: dict, quant_cfg: dict, bits: int, method: str, hessians_path: str,
                   heldout_path: str, out_weights: str, out_error: str) -> None:
    from .quant import QuantSpec, dequantize, expert_nbytes, quantize_experts, save_quantized

    model, _, adapter = _load(model_cfg)
    hess, counts, cal_meta = read_calibration(hessians_path, model_cfg["id"])
    hess_ho, counts_ho, _ = read_calibration(heldout_path, model_cfg["id"])
    spec = QuantSpec(bits=bits, group_size=quant_cfg["group_size"], symmetric=quant_cfg.get("symmetric", False),
                     method=method, damp=quant_cfg.get("damp", 0.01), min_tokens=quant_cfg.get("min_tokens", 0))
    quantized, rows = {}, []
    for layer in adapter.layers():  # one layer at a time: peak memory = one layer's experts + Hessians
        for name in adapter.projections:
            key = f"layers.{layer.index}.{name}"
            weight = getattr(layer.experts, name).detach().float()
            q = quantize_experts(weight, hess[key], counts[f"layers.{layer.index}"], spec)
            quantized[key] = q
            err = _relative_error(dequantize(q) - weight, weight, hess_ho[key])
            nbytes = expert_nbytes(q)
            for e in range(weight.shape[0]):
                rows.append({"layer": layer.index, "expert": e, "projection": name, "method": method, "bits": bits,
                             "group_size": spec.group_size, "relative_error": float(err[e]),
                             "calibration_tokens": int(counts[f"layers.{layer.index}"][e]),
                             "heldout_tokens": int(counts_ho[f"layers.{layer.index}"][e]),
                             "fallback": bool(q.fallback[e]), "bytes": int(nbytes[e])})
        log.info("layer %d quantized to %d bits", layer.index, bits)
    meta = {"model_id": str(model_cfg["id"]), "calibration_config_hash": cal_meta.get("config_hash", ""),
            "config_hash": config_hash(model_cfg, quant_cfg, bits, method)}
    save_quantized(out_weights, quantized, meta)
    io.write_parquet(out_error, pd.DataFrame(rows))


def profile_stage(model_cfg: dict, dataset_cfg: dict, profile_cfg: dict, seed: int, out: str) -> None:
    torch.manual_seed(seed)
    problems = load_split(dataset_cfg, "train", profile_cfg["n_samples"], seed, "profile")
    model, tokenizer, adapter = _load(model_cfg)
    rows = profile_hotness(model, tokenizer, adapter, [training_text(p) for p in problems], profile_cfg["max_length"],
                           profile_cfg.get("batch_size", 8))
    df = pd.DataFrame(rows)
    df["config_hash"] = config_hash(model_cfg, dataset_cfg, profile_cfg, seed)
    io.write_parquet(out, df)
