"""The real SmolLM2-135M model (wheel from PyPI): a small calibration, then the runtime API on its artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from clada import runtime
from clada.calibrate.cli import calibrate_main
from clada.calibrate.models import load_model

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    recipe = {
        "model": "smollm2-135m", "data": "lee", "output": str(root / "out"),
        "calibration": {"activation_tokens": 256, "search_docs": 4, "q_in": [0.0, 0.1, 0.2], "q_mid": [0.0, 0.2, 0.4]},
        "search": {"trials": 4, "max_ppl_increase": 0.05},
        "eval": {"heldout_docs": 4, "batch_size": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_report_has_real_figures(calibrated):
    report = json.loads((calibrated / "report.json").read_text())
    assert report["tokens"] == 4 * 128
    assert report["mlp_reads_saved"] > 0 and report["mlp_sparsity"] > 0
    assert math.isfinite(report["clada_ppl"]) and math.isfinite(report["dense_ppl"])
    assert report["model"]["num_layers"] == 30 and report["model"]["model_type"] == "llama"


def test_runtime_api_on_real_model(calibrated):
    model, tokenizer, _ = load_model("smollm2-135m")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The bushfire near Sydney", "Prime Minister John Howard said that the"],
                      return_tensors="pt", padding=True)
    dense = model.generate(**batch, max_new_tokens=16, do_sample=False)
    runtime.apply(model, calibrated / "clada.safetensors")
    sparse = model.generate(**batch, max_new_tokens=16, do_sample=False)
    st = runtime.stats(model)
    assert sparse.shape == dense.shape
    assert 0 < st["mlp_reads_saved"] < 1 and st["tokens"] == 2 * 15
    runtime.remove(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=16, do_sample=False), dense)
