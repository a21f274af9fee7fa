"""Artefact files: the user's umask, content hashes written into every artefact and checked by its readers."""
import json
import os
import stat

import pandas as pd
import pytest
import torch

from moesweep import io
from moesweep.io import ArtefactError
from moesweep.quant import QuantizedWriter, load_quantized, save_quantized
from moesweep.quant.core import QuantSpec, quantize_experts
from moesweep.results import read_cell_json


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the content tells


def write_each_kind(tmp_path):
    """{kind: path} of one artefact of each sealed format."""
    paths = {"json": tmp_path / "a.json", "parquet": tmp_path / "a.parquet", "safetensors": tmp_path / "a.safetensors"}
    io.write_json(paths["json"], {"cell": "x", "values": list(range(50))})
    io.write_parquet(paths["parquet"], pd.DataFrame({"a": range(100), "b": [0.5] * 100}))
    io.save_safetensors(paths["safetensors"], {"t": torch.arange(1000, dtype=torch.float32)}, {"model_id": "m"})
    return paths


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artefacts_take_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        paths = write_each_kind(tmp_path)
        io.write_text(tmp_path / "a.csv", "a,b\n")
    finally:
        os.umask(old)
    for p in [*paths.values(), tmp_path / "a.csv"]:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


def test_sealed_files_verify_and_read_back(tmp_path):
    paths = write_each_kind(tmp_path)
    for p in paths.values():
        io.verify(p, "rebuild")
    assert io.read_json(paths["json"]) == {"cell": "x", "values": list(range(50))}
    assert io.read_parquet(paths["parquet"], "rebuild")["a"].tolist() == list(range(100))


@pytest.mark.parametrize("kind", ["json", "parquet", "safetensors"])
@pytest.mark.parametrize("where", [0.1, 0.5, -20])
def test_a_flipped_byte_is_named_with_the_rebuild_command(tmp_path, kind, where):
    path = write_each_kind(tmp_path)[kind]
    size = path.stat().st_size
    flip_byte(path, int(size * where) if where > 0 else size + where)
    with pytest.raises(ArtefactError, match=rf"^{path}: .*; snakemake {path} --force$"):
        io.verify(path, f"snakemake {path} --force")


def test_a_file_without_hash_is_refused(tmp_path):
    path = tmp_path / "old.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    with pytest.raises(ArtefactError, match="no content hash recorded.*rebuild it"):
        io.verify(path, "rebuild it")
    with pytest.raises(ArtefactError, match="missing; rebuild it"):
        io.verify(tmp_path / "absent.parquet", "rebuild it")


def _quantized(seed=0):
    torch.manual_seed(seed)
    spec = QuantSpec(bits=4, group_size=16, symmetric=False, method="rtn", damp=0.01, min_tokens=1)
    return {f"layers.{i}.down_proj": quantize_experts(torch.randn(2, 8, 32), None, None, spec) for i in range(2)}


def test_quantized_files_both_writers_are_verified(tmp_path):
    layers = _quantized()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_quantized(a, layers, {"model_id": "m"})
    spec = next(iter(layers.values())).spec
    with QuantizedWriter(b, spec, {n: q.shape for n, q in layers.items()}, {"model_id": "m"}) as w:
        for n, q in layers.items():
            w.add(n, q)
    for p in (a, b):
        got, _ = load_quantized(p, {"model_id": "m"})
        assert torch.equal(got["layers.1.down_proj"].codes, layers["layers.1.down_proj"].codes)
        flip_byte(p, p.stat().st_size - 3)  # inside the last tensor's bytes: shapes and metadata still match
        with pytest.raises(ArtefactError, match=rf"{p}: content hash mismatch .* snakemake --forcerun {p}$"):
            load_quantized(p, {"model_id": "m"})


def _cell(tmp_path, folder, cell, chash="h1"):
    path = tmp_path / "results/cells" / folder / "cell.json"
    io.write_json(path, {"cell": cell, "n": 4, "config_hash": chash})
    return str(path)


def test_a_cell_json_must_be_its_folders(tmp_path):
    assert read_cell_json(_cell(tmp_path, "native-w16", "native-w16"), {"native-w16": "h1"})["n"] == 4
    with pytest.raises(ArtefactError, match=r"holds cell 'native-w16', not 'native-w2' .*results/cells/native-w2/cell.json --force"):
        read_cell_json(_cell(tmp_path, "native-w2", "native-w16"), {"native-w2": "h1"})
    with pytest.raises(ArtefactError, match=r"config_hash 'h0' is not this config's 'h1' for cell 'top1-w16'"):
        read_cell_json(_cell(tmp_path, "top1-w16", "top1-w16", "h0"), {"top1-w16": "h1"})


def test_json_artefact_keeps_key_order_and_hash_is_last(tmp_path):
    p = tmp_path / "c.json"
    io.write_json(p, {"b": 1, "a": 2})
    raw = json.loads(p.read_text())
    assert list(raw) == ["b", "a", io.HASH_KEY] and len(raw[io.HASH_KEY]) == 32
    assert list(io.read_json(p)) == ["b", "a"]
