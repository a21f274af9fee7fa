"""Aggregation of per-cell outputs into the summary tables (the results contract)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from . import io
from .costmodel import CostModelSettings, cell_traffic, predict
from .scoring import mcnemar_exact_p

REFERENCE = ("native", "full")  # (routing_policy, precision_policy) of the reference cell
SCHEMA_FILE = Path(__file__).with_name("results_schema.yaml")
PROFILE_SLOT = "<profile>"  # schema columns documented once, repeated per cost-model hardware profile


def table_schema(table: str, profiles: Sequence[str] = ()):
    """The documented Arrow schema of a summary table (results_schema.yaml); a column named with <profile>
    becomes one column per cost-model profile, in the config's order."""
    import pyarrow as pa
    import yaml

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
             "list<int64>": pa.list_(pa.int64()), "list<float64>": pa.list_(pa.float64()),
             "list<string>": pa.list_(pa.string())}
    columns = yaml.safe_load(SCHEMA_FILE.read_text())[table]
    fields = []
    for name, spec in columns.items():
        names = [name.replace(PROFILE_SLOT, p) for p in profiles] if PROFILE_SLOT in name else [name]
        fields += [(n, types[spec[0]]) for n in names]
    return pa.schema(fields)


def _typed(df: pd.DataFrame, table: str, profiles: Sequence[str] = ()):
    """Exactly the documented columns and types; a column the code forgot to document is an error."""
    import pyarrow as pa

    schema = table_schema(table, profiles)
    extra = set(df.columns) - set(schema.names)
    if extra:
        raise ValueError(f"{table}: columns {sorted(extra)} are not documented in {SCHEMA_FILE.name}")
    df = df.reindex(columns=schema.names)
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def pareto_mask(accuracy: pd.Series, speed: pd.Series) -> pd.Series:
    """True where no other cell is at least as accurate and as fast, and strictly better in one. A cost (lower is
    better) is passed negated."""
    a, s = accuracy.to_numpy(), speed.to_numpy()
    out = []
    for i in range(len(a)):
        dominated = ((a >= a[i]) & (s >= s[i]) & ((a > a[i]) | (s > s[i]))).any()
        out.append(not dominated)
    return pd.Series(out, index=accuracy.index)


def headline_measure(cells: pd.DataFrame) -> str:
    """The cost axis of the Pareto flag and the headline figure. A CPU clock on this project's models measures Python
    and kernel-launch overhead, not the policy (README), so off CUDA the axis is the hardware-independent weight
    bytes read per generated token; when every cell ran on CUDA, the fixed-shape decode tokens/s. A family without
    cost-model shapes has no dense byte count: its cells use the expert bytes alone, which orders the cells the same
    (the dense bytes per token are one constant for all cells of a sweep: same model, same fixed batch)."""
    if cells["device"].astype(str).str.startswith("cuda").all():
        return "fixed_decode_tokens_per_s"
    return "weight_bytes_per_token" if cells["weight_bytes_per_token"].notna().all() else "expert_bytes_per_token"


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjustment over the non-null p-values of `p` (the family): the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). Controls the family-wise error rate under any dependence."""
    valid = p.dropna().sort_values(kind="mergesort")
    m = len(valid)
    adjusted, running = {}, 0.0
    for i, (index, value) in enumerate(valid.items()):
        running = max(running, min(1.0, (m - i) * value))
        adjusted[index] = running
    return pd.Series([adjusted.get(i) for i in p.index], index=p.index, dtype="float64")


def mcnemar_vs_reference(cells: pd.DataFrame, problems: pd.DataFrame) -> pd.Series:
    ref = cells[(cells.routing_policy == REFERENCE[0]) & (cells.precision_policy == REFERENCE[1])]
    if ref.empty:
        return pd.Series([None] * len(cells), index=cells.index, dtype="float64")
    ref_id = ref.iloc[0]["cell"]
    wide = problems.pivot(index="problem_id", columns="cell", values="correct_strict")
    p = []
    for cid in cells["cell"]:
        b = int((wide[ref_id] & ~wide[cid]).sum())  # reference right, cell wrong
        c = int((~wide[ref_id] & wide[cid]).sum())
        p.append(mcnemar_exact_p(b, c))
    return pd.Series(p, index=cells.index, dtype="float64")


def add_projections(cells: pd.DataFrame, layers: pd.DataFrame, settings: CostModelSettings) -> pd.DataFrame:
    """Cost-model columns per cell: traffic per decode step (on the cell's model or the target's shapes) and,
    per hardware profile, projected decode tokens/s and whether the configuration fits (costmodel.py)."""
    rows = []
    by_cell = {c: g.to_dict("records") for c, g in layers.groupby("cell")}
    for cell in cells.to_dict("records"):
        t = cell_traffic(cell, by_cell.get(cell["cell"]), settings.target, settings.distinct)
        row = {"projected_model": t.model, "projected_tokens_per_step": t.tokens_per_step,
               "projected_dense_bytes_per_step": t.dense_bytes, "projected_expert_bytes_per_step": t.expert_bytes,
               "projected_kv_bytes_per_step": t.kv_bytes, "projected_host_bytes_per_step": t.host_bytes,
               "projected_resident_bytes": t.resident_weight_bytes + t.kv_cache_bytes}
        for name, profile in settings.profiles.items():
            p = predict(t, profile, settings.overlap_host_link)
            row[f"projected_tokens_per_s_{name}"] = p.tokens_per_s
            row[f"fits_{name}"] = p.fits
        rows.append(row)
    return pd.concat([cells, pd.DataFrame(rows, index=cells.index)], axis=1)


def _rebuild_hint(path: str) -> str:
    return f"rebuild that cell: snakemake {Path(path).parent / 'cell.json'} --force"


def _read_parquet(path: str) -> pd.DataFrame:
    return io.read_parquet(path, _rebuild_hint(path))  # content hash verified, then read


def read_cell_json(path: str, expected_hashes: dict[str, str] | None = None) -> dict:
    """A cell's summary, refused unless it is its folder's cell: a cell.json copied from another cell (valid,
    hash and all) would otherwise become a second row of that cell and hide this one's."""
    summary = io.read_json(path, _rebuild_hint(path))
    folder = Path(path).parent.name
    if summary.get("cell") != folder:
        raise io.ArtefactError(f"{path}: holds cell {summary.get('cell')!r}, not {folder!r} (copied from another "
                               f"cell's folder?); {_rebuild_hint(path)}")
    if expected_hashes is not None and summary.get("config_hash") != expected_hashes.get(folder):
        raise io.ArtefactError(f"{path}: config_hash {summary.get('config_hash')!r} is not this config's "
                               f"{expected_hashes.get(folder)!r} for cell {folder!r}; {_rebuild_hint(path)}")
    return summary


def aggregate(cell_jsons: list[str], problem_files: list[str], layer_files: list[str], out_cells: str,
              out_problems: str, out_layers: str, out_csv: str, trace_files: list[str] = (),
              out_trace: str | None = None, cost_model: CostModelSettings | None = None,
              expected_hashes: dict[str, str] | None = None) -> pd.DataFrame:
    """`expected_hashes`: {cell id: config_hash} the current config gives each cell (grid.config_hash of the
    evaluate rule's settings and cell); a cell.json with another is refused."""
    cells = pd.DataFrame([read_cell_json(p, expected_hashes) for p in cell_jsons])
    problems = pd.concat([_read_parquet(p) for p in problem_files], ignore_index=True)
    layers = pd.concat([_read_parquet(p) for p in layer_files], ignore_index=True)
    if cells["n"].nunique() != 1:
        raise ValueError(f"cells were evaluated on different numbers of problems: {sorted(cells['n'].unique())}")
    cells["capacity_factor"] = cells["capacity_factor"].astype("float64")
    cells["memory_budget"] = cells["memory_budget"].astype("float64")
    measure = headline_measure(cells)
    cost = cells[measure] if measure == "fixed_decode_tokens_per_s" else -cells[measure]
    if cost.isna().any():
        raise ValueError(f"{measure} is missing for cells {cells.loc[cost.isna(), 'cell'].tolist()}; rebuild them")
    cells["pareto_measure"] = measure
    cells["pareto"] = pareto_mask(cells["accuracy_strict"], cost)
    cells["p_vs_reference"] = mcnemar_vs_reference(cells, problems)
    is_reference = (cells.routing_policy == REFERENCE[0]) & (cells.precision_policy == REFERENCE[1])
    cells["p_holm"] = holm(cells["p_vs_reference"].where(~is_reference))
    profiles = list(cost_model.profiles) if cost_model else []
    if cost_model:
        cells = add_projections(cells, layers, cost_model)
    io.write_parquet(out_cells, _typed(cells, "cells", profiles))
    io.write_parquet(out_problems, _typed(problems, "problems"))
    io.write_parquet(out_layers, _typed(layers, "layers"))
    io.write_text(out_csv, cells.to_csv(index=False))
    if out_trace:
        traces = [t for t in (_read_parquet(p) for p in trace_files) if len(t)]
        trace = pd.concat(traces, ignore_index=True) if traces else pd.DataFrame(columns=table_schema("trace").names)
        io.write_parquet(out_trace, _typed(trace, "trace"))
    return cells


def aggregate_quant_errors(files: list[str], out: str) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    io.write_parquet(out, df)
    return df
