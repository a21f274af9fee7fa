if config["quantization"].get("fused", False):

    rule quantize:
        """Calibration and every width in one layer-by-layer pass (quantization.fused): no Hessian files."""
        input:
            model=model_files(),
        output:
            weights=expand("results/quantization/{method}-w{bits}.safetensors", method=METHOD, bits=WIDTHS),
            errors=expand("results/quantization/{method}-w{bits}.error.parquet", method=METHOD, bits=WIDTHS),
            stats="results/calibration/routing_stats.json",
        params:
            model=config["model"],
            dataset=config["dataset"],
            calibration=config["calibration"],
            quantization=config["quantization"],
            seed=config["seed"],
            widths=WIDTHS,
            method=METHOD,
        log:
            "logs/quantize/fused.log",
        benchmark:
            "benchmarks/rules/quantize/fused.tsv"
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
            hessians="results/calibration/hessians.safetensors",
            heldout="results/calibration/heldout_hessians.safetensors",
        output:
            weights="results/quantization/{method}-w{bits}.safetensors",
            error="results/quantization/{method}-w{bits}.error.parquet",
        params:
            model=config["model"],
            quantization=config["quantization"],
        log:
            "logs/quantize/{method}-w{bits}.log",
        benchmark:
            "benchmarks/rules/quantize/{method}-w{bits}.tsv"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=240,
        script:
            "../scripts/quantize.py"


rule quantization_report:
    """Per-expert quantization error of every width in one table, and its heatmap."""
    input:
        expand("results/quantization/{method}-w{bits}.error.parquet", method=METHOD, bits=WIDTHS),
    output:
        table="results/quantization/error.parquet",
        figure=report(
            "results/figures/quant_error.png",
            caption="../report/quant_error.rst",
            category="Quantization",
        ),
    log:
        "logs/quantization_report.log",
    benchmark:
        "benchmarks/rules/quantization_report.tsv"
    script:
        "../scripts/quantization_report.py"
