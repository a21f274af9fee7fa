def cost_model_inputs():
    """The hardware profiles file and the projection target's config.json: editing either re-aggregates."""
    if not COST_MODEL:
        return {}
    target = config["cost_model"].get("target_model")
    if target and Path(target).is_dir():
        target = str(Path(target) / "config.json")
    return {"hardware": HARDWARE_FILE, **({"target_model": target} if target else {})}


rule aggregate:
    """All cells into the summary tables (Parquet + a wide CSV), with Pareto flags and McNemar p-values."""
    input:
        cells=cell_outputs("cell.json"),
        problems=cell_outputs("problems.parquet"),
        layers=cell_outputs("layers.parquet"),
        traces=cell_outputs("trace.parquet"),
        **cost_model_inputs(),
    params:
        cost_model=config.get("cost_model"),
        # each cell's config hash under this config: a cell.json from another cell or config is refused
        cell_hashes={c: config_hash(stage_settings(), cell.to_dict()) for c, cell in CELL_BY_ID.items()},
    output:
        cells=report(f"{OUT}/summary/cells.parquet", caption="../report/cells.rst", category="Tables"),
        problems=f"{OUT}/summary/problems.parquet",
        layers=f"{OUT}/summary/layers.parquet",
        csv=report(f"{OUT}/summary/cells.csv", caption="../report/cells.rst", category="Tables"),
        trace=f"{OUT}/summary/trace.parquet",
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCH}/aggregate.tsv"
    script:
        "../scripts/aggregate.py"


rule plot_trade_off:
    """Figures of the trade-off, drawn from the summary table only."""
    input:
        cells=f"{OUT}/summary/cells.parquet",
        layers=f"{OUT}/summary/layers.parquet",
    output:
        pareto=report(f"{OUT}/figures/pareto.png", caption="../report/pareto.rst", category="Trade-off"),
        throughput=report(f"{OUT}/figures/throughput.png", caption="../report/throughput.rst", category="Trade-off"),
        capacity=report(f"{OUT}/figures/capacity_factor.png", caption="../report/capacity_factor.rst", category="Trade-off"),
        budget=report(f"{OUT}/figures/precision_budget.png", caption="../report/precision_budget.rst", category="Trade-off"),
        dynamic=report(f"{OUT}/figures/dynamic_precision.png", caption="../report/dynamic_precision.rst", category="Trade-off"),
        imbalance=report(f"{OUT}/figures/load_imbalance.png", caption="../report/load_imbalance.rst", category="Routing"),
    log:
        f"{LOGS}/plot_trade_off.log",
    benchmark:
        f"{BENCH}/plot_trade_off.tsv"
    script:
        "../scripts/plot_trade_off.py"


rule plot_projection:
    """Accuracy vs cost-model projected decode tokens/s per hardware profile (cost_model in the config)."""
    input:
        cells=f"{OUT}/summary/cells.parquet",
    output:
        report(f"{OUT}/figures/projection.png", caption="../report/projection.rst", category="Trade-off"),
    log:
        f"{LOGS}/plot_projection.log",
    benchmark:
        f"{BENCH}/plot_projection.tsv"
    script:
        "../scripts/plot_projection.py"
