"""Figures, drawn from the Parquet tables only (never from live objects), saved as PNG and SVG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_path  # noqa: E402


def _save(fig, path: str) -> None:
    for p in (Path(path), Path(path).with_suffix(".svg")):
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=p.suffix[1:])
    plt.close(fig)


def _subtitle(cells: pd.DataFrame) -> str:
    """Model, data set (n, preset), engine(s), hardware, batch: what every evaluation figure's numbers depend on."""
    c = cells.iloc[0]
    engines = "/".join(sorted(cells["engine"].astype(str).unique()))
    return (f"{c['model']} · {c['dataset']} (n={c['n']}, {c['prompt_preset']}) · {engines} engine · "
            f"{c['hardware']} · batch {c['batch_size']}")


# The cost axis of the headline figure (results.headline_measure, recorded per row as pareto_measure): long label
# (the headline's x-axis), short label (panels of the other figures), and whether lower is better.
MEASURES = {
    "weight_bytes_per_token": ("weight bytes read per generated token ({unit}; fixed-shape pass, measured routing)",
                               "weight bytes / generated token ({unit})", True),
    "expert_bytes_per_token": ("expert weight bytes read per generated token ({unit}; fixed-shape pass)",
                               "expert bytes / generated token ({unit})", True),
    "fixed_decode_tokens_per_s": ("decode tokens / s (fixed-shape pass, median of repeats)",
                                  "decode tokens / s (fixed shape)", False),
}


def _measure(cells: pd.DataFrame, short: bool = False) -> tuple[str, str, float, bool]:
    """(column, axis label, scale to display units, lower is better); bytes in MB, or kB when below 1 MB."""
    name = str(cells["pareto_measure"].iloc[0])
    long_label, short_label, lower = MEASURES[name]
    scale, unit = 1.0, ""
    if lower:
        scale, unit = (1e-6, "MB") if cells[name].max() >= 1e6 else (1e-3, "kB")
    return name, (short_label if short else long_label).format(unit=unit), scale, lower


def _place_labels(ax, xs, ys, texts, fontsize=7) -> None:
    """Annotate points without overlapping labels: each label takes the first of a few offsets whose box clears
    the labels already placed (greedy, in the order given)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    offsets = [(4, 3, "left"), (4, -9, "left"), (-4, 3, "right"), (-4, -9, "right"), (4, 11, "left"),
               (-4, 11, "right"), (4, -17, "left"), (-4, -17, "right"), (4, 19, "left"), (4, -25, "left")]
    placed = []
    for x, y, text in zip(xs, ys, texts):
        for dx, dy, ha in offsets:
            a = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha,
                            color="black")
            box = a.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            a.remove()
        else:  # every slot taken: keep the first, with a leader line, rather than drop the name
            a = ax.annotate(text, (x, y), xytext=(8, 26), textcoords="offset points", fontsize=fontsize,
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
            placed.append(a.get_window_extent(renderer))


def pareto(cells: pd.DataFrame, path: str) -> None:
    """The headline: accuracy with Wilson 95 % intervals against the cell's cost (results.headline_measure: weight
    bytes read per generated token off CUDA, fixed-shape decode tokens/s on CUDA) and the Pareto frontier."""
    sns.set_theme(style="whitegrid")
    name, label, scale, lower = _measure(cells)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    families = list(dict.fromkeys(cells["policy"]))
    palette = dict(zip(families, sns.color_palette("tab10", len(families))))
    markers = dict(zip(families, "os^DvP*Xh<>"))
    for fam in families:
        d = cells[cells["policy"] == fam]
        ax.errorbar(scale * d[name], 100 * d["accuracy_strict"],
                    yerr=[100 * (d["accuracy_strict"] - d["accuracy_ci_low"]), 100 * (d["accuracy_ci_high"] - d["accuracy_strict"])],
                    fmt=markers[fam], color=palette[fam], label=fam, ms=8, capsize=3, alpha=0.9)
    # Frontier as a staircase from the cheapest cell: accuracy only rises as the cost does.
    front = cells[cells["pareto"]].sort_values(name, ascending=lower)
    ax.step(scale * front[name], 100 * front["accuracy_strict"], where="post" if lower else "pre", ls="--",
            color="black", lw=1.2, label="Pareto frontier", zorder=0)
    # Name the frontier, the reference and single-cell families; the rest are told apart by the legend and by the
    # per-family figures (capacity factor, precision budget), which keeps this one readable.
    singles = cells["policy"].map(cells["policy"].value_counts()) == 1
    named = cells[cells["pareto"] | singles].sort_values("accuracy_strict", ascending=False)
    fig.canvas.draw()
    _place_labels(ax, scale * named[name], 100 * named["accuracy_strict"], named["cell"])
    ax.set_xlabel(("← cheaper · " if lower else "") + label + ("" if lower else " · faster →"))
    ax.set_ylabel("accuracy, strict match (%) ± Wilson 95 %")
    note = ("cost from each cell's measured routing and precision traffic, not a clock (a CPU clock is not a speed "
            "result here)" if name != "fixed_decode_tokens_per_s" else "measured on the GPU, fixed shape")
    ax.set_title(f"Accuracy vs cost per grid cell — {note}\n" + _subtitle(cells), fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def throughput(cells: pd.DataFrame, path: str) -> None:
    """Secondary figure: the fixed-shape pass's decode tokens/s per cell (median, bar = min-max over repeats) and
    the end-to-end tokens/s of the accuracy run. On a CPU it says in its title that it is not a speed result."""
    sns.set_theme(style="whitegrid")
    d = cells.sort_values("fixed_decode_tokens_per_s")
    cpu = not d["device"].astype(str).str.startswith("cuda").all()
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(d) + 2.2))
    y = np.arange(len(d))
    ax.errorbar(d["fixed_decode_tokens_per_s"], y, xerr=[d["fixed_decode_tokens_per_s"] - d["fixed_decode_tokens_per_s_min"],
                d["fixed_decode_tokens_per_s_max"] - d["fixed_decode_tokens_per_s"]], fmt="o", capsize=3,
                label=f"fixed shape: batch {d['fixed_batch'].iloc[0]}, prompt {d['fixed_prompt_tokens'].iloc[0]} tokens, "
                      f"{d['fixed_decode_steps'].iloc[0]} steps; median of {d['fixed_repeats'].iloc[0]} (bar: min–max)")
    ax.plot(d["tokens_per_s"], y, "x", color="grey", label="end to end (accuracy run; output length included)")
    ax.set_yticks(y, d["cell"], fontsize=7)
    ax.set_xlabel("tokens / s")
    ax.legend(fontsize=7, loc="lower right")
    head = ("CPU clock — NOT a speed result: Python and kernel-launch overhead dominate this model "
            "(the headline figure uses bytes per token)" if cpu else "Decode throughput, measured on the GPU")
    ax.set_title(head + "\n" + _subtitle(cells), fontsize=9)
    _save(fig, path)


def capacity_factor(cells: pd.DataFrame, path: str) -> None:
    """Accuracy, tokens/s and drop rate against capacity factor, one line per k′, native point marked."""
    sns.set_theme(style="whitegrid")
    d = cells[(cells["routing_policy"] == "topk") & (cells["precision_policy"] == "full")].copy()
    native = cells[(cells["routing_policy"] == "native") & (cells["precision_policy"] == "full")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    if d.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no top-k′ cells at full precision in this grid", ha="center", transform=ax.transAxes)
        _save(fig, path)
        return
    measure, measure_label, scale, _ = _measure(cells, short=True)
    finite = sorted(d["capacity_factor"].dropna().unique())
    none_x = (max(finite) * 1.5) if finite else 1.0  # dropless drawn to the right of the largest CF
    d["cf_x"] = d["capacity_factor"].fillna(none_x)
    for k, g in d.sort_values("cf_x").groupby("top_k"):
        g = g.sort_values("cf_x")
        axes[0].errorbar(g["cf_x"], 100 * g["accuracy_strict"], yerr=[100 * (g["accuracy_strict"] - g["accuracy_ci_low"]),
                         100 * (g["accuracy_ci_high"] - g["accuracy_strict"])], marker="o", capsize=3, label=f"top-{k}")
        axes[1].plot(g["cf_x"], scale * g[measure], marker="o", label=f"top-{k}")
        axes[2].plot(g["cf_x"], 100 * g["drop_rate"], marker="o", label=f"top-{k}")
    if not native.empty:
        n = native.iloc[0]
        axes[0].axhline(100 * n["accuracy_strict"], color="black", ls="--", lw=1, label=f"native top-{n['top_k']}")
        axes[1].axhline(scale * n[measure], color="black", ls="--", lw=1, label=f"native top-{n['top_k']}")
    ticks = finite + [none_x]
    for ax, ylabel in zip(axes, ("accuracy, strict (%)", measure_label, "assignments dropped (%)")):
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["none"])
        ax.set_xlabel("capacity factor (none = dropless)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Top-k′ routing under expert capacity limits · " + _subtitle(cells), fontsize=10)
    _save(fig, path)


def hotness(profile: pd.DataFrame, path: str) -> None:
    """Routed probability share per (layer, expert); experts sorted hottest-first within each layer."""
    sns.set_theme(style="white")
    wide = profile.pivot(index="layer", columns="expert", values="prob_share")
    sorted_rows = np.sort(wide.to_numpy(), axis=1)[:, ::-1]
    E = sorted_rows.shape[1]
    top_quarter = sorted_rows[:, : max(1, E // 4)].sum(axis=1).mean()
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(wide) + 2.5), gridspec_kw={"width_ratios": [1, 1]},
                             layout="constrained")  # room for the two-line title
    sns.heatmap(100 * wide, ax=axes[0], cmap="magma", cbar_kws={"label": "share of routed probability mass (%)"})
    axes[0].set_title("by expert id")
    sns.heatmap(100 * pd.DataFrame(sorted_rows, index=wide.index), ax=axes[1], cmap="magma",
                cbar_kws={"label": "share (%)"})
    axes[1].set_title("sorted hottest → coldest")
    axes[1].set_xlabel("hotness rank")
    source = (f"\nprofiled problems: {profile['profile_source'].iloc[0]}, content hash {profile['profile_hash'].iloc[0]}"
              if "profile_source" in profile.columns else "")
    fig.suptitle(f"Expert hotness (profile stage): the hottest 25 % of experts get {100 * top_quarter:.0f} % of the "
                 f"routed mass on average (uniform = 25 %){source}", fontsize=10)
    _save(fig, path)


def quant_error(errors: pd.DataFrame, path: str) -> None:
    """Relative output error per (layer, expert) for each width, projections averaged."""
    sns.set_theme(style="white")
    widths = sorted(errors["bits"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 0.5 * errors["layer"].nunique() + 2.5),
                             squeeze=False, layout="constrained")
    for ax, bits in zip(axes[0], widths):
        d = errors[errors["bits"] == bits].groupby(["layer", "expert"])["relative_error"].mean().unstack()
        sns.heatmap(d, ax=ax, cmap="viridis", cbar_kws={"label": "relative output error"})
        ax.set_title(f"{bits}-bit (median {d.stack().median():.3f})")
    fig.suptitle("Per-expert quantization error on held-out calibration tokens", fontsize=10)
    _save(fig, path)


def precision_budget(cells: pd.DataFrame, path: str) -> None:
    """Accuracy and expert-weight memory of each precision policy (full, uniform widths, hot/cold budgets)."""
    sns.set_theme(style="whitegrid")
    d = cells[(cells["routing_policy"] == "native") & cells["precision_policy"].isin(["full", "uniform", "hotcold"])].copy()
    d["memory_fraction"] = d["expert_weight_bytes"] / d["expert_weight_bytes_16bit"]
    fig, ax = plt.subplots(figsize=(8, 5))
    # One line per policy and tier pair: a hot 8 / cold 2 map and a hot 8 / cold 4 map are different curves
    # (joined, the line suggested a trend across tiers that no single policy has).
    d["line"] = np.where(d["precision_policy"] == "hotcold",
                         "hot/cold " + d["bits_high"].astype(str) + "/" + d["bits_low"].astype(str) + " bit",
                         d["precision_policy"])
    for line, g in d.groupby("line"):
        g = g.sort_values("memory_fraction")
        ax.errorbar(100 * g["memory_fraction"], 100 * g["accuracy_strict"],
                    yerr=[100 * (g["accuracy_strict"] - g["accuracy_ci_low"]), 100 * (g["accuracy_ci_high"] - g["accuracy_strict"])],
                    marker="o", capsize=3, label=line, ls="-" if len(g) > 1 else "none")
    fig.canvas.draw()
    _place_labels(ax, 100 * d["memory_fraction"], 100 * d["accuracy_strict"], d["cell"].str.replace("native-", ""))
    ax.set_xlabel("resident expert-weight bytes (% of 16-bit)")
    ax.set_ylabel("accuracy, strict (%)")
    ax.set_title("Accuracy vs expert memory, native routing\n" + _subtitle(cells), fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the points fill the axes
    _save(fig, path)


def load_imbalance(layers: pd.DataFrame, path: str, cells: pd.DataFrame | None = None) -> None:
    """Expert load imbalance (max/mean kept assignments per expert) per cell and layer."""
    sns.set_theme(style="white")
    wide = layers.pivot(index="cell", columns="layer", values="load_imbalance")
    wide = wide.loc[wide.mean(axis=1).sort_values().index]
    fig, ax = plt.subplots(figsize=(1.2 * wide.shape[1] + 5, 0.35 * len(wide) + 1.8), layout="constrained")
    sns.heatmap(wide, ax=ax, annot=True, fmt=".1f", cmap="rocket_r", vmin=1,
                cbar_kws={"label": "max / mean assignments per expert (1 = balanced)"})
    ax.set_title("Expert load imbalance per layer (evaluation traffic, prefill + decode)"
                 + ("\n" + _subtitle(cells) if cells is not None else ""), fontsize=9)
    ax.set_ylabel("")
    _save(fig, path)


def dynamic_precision(cells: pd.DataFrame, path: str) -> None:
    """Dynamic vs static hot/cold vs frozen vs offloading at each memory budget (accuracy and tokens/s)."""
    sns.set_theme(style="whitegrid")
    policies = ["hotcold", "frozen", "dynamic", "offload"]
    d = cells[cells["precision_policy"].isin(policies)].copy()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    if d.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no budgeted precision cells in this grid", ha="center", transform=ax.transAxes)
        _save(fig, path)
        return
    tiers = np.where(d["precision_policy"] == "offload", "16-bit LRU",
                     d["bits_high"].astype(str) + "/" + d["bits_low"].astype(str) + " bit")
    d["variant"] = d["precision_policy"] + " " + tiers
    d["group"] = (100 * d["memory_budget"]).round(1).astype(str) + " %"
    order = d.sort_values("memory_budget")["group"].unique()
    rank = {p: i for i, p in enumerate(policies)}
    hue_order = sorted(d["variant"].unique(), key=lambda v: (rank[v.split()[0]], v))
    measure, measure_label, measure_scale, _ = _measure(cells, short=True)
    for ax, col, label in ((axes[0], "accuracy_strict", "accuracy, strict (%)"), (axes[1], measure, measure_label)):
        scale = 100 if col == "accuracy_strict" else measure_scale
        sns.barplot(data=d.assign(v=scale * d[col]), x="group", y="v", hue="variant", order=order,
                    hue_order=hue_order, ax=ax, errorbar=None)
        if col == "accuracy_strict":  # Wilson intervals on the bars
            for bars, pol in zip(ax.containers, hue_order):
                # a variant's container holds bars only for the budgets it has (e.g. no 8/4 bit at 25 %)
                present = [g for g in order if ((d["group"] == g) & (d["variant"] == pol)).any()]
                for bar, grp in zip(bars, present):
                    r = d[(d["group"] == grp) & (d["variant"] == pol)]
                    if len(r):
                        r = r.iloc[0]
                        x = bar.get_x() + bar.get_width() / 2
                        ax.errorbar(x, 100 * r["accuracy_strict"], yerr=[[100 * (r["accuracy_strict"] - r["accuracy_ci_low"])],
                                    [100 * (r["accuracy_ci_high"] - r["accuracy_strict"])]], color="black", capsize=2, lw=1)
        ax.set_xlabel("expert memory budget (% of the 16-bit expert bytes)")
        ax.set_ylabel(label)
        if ax is axes[1]:  # one legend, outside the bars
            ax.legend(title="precision policy, tiers", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.get_legend().remove()
    full = cells[(cells["routing_policy"] == "native") & (cells["precision_policy"] == "full")]
    if not full.empty:
        axes[0].axhline(100 * full.iloc[0]["accuracy_strict"], color="black", ls="--", lw=1)
    fig.suptitle("Expert precision under a memory budget (dashed: full precision) · " + _subtitle(cells), fontsize=10)
    _save(fig, path)


def projection(cells: pd.DataFrame, path: str) -> None:
    """Accuracy vs projected decode tokens/s, one panel per cost-model hardware profile; hollow = does not fit."""
    sns.set_theme(style="whitegrid")
    prefix = "projected_tokens_per_s_"
    profiles = [c[len(prefix):] for c in cells.columns if c.startswith(prefix)]
    if not profiles:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.text(0.5, 0.5, "no cost_model profiles in this config", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save(fig, path)
        return
    ncols = min(3, len(profiles))
    nrows = -(-len(profiles) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.5 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    families = list(dict.fromkeys(cells["policy"]))
    palette = dict(zip(families, sns.color_palette("tab10", len(families))))
    markers = dict(zip(families, "os^DvP*Xh<>"))
    for ax, name in zip(axes.flat, profiles):
        x, fits = cells[prefix + name], cells[f"fits_{name}"].astype(bool)
        for fam in families:
            sel = cells["policy"] == fam
            for fit in (True, False):
                d = cells[sel & (fits == fit)]
                if d.empty:
                    continue
                ax.errorbar(x[d.index], 100 * d["accuracy_strict"],
                            yerr=[100 * (d["accuracy_strict"] - d["accuracy_ci_low"]),
                                  100 * (d["accuracy_ci_high"] - d["accuracy_strict"])],
                            fmt=markers[fam], color=palette[fam], mfc=palette[fam] if fit else "none", ms=7, capsize=2,
                            alpha=0.9, label=fam if fit or not (sel & fits).any() else None)
        ax.set_xscale("log")
        ax.set_title(f"{name}: {int(fits.sum())}/{len(cells)} cells fit", fontsize=9)
        ax.set_xlabel("projected decode tokens / s (log)")
    for ax in axes.flat[len(profiles):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy, strict (%) ± Wilson 95 %")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper", title="hollow = does not fit")
    model = cells["projected_model"].iloc[0]
    fig.suptitle(f"Decode tokens/s projected by the cost model on {model}'s shapes (not measured)\n"
                 f"accuracy measured: {_subtitle(cells)}", fontsize=10)
    _save(fig, path)
