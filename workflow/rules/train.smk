# Train the embedded default model (tiny Qwen3-MoE on synthetic GSM-style problems). Not part of `all`:
# the result of a real run ships in resources/models/tiny-qwen3-moe; rebuild with `snakemake train_model`.
# Uses a GPU when present (about 4 minutes on one H200); on 2 CPU cores expect hours.
# config["train"] holds moesweep.train.TrainSettings fields plus `seed`; missing fields take their defaults.
_train_config = dict(config.get("train", {}))


rule train_model:
    output:
        directory("results/train/tiny-qwen3-moe"),
    params:
        settings={k: v for k, v in _train_config.items() if k != "seed"},
        seed=_train_config.get("seed", 0),
    log:
        "logs/train/tiny-qwen3-moe.log",
    benchmark:
        "benchmarks/rules/train/tiny-qwen3-moe.tsv"
    script:
        "../scripts/train_model.py"
