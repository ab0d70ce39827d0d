"""Killing clada-calibrate (SIGKILL, SIGINT) and running it again resumes and reaches the uninterrupted result."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
import yaml

from clada.artifacts import load_artifact
from tests.conftest import synthetic_documents, tiny_model, word_tokenizer

TRIALS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_model("llama").save_pretrained(root / "ckpt")
    word_tokenizer().save_pretrained(root / "ckpt")
    (root / "docs.txt").write_text("\n\n".join(synthetic_documents(40, 60)))
    return root


def write_recipe(root, name):
    recipe = {
        "model": str(root / "ckpt"), "data": str(root / "docs.txt"), "output": str(root / name),
        "prompt_tokens": 16, "scored_tokens": 24,
        "calibration": {"activation_tokens": 128, "search_docs": 4, "q_in": [0.0, 0.2], "q_mid": [0.0, 0.3]},
        "search": {"trials": TRIALS, "max_ppl_increase": 0.05},
        "eval": {"heldout_docs": 4, "batch_size": 4},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def command(recipe):
    return [sys.executable, "-c", "from clada.calibrate.cli import calibrate_main; calibrate_main()", str(recipe), "--quiet"]


def completed(db):
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute(  # the sampled trials: not those the validation derived from them
                "select count(*) from trials t where state='COMPLETE' and not exists (select 1 from "
                "trial_user_attributes a where a.trial_id = t.trial_id and a.key = 'derived_from')").fetchone()[0]
    except sqlite3.Error:
        return 0


def trial_params(db):
    with sqlite3.connect(db) as con:
        rows = con.execute("select t.number, p.param_name, p.param_value from trials t join trial_params p "
                           "on t.trial_id = p.trial_id where t.state='COMPLETE' order by t.number, p.param_name").fetchall()
    by_trial: dict = {}
    for number, name, value in rows:
        by_trial.setdefault(number, {})[name] = value
    return sorted(tuple(sorted(p.items())) for p in by_trial.values())


@pytest.fixture(scope="module")
def uninterrupted(setup):
    recipe = write_recipe(setup, "straight")
    subprocess.run(command(recipe), check=True, capture_output=True)
    return setup / "straight"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_same_result(setup, uninterrupted, sig):
    name = f"killed-{sig.name}"
    recipe = write_recipe(setup, name)
    db = setup / name / "study.db"
    proc = subprocess.Popen(command(recipe), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while completed(db) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert b"resume" in err
    kept = completed(db)
    assert 5 <= kept < TRIALS
    assert not (setup / name / "clada.safetensors").exists()

    subprocess.run(command(recipe), check=True, capture_output=True)
    assert completed(db) == TRIALS
    assert trial_params(db) == trial_params(uninterrupted / "study.db")
    a = load_artifact(setup / name / "clada.safetensors")
    b = load_artifact(uninterrupted / "clada.safetensors")
    assert torch.equal(a.tau_base_in, b.tau_base_in) and torch.equal(a.tau_base_mid, b.tau_base_mid)
    assert (a.lam, a.gam, a.tau_s, a.tau_H) == (b.lam, b.gam, b.tau_s, b.tau_H)
    report = json.loads((setup / name / "report.json").read_text())
    assert report["search"]["trials"] == TRIALS
