rule profile:
    """Expert hotness (selections and routed probability mass per layer and expert) under native routing."""
    input:
        model=model_files(),
        data=data_files(*PROFILE_DATA),
    output:
        f"{OUT}/profile/hotness.parquet",
    params:
        model=model_settings(),
        dataset=train_data_settings(),
        profile=config["profile"],
        seed=config["seed"],
    log:
        f"{LOGS}/profile.log",
    benchmark:
        f"{BENCH}/profile.tsv"
    threads: config["evaluate"].get("threads", 1)
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/profile.py"


rule plot_hotness:
    input:
        f"{OUT}/profile/hotness.parquet",
    output:
        report(f"{OUT}/figures/hotness.png", caption="../report/hotness.rst", category="Expert hotness"),
    log:
        f"{LOGS}/plot_hotness.log",
    benchmark:
        f"{BENCH}/plot_hotness.tsv"
    script:
        "../scripts/plot_hotness.py"
