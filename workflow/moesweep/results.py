"""Aggregation of per-cell outputs into the summary tables (the results contract)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import io
from .scoring import mcnemar_exact_p

REFERENCE = ("native", "full")  # (routing_policy, precision_policy) of the reference cell
SCHEMA_FILE = Path(__file__).with_name("results_schema.yaml")


def table_schema(table: str):
    """The documented Arrow schema of a summary table (results_schema.yaml)."""
    import pyarrow as pa
    import yaml

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
             "list<int64>": pa.list_(pa.int64()), "list<float64>": pa.list_(pa.float64())}
    columns = yaml.safe_load(SCHEMA_FILE.read_text())[table]
    return pa.schema([(name, types[spec[0]]) for name, spec in columns.items()])


def _typed(df: pd.DataFrame, table: str):
    """Exactly the documented columns and types; a column the code forgot to document is an error."""
    import pyarrow as pa

    schema = table_schema(table)
    extra = set(df.columns) - set(schema.names)
    if extra:
        raise ValueError(f"{table}: columns {sorted(extra)} are not documented in {SCHEMA_FILE.name}")
    df = df.reindex(columns=schema.names)
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def pareto_mask(accuracy: pd.Series, speed: pd.Series) -> pd.Series:
    """True where no other cell is at least as accurate and as fast, and strictly better in one."""
    a, s = accuracy.to_numpy(), speed.to_numpy()
    out = []
    for i in range(len(a)):
        dominated = ((a >= a[i]) & (s >= s[i]) & ((a > a[i]) | (s > s[i]))).any()
        out.append(not dominated)
    return pd.Series(out, index=accuracy.index)


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


def _rebuild_hint(path: str) -> str:
    cell = Path(path).parent.name
    return f"rebuild that cell: snakemake results/cells/{cell}/cell.json --force"


def _read_parquet(path: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for truncated or foreign files
        raise io.ArtefactError(f"{path}: unreadable Parquet file ({err}); {_rebuild_hint(path)}") from None


def aggregate(cell_jsons: list[str], problem_files: list[str], layer_files: list[str], out_cells: str,
              out_problems: str, out_layers: str, out_csv: str, trace_files: list[str] = (),
              out_trace: str | None = None) -> pd.DataFrame:
    cells = pd.DataFrame([io.read_json(p, _rebuild_hint(p)) for p in cell_jsons])
    problems = pd.concat([_read_parquet(p) for p in problem_files], ignore_index=True)
    layers = pd.concat([_read_parquet(p) for p in layer_files], ignore_index=True)
    if cells["n"].nunique() != 1:
        raise ValueError(f"cells were evaluated on different numbers of problems: {sorted(cells['n'].unique())}")
    cells["capacity_factor"] = cells["capacity_factor"].astype("float64")
    cells["memory_budget"] = cells["memory_budget"].astype("float64")
    cells["pareto"] = pareto_mask(cells["accuracy_strict"], cells["tokens_per_s"])
    cells["p_vs_reference"] = mcnemar_vs_reference(cells, problems)
    io.write_parquet(out_cells, _typed(cells, "cells"))
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
