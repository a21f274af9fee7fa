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
    output:
        cells=report("results/summary/cells.parquet", caption="../report/cells.rst", category="Tables"),
        problems="results/summary/problems.parquet",
        layers="results/summary/layers.parquet",
        csv=report("results/summary/cells.csv", caption="../report/cells.rst", category="Tables"),
        trace="results/summary/trace.parquet",
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/rules/aggregate.tsv"
    script:
        "../scripts/aggregate.py"


rule plot_trade_off:
    """Figures of the trade-off, drawn from the summary table only."""
    input:
        cells="results/summary/cells.parquet",
        layers="results/summary/layers.parquet",
    output:
        pareto=report("results/figures/pareto.png", caption="../report/pareto.rst", category="Trade-off"),
        throughput=report("results/figures/throughput.png", caption="../report/throughput.rst", category="Trade-off"),
        capacity=report("results/figures/capacity_factor.png", caption="../report/capacity_factor.rst", category="Trade-off"),
        budget=report("results/figures/precision_budget.png", caption="../report/precision_budget.rst", category="Trade-off"),
        dynamic=report("results/figures/dynamic_precision.png", caption="../report/dynamic_precision.rst", category="Trade-off"),
        imbalance=report("results/figures/load_imbalance.png", caption="../report/load_imbalance.rst", category="Routing"),
    log:
        "logs/plot_trade_off.log",
    benchmark:
        "benchmarks/rules/plot_trade_off.tsv"
    script:
        "../scripts/plot_trade_off.py"


rule plot_projection:
    """Accuracy vs cost-model projected decode tokens/s per hardware profile (cost_model in the config)."""
    input:
        cells="results/summary/cells.parquet",
    output:
        report("results/figures/projection.png", caption="../report/projection.rst", category="Trade-off"),
    log:
        "logs/plot_projection.log",
    benchmark:
        "benchmarks/rules/plot_projection.tsv"
    script:
        "../scripts/plot_projection.py"
