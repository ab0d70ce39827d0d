"""clada lm-eval: the lm-evaluation-harness LM wrapper, the shipped offline task, BIG-bench conversion and the
command, offline on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

if importlib.util.find_spec("lm_eval") is None:  # the lmeval extra: skipped without it, except under CI
    if os.environ.get("CI"):
        pytest.fail("lm_eval is not installed (pip install -e '.[lmeval]'); CI must test it", pytrace=False)
    pytest.skip("lm_eval is not installed (pip install -e '.[lmeval]')", allow_module_level=True)

from clada import runtime
from clada.artifacts import save_artifact
from clada.calibrate import lm_eval_tasks, lm_eval_wrapper
from clada.calibrate.cli import main
from clada.calibrate.lm_eval_tasks import SHIPPED, SHIPPED_TASK, localise, prepare_tasks, task_config
from clada.calibrate.lm_eval_wrapper import HarnessLM, ScoreCache, cut_at_stops
from clada.calibrate.methods import build_method
from clada.calibrate.multiple_choice import (Question, encode, jsonl_questions, multiple_choice_eval,
                                             questions_jsonl, score_choices, score_question)
from tests.conftest import make_artifact, tiny_checkpoint, tiny_model, word_tokenizer
from tests.test_extras import one_error_line, run_cli

SHIPPED_JSONL = SHIPPED / "cause_and_effect" / "cause_and_effect.jsonl"
SHIPPED_YAML = SHIPPED / "cause_and_effect" / f"{SHIPPED_TASK}.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def adaptive_artifact(model):
    return make_artifact(model, tau_in=0.1, tau_mid=0.05, lam=-0.5, tau_s=0.3)


def word_questions(n: int = 8, seed: int = 0) -> list[Question]:
    """Multiple-choice questions the word tokenizer reads (choices of 1-3 words, contexts of 3-6 words)."""
    rng = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(1, 80, (k,), generator=rng))
    questions = []
    for i in range(n):
        choices = tuple(" " + words(1 + (i + c) % 3) for c in range(2 + i % 2))  # a leading space, as lm-eval's
        questions.append(Question(words(3 + i % 4), choices, i % len(choices)))
    return questions


def requests(pairs):
    return [SimpleNamespace(args=pair) for pair in pairs]


def test_loglikelihood_is_score_question_in_each_mode():
    """Dense and sparse log-likelihoods of the wrapper are score_question's, per request, in any request order;
    is_greedy says whether every continuation token is the top prediction."""
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    method = build_method("clada", model, artifact=adaptive_artifact(model))
    questions = word_questions(4)
    pairs = [(q.context, c) for q in questions for c in q.choices][::-1]
    cache = ScoreCache(model, tokenizer, method)
    dense, sparse = (HarnessLM(model, tokenizer, method, mode, cache).loglikelihood(requests(pairs))
                     for mode in ("dense", "sparse"))
    for q in questions:
        ctx, conts = encode(tokenizer, q)
        want_dense, want_sparse = score_question(model, method, ctx, conts)
        flags = score_choices(model, method, ctx, conts)
        for i, choice in enumerate(q.choices):
            at = pairs.index((q.context, choice))
            assert dense[at] == (pytest.approx(want_dense[i].item(), abs=1e-5), bool(flags.dense_greedy[i]))
            assert sparse[at] == (pytest.approx(want_sparse[i].item(), abs=1e-5), bool(flags.sparse_greedy[i]))
    assert any(d[0] != pytest.approx(s[0], abs=1e-4) for d, s in zip(dense, sparse))  # the sparse mode is sparse


def test_each_document_is_scored_as_its_own_question(monkeypatch):
    """Equal contexts of different documents (BIG-bench's prompt-less subtasks: all empty) are separate questions,
    each scored with its own choices as clada eval --mc does; both modes share the scores."""
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    method = build_method("clada", model, artifact=adaptive_artifact(model))
    calls = []
    score = lm_eval_wrapper.score_choices
    monkeypatch.setattr(lm_eval_wrapper, "score_choices", lambda m, s, ctx, choices: calls.append(choices) or score(m, s, ctx, choices))
    reqs = [SimpleNamespace(args=("", c), task_name="t", doc_id=d) for d, cs in enumerate([[" w1", " w2 w3"], [" w4", " w1"]])
            for c in cs]
    cache = ScoreCache(model, tokenizer, method)
    dense = HarnessLM(model, tokenizer, method, "dense", cache).loglikelihood(reqs[::-1])
    HarnessLM(model, tokenizer, method, "sparse", cache).loglikelihood(reqs)
    assert sorted(sorted(c) for c in calls) == [[[5], [6, 7]], [[5], [8]]]  # w1 -> id 5; one call per document
    want, _ = score_question(model, method, [tokenizer.eos_token_id], [[8], [5]])
    assert [d[0] for d in dense[:2]] == pytest.approx(want.tolist()[::-1], abs=1e-6)


def test_greedy_flags_say_whether_each_token_is_the_top_prediction():
    model = tiny_model("llama")
    method = build_method("clada", model, artifact=adaptive_artifact(model))
    ctx, greedy = [5, 6, 7], []
    with runtime.dense(model), torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(input_ids=torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    wrong_last = greedy[:2] + [(greedy[2] + 1) % 128]
    wrong_first = [(greedy[0] + 1) % 128] + greedy[1:]
    flags = score_choices(model, method, ctx, [greedy, wrong_last, wrong_first, greedy[:1]])
    assert flags.dense_greedy.tolist() == [True, False, False, True]


def test_generate_until_stops_at_the_stop_string_and_runs_each_mode():
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    method = build_method("clada", model, artifact=adaptive_artifact(model))
    context = "w5 w6 w7 w8"
    with runtime.dense(model):
        reference = model.generate(torch.tensor([tokenizer(context)["input_ids"]]), max_new_tokens=12,
                                   do_sample=False, pad_token_id=0)
    full = tokenizer.decode(reference[0, len(tokenizer(context)["input_ids"]):], skip_special_tokens=True)
    words = full.split()
    assert len(set(words)) > 2, full
    stop = next(w for w in words[2:] if w not in words[:2])  # a word first generated third or later
    dense = HarnessLM(model, tokenizer, method, "dense")
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(generate(*a, **k)) or calls[-1]
    try:
        [cut, uncut] = dense.generate_until(requests([(context, {"until": [stop], "max_gen_toks": 12}),
                                                      (context, {"until": ["w999"], "max_gen_toks": 12})]))
    finally:
        del model.generate
    assert uncut == full
    assert cut == full[: full.index(stop)] and stop not in cut
    assert calls[0].shape[1] < calls[1].shape[1]  # it stopped generating there, not only cut the text
    # the sparse mode generates through the patched model: its decode steps are sparse
    method.reset_stats()
    [sparse] = HarnessLM(model, tokenizer, method, "sparse").generate_until(requests([(context, {"max_gen_toks": 5})]))
    assert isinstance(sparse, str) and method.stats()["tokens"] > 0
    assert cut_at_stops("a b c", ["c", "b"]) == "a " and cut_at_stops("abc", []) == "abc"


def test_loglikelihood_rolling_says_it_is_not_supported():
    model = tiny_model("llama")
    lm = HarnessLM(model, word_tokenizer(), build_method("dense", model), "dense")
    with pytest.raises(NotImplementedError, match="clada eval --data"):
        lm.loglikelihood_rolling(requests([("w1 w2",)]))


def test_shipped_task_is_bigbench_cause_and_effect_in_the_mc_prompt():
    """The shipped JSONL reads as clada eval --mc questions; its YAML is task_config's with the JSONL next to it."""
    questions = jsonl_questions(SHIPPED_JSONL)
    rows = [json.loads(line) for line in SHIPPED_JSONL.read_text().splitlines()]
    assert len(questions) == len(rows) == 153
    by_source = {s: [q for q, r in zip(questions, rows) if r["source"] == f"cause_and_effect/{s}"]
                 for s in ("one_sentence", "one_sentence_no_prompt", "two_sentences")}
    assert sum(map(len, by_source.values())) == 153
    assert all(q.context.endswith("\nanswer: ") and all(c in q.context for c in q.choices)
               for q in by_source["one_sentence"])
    assert all(q.context == "" for q in by_source["one_sentence_no_prompt"])  # scored after EOS, as clada eval --mc
    assert yaml.safe_load(SHIPPED_YAML.read_text()) == task_config(SHIPPED_TASK, "cause_and_effect.jsonl")
    assert "canary GUID" in (SHIPPED / "cause_and_effect" / "README.md").read_text()


def test_tasks_resolve_from_any_directory(tmp_path, monkeypatch):
    """The shipped YAML's relative data file is made absolute; bigbench: tasks become local JSONL tasks."""
    monkeypatch.chdir(tmp_path)
    localised = yaml.safe_load(localise(SHIPPED_YAML, tmp_path).read_text())
    assert localised["dataset_kwargs"]["data_files"]["test"] == str(SHIPPED_JSONL.resolve())
    questions = word_questions(3)
    monkeypatch.setattr(lm_eval_tasks, "load_bigbench", lambda task: questions if task == "some/sub" else None)
    prepared = prepare_tasks(["bigbench:some/sub", "other"], [str(tmp_path)], tmp_path / "inc")
    assert prepared.names == ["clada_bigbench_some__sub", "other"]
    assert prepared.include_paths == [str(tmp_path / "inc"), str(tmp_path)]
    config = yaml.safe_load((tmp_path / "inc" / "clada_bigbench_some__sub.yaml").read_text())
    assert jsonl_questions(config["dataset_kwargs"]["data_files"]["test"]) == questions
    assert (tmp_path / "inc" / f"{SHIPPED_TASK}.yaml").is_file()


# ---- command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, an adaptive artifact for it, and an include folder with a word-token multiple-choice
    task (clada_words) and a generation task (clada_words_gen) over local JSONL files."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = tiny_checkpoint(root / "ckpt")
    save_artifact(adaptive_artifact(model), root / "a.safetensors")
    tasks = root / "tasks"
    tasks.mkdir()
    lm_eval_tasks.write_task(tasks, "clada_words", "words.jsonl", questions_jsonl(word_questions(8)))
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}", "answer": "w9"}) + "\n"
                                             for i in range(3)))
    (tasks / "clada_words_gen.yaml").write_text(yaml.safe_dump({
        "task": "clada_words_gen", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "gen.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
        "generation_kwargs": {"until": ["w3"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return root


def lm_eval(tiny, *args):
    return CliRunner().invoke(main, ["lm-eval", "--model", str(tiny / "ckpt"), "--artifact", str(tiny / "a.safetensors"),
                                     "--quiet", *args])


def test_cli_shipped_task_offline(tiny, tmp_path, monkeypatch):
    """The shipped task with --limit 4, from another directory: a table and JSON of dense vs CLADA; lm-eval
    asked for each question's choices verbatim as (context, choice)."""
    monkeypatch.chdir(tmp_path)
    asked = []
    get = ScoreCache.get
    monkeypatch.setattr(ScoreCache, "get", lambda self, requests, mode: asked.append(
        (mode, [(r.doc_id, *r.args) for r in requests])) or get(self, requests, mode))
    out = tmp_path / "r.json"
    result = lm_eval(tiny, "--tasks", SHIPPED_TASK, "--limit", "4", "--json", str(out))
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["lm_eval_version"] == lm_eval_wrapper.lm_eval_version() and figures["limit"] == 4
    assert figures["artifact"] == str(tiny / "a.safetensors") and figures["lm_eval_tasks"] == [SHIPPED_TASK]
    assert [(r["task"], r["metric"], r["n"]) for r in figures["rows"]] == [(SHIPPED_TASK, "acc", 4),
                                                                         (SHIPPED_TASK, "acc_norm", 4)]
    for row in figures["rows"]:
        assert row["difference"] == pytest.approx(row["clada"] - row["dense"])
        assert f"{SHIPPED_TASK}  {row['metric']:10s} {row['dense']:8.4f} {row['clada']:8.4f}" in result.output
    assert figures["dense"]["n-samples"][SHIPPED_TASK] == {"original": 153, "effective": 4}
    assert figures["sparse_stats"]["tokens"] > 0 and "lm-eval " + figures["lm_eval_version"] in result.output
    questions = jsonl_questions(SHIPPED_JSONL)[:4]
    assert [mode for mode, _ in asked] == ["dense", "sparse"]
    for _, pairs in asked:
        assert sorted(pairs) == sorted((i, q.context, c) for i, q in enumerate(questions) for c in q.choices)


def test_cli_accuracy_is_clada_eval_mc_and_generation_runs(tiny):
    """On a local word task the dense and CLADA accuracies are those of multiple_choice_eval (clada eval --mc);
    the generation task runs through generate_until in both modes."""
    out = tiny / "w.json"
    result = lm_eval(tiny, "--tasks", "clada_words,clada_words_gen", "--include-path", str(tiny / "tasks"),
                     "--json", str(out))
    assert result.exit_code == 0, result.output
    rows = {(r["task"], r["metric"]): r for r in json.loads(out.read_text())["rows"]}
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    want = multiple_choice_eval(model, tokenizer, word_questions(8),
                                build_method("clada", model, artifact=adaptive_artifact(model)), progress=False)
    assert rows["clada_words", "acc"]["dense"] == pytest.approx(want["accuracy_dense"])
    assert rows["clada_words", "acc"]["clada"] == pytest.approx(want["accuracy_sparse"])
    assert want["accuracy_dense"] not in (0.0, 1.0)  # a check that can fail
    gen = rows["clada_words_gen", "exact_match"]
    assert gen["n"] == 3 and 0.0 <= gen["dense"] <= 1.0 and gen["clada"] is not None


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "unknown lm-eval task 'no_such_task_xyz'"),
    (["--tasks", SHIPPED_TASK, "--include-path", "/nonexistent/dir"], "--include-path: /nonexistent/dir is not a folder"),
    (["--tasks", " , "], "--tasks: expected comma-separated task names"),
    (["--tasks", "bigbench:../x"], "expected TASK or TASK/SUBTASK"),
    (["--tasks", SHIPPED_TASK, "--method", "teal"], "needs a sparsity level"),
])
def test_cli_bad_input_is_one_line(tiny, monkeypatch, args, message):
    monkeypatch.setattr("clada.calibrate.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    result = lm_eval(tiny, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clada: error: ") and message in lines[0], result.output


def test_without_lm_eval_the_command_names_the_extra(tiny):
    """lm_eval made missing (as if not installed): one line naming the extra, before the model is loaded."""
    [result] = run_cli(["lm_eval"], ("main", ["lm-eval", "--model", str(tiny / "ckpt"), "--artifact",
                                              str(tiny / "a.safetensors"), "--tasks", SHIPPED_TASK]))
    line = one_error_line(result)
    assert line == ("clada: error: not installed: lm_eval (lm-evaluation-harness); "
                    "install with: pip install 'clada[lmeval]'")
    assert result["out"] == "" and result["loaded"] == []
