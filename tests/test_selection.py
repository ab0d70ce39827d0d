"""The measured choice between the dense product and gathering (runtime/selection.py): the decision rule, the
timing, the cache, and what a patched model does with each outcome."""

from __future__ import annotations

import json

import pytest
import torch

from clada import runtime
from clada.runtime import selection
from clada.runtime.selection import ROW_COUNTS, Shape, Timing, decide
from tests.conftest import GATHER, fixed_timing, make_artifact, tiny_model

MEASURE = selection.measure  # the real one (conftest's autouse fixture replaces it during each test)
PROMPT = torch.tensor([[5, 9, 17, 33, 8, 21, 40, 11], [7, 7, 19, 50, 61, 3, 12, 90]])
SHAPE = Shape(576, 3072, 2)


def timings(sparse, dense=1.0, dense_rows=None):
    """One Timing per row count from per-row-count lists (or one value for all)."""
    pick = lambda v, i: v[i] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [Timing(n, 0.7, pick(dense, i), pick(dense if dense_rows is None else dense_rows, i), pick(sparse, i))
            for i, n in enumerate(ROW_COUNTS)]


def test_dense_faster_everywhere_keeps_the_original_layout():
    d = decide(SHAPE, "native", timings(sparse=1.2))
    assert not d.gathering_layout and set(d.per_rows.values()) == {"dense"}
    assert d.choice(1) == d.choice(8) == "dense" and "original layout" in d.reason()


def test_gathering_layout_takes_the_faster_per_row_count():
    # sparse wins at 1 and 2 rows; at 4 and 8 the dense product on the gathering layout wins, within tolerance
    d = decide(SHAPE, "native", timings(sparse=[0.7, 0.8, 1.1, 1.3], dense_rows=[1.0, 1.0, 1.01, 1.01]))
    assert d.gathering_layout
    assert d.per_rows == {1: "native", 2: "native", 4: "dense", 8: "dense"}
    assert [d.choice(n) for n in (1, 2, 3, 4, 5, 8, 9)] == ["native", "native", "dense", "dense", "dense", "dense",
                                                            "dense"]


def test_the_layout_follows_the_row_count_that_decodes_first():
    """Gathering pays a lot at 1 row, but at 8 rows both products on the gathering layout are 10% slower: decoding
    one row the gathering layout is taken (8-row calls then get the better of what it allows); decoding 5 to 8 rows
    the original layout is kept."""
    t = timings(sparse=[0.5, 0.9, 1.2, 1.2], dense_rows=1.1)
    one = decide(SHAPE, "native", t, rows=1)
    assert one.gathering_layout and one.deciding_rows == 1
    assert one.per_rows == {1: "native", 2: "native", 4: "dense", 8: "dense"}
    eight = decide(SHAPE, "native", t, rows=6)
    assert not eight.gathering_layout and eight.deciding_rows == 8 and set(eight.per_rows.values()) == {"dense"}
    assert "decided at 8 rows" in eight.reason()


def test_a_win_within_tolerance_keeps_the_original_layout():
    d = decide(SHAPE, "native", timings(sparse=0.99, dense_rows=1.0), rows=1)  # 1% is noise, not a reason
    assert not d.gathering_layout
    d = decide(SHAPE, "native", timings(sparse=0.92, dense_rows=1.0), rows=1)  # 8%: within the margin
    assert not d.gathering_layout
    d = decide(SHAPE, "native", timings(sparse=0.85, dense_rows=1.0), rows=1, overhead_ms=0.1)  # the runtime eats it
    assert not d.gathering_layout
    d = decide(SHAPE, "native", timings(sparse=0.6, dense_rows=1.0), rows=1)
    assert d.gathering_layout


def test_the_runtime_overhead_per_call_decides_small_shapes():
    """A kernel win that the wrappers' per-call work eats keeps the original layout: 0.5 vs 1.0 ms gathers with
    0.35 ms of overhead (0.85 < 0.9), not with 0.45."""
    t = timings(sparse=0.5, dense_rows=1.0)
    assert decide(SHAPE, "native", t, rows=1, overhead_ms=0.35).gathering_layout
    assert not decide(SHAPE, "native", t, rows=1, overhead_ms=0.45).gathering_layout
    assert decide(SHAPE, "native", t, rows=1).gathering_layout


def test_select_adds_the_cpu_overhead_of_a_row_group(monkeypatch, tmp_path):
    """On CPU, a group's 0.06 ms of runtime work turns a 0.03 ms kernel win on a 0.1 ms product into the dense
    choice; a single projection's 0.025 ms leaves a 0.09 ms win gathering."""
    monkeypatch.setattr(selection, "_cache_file", lambda device: tmp_path / "cache.json")
    group, single = Shape(64, 96, 3), Shape(64, 64, 1)
    monkeypatch.setattr(selection, "measure", lambda workload, *a, **k: Timing(
        a[1], 0.7, 0.1, 0.1, 0.07 if workload.shape.members > 1 else 0.01))
    weights = lambda shape: [[torch.zeros(shape.width // shape.members, shape.channels)] * shape.members]
    decisions = selection.select([selection.Workload(s, weights(s)) for s in (group, single)], [0.7, 0.7],
                                 _native_stub(), torch.float32,
                                 torch.device("cpu"))
    assert [d.gathering_layout for d in decisions] == [False, True]


def _native_stub():
    """A gathering backend as ``select`` sees it when ``measure`` is replaced: a name and a timing identity."""
    class Stub:
        name = "native"
        gather = None

        def identity(self):
            return "stub"
    return Stub()


def test_measure_times_each_candidate_with_the_clock():
    """``measure`` alternates the three candidates over the sampled layers: with a clock that advances by the
    number of products run, each candidate's milliseconds per call are exact."""
    weights = [[torch.randn(6, 4), torch.randn(5, 4)] for _ in range(3)]
    workload = selection.Workload(Shape(4, 11, 2), weights)
    calls = {"n": 0}
    real_linear = torch.nn.functional.linear

    def counting_linear(x, w, *a):
        calls["n"] += 1
        return real_linear(x, w, *a)

    def gather(x, weight, tau, rows):
        calls["n"] += 3  # a gathering call counted as three products' time
        return torch.zeros(x.shape[0], rows.shape[1]), 0

    def clock(device):  # one "second" per product run so far
        return float(calls["n"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection.F, "linear", counting_linear)
        t = MEASURE(workload, gather, rows=2, density=0.5, dtype=torch.float32,
                              device=torch.device("cpu"), clock=clock, reps=3)
    # per pass: 3 layers x 2 members dense products; 3 layers x 1 gather (3 units each)
    assert t.dense == pytest.approx(2 * 1e3) and t.dense_rows == pytest.approx(2 * 1e3)
    assert t.sparse == pytest.approx(3 * 1e3) and t.rows == 2 and t.density == 0.5


def test_measure_runs_the_real_backend_on_real_weights():
    """Without stand-ins: every figure is a positive time, on a real backend and the model's weight shapes."""
    model = tiny_model("llama")
    adapter = runtime.adapter_for(model)
    part = adapter.mlp_parts(model)[0]
    members = [[adapter.weight_of(getattr(part.owner, n)) for n in part.in_names]]
    workload = selection.Workload(Shape(32, 128, 2), members)
    backend = runtime.backends.BACKENDS[GATHER]
    t = MEASURE(workload, backend.gather, 4, 0.6, torch.float32, torch.device("cpu"), reps=2)
    assert min(t.dense, t.dense_rows, t.sparse) > 0


def greedy(model, n=8):
    with torch.no_grad():
        return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_where_dense_wins_auto_keeps_the_dense_layout_and_exact_outputs(family, monkeypatch):
    model = tiny_model(family)
    want = greedy(model)
    with torch.no_grad():
        want_logits = model(input_ids=PROMPT).logits
    monkeypatch.setattr(selection, "measure", fixed_timing(sparse_ms=2.0))  # gathering twice as slow
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
    got = greedy(model)
    st = runtime.stats(model)
    assert torch.equal(got, want)  # exactly the dense model
    assert all(p.is_contiguous() for p in model.parameters())  # never re-laid
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROMPT).logits, want_logits)
    assert st["path_calls"]["dense"] > 0 and sum(st["path_calls"].values()) == st["path_calls"]["dense"]
    assert st["mlp_reads_saved"] == 0.0 and st["tokens"] > 0
    assert st["selection"] and all(not d["gathering_layout"] and "dense wins" in d["reason"]
                                   for d in st["selection"])
    assert set(st["backends"].values()) == {"dense"}
    runtime.remove(model)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_where_gathering_pays_auto_re_lays_and_gathers(family, monkeypatch):
    model = tiny_model(family)
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, art, backend=GATHER)
    want = greedy(model)
    runtime.remove(model)
    monkeypatch.setattr(selection, "measure", fixed_timing(sparse_ms=0.5))
    runtime.apply(model, art)
    layouts_before_decode = [p.is_contiguous() for p in model.parameters()]
    got = greedy(model)
    st = runtime.stats(model)
    assert all(layouts_before_decode)  # apply itself re-lays nothing: the first decode call decides
    assert torch.equal(got, want)
    assert st["path_calls"][GATHER] > 0 and st["path_calls"]["dense"] == 0 and st["mlp_reads_saved"] > 0
    assert all(d["gathering_layout"] and d["backend"] == GATHER for d in st["selection"])
    if family == "llama":  # plain Linear weights: gate and up now share one row buffer
        assert not all(p.is_contiguous() for p in model.parameters())
    runtime.remove(model)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("batch", [1, 6])
def test_the_batch_being_decoded_decides_the_layout(batch, monkeypatch):
    """Gathering 3x faster at 1 row, 30% slower at 8 (as on a CPU with a fast dense GEMM): decoding one sequence
    gathers, decoding six keeps the original layout and runs dense."""
    monkeypatch.setattr(selection, "measure", lambda workload, gather, rows, density, *a, **k:
                        Timing(rows, density, 1.0, 1.4, 0.33 if rows == 1 else 1.3))
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
    prompt = torch.randint(4, 100, (batch, 8), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    st = runtime.stats(model)
    runtime.remove(model)
    assert {d["deciding_rows"] for d in st["selection"]} == {1 if batch == 1 else 8}
    assert all(d["gathering_layout"] == (batch == 1) for d in st["selection"])
    assert st["path_calls"][GATHER if batch == 1 else "dense"] > 0


def test_named_backend_overrides_the_measurement(monkeypatch):
    model = tiny_model("llama")
    measured = []
    monkeypatch.setattr(selection, "measure", lambda *a, **k: measured.append(a) or fixed_timing(2.0)(*a, **k))
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05), backend=GATHER)
    greedy(model, 3)
    st = runtime.stats(model)
    runtime.remove(model)
    assert not measured and st["selection"] == [] and st["path_calls"][GATHER] > 0


def test_timings_are_measured_once_per_machine_and_case(monkeypatch, tmp_path):
    """The second apply (another process, in effect) reads the cached timings; another density measures anew."""
    cache = tmp_path / "sel.json"
    monkeypatch.setattr(selection, "_cache_file", lambda device: cache)
    measured = []

    def counting(workload, gather, rows, density, dtype, device, clock=None, reps=None, graphs=False):
        measured.append((workload.shape, rows, density))
        return Timing(rows, density, 1.0, 1.0, 0.5)

    monkeypatch.setattr(selection, "measure", counting)
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, art)
    greedy(model, 3)
    first = runtime.stats(model)["selection"]
    runtime.remove(model)
    assert len(measured) == 2 * len(ROW_COUNTS)  # two shapes: gate+up, down
    entries = {k: v for k, v in json.loads(cache.read_text()).items() if "|gemv:" not in k}  # dense products aside
    assert len(entries) == len(measured) and all(key.startswith(f"m{selection.MEASUREMENT}|{GATHER}") and "|float32|" in key for key in entries)
    runtime.apply(model, art)
    greedy(model, 3)
    second = runtime.stats(model)["selection"]
    runtime.remove(model)
    assert len(measured) == 2 * len(ROW_COUNTS)  # nothing measured again
    assert [d["per_rows"] for d in second] == [d["per_rows"] for d in first]
    assert all("(cached)" in d["reason"] for d in second)
    runtime.apply(model, make_artifact(model, tau_in=0.0, tau_mid=0.0))  # keeps everything: density 1
    greedy(model, 3)
    runtime.remove(model)
    assert len(measured) == 4 * len(ROW_COUNTS) and {m[2] for m in measured[-len(ROW_COUNTS):]} == {1.0}
    cache.write_text("{not json")  # a damaged cache is measured over, not an error
    runtime.apply(model, art)
    greedy(model, 3)
    runtime.remove(model)
    assert len(measured) == 6 * len(ROW_COUNTS)


def test_density_comes_from_the_prompt(monkeypatch):
    """The density timed is the share of channels the prompt's last rows keep at the base thresholds."""
    seen = []
    monkeypatch.setattr(selection, "measure", lambda workload, gather, rows, density, *a, **k:
                        seen.append((workload.shape.members, density)) or Timing(rows, density, 1.0, 1.0, 0.5))
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    adapter = runtime.adapter_for(model)
    keep = {"in": [], "mid": []}
    hooks = []
    for l, part in enumerate(adapter.mlp_parts(model)):
        def grab(side, l):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1])[-16:]
                w = art.channel_weight_in[l] if side == "in" else art.channel_weight_mid[l]
                tau = art.tau_base_in[l] if side == "in" else art.tau_base_mid[l]
                keep[side].append(float((x.abs() * w > tau).float().mean()))
            return hook
        hooks.append(getattr(part.owner, part.in_names[0]).register_forward_pre_hook(grab("in", l)))
        hooks.append(getattr(part.owner, part.out_name).register_forward_pre_hook(grab("mid", l)))
    with torch.no_grad():
        model(input_ids=PROMPT)  # what the prefill will show
    for h in hooks:
        h.remove()
    runtime.apply(model, art)
    greedy(model, 2)
    runtime.remove(model)
    want = {2: selection.round_density(sum(keep["in"]) / len(keep["in"])),
            1: selection.round_density(sum(keep["mid"]) / len(keep["mid"]))}
    assert {m: d for m, d in seen} == want


def mlp_modules(model):
    adapter = runtime.adapter_for(model)
    return [part.projections() for part in adapter.mlp_parts(model)]


def stepped(model) -> list[bool]:
    """Per MLP: whether its decode step (``runtime.mlp_step``) is in place."""
    return ["forward" in part.owner.__dict__ for part in runtime.adapter_for(model).mlp_parts(model)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_where_dense_wins_the_original_modules_run_and_no_signals_are_computed(family, monkeypatch):
    """After the deciding decode step the module tree holds the original projections (no wrapper in the call
    path), the load signals are no longer computed, decode tokens are still counted, and remove restores all."""
    model = tiny_model(family)
    originals = mlp_modules(model)
    want = greedy(model, 6)
    monkeypatch.setattr(selection, "measure", fixed_timing(sparse_ms=2.0))
    signals = []
    real = runtime.signals.load_signals
    monkeypatch.setattr(runtime.signals, "load_signals", lambda *a: signals.append(1) or real(*a))
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
    assert all(type(m).__name__ == "GatedProjection" for ms in mlp_modules(model) for m in ms)
    assert all(stepped(model)) == (family == "llama")  # gated MLPs get decode steps
    got = greedy(model, 6)
    st = runtime.stats(model)
    assert torch.equal(got, want)
    assert [[m for m in ms] for ms in mlp_modules(model)] == originals  # the very modules, unwrapped
    assert not any(stepped(model))  # and the MLPs' own forward, without a step in front
    assert len(signals) <= 1  # at most the deciding step's (its predecessor had no distribution)
    assert st["tokens"] == PROMPT.shape[0] * 5 and st["decode_steps"]["calls"] == 5
    assert st["mlp_reads_saved"] == 0.0 and st["path_calls"]["dense"] > 0
    runtime.remove(model)
    assert mlp_modules(model) == originals and not runtime.is_patched(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_one_side_gathers_while_the_other_runs_its_original_modules(monkeypatch):
    """Gathering pays for gate/up (input side) only: down runs unwrapped, gate/up gather, both sides count."""
    monkeypatch.setattr(selection, "measure", lambda workload, gather, rows, density, *a, **k:
                        Timing(rows, density, 1.0, 1.0, 0.5 if workload.shape.members == 2 else 2.0))
    model = tiny_model("llama")
    art = make_artifact(model, tau_in=0.05, tau_mid=0.05)
    runtime.apply(model, art)
    greedy(model, 5)
    st = runtime.stats(model)
    kinds = [[type(m).__name__ for m in ms] for ms in mlp_modules(model)]
    steps = stepped(model)
    runtime.remove(model)
    assert kinds == [["GatedProjection", "GatedProjection", "Linear"]] * len(kinds)
    assert not any(steps)  # a step needs both sides gathering
    assert st["input_sparsity"] > 0 and st["mlp_sparsity"] == 0.0
    assert st["path_calls"][GATHER] > 0 and st["path_calls"]["dense"] > 0
    assert st["tokens"] == PROMPT.shape[0] * 4


def test_a_new_dtype_is_measured_again_with_the_wrappers_back(monkeypatch):
    """The routing follows the decisions of the model's current (device, dtype): after ``model.to(dtype)`` the
    wrappers return until that dtype's first decode step has been measured."""
    measured = []
    monkeypatch.setattr(selection, "measure", lambda workload, gather, rows, density, dtype, *a, **k:
                        measured.append(dtype) or Timing(rows, density, 1.0, 1.0, 2.0))
    model = tiny_model("llama")
    runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
    greedy(model, 3)
    assert type(mlp_modules(model)[0][0]).__name__ == "Linear"
    model.to(torch.bfloat16)
    with torch.no_grad():
        model(input_ids=PROMPT)  # a prefill: not yet measured for bfloat16, the wrappers are back
    assert type(mlp_modules(model)[0][0]).__name__ == "GatedProjection" and all(stepped(model))
    greedy(model, 3)
    assert not any(stepped(model))
    st = runtime.stats(model)
    runtime.remove(model)
    assert set(measured) == {torch.float32, torch.bfloat16}
    assert {d["dtype"] for d in st["selection"]} == {"float32", "bfloat16"}
    assert type(mlp_modules(model)[0][0]).__name__ == "Linear"


def test_calls_of_more_rows_than_auto_gathers_run_dense_not_masked(monkeypatch):
    """Where gathering pays, a decode step of more than MAX_GATHER_ROWS rows runs the dense product (masked
    would read every weight and more): its tokens are the dense model's."""
    monkeypatch.setattr(selection, "measure", fixed_timing(sparse_ms=0.5))
    model = tiny_model("llama")
    prompt = torch.randint(4, 100, (runtime.backends.MAX_GATHER_ROWS + 1, 8), generator=torch.Generator().manual_seed(3))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, **kwargs)
        runtime.apply(model, make_artifact(model, tau_in=0.05, tau_mid=0.05))
        got = model.generate(prompt, **kwargs)
    st = runtime.stats(model)
    runtime.remove(model)
    assert torch.equal(got, want)
    assert st["path_calls"]["masked"] == 0 and st["path_calls"]["dense"] > 0


def test_a_close_call_is_measured_again_and_keeps_each_candidates_fastest(monkeypatch, tmp_path):
    """A sitting slowed down fourfold by a neighbour (dense 0.42, native 0.34 ms) gathers, the runtime's 0.025 ms
    diluted; that is a close call, so the next decision measures again (0.11 / 0.104 ms) and the fastest of each
    candidate decides: dense. A clear decision is not measured again, and a close one at most SITTINGS times."""
    monkeypatch.setattr(selection, "_cache_file", lambda device: tmp_path / "cache.json")
    sittings = iter([(0.42, 0.34), (0.11, 0.104), (0.12, 0.09), (0.11, 0.08)])
    measured = []

    def sitting(workload, gather, rows, density, *a, **k):
        dense, sparse = next(sittings) if rows == 1 else (1.0, 0.5)
        measured.append(rows)
        return Timing(rows, density, dense, 10.0, sparse)

    monkeypatch.setattr(selection, "measure", sitting)
    shape = Shape(64, 64, 1)
    workload = selection.Workload(shape, [[torch.zeros(64, 64)]])
    decide_now = lambda: selection.select([workload], [0.6], _native_stub(), torch.bfloat16, torch.device("cpu"))[0]
    first = decide_now()
    assert first.gathering_layout and len(measured) == len(ROW_COUNTS)
    second = decide_now()  # (0.34 + 0.025) / (0.42 * 0.9) = 0.97: close, measured again at the deciding row count
    assert measured[len(ROW_COUNTS):] == [1] and not second.gathering_layout
    at = second.timings[0]
    assert (at.dense, at.sparse, at.sittings) == (0.11, 0.104, 2) and "2 sittings" in second.reason()
    assert json.loads((tmp_path / "cache.json").read_text())[
        selection.case_key("stub", torch.bfloat16, shape, 1, 0.6)]["sittings"] == 2
    third = decide_now()  # (0.104 + 0.025) / 0.099 = 1.30: clear, nothing measured
    assert len(measured) == len(ROW_COUNTS) + 1 and not third.gathering_layout and third.timings[0].cached


def test_close_calls_stop_after_the_last_sitting(monkeypatch, tmp_path):
    monkeypatch.setattr(selection, "_cache_file", lambda device: tmp_path / "cache.json")
    measured = []
    monkeypatch.setattr(selection, "measure", lambda workload, gather, rows, density, *a, **k: measured.append(rows)
                        or Timing(rows, density, 1.0, 10.0, 0.86))  # (0.86 + 0.025) / 0.9 = 0.98: always close
    workload = selection.Workload(Shape(64, 64, 1), [[torch.zeros(64, 64)]])
    for _ in range(selection.SITTINGS + 2):
        decision = selection.select([workload], [0.6], _native_stub(), torch.float32, torch.device("cpu"))[0]
    assert measured.count(1) == selection.SITTINGS and decision.timings[0].sittings == selection.SITTINGS


def test_fastest_of_keeps_each_candidates_minimum():
    old, new = Timing(1, 0.6, 0.4, 2.0, 0.3, sittings=2), Timing(1, 0.6, 0.5, 1.0, 0.2)
    both = selection.fastest_of(old, new, selection.CANDIDATES)
    assert (both.dense, both.dense_rows, both.sparse, both.sittings, both.cached) == (0.4, 1.0, 0.2, 3, False)
