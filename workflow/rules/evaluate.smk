rule evaluate:
    """One grid cell: greedy batched generation on the evaluation problems under its routing and precision policy."""
    input:
        unpack(evaluate_inputs),
    output:
        cell=f"{OUT}/cells/{{cell}}/cell.json",
        problems=f"{OUT}/cells/{{cell}}/problems.parquet",
        layers=f"{OUT}/cells/{{cell}}/layers.parquet",
        trace=f"{OUT}/cells/{{cell}}/trace.parquet",
    params:
        cell=lambda wc: CELL_BY_ID[wc.cell].to_dict(),
        settings=stage_settings(),
    log:
        f"{LOGS}/evaluate/{{cell}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{cell}}.tsv"
    threads: config["evaluate"].get("threads", 1)
    resources:
        mem_mb=8000,
        runtime=240,
    script:
        "../scripts/evaluate.py"
