"""One safetensors file per quantized model (never pickle).

Tensor keys, for each entry NAME of the layers dict (e.g. "layers.3.gate_up_proj"):
    NAME.codes     uint8   [E, out, ceil(in*bits/8)]   packed codes (packing.py)
    NAME.scales    float16 [E, out, n_groups]
    NAME.zeros     uint8   [E, out, n_groups]          only when asymmetric; float16 when zero_dtype=float16 (hqq)
    NAME.fallback  bool    [E]                         expert quantized by the RTN fallback
Metadata (all strings; non-strings are JSON-encoded): format="moesweep-quantized", format_version,
bits, group_size, symmetric, method, damp, min_tokens, zero_dtype ("uint8": integer zero points of the
gptq/rtn grid; "float16": hqq's float zero points; "none": symmetric), shapes (JSON {NAME: [E, out, in]}),
and every entry of the caller's metadata (model_id, calibration hash, ...), and the file's content hash
(io.HASH_KEY, see moesweep/io.py). All layers of one file share one QuantSpec. The content hash, then every
tensor's dtype and shape are checked on load.

Version 2 added zero_dtype (float16 zeros for hqq); version-1 files (uint8 zeros only, no zero_dtype) are
still read. Files may also be written layer by layer (QuantizedWriter): the same bytes layout rules of
safetensors, readable by safe_open, without holding the whole model's packed experts in memory.
"""
from __future__ import annotations

import json
import math
import os

import torch

from ..io import HASH_KEY, ArtefactError, atomic_path, placeholder_metadata, save_safetensors, verify
from . import format
from .core import QuantizedExperts, QuantSpec
from .format import packed_row_bytes

FORMAT = "moesweep-quantized"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
_SPEC_KEYS = ("bits", "group_size", "symmetric", "method", "damp", "min_tokens")
_RESERVED = ("format", "format_version", "shapes", "zero_dtype", *_SPEC_KEYS)
ZERO_DTYPES = {"uint8": torch.uint8, "float16": torch.float16}


def zero_dtype(spec: QuantSpec) -> str:
    """How a spec's zero points are stored (format.zero_dtype)."""
    return format.zero_dtype(spec.method, spec.symmetric)


def _parts(name: str, shape, spec: QuantSpec) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor a layer entry has in the file: {key: (dtype, shape)}."""
    E, out, n_in = shape
    groups = spec.n_groups(n_in)
    parts = {f"{name}.codes": (torch.uint8, (E, out, packed_row_bytes(n_in, spec.bits))),
             f"{name}.scales": (torch.float16, (E, out, groups)), f"{name}.fallback": (torch.bool, (E,))}
    zd = zero_dtype(spec)
    if zd != "none":
        parts[f"{name}.zeros"] = (ZERO_DTYPES[zd], (E, out, groups))
    return parts


def _tensors(name: str, q: QuantizedExperts) -> dict[str, torch.Tensor]:
    t = {f"{name}.codes": q.codes, f"{name}.scales": q.scales, f"{name}.fallback": q.fallback.to(torch.bool)}
    if zero_dtype(q.spec) != "none":
        t[f"{name}.zeros"] = q.zeros
    for key, (dtype, shape) in _parts(name, q.shape, q.spec).items():
        if t[key].dtype != dtype or tuple(t[key].shape) != shape:
            raise ValueError(f"{key}: {t[key].dtype} {tuple(t[key].shape)}, expected {dtype} {shape}")
    return t


def _file_metadata(spec: QuantSpec, shapes: dict, metadata: dict) -> dict[str, str]:
    clash = set(metadata) & set(_RESERVED)
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are written by save_quantized itself")
    meta = {k: _as_str(v) for k, v in metadata.items()}
    meta.update({k: _as_str(getattr(spec, k)) for k in _SPEC_KEYS})
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, zero_dtype=zero_dtype(spec),
                shapes=_as_str({name: list(s) for name, s in shapes.items()}))
    return meta


def _as_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_quantized(path: str | os.PathLike, layers: dict[str, QuantizedExperts], metadata: dict) -> None:
    """Write all layers atomically into one safetensors file (see module docstring for keys and metadata)."""
    specs = {q.spec for q in layers.values()}
    if len(specs) != 1:
        raise ValueError(f"one file holds one QuantSpec, got {len(specs)}")
    spec = specs.pop()
    meta = _file_metadata(spec, {name: q.shape for name, q in layers.items()}, metadata)
    tensors = {}
    for name, q in layers.items():
        tensors.update(_tensors(name, q))
    save_safetensors(path, tensors, meta)


def load_quantized(path: str | os.PathLike, expect: dict) -> tuple[dict[str, QuantizedExperts], dict]:
    """Read a file written by save_quantized; return (layers, metadata as strings).

    `expect` maps metadata keys to required values (compared as the strings save_quantized wrote; "shapes"
    may be a {NAME: (E, out, in)} dict). Any mismatch, a wrong format version, or an unreadable/truncated
    file raises ArtefactError naming the file.
    """
    from safetensors import safe_open

    def fail(why: str):
        raise ArtefactError(f"{path}: {why}; {rebuild_quantized_hint(path)}")

    verify(path, rebuild_quantized_hint(path))  # every byte, before any metadata or tensor is trusted
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                fail(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            if meta.get("format_version") not in READABLE_VERSIONS:
                fail(f"format_version is {meta.get('format_version')!r}, expected one of {', '.join(READABLE_VERSIONS)}")
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
    # Version 1 had no zero_dtype key: integer (uint8) zero points, or none when symmetric.
    stored_zero = meta.get("zero_dtype", zero_dtype(spec) if meta["format_version"] == "1" else None)
    if stored_zero != zero_dtype(spec):
        fail(f"zero_dtype is {stored_zero!r}, but method {spec.method!r} (symmetric={spec.symmetric}) stores "
             f"{zero_dtype(spec)!r}")
    layers = {}
    for name, shape in json.loads(meta["shapes"]).items():
        for key, (dtype, part_shape) in _parts(name, shape, spec).items():
            got = tensors.get(key)
            if got is None or tuple(got.shape) != part_shape or got.dtype != dtype:
                fail(f"{key} is {None if got is None else (got.dtype, tuple(got.shape))}, expected "
                     f"{(dtype, part_shape)}")
        zeros = tensors[f"{name}.zeros"] if not spec.symmetric else torch.zeros(0, dtype=torch.uint8)
        layers[name] = QuantizedExperts(tensors[f"{name}.codes"], tensors[f"{name}.scales"], zeros,
                                        tuple(shape), spec, tensors[f"{name}.fallback"])
    meta.pop(HASH_KEY, None)  # the file's integrity, not a property of its content: equal for equal content
    return layers, meta


def rebuild_quantized_hint(path) -> str:
    """The command that rebuilds one quantized file and then what used it (with quantization.fused the one job
    writes every width)."""
    return f"rerun the quantize stage: snakemake --forcerun {path}"


_ST_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.bool: "BOOL"}


class QuantizedWriter:
    """Write one quantized file layer by layer, so that only one layer's packed experts are in memory.

    All entries (names and [E, out, in] shapes) are declared up front, which fixes the safetensors header;
    each `add(name, q)` then writes that entry's tensors at their offsets. `close()` checks that every entry
    was written and renames the file into place (atomic: a failure leaves no file). The result is a normal
    safetensors file with the metadata save_quantized writes, read back by load_quantized.
    Use as a context manager: an exception inside discards the partial file.
    """

    def __init__(self, path: str | os.PathLike, spec: QuantSpec, shapes: dict, metadata: dict):
        self.spec, self.shapes = spec, {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self.parts, self.offsets, offset = {}, {}, 0
        for name, shape in self.shapes.items():
            for key, (dtype, shape_) in _parts(name, shape, spec).items():
                nbytes = math.prod(shape_) * torch.empty(0, dtype=dtype).element_size()
                self.parts[key], self.offsets[key] = (dtype, shape_), (offset, offset + nbytes)
                offset += nbytes
        header = {"__metadata__": {**_file_metadata(spec, self.shapes, metadata), **placeholder_metadata()}}
        header.update({k: {"dtype": _ST_DTYPES[d], "shape": list(s), "data_offsets": list(self.offsets[k])}
                       for k, (d, s) in self.parts.items()})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._data_start = 8 + len(raw)
        self._atomic = atomic_path(path, seal=True)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "r+b")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._file.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def add(self, name: str, q: QuantizedExperts) -> None:
        if q.spec != self.spec or q.shape != self.shapes.get(name):
            raise ValueError(f"{name}: spec/shape {q.spec}, {q.shape} not declared for this file "
                             f"({self.spec}, {self.shapes.get(name)})")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        for key, tensor in _tensors(name, q).items():
            self._file.seek(self._data_start + self.offsets[key][0])
            self._file.write(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self.shapes) - self._written)
        if missing:
            self.abort()
            raise ValueError(f"quantized file incomplete: {missing[:3]}{'...' if len(missing) > 3 else ''} never written")
        self._file.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        try:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
