rule evaluate:
    """One grid cell: greedy batched generation on the evaluation problems under its routing and precision policy."""
    input:
        unpack(evaluate_inputs),
    output:
        cell="results/cells/{cell}/cell.json",
        problems="results/cells/{cell}/problems.parquet",
        layers="results/cells/{cell}/layers.parquet",
        trace="results/cells/{cell}/trace.parquet",
    params:
        cell=lambda wc: CELL_BY_ID[wc.cell].to_dict(),
        settings=stage_settings(),
    log:
        "logs/evaluate/{cell}.log",
    benchmark:
        "benchmarks/rules/evaluate/{cell}.tsv"
    threads: config["evaluate"].get("threads", 1)
    resources:
        mem_mb=8000,
        runtime=240,
    script:
        "../scripts/evaluate.py"
