"""benchmarks/probe_predictor.py: the low-bit copy, its byte share, the predictor's table and its method."""

from __future__ import annotations

import pytest
import torch

from clada import runtime
from clada.calibrate.measure import channel_weights, collect_mlp_inputs, output_gradients

from .conftest import load_script, tiny_model


@pytest.fixture(scope="module")
def probe():
    return load_script("probe_predictor")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_bits_outside_2_to_8_are_refused_before_any_model_loads(probe, capsys):
    with pytest.raises(SystemExit) as exit_:
        probe.main(["--bits", "1"])
    assert exit_.value.code == 2 and "--bits" in capsys.readouterr().err


def test_copy_share_of_a_gated_mlp(probe, model):
    adapter = runtime.adapter_for(model)
    predictor = probe.Predictor(model, adapter, *channel_weights(model, adapter, "wina"), 4, 16)
    copy = (4 + 1) / 8  # bytes per weight: 4 bits, a float16 scale per 16
    assert predictor.share["model"] == pytest.approx(2 / 3 * copy / 4)  # float32 weights, gate + up = 2/3
    assert predictor.share["bfloat16"] == pytest.approx(2 / 3 * copy / 2)


def test_table_and_method_agree_and_leave_the_model_dense(probe, model):
    adapter = runtime.adapter_for(model)
    prompt, ids = 4, torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    x = collect_mlp_inputs(model, adapter, ids, prompt, 48)
    grads = output_gradients(model, adapter, ids, prompt, 48, 2, progress=False)
    predictor = probe.Predictor(model, adapter, *channel_weights(model, adapter, "wina"), 4, 16)
    measured = [predictor.measure(layer, x[layer], grads[layer], [0.0, 0.3]) for layer in range(len(x))]
    share = predictor.share["model"]
    t = probe.Predictor.table(measured[0], share)
    assert (t.error[:, 0] == 0).all() and (t.saved[:, 0] == 0).all()  # keeps everything, reads no copy
    assert t.saved[:, 1:].diff().ge(-1e-6).all() and (t.error[:, -1] > 0).all()
    assert t.tau_in[0] < 0 and float(measured[0]["skip_in"][1]) == pytest.approx(0.3, abs=0.05)
    # the input mask leaves 30% of the copy's rows unread: those bytes come back to the saved share
    assert torch.allclose(t.saved[1, 1:] - t.saved[0, 1:], measured[0]["skip_mid"][1, 1:] - measured[0]["skip_mid"][0, 1:]
                          + share * measured[0]["skip_in"][1])
    assert probe.Predictor.table(measured[0], share, rows=1).saved.shape[0] == 1
    column = 16  # ~40% of the neurons skipped
    for row in (0, 1):
        tables = [probe.Predictor.table(mm, share) for mm in measured]
        with torch.no_grad():
            dense = model(input_ids=ids).logits
            method = probe.PredictorMethod(predictor, [float(tb.tau_in[row]) for tb in tables],
                                           [float(tb.tau_mid[row, column]) for tb in tables], share)
            assert torch.equal(model(input_ids=ids).logits, dense)  # outside teacher_forced: dense
            with method.teacher_forced():
                sparse = model(input_ids=ids[:, prompt:]).logits
            reads = method.stats()["mlp_reads_saved"]
            method.remove()
            assert torch.equal(model(input_ids=ids).logits, dense)
        assert not torch.equal(sparse, dense[:, prompt:])
        want = sum(float(tb.saved[row, column]) for tb in tables) / len(tables)  # on other positions: close, not equal
        assert reads == pytest.approx(want, abs=0.1)
