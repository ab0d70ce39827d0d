"""Parallel calibration: two clada-calibrate workers share one Optuna study in a real PostgreSQL server.

Needs CLADA_TEST_POSTGRES=postgresql://USER:PASSWORD@HOST:PORT/DB (.ci/postgres starts such a server). Without
it the shared-study test is skipped locally and fails under CI (CI set), so CI cannot pass by skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from clada.artifacts import load_artifact
from clada.calibrate.cli import calibrate_main
from clada.calibrate.pipeline import study_name
from clada.calibrate.recipe import load_recipe
from clada.calibrate.search import (DERIVED_ATTR, SLOT_ATTR, WORKER_ATTR, SearchSettings, claim_trial,
                                    fail_expired_trials)
from tests.conftest import tiny_job

TRIALS = 40
URL = os.environ.get("CLADA_TEST_POSTGRES")


@pytest.fixture(scope="module")
def postgres_url() -> str:
    if not URL:
        message = "CLADA_TEST_POSTGRES is not set (run .ci/postgres and export its URL)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the shared-study test, not skip it")
        pytest.skip(message)
    return URL


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("postgres")
    (root / "recipe.yaml").write_text(yaml.safe_dump(tiny_job(root, trials=TRIALS)))
    return root


def worker(root, name: str, url: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from clada.calibrate.cli import calibrate_main; calibrate_main()",
           str(root / "recipe.yaml"), "--storage", url, "--output", str(root / name), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def two_workers(workspace, postgres_url):
    name = study_name(load_recipe(workspace / "recipe.yaml"))
    with contextlib.suppress(KeyError):  # left by an earlier run on the same paths
        optuna.delete_study(study_name=name, storage=postgres_url)
    procs = {worker_name: worker(workspace, worker_name, postgres_url) for worker_name in ("w1", "w2")}
    results = {worker_name: (*proc.communicate(timeout=300), proc.returncode) for worker_name, proc in procs.items()}
    yield workspace, results, name
    optuna.delete_study(study_name=name, storage=postgres_url)


def test_workers_exit_cleanly(two_workers):
    _, results, _ = two_workers
    for name, (out, err, code) in results.items():
        assert code == 0, f"{name} exited {code}: {err.decode()[-2000:]}"
        assert b"artifact:" in out


def test_study_has_exactly_the_requested_trials(two_workers, postgres_url):
    _, _, name = two_workers
    study = optuna.load_study(study_name=name, storage=postgres_url)
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and DERIVED_ATTR not in t.user_attrs]  # the sampled trials (the validation may add one)
    assert len(complete) == TRIALS
    assert len(study.trials) - len(complete) <= 1  # the workers validated once, under the study's lock
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING not in states
    assert sorted(t.user_attrs[SLOT_ATTR] for t in complete) == list(range(TRIALS))  # no slot lost or doubled
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == TRIALS, "two trials proposed identical parameters (sampler seeds collided)"
    workers = {t.user_attrs[WORKER_ATTR] for t in complete}
    assert len(workers) == 2, f"expected both workers to run trials, got {workers}"


def test_both_artifacts_valid_and_agree(two_workers):
    root, _, name = two_workers
    reports = [json.loads((root / name / "report.json").read_text()) for name in ("w1", "w2")]
    assert [r["search"]["trials"] for r in reports] == [TRIALS, TRIALS]
    assert reports[0]["search"]["study"] == reports[1]["search"]["study"] == name
    assert reports[0]["chosen"]["trial"] == reports[1]["chosen"]["trial"]
    assert "clada:***@" in reports[0]["search"]["storage"] or "@" not in reports[0]["search"]["storage"]
    a, b = (load_artifact(root / name / "clada.safetensors") for name in ("w1", "w2"))
    assert torch.equal(a.tau_base_in, b.tau_base_in) and torch.equal(a.tau_base_mid, b.tau_base_mid)
    assert (a.lam, a.gam, a.tau_s, a.tau_H) == (b.lam, b.gam, b.tau_s, b.tau_H)


def test_rerun_after_study_is_full_adds_no_trial(two_workers, postgres_url):
    root, _, name = two_workers
    result = CliRunner().invoke(calibrate_main, [str(root / "recipe.yaml"), "--storage", postgres_url,
                                                 "--output", str(root / "w3"), "--quiet"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=postgres_url)
    sampled = [t for t in study.trials if t.state.name == "COMPLETE" and DERIVED_ATTR not in t.user_attrs]
    assert len(sampled) == TRIALS and len(study.trials) - TRIALS <= 1


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_dead_workers_trial_expires_and_its_slot_is_redone(postgres_url):
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=1)
    name = f"clada-test-dead-worker-{os.getpid()}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    settings = SearchSettings(trials=3, adapt=False)
    try:
        dead = claim_trial(study, settings)  # its worker "dies": never told, no more heartbeats
        for _ in range(2):
            study.tell(claim_trial(study, settings), 0.5)
        assert claim_trial(study, settings) is None  # 2 complete + 1 running: nothing left to claim
        time.sleep(2.5)
        fail_expired_trials(study)
        assert study.trials[dead.number].state == optuna.trial.TrialState.FAIL
        redo = claim_trial(study, settings)
        assert redo is not None and redo.user_attrs[SLOT_ATTR] == dead.user_attrs[SLOT_ATTR] == 0
        study.tell(redo, 0.5)
        assert claim_trial(study, settings) is None
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(t.user_attrs[SLOT_ATTR] for t in complete) == [0, 1, 2]
    finally:
        optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.parametrize("url,match", [
    ("mysql://user@host/db", "is not supported"),
    ("postgresql://clada:secret@127.0.0.1:1/clada", "cannot open"),  # nothing listens on port 1
    ("postgresql://clada:secret@127.0.0.1:notaport/clada", "not a valid storage URL"),
    ("sqlite:////nonexistent-clada-dir/study.db", "does not exist"),
])
def test_bad_storage_is_one_line_exit_2(workspace, url, match):
    out = workspace / "bad-storage"
    result = CliRunner().invoke(calibrate_main, [str(workspace / "recipe.yaml"), "--storage", url,
                                                 "--output", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "secret" not in lines[0], result.output
    assert not out.exists()


def test_recipe_storage_key_is_validated(workspace, tmp_path):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["search"]["storage"] = "mysql://user:secret@host/db"
    recipe["output"] = str(tmp_path / "never")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(calibrate_main, [str(tmp_path / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 2 and "recipe field 'search.storage'" in result.output, result.output
    assert "secret" not in result.output and not (tmp_path / "never").exists()
