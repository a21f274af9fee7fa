"""One safetensors file per quantized model (never pickle).

Tensor keys, for each entry NAME of the layers dict (e.g. "layers.3.gate_up_proj"):
    NAME.codes     uint8   [E, out, ceil(in*bits/8)]   packed codes (packing.py)
    NAME.scales    float16 [E, out, n_groups]
    NAME.zeros     uint8   [E, out, n_groups]          only when asymmetric
    NAME.fallback  bool    [E]                         expert quantized by the RTN fallback
Metadata (all strings; non-strings are JSON-encoded): format="moesweep-quantized", format_version,
bits, group_size, symmetric, method, damp, min_tokens, shapes (JSON {NAME: [E, out, in]}), and every entry
of the caller's metadata (model_id, calibration hash, ...). All layers of one file share one QuantSpec.
"""
from __future__ import annotations

import json
import os

import torch

from ..io import ArtefactError, save_safetensors
from .core import QuantizedExperts, QuantSpec
from .packing import packed_row_bytes

FORMAT = "moesweep-quantized"
FORMAT_VERSION = "1"
_SPEC_KEYS = ("bits", "group_size", "symmetric", "method", "damp", "min_tokens")
_RESERVED = ("format", "format_version", "shapes", *_SPEC_KEYS)


def _as_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_quantized(path: str | os.PathLike, layers: dict[str, QuantizedExperts], metadata: dict) -> None:
    """Write all layers atomically into one safetensors file (see module docstring for keys and metadata)."""
    specs = {q.spec for q in layers.values()}
    if len(specs) != 1:
        raise ValueError(f"one file holds one QuantSpec, got {len(specs)}")
    clash = set(metadata) & set(_RESERVED)
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are written by save_quantized itself")
    spec = specs.pop()
    tensors = {}
    for name, q in layers.items():
        tensors[f"{name}.codes"], tensors[f"{name}.scales"] = q.codes, q.scales
        tensors[f"{name}.fallback"] = q.fallback.to(torch.bool)
        if not spec.symmetric:
            tensors[f"{name}.zeros"] = q.zeros
    meta = {k: _as_str(v) for k, v in metadata.items()}
    meta.update({k: _as_str(getattr(spec, k)) for k in _SPEC_KEYS})
    meta.update(format=FORMAT, format_version=FORMAT_VERSION,
                shapes=_as_str({name: list(q.shape) for name, q in layers.items()}))
    save_safetensors(path, tensors, meta)


def load_quantized(path: str | os.PathLike, expect: dict) -> tuple[dict[str, QuantizedExperts], dict]:
    """Read a file written by save_quantized; return (layers, metadata as strings).

    `expect` maps metadata keys to required values (compared as the strings save_quantized wrote; "shapes"
    may be a {NAME: (E, out, in)} dict). Any mismatch, a wrong format version, or an unreadable/truncated
    file raises ArtefactError naming the file.
    """
    from safetensors import safe_open

    def fail(why: str):
        raise ArtefactError(f"{path}: {why}; rerun the quantize stage")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                fail(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            if meta.get("format_version") != FORMAT_VERSION:
                fail(f"format_version is {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
            for key, want in expect.items():
                want = _as_str({k: list(v) for k, v in want.items()} if key == "shapes" else want)
                if meta.get(key) != want:
                    fail(f"{key} is {meta.get(key)!r}, expected {want!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ArtefactError:
        raise
    except FileNotFoundError:
        fail("missing")
    except Exception as err:  # safetensors raises its own error types on truncated or corrupt files
        fail(f"unreadable ({type(err).__name__}: {err})")

    spec = QuantSpec(bits=int(meta["bits"]), group_size=int(meta["group_size"]),
                     symmetric=json.loads(meta["symmetric"]), method=meta["method"],
                     damp=float(meta["damp"]), min_tokens=int(meta["min_tokens"]))
    layers = {}
    for name, shape in json.loads(meta["shapes"]).items():
        E, out, n_in = shape
        groups = spec.n_groups(n_in)
        want = {"codes": (E, out, packed_row_bytes(n_in, spec.bits)), "scales": (E, out, groups),
                "fallback": (E,), **({} if spec.symmetric else {"zeros": (E, out, groups)})}
        for part, part_shape in want.items():
            got = tensors.get(f"{name}.{part}")
            if got is None or tuple(got.shape) != part_shape:
                fail(f"{name}.{part} has shape {None if got is None else tuple(got.shape)}, expected {part_shape}")
        zeros = tensors[f"{name}.zeros"] if not spec.symmetric else torch.zeros(0, dtype=torch.uint8)
        layers[name] = QuantizedExperts(tensors[f"{name}.codes"], tensors[f"{name}.scales"], zeros,
                                        tuple(shape), spec, tensors[f"{name}.fallback"])
    return layers, meta
