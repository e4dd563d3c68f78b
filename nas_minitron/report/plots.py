"""The report's figures and derived tables, each from plain DataFrames / tensors of one run directory.

Every builder returns Plotly figures plus the table behind them, so the HTML and the CSVs beside it agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.space.spaces import AXES

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import plotly.graph_objects as go
else:
    np = lazy_import("numpy")
    pd = lazy_import("pandas")
    go = lazy_import("plotly.graph_objects")

__all__ = [
    "dmc_figure",
    "eval_figures",
    "human",
    "importance_figures",
    "loss_curve_figure",
    "parallel_figure",
    "pareto_figure",
    "pareto_mask",
    "ranking_figures",
    "rung_figures",
    "spearman",
]

_AXIS_LABELS = {"num_hidden_layers": "layers", "hidden_size": "hidden", "intermediate_size": "MLP",
                "num_attention_heads": "heads", "num_key_value_heads": "KV heads"}  # fmt: skip
_MAX_NEURON_BINS = 64
_LAYOUT = dict(template="plotly_white", height=430, margin=dict(l=60, r=20, t=50, b=50))


def _fig(**layout: Any) -> go.Figure:
    return go.Figure(layout={**_LAYOUT, **layout})


def pareto_mask(params: Sequence[float], losses: Sequence[float]) -> list[bool]:
    """True where no other point has both fewer-or-equal params and a lower loss (lower is better on both)."""
    order = sorted(range(len(params)), key=lambda i: (params[i], losses[i]))
    mask, best = [False] * len(params), float("inf")
    for i in order:
        if losses[i] < best:
            mask[i], best = True, losses[i]
    return mask


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation (average ranks for ties) over the index both series share; nan below 2 points."""
    both = a.to_frame("a").join(b.to_frame("b"), how="inner").dropna()
    if len(both) < 2:
        return float("nan")
    ranks = both.rank(method="average")
    if ranks["a"].std() == 0 or ranks["b"].std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks["a"], ranks["b"])[0, 1])


def pareto_figure(
    trials: pd.DataFrame, winners: pd.DataFrame | None, config: dict[str, Any]
) -> tuple[go.Figure, pd.DataFrame]:
    """Params vs short-distillation val loss of finished trials; front, winners, teacher and budget marked."""
    done = trials[trials["status"] == "COMPLETE"].dropna(subset=["val_loss"]).copy()
    done["on_front"] = pareto_mask(list(done["params"]), list(done["val_loss"]))
    winner_names = set(winners["name"]) if winners is not None else set()
    done["is_winner"] = done["name"].isin(winner_names)
    fig = _fig(title="Pareto front: parameters vs. short-distillation validation loss",
               xaxis_title="parameters", yaxis_title="validation loss (short distillation)")  # fmt: skip
    hover = "%{text}<br>params %{x:,}<br>val loss %{y:.4f}<extra></extra>"
    rest = done[~done["is_winner"]]
    fig.add_scatter(x=rest["params"], y=rest["val_loss"], text=rest["name"], mode="markers", name="trials",
                    marker=dict(size=9, color="#8fa8c8"), hovertemplate=hover)  # fmt: skip
    front = done[done["on_front"]].sort_values("params")
    fig.add_scatter(x=front["params"], y=front["val_loss"], text=front["name"], mode="lines", name="Pareto front",
                    line=dict(color="#1f4e8c", shape="hv"), hovertemplate=hover)  # fmt: skip
    best = done[done["is_winner"]]
    fig.add_scatter(x=best["params"], y=best["val_loss"], text=best["name"], mode="markers", name="winners",
                    marker=dict(size=16, symbol="star", color="#e4572e", line=dict(width=1, color="black")),
                    hovertemplate=hover)  # fmt: skip
    teacher_params = config.get("teacher_params")
    if teacher_params:
        label = f"teacher {config.get('teacher_arch', '')}".strip()
        if config.get("teacher_val_loss") is not None:
            fig.add_scatter(x=[teacher_params], y=[config["teacher_val_loss"]], mode="markers", name=label,
                            marker=dict(size=14, symbol="diamond", color="black"), text=[label],
                            hovertemplate=hover)  # fmt: skip
        # not drawn as a line: at a fraction of the teacher's size it would squeeze the candidates into a corner
        fig.update_layout(title=f"{fig.layout.title.text} (teacher {label}: {human(float(teacher_params))} "
                                f"parameters, off this axis)")
    if config.get("budget_params"):
        fig.add_vline(x=config["budget_params"], line_dash="dash", line_color="#e4572e", annotation_text="budget")
    xs = [float(x) for x in done["params"]] + ([float(config["budget_params"])] if config.get("budget_params") else [])
    if xs:
        pad = max(1.0, 0.05 * (max(xs) - min(xs)) or 0.01 * max(xs))
        fig.update_xaxes(range=[min(xs) - pad, max(xs) + pad], tickformat=".3s")
    columns = ["name", "params", "val_loss", "val_kl", "on_front", "is_winner", *AXES]
    return fig, done[[c for c in columns if c in done.columns]].sort_values("params")


def parallel_figure(trials: pd.DataFrame) -> go.Figure:
    """Parallel coordinates: one line per finished trial through its arch axes, ending at its loss."""
    done = trials[trials["status"] == "COMPLETE"].dropna(subset=["val_loss"])
    dims = [dict(label=_AXIS_LABELS[a], values=done[a]) for a in AXES if a in done.columns]
    dims += [dict(label="params", values=done["params"]), dict(label="val loss", values=done["val_loss"])]
    line = dict(color=done["val_loss"], colorscale="Viridis_r", showscale=True, colorbar=dict(title="loss"))
    layout = {**_LAYOUT, "title": "Architecture axes vs. validation loss", "margin": dict(l=60, r=40, t=110, b=40)}
    return go.Figure(go.Parcoords(line=line, dimensions=dims), layout=layout)


def ranking_figures(curves: pd.DataFrame, trials: pd.DataFrame) -> tuple[list[go.Figure], pd.DataFrame, pd.DataFrame]:
    """Each candidate's rank at each validation step, and Spearman of each step's ranking to the final one."""
    finished = set(trials.loc[trials["status"] == "COMPLETE", "name"])
    curves = curves[curves["name"].isin(finished)]
    losses = curves.pivot_table(index="name", columns="step", values="val_loss", aggfunc="last")  # [trial, step]
    ranks = losses.rank(axis=0, method="min")
    final = trials[trials["status"] == "COMPLETE"].set_index("name")["val_loss"].astype(float)
    rows = [dict(step=int(step), spearman_to_final=spearman(losses[step], final),
                 num_candidates=int(losses[step].notna().sum())) for step in losses.columns]  # fmt: skip
    corr = pd.DataFrame(rows, columns=["step", "spearman_to_final", "num_candidates"])
    rank_fig = _fig(title="Ranking stability: rank at each validation step (1 = lowest loss)",
                    xaxis_title="validation step", yaxis=dict(title="rank", autorange="reversed"))  # fmt: skip
    for name, row in ranks.iterrows():
        rank_fig.add_scatter(x=list(row.index), y=list(row.values), mode="lines+markers", name=str(name),
                             hovertemplate=f"{name}<br>step %{{x}}: rank %{{y}}<extra></extra>")  # fmt: skip
    corr_fig = _fig(title="Spearman correlation of each step's ranking with the final ranking",
                    xaxis_title="validation step", yaxis=dict(title="Spearman ρ", range=[-1.05, 1.05]))  # fmt: skip
    corr_fig.add_scatter(x=corr["step"], y=corr["spearman_to_final"], mode="lines+markers", name="Spearman ρ")
    long = ranks.stack().rename("rank").reset_index().merge(
        losses.stack().rename("val_loss").reset_index(), on=["name", "step"]
    )
    return [rank_fig, corr_fig], long, corr


def importance_figures(scores: ImportanceScores) -> tuple[list[go.Figure], pd.DataFrame]:
    """Heatmaps of head and (binned) neuron importance per layer, and layer-importance curves."""
    heads = scores.heads.float().numpy()  # [L, A]
    neurons = scores.neurons.float()  # [L, I]
    num_bins = min(_MAX_NEURON_BINS, neurons.shape[1])
    edges = [round(i * neurons.shape[1] / num_bins) for i in range(num_bins + 1)]
    binned = [neurons[:, a:b].mean(dim=1).numpy() for a, b in zip(edges, edges[1:])]  # num_bins x [L]
    head_fig = _fig(title="Attention-head importance", xaxis=dict(title="head", dtick=1),
                    yaxis=dict(title="layer", dtick=1))
    head_fig.add_heatmap(z=heads, colorscale="Viridis", hovertemplate="layer %{y}, head %{x}: %{z:.4g}<extra></extra>")
    neuron_fig = _fig(title=f"MLP-neuron importance (mean over {num_bins} bins of neuron index)",
                      xaxis_title=f"neuron bin (width {neurons.shape[1] / num_bins:.0f})",
                      yaxis=dict(title="layer", dtick=1))  # fmt: skip
    neuron_fig.add_heatmap(z=[list(col) for col in zip(*binned)], colorscale="Viridis",
                           hovertemplate="layer %{y}, bin %{x}: %{z:.4g}<extra></extra>")  # fmt: skip
    layer_fig = _fig(title="Layer importance", xaxis=dict(title="layer (window start for removal losses)", dtick=1),
                     legend=dict(orientation="h", y=-0.25), height=480,
                     yaxis_title="score (higher = keep)", yaxis2=dict(title="LM loss with window removed",
                                                                      overlaying="y", side="right"))  # fmt: skip
    rows: dict[str, Any] = {}
    for method, values in scores.layers.items():
        rows[f"layers.{method}"] = values.float().tolist()
        layer_fig.add_scatter(y=rows[f"layers.{method}"], mode="lines+markers", name=method)
    for k, values in sorted(scores.windows.items()):
        rows[f"windows.{k}"] = values.float().tolist()
        layer_fig.add_scatter(y=rows[f"windows.{k}"], mode="lines+markers", line_dash="dot", yaxis="y2",
                              name=f"loss, {k} layer(s) removed")  # fmt: skip
    table = pd.DataFrame({key: pd.Series(values) for key, values in rows.items()}).rename_axis("layer").reset_index()
    return [head_fig, neuron_fig, layer_fig], table


def loss_curve_figure(
    curves: pd.DataFrame, winners: pd.DataFrame | None, distill: dict[str, dict[str, Any]]
) -> go.Figure:
    """Validation loss vs tokens for every trial (winners bold), plus full-distillation curves of the winners."""
    winner_names = set(winners["name"]) if winners is not None else set()
    fig = _fig(title="Validation loss per trial (short distillation) and winners' full distillation",
               xaxis_title="training tokens", yaxis_title="validation loss", height=480)  # fmt: skip
    for (trial_id, name), curve in curves.groupby(["trial_id", "name"], sort=False):
        bold = name in winner_names
        fig.add_scatter(x=curve["num_tokens"], y=curve["val_loss"], mode="lines", name=f"{name} ({trial_id})",
                        line=dict(width=3 if bold else 1), opacity=1.0 if bold else 0.6,
                        hovertemplate=f"{name}<br>%{{x:,}} tokens: %{{y:.4f}}<extra></extra>")  # fmt: skip
    for name, record in distill.items():
        curve = record.get("curve", [])
        fig.add_scatter(x=[p["num_tokens"] for p in curve], y=[p["val_loss"] for p in curve], mode="lines+markers",
                        name=f"{name} (full distillation)", line=dict(width=3, dash="dash"),
                        hovertemplate=f"{name} full<br>%{{x:,}} tokens: %{{y:.4f}}<extra></extra>")  # fmt: skip
    return fig


def eval_figures(wide: pd.DataFrame, speed: pd.DataFrame) -> list[go.Figure]:
    """Grouped bars of each task's main metric per model, and speed per model when measured."""
    figs = []
    if not wide.empty:
        main = wide[~wide.index.get_level_values("metric").str.endswith("_stderr")]
        fig = _fig(title="Benchmark scores (teacher and students)", yaxis_title="score", barmode="group")
        for model in main.columns:
            labels = [f"{task} {metric}" for task, metric in main.index]
            fig.add_bar(x=labels, y=main[model], name=str(model))
        figs.append(fig)
    if not speed.empty:
        fig = _fig(title="Speed (tokens/s, higher is better)", yaxis=dict(title="tokens/s", type="log"),
                   barmode="group")
        fig.add_bar(x=speed["model"], y=speed["prefill_tok_s"], name="prefill")
        fig.add_bar(x=speed["model"], y=speed["decode_tok_s"], name="decode")
        figs.append(fig)
    return figs


def dmc_figure(dmc: pd.DataFrame, distill: dict[str, dict[str, Any]]) -> tuple[go.Figure, pd.DataFrame]:
    """Quality vs KV-cache size of the DMC retrofits (dmc.csv): validation KL to the teacher against KV bytes per
    token over achieved CR, a line per winner from its uncompressed self (ratio 1: its full distillation's val KL,
    distill.json, when it has one) through its retrofits in order of achieved ratio, and the Pareto front over every
    (architecture, ratio) point (the table's `pareto` column)."""
    fig = _fig(title="DMC: validation KL vs KV-cache bytes per token (compressed by the achieved ratio)",
               xaxis=dict(title="KV-cache bytes per token / achieved CR", type="log"),
               yaxis_title="validation KL to the teacher")
    rows = []
    for name, part in dmc.groupby("winner", sort=False):
        kv = pd.to_numeric(part["kv_bytes_per_token"], errors="coerce")
        base = distill.get(str(name), {})
        if base.get("val_kl") is not None and kv.notna().any():
            rows.append(dict(winner=name, target_cr=1.0, achieved_cr=1.0, val_kl=float(base["val_kl"]),
                             kv_bytes_per_token_compressed=float(kv.dropna().iloc[0]), kind="uncompressed"))
        for row in part.itertuples():
            rows.append(dict(winner=name, target_cr=float(row.target_cr), achieved_cr=float(row.achieved_cr),
                             val_kl=row.val_kl, kv_bytes_per_token_compressed=row.kv_bytes_per_token_compressed,
                             kind="dmc"))
    columns = ["winner", "target_cr", "achieved_cr", "val_kl", "kv_bytes_per_token_compressed", "kind"]
    table = pd.DataFrame(rows, columns=columns)
    kv_x = pd.to_numeric(table["kv_bytes_per_token_compressed"], errors="coerce")
    kl_y = pd.to_numeric(table["val_kl"], errors="coerce")
    known = kv_x.notna() & kl_y.notna()
    table["pareto"] = False  # over architecture x ratio: no other point has fewer KV bytes/token and a lower KL
    table.loc[known, "pareto"] = pareto_mask(kv_x[known].tolist(), kl_y[known].tolist())
    for name, part in table.groupby("winner", sort=False):
        part = part.sort_values("achieved_cr")
        labels = [f"{name}<br>target {t:g}, achieved {a:.2f}" if k == "dmc" else f"{name}<br>uncompressed"
                  for t, a, k in zip(part["target_cr"], part["achieved_cr"], part["kind"])]
        fig.add_scatter(x=part["kv_bytes_per_token_compressed"], y=part["val_kl"], text=labels, name=str(name),
                        mode="lines+markers", marker=dict(size=10, symbol=["circle" if k == "dmc" else "star"
                                                                          for k in part["kind"]]),
                        hovertemplate="%{text}<br>%{x:.4g} B/token<br>val KL %{y:.4f}<extra></extra>")
    front = table[table["pareto"]].sort_values("kv_bytes_per_token_compressed")
    if len(front):
        fig.add_scatter(x=front["kv_bytes_per_token_compressed"], y=front["val_kl"], name="Pareto front",
                        mode="lines", line=dict(dash="dot", color="black"), hoverinfo="skip")
    return fig, table


def human(n: float) -> str:
    """4.51B, 65.1M, 512K, 12: three significant digits for people."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def rung_figures(rungs: pd.DataFrame, stats: pd.DataFrame | None) -> list[go.Figure]:
    """The successive-halving search (rungs.csv): each candidate's rank over the rungs (stopped ones end where they
    were stopped), the value with its bootstrap interval at every rung, parameters vs value with each rung's
    Pareto front, and the compute spent per rung."""
    figs = []
    done = rungs[rungs["status"] == "COMPLETE"].copy()
    ticks = sorted(done["tokens"].unique())
    labels = [human(float(t)) if t else "0 (untrained)" for t in ticks]
    fig = _fig(title="Rank over rungs (1 = best; a line ends where the candidate was stopped)",
               xaxis=dict(title="distillation tokens (rung)", tickvals=list(range(len(ticks))), ticktext=labels),
               yaxis=dict(title="rank in its rung", autorange="reversed"), height=520)
    position = {t: i for i, t in enumerate(ticks)}
    final = done[done["tokens"] == ticks[-1]]["name"].tolist() if ticks else []
    for name, part in done.sort_values("tokens").groupby("name"):
        fig.add_scatter(x=[position[t] for t in part["tokens"]], y=part["rank"], mode="lines+markers", name=str(name),
                        line=dict(width=3 if name in final else 1), opacity=1.0 if name in final else 0.45)
    figs.append(fig)
    fig = _fig(title="Validation value per rung, with 95% bootstrap intervals over validation sequences",
               xaxis=dict(title="candidate (sorted by value at its last rung)"), yaxis=dict(title="val KL"),
               height=520)
    for tokens in ticks:
        part = done[done["tokens"] == tokens].sort_values("val_kl")
        low = part["val_kl"] - part["ci_low"]
        high = part["ci_high"] - part["val_kl"]
        fig.add_scatter(x=part["name"], y=part["val_kl"], mode="markers", name=f"rung {human(float(tokens))} tokens",
                        error_y=dict(type="data", array=high, arrayminus=low, visible=True))
    figs.append(fig)
    if "params" in done.columns and done["params"].notna().all():
        fig = _fig(title="Parameters vs validation KL at every rung, with each rung's Pareto front",
                   xaxis=dict(title="parameters", tickformat=".3s"), yaxis=dict(title="val KL"), height=480)
        for tokens in ticks:
            part = done[done["tokens"] == tokens]
            mask = pareto_mask([float(p) for p in part["params"]], [float(v) for v in part["val_kl"]])
            front = part[mask].sort_values("params")
            label = f"rung {human(float(tokens))}"
            fig.add_scatter(x=part["params"], y=part["val_kl"], text=part["name"], mode="markers", name=label,
                            hovertemplate="%{text}<br>params %{x:,}<br>val KL %{y:.4f}<extra></extra>")
            fig.add_scatter(x=front["params"], y=front["val_kl"], mode="lines", name=f"{label} front",
                            line=dict(shape="hv", dash="dot"), hoverinfo="skip")
        figs.append(fig)
    if stats is not None and not stats.empty:
        fig = _fig(title="Compute per rung", xaxis=dict(title="rung (tokens)"),
                   yaxis=dict(title="distillation tokens spent"), barmode="group")
        fig.add_bar(x=[human(float(t)) for t in stats["tokens"]], y=stats["new_tokens"], name="tokens")
        fig.add_bar(x=[human(float(t)) for t in stats["tokens"]], y=stats["trial_s"], name="trial-seconds",
                    yaxis="y2")
        fig.update_layout(yaxis2=dict(title="trial-seconds", overlaying="y", side="right"))
        figs.append(fig)
    return figs
