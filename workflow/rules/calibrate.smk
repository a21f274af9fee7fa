# With quantization.fused the quantize rule calibrates itself, layer by layer, and no Hessian file exists
# (for Qwen3-30B-A3B they would be 2 x 118 GB); see quantize.smk.
if not config["quantization"].get("fused", False):

    rule calibrate:
        """Per-expert input Hessians (for GPTQ) and routing statistics from teacher-forced train problems."""
        input:
            model=model_files(),
            data=data_files(*CALIBRATION_DATA),
        output:
            hessians=f"{OUT}/calibration/hessians.safetensors",
            heldout=f"{OUT}/calibration/heldout_hessians.safetensors",
            stats=f"{OUT}/calibration/routing_stats.json",
        params:
            model=model_settings(),
            dataset=train_data_settings(),
            calibration=config["calibration"],
            seed=config["seed"],
        log:
            f"{LOGS}/calibrate.log",
        benchmark:
            f"{BENCH}/calibrate.tsv"
        threads: config["evaluate"].get("threads", 1)
        resources:
            mem_mb=8000,
            runtime=120,
        script:
            "../scripts/calibrate.py"
