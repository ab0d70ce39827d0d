"""Quality and sparsity of a patched model in the generation regime, and a fast teacher-forced proxy.

Regime (what the reported figures mean): each document is cut to P + S + 1 tokens; the first P tokens
are the prompt (dense prefill); tokens P .. P+S-1 are then fed one at a time with the KV cache, the
adaptive sparse MLPs active, and the prediction of each next token (P+1 .. P+S) is scored. Each step's
thresholds come from the previous step's own distribution (see clada.runtime.signals).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from clada import runtime
from clada.runtime.compat import cache_kwargs, output_cache
from clada.runtime.signals import load_signals, relax_multiplier


def tokenize_documents(tokenizer, documents: list[str], length: int, max_docs: int | None = None) -> torch.Tensor:
    """(N, length) int64 token ids of the documents that have at least ``length`` tokens, truncated."""
    rows = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if max_docs is not None and len(rows) >= max_docs:
            break
    if not rows:
        raise ValueError(f"no document has the {length} tokens needed (prompt + scored + 1)")
    return torch.tensor(rows, dtype=torch.long)


def _kl(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || sparse) per position, nats: (..., V) -> (...)."""
    p = torch.log_softmax(dense_logits.float(), -1)
    q = torch.log_softmax(sparse_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


@dataclass
class _Dense:
    """Dense teacher-forced outputs of one batch."""
    logits: torch.Tensor  # (b, S, V) predictions of tokens P+1 .. P+S


@contextmanager
def _dense_mode(model: nn.Module) -> Iterator[None]:
    """Run a patched model exactly dense: load signals off, no thresholds."""
    st, trk = runtime.state(model), runtime.tracker(model)
    trk.enabled, st.scale = False, None
    try:
        yield
    finally:
        trk.enabled = True


def _dense_logits(model: nn.Module, tokens: torch.Tensor, prompt: int, scored: int) -> torch.Tensor:
    """Dense logits at positions prompt .. prompt+scored-1: (B, scored, V)."""
    with _dense_mode(model):
        return model(input_ids=tokens[:, : prompt + scored]).logits[:, prompt:]


def _summarise(nll_sparse: list, nll_dense: list, kl: list, stats: dict) -> dict:
    sparse = torch.cat(nll_sparse).double().mean().item()
    dense = torch.cat(nll_dense).double().mean().item()
    out = {
        "dense_ppl": math.exp(dense),
        "clada_ppl": math.exp(sparse),
        "ppl_increase": math.exp(sparse - dense) - 1.0,
        "kl": torch.cat(kl).double().mean().item(),
    }
    out.update({k: stats[k] for k in ("mlp_sparsity", "input_sparsity", "mlp_reads_saved", "relaxed_share")})
    out["tokens"] = int(torch.cat(nll_sparse).numel())
    out["per_layer"] = stats["per_layer"]
    return out


@torch.no_grad()
def generation_eval(model: nn.Module, tokens: torch.Tensor, prompt: int, batch_size: int = 16,
                    progress: bool = True) -> dict:
    """Dense vs CLADA in the exact generation regime on ``tokens`` (N, P+S+1) of a patched model."""
    scored = tokens.shape[1] - prompt - 1
    device = next(model.parameters()).device
    runtime.reset_stats(model)
    nll_s, nll_d, kls = [], [], []
    bar = tqdm(total=tokens.shape[0] * scored, desc="eval (token by token)", unit="tok", disable=not progress)
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        targets = batch[:, prompt + 1 :]
        dense = _dense_logits(model, batch, prompt, scored)
        nll_d.append(_nll(dense, targets).cpu())
        cache = output_cache(model(input_ids=batch[:, :prompt], use_cache=True))
        step_logits = []
        for t in range(prompt, prompt + scored):
            out = model(input_ids=batch[:, t : t + 1], **cache_kwargs(model, cache))
            cache = output_cache(out)
            step_logits.append(out.logits[:, -1])
            bar.update(batch.shape[0])
        sparse = torch.stack(step_logits, 1)
        nll_s.append(_nll(sparse, targets).cpu())
        kls.append(_kl(dense, sparse).flatten().cpu())
    bar.close()
    return _summarise(nll_s, nll_d, kls, runtime.stats(model))


class ProxyEvaluator:
    """Fast teacher-forced stand-in for ``generation_eval`` used inside the search.

    The MLP masks of every scored position are applied in one forward over the scored tokens (on top
    of a cached dense prefill), which is exactly the generation regime except that the load signals
    come from the dense model's distributions instead of the sparse model's own.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, prompt: int, batch_size: int = 16):
        self.model, self.prompt = model, prompt
        self.scored = tokens.shape[1] - prompt - 1
        device = next(model.parameters()).device
        self.batches = []
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                dense = _dense_logits(model, batch, prompt, self.scored)
                with _dense_mode(model):
                    prefill = model(input_ids=batch[:, :prompt], use_cache=True)
                cache = output_cache(prefill)
                # the distribution each scored step's fed token is drawn from: prompt's last position, then dense
                prev = torch.cat([prefill.logits[:, -1:], dense[:, :-1]], 1)
                surprisal, entropy = load_signals(prev, batch[:, prompt : prompt + self.scored])
                self.batches.append({"tokens": batch, "dense": dense, "cache": cache,
                                     "surprisal": surprisal, "entropy": entropy,
                                     "nll_dense": _nll(dense, batch[:, prompt + 1 :])})

    def signals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense-model surprisal and entropy of every scored step, flattened."""
        return (torch.cat([b["surprisal"].flatten() for b in self.batches]),
                torch.cat([b["entropy"].flatten() for b in self.batches]))

    @torch.no_grad()
    def __call__(self, tau_in: torch.Tensor, tau_mid: torch.Tensor, lam: float = 0.0, gam: float = 0.0,
                 tau_s: float = 1.0, tau_H: float = 1.0) -> dict:
        st, trk = runtime.state(self.model), runtime.tracker(self.model)
        st.tau["in"].copy_(tau_in)
        st.tau["mid"].copy_(tau_mid)
        st.reset_stats()
        trk.enabled = False
        nll_s, nll_d, kls = [], [], []
        try:
            for b in self.batches:
                m = relax_multiplier(b["surprisal"], b["entropy"], lam, gam, tau_s, tau_H)
                st.relaxed[0] += m.numel()
                st.relaxed[1] += (m < 1).sum()
                st.scale = m
                out = self.model(input_ids=b["tokens"][:, self.prompt : self.prompt + self.scored],
                                 **cache_kwargs(self.model, copy.deepcopy(b["cache"])))
                nll_s.append(_nll(out.logits, b["tokens"][:, self.prompt + 1 :]).cpu())
                nll_d.append(b["nll_dense"].cpu())
                kls.append(_kl(b["dense"], out.logits).flatten().cpu())
        finally:
            st.scale = None
            trk.enabled = True
        return _summarise(nll_s, nll_d, kls, st.summary())
