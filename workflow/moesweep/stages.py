"""Stage entry points called by the workflow scripts: calibrate, quantize (or both fused), profile.

All three run layer by layer from the checkpoint's safetensors shards (layerwise.py); none loads the model.

Each takes plain config sections and paths, does one stage's work through the library, and writes its
artefacts atomically with metadata naming the model and the config hash that produced them.
"""
from __future__ import annotations

import logging

import pandas as pd
import torch

from . import io
from .calibrate import _batches, collect_calibration_layerwise, profile_hotness_layerwise
from .data.sources import (CALIBRATION_FORMATS, SYNTHETIC, assert_disjoint, calibration_problems, evaluation_split,
                           leakage_error, problems_hash, profile_problems, stage_dataset, text_chunks, texts_hash,
                           training_text)
from .grid import config_hash
from .model import load_tokenizer, model_fingerprint, resolve_device

log = logging.getLogger(__name__)
CALIBRATION_FORMAT = "moesweep-calibration"
CALIBRATION_VERSION = "1"
PROVENANCE_KEYS = ("calibration_source", "calibration_hash")  # in calibration, quantized and routing-stats files


def _skeleton(model_cfg: dict):
    from .layerwise import skeleton

    return skeleton(model_cfg["id"], model_cfg.get("dtype", "float32"), model_cfg.get("revision"),
                    model_cfg.get("trust_remote_code", False))


def _tokenizer(model_cfg: dict):
    return load_tokenizer(model_cfg["id"], model_cfg.get("revision"), model_cfg.get("trust_remote_code", False))


def calibration_samples(dataset_cfg: dict, calib_cfg: dict, seed: int, tokenizer) -> tuple[list, dict]:
    """(samples, provenance): n_samples + n_heldout samples, problem texts (strings) or, with calibration.format:
    text, token-id chunks of exactly max_length tokens; provenance = {"calibration_source", "calibration_hash"}.
    Bad data, or problems that are also evaluated (by content hash), fail here, before any weight is read."""
    n, n_ho = calib_cfg["n_samples"], calib_cfg["n_heldout"]
    fmt = calib_cfg.get("format", "problems")
    if fmt not in CALIBRATION_FORMATS:
        raise ValueError(f"calibration.format must be one of {', '.join(CALIBRATION_FORMATS)}, got {fmt!r}")
    if fmt == "text":
        source = calib_cfg.get("source")
        if not source or source == SYNTHETIC:
            raise ValueError("calibration.format 'text' needs calibration.source: a hub id or a local "
                             ".txt/.jsonl/.json/.parquet file (the synthetic source has no plain text)")
        chunks = text_chunks(source, calib_cfg.get("config_name"), calib_cfg.get("split", "train"),
                             calib_cfg.get("text_field", "text"), tokenizer, n + n_ho, calib_cfg["max_length"], seed)
        return chunks, {"calibration_source": f"{source} [{calib_cfg.get('split', 'train')}, text]",
                        "calibration_hash": texts_hash(chunks)}
    _refuse_leakage(dataset_cfg, calib_cfg, None)
    problems = calibration_problems(dataset_cfg, calib_cfg, seed)
    assert_disjoint(evaluation_split(dataset_cfg, seed), {"calibration (incl. held-out)": problems})
    src = stage_dataset(dataset_cfg, calib_cfg)["source"]
    return [training_text(p) for p in problems], {
        "calibration_source": f"{src} [{calib_cfg.get('split', 'train')}]", "calibration_hash": problems_hash(problems)}


def _refuse_leakage(dataset_cfg: dict, calib_cfg: dict | None, profile_cfg: dict | None) -> None:
    """The DAG-time refusal (checks.check_data_leakage), repeated for a stage called from Python."""
    why = leakage_error(dataset_cfg, calib_cfg or {"source": "-"}, profile_cfg or {"source": "-"})
    if why:
        raise ValueError(why)


def _calibration_meta(model_cfg, dataset_cfg, calib_cfg, seed, provenance: dict) -> dict:
    return {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION,
            "config_hash": config_hash(model_cfg, dataset_cfg, calib_cfg, seed), **provenance,
            **{k: str(v) for k, v in model_fingerprint(model_cfg["id"]).items()}}


def _layerwise_runners(model_cfg, calib_cfg, samples, tokenizer, device):
    """(skeleton adapter, {"calibration": LayerwiseModel, "heldout": LayerwiseModel}) sharing one skeleton."""
    from .layerwise import LayerwiseModel

    ckpt, model, adapter, dtype = _skeleton(model_cfg)
    n = calib_cfg["n_samples"]
    bs, max_length = calib_cfg.get("batch_size", 8), calib_cfg["max_length"]
    runners = {part: LayerwiseModel(ckpt, model, adapter, dtype, _batches(tokenizer, sub, max_length, bs, "cpu"), device)
               for part, sub in (("calibration", samples[:n]), ("heldout", samples[n:]))}
    return ckpt, adapter, dtype, runners


def calibrate_stage(model_cfg: dict, dataset_cfg: dict, calib_cfg: dict, seed: int, out_hessians: str,
                    out_heldout: str, out_stats: str, progress=None) -> None:
    """Per-expert Hessians of the calibration and held-out sets, layer by layer (layerwise.py): the model is
    never loaded whole; the Hessians of all layers are kept until written (for Qwen3-30B-A3B that is
    2 x 118 GB: use quantization.fused there, which never stores them)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(model_cfg)
    samples, provenance = calibration_samples(dataset_cfg, calib_cfg, seed, tokenizer)
    device = resolve_device(calib_cfg.get("device", "cpu"), "calibration.device")
    _, adapter, _, runners = _layerwise_runners(model_cfg, calib_cfg, samples, tokenizer, device)
    results = collect_calibration_layerwise(runners, adapter, calib_cfg.get("expert_inputs", "routed"),
                                            progress=progress)
    meta = _calibration_meta(model_cfg, dataset_cfg, calib_cfg, seed, provenance)
    n = calib_cfg["n_samples"]
    for part, out, count in (("calibration", out_hessians, n), ("heldout", out_heldout, len(samples) - n)):
        res = results[part]
        log.info("%s: %d tokens through %d layers", part, res.tokens, len(res.token_counts))
        tensors = {f"hessian.{k}": v for k, v in res.hessians.items()}
        tensors.update({f"tokens.{k}": v for k, v in res.token_counts.items()})
        io.save_safetensors(out, tensors, {**meta, "part": part, "tokens": str(res.tokens), "samples": str(count)})
    _write_stats(out_stats, results["calibration"], n, meta["config_hash"], provenance)


def _write_stats(path, cal, n, chash, provenance: dict):
    io.write_json(path, {"skip_beta": {str(k): v for k, v in sorted(cal.skip_beta.items())}, "tokens": cal.tokens,
                         "samples": n, "config_hash": chash, **provenance})


class CalibrationReader:
    """Lazy reader of a calibration file: metadata checked on opening, each layer's tensors read on demand
    (so the quantize stage holds one layer's Hessians, not the file)."""

    def __init__(self, path: str, model_id: str):
        from safetensors import safe_open

        self.path = str(path)
        io.verify(self.path, "rerun the calibrate stage (snakemake --forcerun calibrate)")
        try:
            with safe_open(self.path, framework="pt") as f:
                self.meta = f.metadata() or {}
                self.keys = set(f.keys())
        except Exception as err:  # safetensors raises several types for truncated / garbage files
            raise io.ArtefactError(f"{path}: unreadable calibration file ({err}); rerun the calibrate stage "
                                   f"(snakemake --forcerun calibrate)") from None
        if self.meta.get("format") != CALIBRATION_FORMAT or self.meta.get("format_version") != CALIBRATION_VERSION:
            raise io.ArtefactError(f"{path}: not a moesweep calibration file of format version "
                                   f"{CALIBRATION_VERSION}; rerun the calibrate stage")
        if self.meta.get("model_id") != str(model_id):
            raise io.ArtefactError(f"{path}: made for model {self.meta.get('model_id')!r}, not {model_id!r}; "
                                   f"rerun the calibrate stage")

    def _get(self, names: list[str]) -> list[torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.keys]
        if missing:
            raise io.ArtefactError(f"{self.path}: no tensor {missing[0]!r} (calibrated for another model?); "
                                   f"rerun the calibrate stage")
        try:
            with safe_open(self.path, framework="pt") as f:
                return [f.get_tensor(n) for n in names]
        except Exception as err:
            raise io.ArtefactError(f"{self.path}: unreadable calibration file ({err}); rerun the calibrate stage "
                                   f"(snakemake --forcerun calibrate)") from None

    def layer(self, index: int, projections) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({proj: Hessian [E, d, d]}, token counts [E]) of one layer."""
        *hess, counts = self._get([f"hessian.layers.{index}.{p}" for p in projections] + [f"tokens.layers.{index}"])
        return dict(zip(projections, hess)), counts


def read_calibration(path: str, model_id: str) -> tuple[dict, dict, dict]:
    """(hessians by 'layers.i.proj', token counts by 'layers.i', metadata); refuses another model's file."""
    reader = CalibrationReader(path, model_id)
    names = sorted(reader.keys)
    tensors = dict(zip(names, reader._get(names)))
    hess = {k[len("hessian."):]: v for k, v in tensors.items() if k.startswith("hessian.")}
    counts = {k[len("tokens."):]: v for k, v in tensors.items() if k.startswith("tokens.")}
    return hess, counts, reader.meta


def _output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per expert ||X Wᵀ||_F² = tr(W H Wᵀ) from the held-out H = XᵀX (float64)."""
    return torch.einsum("eoi,eij,eoj->e", weight.double(), hessian.double(), weight.double())


def _relative_error(delta: torch.Tensor, hessian: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Per expert ||X ΔWᵀ||_F / ||X Wᵀ||_F, with energy = _output_energy(W, H): it does not depend on the width, so
    it is computed once for all widths measured (it is half of the cost)."""
    return (_output_energy(delta, hessian).clamp_min(0) / energy.clamp_min(1e-30)).sqrt().float()


def _spec(quant_cfg: dict, bits: int, method: str):
    from .quant import QuantSpec

    return QuantSpec(bits=bits, group_size=quant_cfg["group_size"], symmetric=quant_cfg.get("symmetric", False),
                     method=method, damp=quant_cfg.get("damp", 0.01), min_tokens=quant_cfg.get("min_tokens", 0))


def _error_rows(layer: int, name: str, weight, q, counts, counts_ho, hess_ho, energy) -> list[dict]:
    """Rows of the error table for one projection; the error is computed where the weight lies (hess_ho and
    energy = _output_energy(weight, hess_ho) are there already)."""
    from .quant import dequantize, expert_nbytes

    err = _relative_error(dequantize(q).to(weight.device) - weight, hess_ho, energy).cpu()
    nbytes = expert_nbytes(q)
    spec = q.spec
    return [{"layer": layer, "expert": e, "projection": name, "method": spec.method, "bits": spec.bits,
             "group_size": spec.group_size, "relative_error": float(err[e]),
             "calibration_tokens": int(counts[e]), "heldout_tokens": int(counts_ho[e]),
             "fallback": bool(q.fallback[e]), "bytes": int(nbytes[e])} for e in range(weight.shape[0])]


EXPERT_CHUNK = 16  # experts quantized together: bounds the float32 temporaries at real shapes (a whole
# Qwen3-30B-A3B gate_up_proj [128, 1536, 2048] needs ~10 GB of them for RTN alone); every method treats
# experts independently, so the chunking does not change a number.


def _quantize_projection(layer: int, name: str, weight, hessian, counts, counts_ho, hess_ho, specs):
    """[(QuantizedExperts, error rows)] per spec for one projection, EXPERT_CHUNK experts at a time."""
    from .quant import QuantizedExperts, quantize_all_widths

    gptq = specs[0].method == "gptq"
    parts = [[] for _ in specs]
    E = weight.shape[0]
    for e0 in range(0, E, EXPERT_CHUNK):
        sl = slice(e0, min(e0 + EXPERT_CHUNK, E))
        qs = quantize_all_widths(weight[sl], hessian[sl] if gptq else None, counts[sl] if gptq else None, specs)
        hess_held_out = hess_ho[sl].to(weight.device)  # moved once, not once per width
        energy = _output_energy(weight[sl], hess_held_out)  # shared by the widths
        for i, q in enumerate(qs):
            rows = _error_rows(layer, name, weight[sl], q, counts[sl], counts_ho[sl], hess_held_out, energy)
            for r in rows:
                r["expert"] += e0
            parts[i].append((q, rows))
    out = []
    for spec, chunks in zip(specs, parts):
        qs = [q for q, _ in chunks]
        zeros = torch.cat([q.zeros for q in qs]) if qs[0].zeros.numel() else qs[0].zeros
        merged = QuantizedExperts(torch.cat([q.codes for q in qs]), torch.cat([q.scales for q in qs]), zeros,
                                  tuple(weight.shape), spec, torch.cat([q.fallback for q in qs]))
        out.append((merged, [r for _, rows in chunks for r in rows]))
    return out


def _expert_shapes(adapter) -> dict[str, tuple[int, int, int]]:
    return {f"layers.{l.index}.{name}": tuple(getattr(l.experts, name).shape)
            for l in adapter.layers() for name in adapter.projections}


def quantize_stage(model_cfg: dict, quant_cfg: dict, bits: int, method: str, hessians_path: str,
                   heldout_path: str, out_weights: str, out_error: str) -> None:
    """One width of every expert, layer by layer: each layer's expert weights are read from the checkpoint's
    shards and its Hessians from the calibration files when it is quantized, and its packed result is
    written straight into the output file (QuantizedWriter), so memory holds one layer, never the model."""
    from .quant import QuantizedWriter

    spec = _spec(quant_cfg, bits, method)
    device = resolve_device(quant_cfg.get("device", "cpu"), "quantization.device")
    cal = CalibrationReader(hessians_path, model_cfg["id"])
    held = CalibrationReader(heldout_path, model_cfg["id"])
    ckpt, _, adapter, dtype = _skeleton(model_cfg)
    meta = {"model_id": str(model_cfg["id"]), "calibration_config_hash": cal.meta.get("config_hash", ""),
            "config_hash": config_hash(model_cfg, quant_cfg, bits, method),
            # provenance of the data behind the Hessians, carried into every cell that reads these weights
            **{k: cal.meta.get(k, "") for k in PROVENANCE_KEYS}}
    rows = []
    with QuantizedWriter(out_weights, spec, _expert_shapes(adapter), meta) as writer:
        for layer in adapter.layers():
            # Cast to the model dtype first, as the whole-model path's from_pretrained(dtype=...) did.
            weights = {k: v.to(device).float() for k, v in ckpt.experts(layer.index, dtype).items()}
            hess, counts = cal.layer(layer.index, adapter.projections)
            hess_ho, counts_ho = held.layer(layer.index, adapter.projections)
            for name in adapter.projections:
                ((q, err_rows),) = _quantize_projection(layer.index, name, weights[name], hess[name], counts,
                                                        counts_ho, hess_ho[name], [spec])
                rows += err_rows
                writer.add(f"layers.{layer.index}.{name}", q)
            log.info("layer %d quantized to %d bits", layer.index, bits)
    io.write_parquet(out_error, pd.DataFrame(rows))


def fused_quantize_stage(model_cfg: dict, dataset_cfg: dict, calib_cfg: dict, quant_cfg: dict, seed: int,
                         widths: list[int], method: str, out_weights: dict, out_errors: dict, out_stats: str,
                         progress=None) -> None:
    """Calibrate and quantize in one layer-by-layer pass, for models whose Hessians are too large to store.

    For each decoder layer: load it, run the calibration and held-out hidden states through it, finish its
    expert Hessians, quantize its experts at every width (GPTQ widths share one Hessian factorisation),
    measure the held-out error, write the packed experts into each width's file, free the layer. Outputs
    equal the calibrate + quantize stages' (same numbers, tested); no Hessian file is written.
    `out_weights` / `out_errors` map each width to its path.
    """
    from .quant import QuantizedWriter

    torch.manual_seed(seed)
    tokenizer = _tokenizer(model_cfg)
    samples, provenance = calibration_samples(dataset_cfg, calib_cfg, seed, tokenizer)
    device = resolve_device(quant_cfg.get("device", calib_cfg.get("device", "cpu")), "quantization.device")
    specs = [_spec(quant_cfg, b, method) for b in widths]
    ckpt, adapter, dtype, runners = _layerwise_runners(model_cfg, calib_cfg, samples, tokenizer, device)
    cal_meta = _calibration_meta(model_cfg, dataset_cfg, calib_cfg, seed, provenance)
    shapes = _expert_shapes(adapter)
    writers = {s.bits: QuantizedWriter(out_weights[s.bits], s, shapes, {
        "model_id": str(model_cfg["id"]), "calibration_config_hash": cal_meta["config_hash"],
        "config_hash": config_hash(model_cfg, quant_cfg, s.bits, method), **provenance}) for s in specs}
    rows = {s.bits: [] for s in specs}

    def on_layer(moe, hess, counts):
        for name in adapter.projections:
            weight = getattr(moe.experts, name).detach().float()
            key = f"layers.{moe.index}.{name}"
            for q, err_rows in _quantize_projection(moe.index, name, weight, hess["calibration"][key],
                                                    counts["calibration"], counts["heldout"],
                                                    hess["heldout"][key], specs):
                rows[q.spec.bits] += err_rows
                writers[q.spec.bits].add(key, q)
        log.info("layer %d: calibrated and quantized to %s bits", moe.index, ", ".join(map(str, widths)))

    try:
        results = collect_calibration_layerwise(runners, adapter, calib_cfg.get("expert_inputs", "routed"),
                                                on_layer=on_layer, progress=progress, keep=False)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    for bits, path in out_errors.items():
        io.write_parquet(path, pd.DataFrame(rows[bits]))
    _write_stats(out_stats, results["calibration"], calib_cfg["n_samples"], cal_meta["config_hash"], provenance)



def profile_stage(model_cfg: dict, dataset_cfg: dict, profile_cfg: dict, seed: int, out: str, progress=None) -> None:
    """Expert hotness (selections, routed probability mass per layer and expert) under native routing, layer
    by layer (layerwise.py): the model is never loaded whole; memory holds one decoder layer's weights and
    the profile samples' hidden states (n_samples x max_length x hidden), on `profile.device`. The rows equal
    a whole-model pass's (calibrate.profile_hotness; tested)."""
    from .layerwise import LayerwiseModel

    torch.manual_seed(seed)
    _refuse_leakage(dataset_cfg, None, profile_cfg)
    problems = profile_problems(dataset_cfg, profile_cfg, seed)
    assert_disjoint(evaluation_split(dataset_cfg, seed), {"profile": problems})
    device = resolve_device(profile_cfg.get("device", "cpu"), "profile.device")
    tokenizer = _tokenizer(model_cfg)
    ckpt, model, adapter, dtype = _skeleton(model_cfg)
    batches = _batches(tokenizer, [training_text(p) for p in problems], profile_cfg["max_length"],
                       profile_cfg.get("batch_size", 8), "cpu")
    runner = LayerwiseModel(ckpt, model, adapter, dtype, batches, device)
    log.info("profile: %d samples, %d tokens, layer by layer on %s", len(problems), runner.tokens, device)
    rows = profile_hotness_layerwise(runner, adapter, progress=progress)
    df = pd.DataFrame(rows)
    # device is hashed too, as calibration.device is: float results on another device may differ in the last bits
    df["config_hash"] = config_hash(model_cfg, dataset_cfg, profile_cfg, seed)
    df["profile_source"] = f"{stage_dataset(dataset_cfg, profile_cfg)['source']} [{profile_cfg.get('split', 'train')}]"
    df["profile_hash"] = problems_hash(problems)
    io.write_parquet(out, df)
