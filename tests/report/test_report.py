from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nas_minitron.errors import UserError
from nas_minitron.report.page import write_report
from nas_minitron.report.plots import pareto_mask, spearman
from synthetic_run import write_synthetic_run
from tiny_models import save_tiny_teacher


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    teacher = save_tiny_teacher(root / "teacher", "llama", num_hidden_layers=4, intermediate_size=128)
    return {
        "full": write_synthetic_run(root / "run-full", teacher),
        "partial": write_synthetic_run(root / "run-partial", teacher, upto="importance"),  # candidates, importance
    }


def _external_refs(page: str) -> list[str]:
    return re.findall(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)


def test_pareto_mask_keeps_the_lower_left_front() -> None:
    params = [10, 20, 20, 30, 40]
    losses = [5.0, 4.0, 4.5, 4.2, 3.0]
    assert pareto_mask(params, losses) == [True, True, False, False, True]


def test_spearman_matches_known_values() -> None:
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0], index=list("abcde"))
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = pd.Series([5.0, 6.0, 7.0, 8.0, 7.0], index=list("abcde"))  # ranks 1, 2, 3.5, 5, 3.5
    assert spearman(a, b) == pytest.approx(0.8207826816681233)  # scipy.stats.spearmanr
    assert spearman(a, b.drop(["a", "b", "c", "d"])) != spearman(a, b.drop(["a", "b", "c", "d"]))  # nan: 1 point


def test_full_report_is_self_contained_with_csvs(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_report(runs["full"])
    assert path == Path("reports/run-full/report.html")
    page = path.read_text()
    assert not _external_refs(page) and not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count("Plotly.newPlot(") >= 10  # pareto, parallel, 2 ranking, curves, 3 importance, 2 eval
    for section in ("summary", "pareto", "parallel", "ranking", "curves", "importance", "eval"):
        assert f'<section id="{section}">' in page
    assert 'id="missing"' not in page and "not available:" not in page
    csvs = {p.name for p in path.parent.glob("*.csv")}
    assert {"summary.csv", "stages.csv", "pareto.csv", "ranking.csv", "spearman.csv", "trials.csv",
            "importance_layers.csv", "eval.csv", "speed.csv"} <= csvs  # fmt: skip
    pareto = pd.read_csv(path.parent / "pareto.csv")
    winners = pd.read_csv(runs["full"] / "winners.csv")
    assert set(pareto.loc[pareto["is_winner"], "name"]) == set(winners["name"])
    corr = pd.read_csv(path.parent / "spearman.csv")
    assert corr["spearman_to_final"].iloc[-1] == pytest.approx(1.0)  # the last step is the final ranking
    eval_wide = pd.read_csv(path.parent / "eval.csv")
    assert list(eval_wide.columns[:3]) == ["task", "metric", "teacher"]
    assert not list(tmp_path.glob("reports/.*"))  # no temporary leftovers


def test_dmc_results_get_a_table_and_a_chart_only_when_dmc_csv_exists(runs: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    from nas_minitron.pipeline.run_dir import DMC_COLUMNS, write_csv

    without = write_report(runs["full"], tmp_path / "without" / "report.html")
    assert '<section id="dmc">' not in without.read_text() and not (without.parent / "dmc.csv").exists()
    run = tmp_path / "run-dmc"
    shutil.copytree(runs["full"], run)
    winners = pd.read_csv(run / "winners.csv")
    kv = pd.read_csv(run / "candidates.csv").set_index("name")["kv_bytes_per_token"]
    rows = [dict(winner=name, target_cr=cr, achieved_cr=cr - 0.3, val_loss=5.0, val_kl=0.1 * cr,
                 kv_bytes_per_token=kv[name], kv_bytes_per_token_compressed=kv[name] / (cr - 0.3), tokens=256,
                 wall_s=1.0, path=f"dmc/{name}-cr{cr:g}") for name in winners["name"] for cr in (2.0, 4.0)]
    write_csv(run / "dmc.csv", rows, DMC_COLUMNS)
    path = write_report(run, tmp_path / "with" / "report.html")
    page = path.read_text()
    assert '<section id="dmc">' in page and "not available:" not in page
    assert page.count("Plotly.newPlot(") == without.read_text().count("Plotly.newPlot(") + 1
    assert pd.read_csv(path.parent / "dmc.csv").shape == (2 * len(winners), len(DMC_COLUMNS))
    points = pd.read_csv(path.parent / "dmc_points.csv")
    # one point per winner x ratio, plus each winner uncompressed at ratio 1 with its full distillation's val KL
    assert len(points) == 3 * len(winners)
    for name in winners["name"]:
        base = points[(points["winner"] == name) & (points["kind"] == "uncompressed")].iloc[0]
        assert base["achieved_cr"] == 1.0 and base["kv_bytes_per_token_compressed"] == kv[name]
        assert base["val_kl"] == json.loads((run / "winners" / name / "distill.json").read_text())["val_kl"]
    # the front over architecture x ratio, checked pairwise: a front point is dominated by none, any other by one
    xy = list(zip(points["kv_bytes_per_token_compressed"], points["val_kl"]))
    for (x, y), on_front in zip(xy, points["pareto"]):
        dominated = any(a <= x and b <= y and (a, b) != (x, y) for a, b in xy)
        assert on_front == (not dominated), (x, y)
    assert points["pareto"].any() and '"name":"Pareto front"' in page


def test_partial_report_marks_missing_stages(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "custom" / "partial.html"
    path = write_report(runs["partial"], out)
    assert path == out
    page = out.read_text()
    missing = re.search(r'<section id="missing".*?missing: ([^<]*)</p>', page, re.S)
    assert missing is not None
    assert missing.group(1) == (
        "logit_cache (missing), trials (in progress), winners (missing), distill (missing), dmc (missing), "
        "eval (missing)"
    )
    assert "not available: eval/results.json is missing" in page
    assert not _external_refs(page)
    assert (out.parent / "pareto.csv").is_file() and not (out.parent / "eval.csv").exists()
    stages = pd.read_csv(out.parent / "stages.csv")
    assert stages.set_index("stage").loc["trials", "status"] == "in progress"


def test_report_of_a_bare_run_directory_renders_without_plots(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    (run / "stages").mkdir(parents=True)
    page = write_report(run, tmp_path / "bare.html").read_text()
    assert "missing: candidates (missing), importance (missing)" in page and "Plotly.newPlot(" not in page


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run directory"):
        write_report(tmp_path)


def test_cli_report(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nas_minitron", "report", str(runs["partial"])],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "reports" / "run-partial" / "report.html").is_file()
    bad = subprocess.run([sys.executable, "-m", "nas_minitron", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not a run directory" in bad.stderr


def test_importing_the_package_stays_light() -> None:
    code = (
        "import sys, nas_minitron.evaluate, nas_minitron.evaluate.harness, nas_minitron.evaluate.speed, "
        "nas_minitron.report, nas_minitron.report.page, nas_minitron.report.plots, "
        "nas_minitron.commands.evaluate, nas_minitron.commands.report; "
        "print(sorted(m for m in ('torch', 'plotly', 'pandas', 'lm_eval', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
