"""benchmarks/paired_quality.py's pairing: the peer's per-document figures interpolated to CLADA's reads saved."""

from __future__ import annotations

import argparse

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("paired_quality")


def row(reads: float, nll: list[float]) -> dict:
    return {"lee": {"mlp_reads_saved": reads, "per_document": {"nll_increase": nll, "kl": [abs(v) for v in nll]}}}


def test_the_peer_is_interpolated_to_my_reads_and_paired_by_document(script):
    peer = [row(0.3, [0.04, 0.02, 0.06, 0.10]), row(0.1, [0.00, 0.02, 0.02, 0.02])]  # any order
    mine = row(0.15, [0.00, 0.03, 0.03, 0.04])  # a quarter of the way: the peer at 0.01, 0.02, 0.03, 0.04
    p = script.paired(mine, peer, "lee", "nll_increase")
    assert p["peer"] == pytest.approx(0.025) and p["mine"] == pytest.approx(0.025)
    assert p["difference"] == pytest.approx(0.0, abs=1e-12)
    assert p["lower_on"] == 1 and p["documents"] == 4  # document 0: 0.00 against 0.01; document 1 above, 2-3 equal
    low, high = p["interval"]
    assert low < 0.0 < high
    assert script.paired(row(0.35, [0.0] * 4), peer, "lee", "kl") is None  # beyond the peer's points: no claim
    assert script.paired(row(0.1, [0.0] * 4), peer, "lee", "kl")["difference"] == pytest.approx(-0.015)


def test_levels_must_be_numbers(script):
    assert script.number_list("0.15, 0.2") == [0.15, 0.2]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        script.number_list("0.15,x")
