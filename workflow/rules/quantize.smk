if config["quantization"].get("fused", False):

    rule quantize:
        """Calibration and every width in one layer-by-layer pass (quantization.fused): no Hessian files."""
        input:
            model=model_files(),
            data=data_files(*CALIBRATION_DATA),
        output:
            weights=expand(f"{OUT}/quantization/{{method}}-w{{bits}}.safetensors", method=METHOD, bits=WIDTHS),
            errors=expand(f"{OUT}/quantization/{{method}}-w{{bits}}.error.parquet", method=METHOD, bits=WIDTHS),
            stats=f"{OUT}/calibration/routing_stats.json",
        params:
            model=model_settings(),
            dataset=train_data_settings(),
            calibration=config["calibration"],
            quantization=config["quantization"],
            seed=config["seed"],
            widths=WIDTHS,
            method=METHOD,
        log:
            f"{LOGS}/quantize/fused.log",
        benchmark:
            f"{BENCH}/quantize/fused.tsv"
        threads: config["evaluate"].get("threads", 1)
        resources:
            mem_mb=8000,
            runtime=240,
        script:
            "../scripts/quantize_fused.py"

else:

    rule quantize:
        """All experts at one width with one method, reusing the calibration Hessians; packed safetensors + error table."""
        input:
            model=model_files(),
            hessians=f"{OUT}/calibration/hessians.safetensors",
            heldout=f"{OUT}/calibration/heldout_hessians.safetensors",
        output:
            weights=f"{OUT}/quantization/{{method}}-w{{bits}}.safetensors",
            error=f"{OUT}/quantization/{{method}}-w{{bits}}.error.parquet",
        params:
            model=model_settings(),
            quantization=config["quantization"],
        log:
            f"{LOGS}/quantize/{{method}}-w{{bits}}.log",
        benchmark:
            f"{BENCH}/quantize/{{method}}-w{{bits}}.tsv"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=240,
        script:
            "../scripts/quantize.py"


rule quantization_report:
    """Per-expert quantization error of every width in one table, and its heatmap."""
    input:
        expand(f"{OUT}/quantization/{{method}}-w{{bits}}.error.parquet", method=METHOD, bits=WIDTHS),
    output:
        table=f"{OUT}/quantization/error.parquet",
        figure=report(
            f"{OUT}/figures/quant_error.png",
            caption="../report/quant_error.rst",
            category="Quantization",
        ),
    log:
        f"{LOGS}/quantization_report.log",
    benchmark:
        f"{BENCH}/quantization_report.tsv"
    script:
        "../scripts/quantization_report.py"
