"""Figures from a small cells table: the headline axis is the recorded pareto_measure, subtitles name model, data
set, n, engine and hardware, one precision-budget line per tier pair, the CPU throughput figure says it is not a
speed result."""
from __future__ import annotations

import pandas as pd
import pytest

from moesweep import plots


def cells_table(device="cpu") -> pd.DataFrame:
    rows = [
        # cell, policy, routing, precision, top_k, cf, hi, lo, budget, acc, bytes/token, tok/s
        ("native-w16", "native", "native", "full", 4, None, 16, 16, None, 0.82, 3.0e6, 900.0),
        ("top1-cf1-w16", "top1-capacity", "topk", "full", 1, 1.0, 16, 16, None, 0.01, 2.2e6, 1000.0),
        ("top1-w16", "top1-capacity", "topk", "full", 1, None, 16, 16, None, 0.05, 2.3e6, 980.0),
        ("native-w4", "static-uniform", "native", "uniform", 4, None, 4, 4, None, 0.84, 1.5e6, 850.0),
        ("native-hc8-2-b25", "static-hotcold", "native", "hotcold", 4, None, 8, 2, 0.25, 0.77, 1.2e6, 800.0),
        ("native-hc8-2-b50", "static-hotcold", "native", "hotcold", 4, None, 8, 2, 0.5, 0.82, 1.8e6, 790.0),
        ("native-hc8-4-b50", "static-hotcold", "native", "hotcold", 4, None, 8, 4, 0.5, 0.81, 1.9e6, 795.0),
        ("native-dyn8-2-b25", "dynamic", "native", "dynamic", 4, None, 8, 2, 0.25, 0.78, 1.1e6, 700.0),
        ("native-off-b25", "offload", "native", "offload", 4, None, 16, 16, 0.25, 0.82, 3.0e6, 400.0),
    ]
    df = pd.DataFrame(rows, columns=["cell", "policy", "routing_policy", "precision_policy", "top_k", "capacity_factor",
                                     "bits_high", "bits_low", "memory_budget", "accuracy_strict",
                                     "weight_bytes_per_token", "fixed_decode_tokens_per_s"])
    df["accuracy_ci_low"] = df["accuracy_strict"] - 0.05
    df["accuracy_ci_high"] = df["accuracy_strict"] + 0.05
    df["fixed_decode_tokens_per_s_min"] = df["fixed_decode_tokens_per_s"] * 0.9
    df["fixed_decode_tokens_per_s_max"] = df["fixed_decode_tokens_per_s"] * 1.1
    df["tokens_per_s"] = df["fixed_decode_tokens_per_s"] * 0.5
    df["drop_rate"] = [0, 0.4, 0, 0, 0, 0, 0, 0, 0]
    df["expert_weight_bytes_16bit"] = 3.0e6
    df["expert_weight_bytes"] = df["expert_weight_bytes_16bit"] * df["memory_budget"].fillna(1.0)
    df.loc[df["precision_policy"] == "uniform", "expert_weight_bytes"] = 0.9e6
    df["pareto_measure"] = "weight_bytes_per_token" if device == "cpu" else "fixed_decode_tokens_per_s"
    df["pareto"] = df["cell"].isin(["native-w4", "native-dyn8-2-b25", "native-hc8-2-b25"])
    df = df.assign(model="tiny-qwen3-moe", dataset="synthetic", n=200, prompt_preset="zeroshot", batch_size=32,
                   engine="reference" if device == "cpu" else "fast", device=device, hardware="AMD EPYC (2 threads)",
                   fixed_batch=32, fixed_prompt_tokens=40, fixed_decode_steps=31, fixed_repeats=3)
    return df


@pytest.fixture
def captured(monkeypatch):
    figs = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.__setitem__(str(path), fig))
    return figs


def texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
    return "\n".join(parts)


SUBTITLE = "tiny-qwen3-moe · synthetic (n=200, zeroshot) · reference engine · AMD EPYC (2 threads) · batch 32"


def test_headline_is_bytes_per_token_on_cpu(captured):
    plots.pareto(cells_table(), "pareto.png")
    fig = captured["pareto.png"]
    ax = fig.axes[0]
    assert "weight bytes read per generated token (MB" in ax.get_xlabel() and "cheaper" in ax.get_xlabel()
    assert SUBTITLE in ax.get_title() and "not a clock" in ax.get_title()
    # the top-1 cell's point sits left of native (fewer bytes): x data of the plotted points in MB
    xs = sorted(float(x) for line in ax.lines for x in line.get_xdata())
    assert 2.2 in [round(x, 1) for x in xs] and 3.0 in [round(x, 1) for x in xs]
    # a small model's bytes in kB
    small = cells_table().assign(weight_bytes_per_token=lambda d: d["weight_bytes_per_token"] / 100)
    plots.pareto(small, "pareto.png")
    assert "(kB;" in captured["pareto.png"].axes[0].get_xlabel()
    # labels named once each, none overlapping
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) >= 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_headline_is_measured_tokens_per_s_on_cuda(captured):
    plots.pareto(cells_table("cuda"), "pareto.png")
    assert "decode tokens / s (fixed-shape pass" in captured["pareto.png"].axes[0].get_xlabel()


def test_throughput_figure_says_cpu_is_not_a_speed_result(captured):
    plots.throughput(cells_table(), "throughput.png")
    assert "NOT a speed result" in texts(captured["throughput.png"])
    plots.throughput(cells_table("cuda"), "throughput.png")
    assert "NOT a speed result" not in texts(captured["throughput.png"])


def test_precision_budget_draws_one_line_per_tier_pair(captured):
    plots.precision_budget(cells_table(), "budget.png")
    ax = captured["budget.png"].axes[0]
    labels = set(ax.get_legend_handles_labels()[1])
    assert {"hot/cold 8/2 bit", "hot/cold 8/4 bit", "full", "uniform"} <= labels
    assert SUBTITLE in ax.get_title()


@pytest.mark.parametrize("name", ["capacity_factor", "dynamic_precision"])
def test_secondary_figures_use_the_headline_measure_and_name_the_run(captured, name):
    getattr(plots, name)(cells_table(), f"{name}.png")
    text = texts(captured[f"{name}.png"])
    assert "weight bytes / generated token (MB)" in text and SUBTITLE in text
    assert "tokens / s" not in text


def test_figures_render_to_files(tmp_path):
    for name in ("pareto", "throughput", "capacity_factor", "precision_budget", "dynamic_precision"):
        getattr(plots, name)(cells_table(), str(tmp_path / f"{name}.png"))
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.svg").exists()
