"""`write_report`: one self-contained HTML page (plotly.js inlined) about a search run, with its tables as CSV.

Renders whatever the run directory holds: a stage without its completion marker is listed under "missing", and
a section whose input is absent or unreadable says so instead of failing the whole report. The page records any
script error into a visible box (and `data-nm-*` attributes) so that a headless browser check can read it back.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron import __version__
from nas_minitron._lazy import lazy_import
from nas_minitron.atomic import atomic_directory, check_output_dir, check_output_file
from nas_minitron.distill.result import RECORD_FILE
from nas_minitron.errors import UserError, first_line
from nas_minitron.evaluate.harness import eval_table, read_eval, wide_table
from nas_minitron.pipeline.run_dir import DMC_CSV, STAGES, stage_marker
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.report.plots import (
    dmc_figure,
    eval_figures,
    human,
    importance_figures,
    loss_curve_figure,
    parallel_figure,
    pareto_figure,
    ranking_figures,
    rung_figures,
)

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go
    import plotly.io as pio
    import plotly.offline as plotly_offline
else:
    pd = lazy_import("pandas")
    pio = lazy_import("plotly.io")
    plotly_offline = lazy_import("plotly.offline")

__all__ = ["Section", "default_report_path", "write_report"]

_STAGE_OUTPUT = {"importance": "importance", "candidates": "candidates.csv", "trials": "trials.csv",
                 "winners": "winners.csv", "dmc": DMC_CSV, "eval": "eval/results.json"}  # fmt: skip
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Section:
    """One part of the page: figures, tables (also written as CSV) and notes; `missing` explains an absence."""

    key: str
    title: str
    figures: list[go.Figure] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing: str = ""


def default_report_path(run_dir: str | os.PathLike[str]) -> Path:
    """reports/<run name>/report.html under the current directory."""
    return Path("reports") / Path(run_dir).resolve().name / "report.html"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _stage_status(run_dir: Path) -> pd.DataFrame:
    rows = []
    for stage in STAGES[:-1]:  # "report" is this very step
        marker = _read_json(stage_marker(run_dir, stage))
        output = _STAGE_OUTPUT.get(stage)
        started = output is not None and (run_dir / output).exists()
        status = "complete" if marker else "in progress" if started else "missing"
        rows.append(dict(stage=stage, status=status, wall_s=marker.get("wall_s"),
                         finished_at=marker.get("finished_at")))
    return pd.DataFrame(rows)


def _guarded(section: Section, build: Callable[..., None], *args: Any) -> Section:
    """Run a section builder; a malformed input file becomes a visible note, not a crashed report."""
    try:
        build(section, *args)
    except (ValueError, KeyError, OSError, TypeError) as err:
        section.missing = f"could not render from the run directory's files: {type(err).__name__}: {err}"
    return section


def _summary(section: Section, run_dir: Path, stages: pd.DataFrame, trials: pd.DataFrame | None) -> None:
    config, summary = _read_json(run_dir / "config.json"), _read_json(run_dir / "summary.json")
    facts: dict[str, Any] = {"run": run_dir.resolve().name}
    for key in ("teacher", "teacher_arch", "teacher_params", "budget", "budget_params", "data", "space", "trials",
                "short_tokens", "winners", "full_tokens", "dmc_cr", "objectives", "seq_len", "seed"):  # fmt: skip
        value = summary.get(key, config.get(key))
        if value is not None:
            facts[key] = ", ".join(map(str, value)) if isinstance(value, list) else value
    if trials is not None:
        facts["trial status"] = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    facts["started_at"] = summary.get("started_at")
    done = stages["finished_at"].dropna()
    # The report is the last stage, so a run being reported is not finished yet: show when its last stage ended.
    facts["finished_at"] = summary.get("finished_at") or (f"{done.max()} (stages before the report)" if len(done)
                                                          else "not yet")
    facts["time spent (stages, s)"] = round(float(stages["wall_s"].fillna(0).sum()), 1)
    section.tables["summary"] = pd.DataFrame({"item": list(facts), "value": [str(v) for v in facts.values()]})
    section.tables["stages"] = stages


def _search_sections(run_dir: Path, trials: pd.DataFrame | None, winners: pd.DataFrame | None) -> list[Section]:
    pareto, parallel = Section("pareto", "Pareto front"), Section("parallel", "Architecture axes vs. loss")
    ranking, curves_s = Section("ranking", "Ranking stability"), Section("curves", "Per-trial loss curves")
    curves = _read_csv(run_dir / "trial_curves.csv")
    if trials is None or not (trials["status"] == "COMPLETE").any():
        for section in (pareto, parallel, ranking):
            section.missing = "no finished trials yet (trials.csv has no COMPLETE row)."
    else:
        config = _read_json(run_dir / "config.json")

        def build_pareto(s: Section) -> None:
            fig, table = pareto_figure(trials, winners, config)
            s.figures.append(fig)
            s.tables["pareto"] = table

        _guarded(pareto, build_pareto)
        _guarded(parallel, lambda s: s.figures.append(parallel_figure(trials)))
        if curves is None:
            ranking.missing = "trial_curves.csv is missing."
        else:

            def build_ranking(s: Section) -> None:
                figs, ranks, corr = ranking_figures(curves, trials)
                s.figures += figs
                s.tables.update(ranking=ranks, spearman=corr)

            _guarded(ranking, build_ranking)
    distill = {p.parent.name: _read_json(p) for p in sorted((run_dir / "winners").glob(f"*/{RECORD_FILE}"))}
    if curves is None and not distill:
        curves_s.missing = "trial_curves.csv is missing and no winner has a distill.json."
    else:
        frame = curves if curves is not None else _empty_curves()
        _guarded(curves_s, lambda s: s.figures.append(loss_curve_figure(frame, winners, distill)))
    if winners is not None:  # source (trial weights or re-pruned), tokens seen in the trial and in all
        curves_s.tables["winners"] = winners
    if trials is not None:
        curves_s.tables["trials"] = trials
    return [pareto, parallel, ranking, curves_s]


def _empty_curves() -> pd.DataFrame:
    return pd.DataFrame(columns=["trial_id", "name", "step", "num_tokens", "val_loss", "val_kl"])


def _importance(section: Section, run_dir: Path) -> None:
    if not (run_dir / "importance" / "scores.safetensors").is_file():
        section.missing = "importance/ has no scores yet."
        return
    try:
        scores = ImportanceScores.load(run_dir / "importance")
    except UserError as err:
        section.missing = str(err)
        return
    figs, table = importance_figures(scores)
    section.figures += figs
    section.tables["importance_layers"] = table
    section.notes.append(f"criterion: {scores.criterion}; meta: {json.dumps(scores.meta, default=str)[:300]}")


def _evaluation(section: Section, run_dir: Path) -> None:
    results, speed = read_eval(run_dir)
    if not results and speed.empty:
        section.missing = "eval/results.json is missing (the eval stage has not run)."
        return
    wide = wide_table(eval_table(results))
    section.figures += eval_figures(wide, speed)
    if not wide.empty:
        section.tables["eval"] = wide.reset_index().rename_axis(columns=None)
    if not speed.empty:
        section.tables["speed"] = speed
        methods = ", ".join(sorted(set(speed.get("peak_mem_method", []))))
        section.notes.append(f"peak memory measured by: {methods or 'unknown'}; KV cache bytes from the config.")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "?"


def _answer(section: Section, run_dir: Path, winners: pd.DataFrame | None) -> None:
    """The headline: the pick, its size, its quality against the teacher and the best no-search baseline, its
    speed and KV memory; before any table."""
    if winners is None or winners.empty:
        section.missing = "no winner yet (winners.csv is missing)."
        return
    config = _read_json(run_dir / "config.json")
    pick = winners.iloc[0]
    name, params = str(pick["name"]), float(pick["params"])
    budget, teacher = float(config.get("budget_params") or 0), float(config.get("teacher_params") or 0)
    lines = [f"Pick: {name}, {human(params)} parameters = {_ratio(params, budget)} the budget "
             f"({human(budget)}) and {_ratio(params, teacher)} the teacher ({human(teacher)}, "
             f"{config.get('teacher_arch', '?')})."]
    distilled = _read_json(run_dir / "winners" / name / RECORD_FILE)
    if distilled.get("val_kl") is not None:
        total = pd.to_numeric(pick.get("total_tokens"), errors="coerce")
        lines.append(f"After its full distillation ({'?' if pd.isna(total) else f'{int(total):,}'} tokens in all): "
                     f"validation KL to the teacher {float(distilled['val_kl']):.4f}, LM loss "
                     f"{float(distilled['val_loss']):.4f}.")
    rungs = _read_csv(run_dir / "rungs.csv")
    baselines = _read_json(stage_marker(run_dir, "candidates")).get("baselines", [])
    if rungs is not None and baselines:
        done = rungs[rungs["status"] == "COMPLETE"]
        for base in baselines:
            mine = done[done["name"] == base]
            if mine.empty or base == name:
                continue
            at = int(mine["tokens"].max())
            ours = done[(done["name"] == name) & (done["tokens"] == at)]
            theirs = float(mine[mine["tokens"] == at]["val_kl"].iloc[0])
            if not ours.empty:
                lines.append(f"Against the no-search baseline {base} at {human(at)} tokens: val KL "
                             f"{float(ours['val_kl'].iloc[0]):.4f} vs {theirs:.4f} (lower is better).")
    results, speed = read_eval(run_dir)
    wide = wide_table(eval_table(results)) if results else None
    if wide is not None and not wide.empty and "teacher" in wide.columns:
        main = wide[~wide.index.get_level_values("metric").str.endswith("_stderr")]
        student = next((c for c in main.columns if c != "teacher"), None)
        if student is not None:
            task, metric = main.index[0]
            lines.append(f"Held-out {task} {metric}: {float(main[student].iloc[0]):.3f} vs the teacher's "
                         f"{float(main['teacher'].iloc[0]):.3f}.")
    if not speed.empty and "teacher" in set(speed["model"]):
        t = speed[speed["model"] == "teacher"].iloc[0]
        others = speed[speed["model"] != "teacher"]
        if not others.empty:
            w = others.iloc[0]
            lines.append(f"Speed ({w['device']}, batch {int(w['batch_size'])} x {int(w['seq_len'])}): prefill "
                         f"{_ratio(w['prefill_tok_s'], t['prefill_tok_s'])}, decode "
                         f"{_ratio(w['decode_tok_s'], t['decode_tok_s'])} the teacher's; KV cache "
                         f"{_ratio(t['kv_cache_bytes'], w['kv_cache_bytes'])} smaller "
                         f"({human(float(w['kv_cache_bytes']))}B vs {human(float(t['kv_cache_bytes']))}B).")
    section.notes = lines + section.notes


def _rungs(section: Section, run_dir: Path) -> None:
    rungs = _read_csv(run_dir / "rungs.csv")
    if rungs is None:
        section.missing = "rungs.csv is missing (not a --strategy rungs search, or its trials have not finished)."
        return
    stats = _read_csv(run_dir / "rung_stats.csv")
    section.figures += rung_figures(rungs, stats)
    if stats is not None:
        section.tables["rung_stats"] = stats
    section.tables["rungs"] = rungs
    section.notes.append("Each rung continues the promoted candidates from their checkpoint under one schedule over "
                         "the top rung. rung_stats: spearman/kendall = rank correlation with the rung before over "
                         "this rung's candidates; top1_same = the best here was the best of them before.")


def _dmc(section: Section, run_dir: Path) -> None:
    dmc = _read_csv(run_dir / DMC_CSV)
    if dmc is None:
        return
    distill = {p.parent.name: _read_json(p) for p in sorted((run_dir / "winners").glob(f"*/{RECORD_FILE}"))}
    fig, points = dmc_figure(dmc, distill)
    section.figures.append(fig)
    section.tables.update(dmc=dmc, dmc_points=points)
    section.notes.append("Each winner retrofitted with Dynamic Memory Compression (dmc/<winner>-cr<ratio>/, load with "
                         "nas_minitron.dmc.load_dmc_model) at each --dmc-cr ratio. achieved_cr: tokens per KV-cache "
                         "entry on the validation sequences with hard decisions; val_kl: KL(teacher || model) on the "
                         "same validation sequences as the full distillation (the star: the winner uncompressed). "
                         "The eval stage scores the DMC variants with lm-eval (labels <winner>-cr<ratio>; no speed "
                         "row); short CPU-sized retrofits say little about quality.")


def _build_sections(run_dir: Path) -> tuple[list[Section], list[str]]:
    stages = _stage_status(run_dir)
    trials, winners = _read_csv(run_dir / "trials.csv"), _read_csv(run_dir / "winners.csv")
    answer = _guarded(Section("answer", "The answer"), _answer, run_dir, winners)
    summary = _guarded(Section("summary", "Run summary"), _summary, run_dir, stages, trials)
    sections = [answer, summary]
    if (run_dir / "rungs.csv").is_file() or _read_json(run_dir / "config.json").get("strategy") == "rungs":
        sections.append(_guarded(Section("rungs", "Successive halving: rungs"), _rungs, run_dir))
    sections += _search_sections(run_dir, trials, winners)
    if (run_dir / DMC_CSV).is_file():
        sections.append(_guarded(Section("dmc", "DMC: KV-cache compression"), _dmc, run_dir))
    sections.append(_guarded(Section("importance", "Importance"), _importance, run_dir))
    sections.append(_guarded(Section("eval", "Evaluation"), _evaluation, run_dir))
    missing = [f"{row.stage} ({row.status})" for row in stages.itertuples() if row.status != "complete"]
    return sections, missing


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:0 24px;color:#222}
h1{margin-top:24px} h2{border-bottom:2px solid #1f4e8c;padding-bottom:4px;margin-top:40px}
nav a{margin-right:14px} table.nm{border-collapse:collapse;font-size:13px;margin:8px 0}
table.nm td,table.nm th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
.scroll{overflow-x:auto} table.nm th{background:#eef2f7}
.missing{background:#fff4e5;border-left:6px solid #e4572e;padding:8px 16px;margin:16px 0}
.errors{background:#fde8e8;color:#8b0000;border:2px solid #8b0000;padding:8px;white-space:pre-wrap}
.note{color:#555;font-size:13px} .plot{margin:12px 0}
.answer{font-size:17px;margin:6px 0;padding:6px 12px;background:#eef6ee;border-left:6px solid #2e7d32}
"""
# Installed before plotly.js runs: script errors and console.error calls land in a visible box and in
# data attributes, and every fetched resource URL is listed, so that a headless browser can check the page.
_CHECK_HOOK = """
window.__nmErrors=[];
function __nmRecord(msg){window.__nmErrors.push(String(msg));var box=document.getElementById('nm-js-errors');
 if(box){box.textContent='Script errors on this page:\\n'+window.__nmErrors.join('\\n');box.hidden=false;}}
window.addEventListener('error',function(e){__nmRecord('error: '+(e.message||(e.target&&e.target.src)||e));},true);
window.addEventListener('unhandledrejection',function(e){__nmRecord('unhandled rejection: '+e.reason);});
(function(){var orig=console.error;console.error=function(){__nmRecord('console.error: '+
 Array.prototype.join.call(arguments,' '));return orig.apply(console,arguments);};})();
function __nmStatus(){var b=document.body;
 var res=performance.getEntriesByType('resource').map(function(r){return r.name;})
  .filter(function(n){return n.indexOf('data:')!==0&&n.indexOf('blob:')!==0;});
 b.setAttribute('data-nm-errors',String(window.__nmErrors.length));
 b.setAttribute('data-nm-resources',JSON.stringify(res));
 b.setAttribute('data-nm-plots',String(document.querySelectorAll('.js-plotly-plot .main-svg').length));
 b.setAttribute('data-nm-status','checked');}
window.addEventListener('load',function(){__nmStatus();setTimeout(__nmStatus,500);});
"""


def _table_html(table: pd.DataFrame) -> str:
    body = table.to_html(index=False, border=0, classes="nm", na_rep="", float_format=lambda x: f"{x:.5g}")
    body = f'<div class="scroll">{body}</div>'
    if len(table) > 25:
        return f"<details><summary>{len(table)} rows</summary>{body}</details>"
    return body


def _section_html(section: Section, figure_divs: list[str]) -> str:
    parts = [f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>']
    if section.missing:
        parts.append(f'<p class="missing">not available: {html.escape(section.missing)}</p>')
    if section.key == "answer":  # the headline: prominent, before anything else
        parts += [f'<p class="answer">{html.escape(line)}</p>' for line in section.notes]
        section = Section(section.key, section.title, tables=section.tables)
    parts += [f'<div class="plot">{div}</div>' for div in figure_divs]
    for name, table in section.tables.items():
        parts.append(f'<h3>{html.escape(name)} <span class="note">({html.escape(name)}.csv)</span></h3>')
        parts.append(_table_html(table))
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in section.notes]
    return "\n".join(parts) + "</section>"


def _page_html(run_name: str, sections: list[Section], missing: list[str], footer: str) -> str:
    any_figures = any(s.figures for s in sections)
    body = []
    for section in sections:
        divs = [
            pio.to_html(fig, full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG, div_id=f"{section.key}-{i}")
            for i, fig in enumerate(section.figures)
        ]
        body.append(_section_html(section, divs))
    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    missing_html = (
        f'<section id="missing" class="missing"><h2>Missing stages</h2><p>missing: {html.escape(", ".join(missing))}'
        f"</p><p>This run is unfinished; the sections below show what exists so far.</p></section>"
        if missing
        else ""
    )
    plotly_js = f"<script>{plotly_offline.get_plotlyjs()}</script>" if any_figures else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>nas-minitron report: '
        f"{html.escape(run_name)}</title><style>{_STYLE}</style><script>{_CHECK_HOOK}</script>{plotly_js}</head>\n"
        f'<body><pre id="nm-js-errors" class="errors" hidden></pre><h1>nas-minitron report: {html.escape(run_name)}'
        f"</h1><nav>{nav}</nav>{missing_html}\n" + "\n".join(body) + f'<footer class="note"><p>{html.escape(footer)}'
        "</p></footer></body></html>\n"
    )


def _export_pngs(sections: list[Section], png_dir: Path) -> str:
    """PNG copies of every figure through kaleido when it and a Chrome are available; the note says what happened."""
    figures = {f"{s.key}-{i}": fig for s in sections for i, fig in enumerate(s.figures)}
    if not figures:
        return "PNG export: no figures."
    if importlib.util.find_spec("kaleido") is None:
        return "PNG export skipped: kaleido is not installed (pip install kaleido; it also needs a Chrome)."
    png_dir.mkdir(parents=True, exist_ok=True)
    try:  # best effort by design: a missing or broken Chrome must not cost the user the HTML report
        pio.write_images(list(figures.values()), [png_dir / f"{name}.png" for name in figures])
    except Exception as err:  # noqa: BLE001
        return f"PNG export skipped: {type(err).__name__}: {first_line(err)}"
    return f"PNG export: {len(figures)} figures in {png_dir.name}/."


def _write_outputs(tmp: Path, sections: list[Section], run_name: str, missing: list[str], html_name: str) -> None:
    for section in sections:
        for name, table in section.tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
    png_note = _export_pngs(sections, tmp / "png")
    for section in sections:
        if section.key == "summary" and "summary" in section.tables:
            section.notes.append(png_note)
    footer = f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by nas-minitron {__version__}. {png_note}"
    (tmp / html_name).write_text(_page_html(run_name, sections, missing, footer), encoding="utf-8")


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's HTML report (default reports/<run name>/report.html) with CSVs beside it; returns its path."""
    run = Path(run_dir)
    if not run.is_dir() or not ((run / "config.json").is_file() or (run / "stages").is_dir()):
        raise UserError(
            f"{str(run_dir)!r} is not a run directory: expected config.json or stages/ "
            f"(written by nas-minitron search)."
        )
    target = default_report_path(run) if out is None else Path(out)
    if out is None:  # reports/<run name>/ is replaced as a whole
        check_output_dir(target.parent, overwrite=True)
    else:
        check_output_file(target, "--out", "a file name like report.html")
    sections, missing = _build_sections(run)
    run_name = run.resolve().name
    if out is None:
        with atomic_directory(target.parent, overwrite=True) as tmp:
            _write_outputs(tmp, sections, run_name, missing, target.name)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_outputs(tmp, sections, run_name, missing, target.name)
        for path in sorted(tmp.rglob("*"), key=lambda p: p.name == target.name):  # the page last
            if path.is_file():
                dest = target.parent / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
