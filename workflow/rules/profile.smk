rule profile:
    """Expert hotness (selections and routed probability mass per layer and expert) under native routing."""
    input:
        model=model_files(),
    output:
        "results/profile/hotness.parquet",
    params:
        model=config["model"],
        dataset=config["dataset"],
        profile=config["profile"],
        seed=config["seed"],
    log:
        "logs/profile.log",
    benchmark:
        "benchmarks/rules/profile.tsv"
    threads: config["evaluate"].get("threads", 1)
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/profile.py"


rule plot_hotness:
    input:
        "results/profile/hotness.parquet",
    output:
        report("results/figures/hotness.png", caption="../report/hotness.rst", category="Expert hotness"),
    log:
        "logs/plot_hotness.log",
    benchmark:
        "benchmarks/rules/plot_hotness.tsv"
    script:
        "../scripts/plot_hotness.py"
