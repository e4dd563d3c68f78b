"""A built wheel works on its own: `pip install .` (not editable) gives a working CLI with its package data.

The wheel is built from a copy of the sources (so no stale `build/` leaks in), installed with `--target` into a
temporary directory, and run with only that directory on PYTHONPATH from a temporary cwd: the checkout is not on
the path, and each check asserts that the installed copy is what ran. Third-party dependencies come from the
running environment. The declared dependencies are checked against the package's imports too.
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from test_import_graph import PACKAGE, PACKAGE_DIR, build_graph

REPO = PACKAGE_DIR.parent
SOURCES = ("pyproject.toml", "README.md", PACKAGE)  # what the build reads (package data included)
PACKAGE_DATA = ("space/files/*.yaml", "space/presets/*.json", "evaluate/tasks/**/*", "py.typed")

# Imports the package may make without declaring them: found by name only, or guarded by an ImportError fallback.
UNDECLARED_IMPORTS = {"kaleido": "report.page's optional PNG export (skipped with a note when missing)"}
# Declared without being imported by nas_minitron: what a library it uses needs at run time.
DECLARED_NOT_IMPORTED = {
    "accelerate": "lm_eval.models.huggingface (HFLM) imports it; lm-eval declares it only in its [hf] extra",
    "gguf": "transformers' from_pretrained(gguf_file=...) for .gguf teachers",
}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    site: Path
    cwd: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        return {**env, "PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1"}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, cwd=self.cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        return result

    def python(self, code: str) -> str:
        return self.run(sys.executable, "-c", code).stdout

    def cli(self, *args: str) -> str:
        return self.run(str(self.site / "bin" / "nas-minitron"), *args).stdout


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src))
    (wheel,) = (root / "dist").glob("*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel))
    cwd = root / "cwd"
    cwd.mkdir()
    return Installed(wheel=wheel, site=root / "site", cwd=cwd)


def test_the_installed_copy_is_what_runs(installed: Installed) -> None:
    out = installed.python("import nas_minitron.cli; print(nas_minitron.__file__, nas_minitron.cli.__file__)")
    for file in out.split():
        assert Path(file).resolve().is_relative_to(installed.site.resolve()), f"{file} is not the installed copy"
    script = (installed.site / "bin" / "nas-minitron").read_text()
    assert "nas_minitron.cli" in script and "main" in script


def test_the_wheel_ships_the_package_data(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {
        f"{PACKAGE}/{path.relative_to(PACKAGE_DIR).as_posix()}"
        for pattern in PACKAGE_DATA
        for path in PACKAGE_DIR.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert {n for n in expected if n.endswith(".yaml")} and {n for n in expected if n.endswith(".json")}
    assert sorted(expected - names) == [], "package data missing from the wheel"
    sources = {f"{PACKAGE}/{p.relative_to(PACKAGE_DIR).as_posix()}" for p in PACKAGE_DIR.rglob("*.py")}
    assert sorted(sources - names) == [], "modules missing from the wheel"
    assert sorted(n for n in names if n.endswith(".py") and n not in sources) == [], "stale modules in the wheel"


def test_candidates_for_a_preset(installed: Installed) -> None:
    out = installed.cli("candidates", "--teacher", "llama-3.1-8b", "--budget", "4.5B", "--format", "json", "--max", "5")
    data = json.loads(out)
    assert data["teacher_params"] == 8_030_261_248
    assert 1 <= len(data["candidates"]) <= 5
    assert all(abs(c["params"] - 4.5e9) <= 0.05 * 4.5e9 for c in data["candidates"])
    table = installed.run(str(installed.site / "bin" / "nas-minitron"), "candidates", "--teacher", "llama-3.1-8b",
                          "--budget", "4.5B", "--max", "3")
    assert len([line for line in table.stdout.splitlines() if line.startswith("L")]) == 3, table.stdout
    assert "3 candidate(s) within" in table.stderr, table.stderr


def test_search_help(installed: Installed) -> None:
    out = installed.cli("search", "--help")
    assert out.startswith("usage: nas-minitron search") and "--budget" in out


def test_shipped_spaces_and_presets_resolve_from_the_installed_tree(installed: Installed) -> None:
    code = """
import json, yaml
from pathlib import Path
from nas_minitron.space.spaces import load_space, space_names, spaces_dir
from nas_minitron.space.presets import load_preset, preset_names
loaded = {}
for name in space_names():
    teacher = yaml.safe_load((spaces_dir() / f"{name}.yaml").read_text())["teacher"]
    loaded[name] = str(load_space(name, load_preset(teacher)).source)
print(json.dumps({"dir": str(spaces_dir()), "spaces": loaded, "presets": preset_names()}))
"""
    data = json.loads(installed.python(code))
    assert Path(data["dir"]).is_relative_to(installed.site.resolve())
    assert sorted(data["spaces"]) == sorted(p.stem for p in (PACKAGE_DIR / "space" / "files").glob("*.yaml"))
    assert all(Path(source).is_relative_to(installed.site.resolve()) for source in data["spaces"].values())
    assert sorted(data["presets"]) == sorted(p.stem for p in (PACKAGE_DIR / "space" / "presets").glob("*.json"))
    help_text = installed.cli("candidates", "--help")
    assert all(name in " ".join(help_text.split()) for name in data["spaces"])


def test_the_bundled_lm_eval_task_is_installed_and_found(installed: Installed) -> None:
    task_dir = installed.site / PACKAGE / "evaluate" / "tasks" / "pydoc_next_sentence"
    for name in ("pydoc_next_sentence.yaml", "pydoc_next_sentence.jsonl", "dataset.py"):
        assert (task_dir / name).is_file(), f"{name} is not installed"
    code = """
from nas_minitron.evaluate.harness import LOCAL_TASKS_DIR, find_tasks
manager, local = find_tasks(["pydoc_next_sentence"])
print(LOCAL_TASKS_DIR.resolve(), sorted(local))
"""
    tasks_dir, local = installed.python(code).split(maxsplit=1)
    assert Path(tasks_dir).is_relative_to(installed.site.resolve())
    assert local.strip() == "['pydoc_next_sentence']"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_declared_dependencies_match_the_imports(installed: Installed) -> None:
    wheel = zipfile.ZipFile(installed.wheel)
    (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    requires = email.message_from_bytes(wheel.read(metadata)).get_all("Requires-Dist") or []
    declared = {_normalize(re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r}
    assert {"torch", "transformers", "ray"} <= declared
    graph = build_graph(PACKAGE_DIR, PACKAGE)
    tops = {name.split(".")[0] for names in graph.external.values() for name in names}
    third_party = tops - set(sys.stdlib_module_names) - {"__future__"} - set(UNDECLARED_IMPORTS)
    dists = packages_distributions()
    missing_here = sorted(top for top in third_party if top not in dists)
    assert not missing_here, f"imported but not installed here: {missing_here}"
    imported = {_normalize(dists[top][0]) for top in third_party}
    assert sorted(imported - declared) == [], "imported but not declared in [project] dependencies"
    assert sorted(declared - imported - set(DECLARED_NOT_IMPORTED)) == [], "declared but never imported"
