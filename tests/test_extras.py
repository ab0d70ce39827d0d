"""Installs without the optional dependencies: each command says in one line which extra to install, before it
loads or downloads anything, and the commands that do not use them run. The CLI runs in a subprocess whose
``sys.meta_path`` starts with a finder that makes the blocked modules fail to import, as if not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from clada.artifacts import save_artifact
from tests.conftest import make_artifact, synthetic_documents, tiny_checkpoint, tiny_recipe

CALIBRATE_ONLY = ["optuna", "matplotlib", "gguf", "datasets"]  # the calibrate extra, but click (transformers 5 has it)
INSTALL = "pip install 'clada[calibrate]'"

RUNNER = r"""
import contextlib, importlib.abc, importlib.machinery, io, json, sys

class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass

class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, Missing()) if name.partition(".")[0] in self.names else None

blocked, commands = json.loads(sys.argv[1])
sys.meta_path.insert(0, Blocker(set(blocked)))
from clada.calibrate import extras

results = []
for entry, args in commands:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [entry, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            getattr(extras, entry)()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "loaded": sorted(m for m in blocked if m in sys.modules)})
print(json.dumps(results))
"""


def run_cli(blocked: list[str], *commands: tuple[str, list[str]], env: dict | None = None) -> list[dict]:
    """Run ``(entry point, arguments)`` commands in one subprocess with ``blocked`` modules made missing."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([blocked, commands])], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def one_error_line(result: dict) -> str:
    assert result["code"] == 2, result
    lines = result["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clada: error: "), result["err"]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, its artifact and a text file."""
    root = tmp_path_factory.mktemp("extras")
    model = tiny_checkpoint(root / "ckpt")
    save_artifact(make_artifact(model, 0.05, 0.02), root / "a.safetensors")
    (root / "docs.txt").write_text("\n\n".join(synthetic_documents(12, 60)))
    return root


def test_without_click_the_console_scripts_say_which_extra(tmp_path):
    for result in run_cli(["click"], ("main", ["--help"]), ("calibrate_main", [str(tmp_path / "r.yaml")])):
        line = one_error_line(result)
        assert "click (the command line)" in line and line.endswith(INSTALL) and result["out"] == ""


def test_calibrate_names_the_extra_before_loading_anything(tiny, tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, str(tiny / "ckpt"))))
    [result] = run_cli(CALIBRATE_ONLY, ("main", ["calibrate", str(tmp_path / "recipe.yaml")]))
    line = one_error_line(result)
    assert "optuna (the threshold search)" in line and "matplotlib (the trials plot)" in line
    assert line.endswith(INSTALL)
    assert not (tmp_path / "out").exists() and result["out"] == ""


def test_eval_inspect_export_run_without_the_calibrate_extra(tiny):
    artifact, ckpt = str(tiny / "a.safetensors"), str(tiny / "ckpt")
    evaluated, inspected, exported = run_cli(
        CALIBRATE_ONLY,
        ("main", ["eval", "--model", ckpt, "--artifact", artifact, "--data", str(tiny / "docs.txt"), "--docs", "2",
                  "--prompt-tokens", "8", "--scored-tokens", "8", "--quiet"]),
        ("main", ["inspect", artifact]),
        ("main", ["export", "--artifact", artifact, "--checkpoint", ckpt]))
    assert evaluated["code"] == 0 and "mlp_reads_saved" in evaluated["out"], evaluated
    assert inspected["code"] == 0 and "CLADA artifact, 2 layers" in inspected["out"], inspected
    assert exported["code"] == 0 and "exported" in exported["out"], exported
    assert evaluated["loaded"] == [] and exported["loaded"] == []


def test_gguf_and_hf_data_are_named_before_any_download(tiny, tmp_path):
    """bench of a built-in GGUF model on an empty cache, and eval of hf: data, stop before fetching anything."""
    cache = tmp_path / "cache"
    bench, hub = run_cli(
        CALIBRATE_ONLY,
        ("main", ["bench", "--model", "smollm2-135m", "--artifact", str(tiny / "a.safetensors")]),
        ("main", ["eval", "--model", str(tiny / "ckpt"), "--artifact", str(tiny / "a.safetensors"),
                  "--data", "hf:some/set:train:text"]),
        env={"CLADA_CACHE": str(cache), "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"})
    line = one_error_line(bench)
    assert "gguf (converting a GGUF model)" in line and line.endswith(INSTALL)
    line = one_error_line(hub)
    assert "datasets (hf: data)" in line and line.endswith(INSTALL)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))  # nothing downloaded
