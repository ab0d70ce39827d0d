"""Quality and sparsity of a patched model in the generation regime, and a fast teacher-forced proxy.

Regime (what the reported figures mean): each document is cut to P + S + 1 tokens; the first P tokens
are the prompt (dense prefill); tokens P .. P+S-1 are then fed one at a time with the KV cache, the
adaptive sparse MLPs active, and the prediction of each next token (P+1 .. P+S) is scored. Each step's
thresholds come from the previous step's own distribution (see clada.runtime.signals).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import runtime
from ..artifacts import Artifact
from ..runtime import SPARSITY_FIGURES
from ..runtime.compat import cache_kwargs, output_cache
from ..runtime.signals import load_signals, relax_multiplier

# Quality figures are the sparsity rule's own: evaluations apply artifacts with the masked reference (every
# gathering backend keeps exactly its channels), never with ``auto``, which may run dense where the dense
# product is faster on this machine (runtime.selection).
QUALITY_BACKEND = "masked"


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


INTERVAL_LEVEL = 0.95  # ppl_increase_interval: the share of bootstrap draws it holds
INTERVAL_DRAWS = 2000  # documents resampled this many times (the ends then vary by ~0.0003, one SD, with the seed)


def _kl(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || sparse) per position, nats: (..., V) -> (...)."""
    p = torch.log_softmax(dense_logits.float(), -1)
    q = torch.log_softmax(sparse_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


class Sparsifier:
    """How the evaluations drive a model patched by ``clada.runtime.apply`` (every method is one: see
    ``clada.calibrate.methods``), through the runtime's public API only.

    Outside the two contexts below the model behaves as in generation: a call with several new tokens per
    row (prefill) runs dense, a call with one new token per row is a sparse decode step.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.artifact = artifact = runtime.applied_artifact(model)
        self.adaptive = artifact.lam != 0.0 or artifact.gam != 0.0  # thresholds follow the model's own outputs
        # the sparse steps depend on what the dense prefill of the prompt saw
        self.needs_prompt = runtime.observes_prefill(artifact)

    def dense(self) -> AbstractContextManager:
        """Calls made inside run exactly dense and record nothing."""
        return runtime.dense(self.model)

    def teacher_forced(self) -> AbstractContextManager:
        """Every token of a call made inside is a sparse decode step at the base thresholds (multiplier 1)."""
        return runtime.fixed_multiplier(self.model, 1.0)

    def reset_stats(self) -> None:
        runtime.reset_stats(self.model)

    def stats(self) -> dict:
        """Realised figures since the last reset (keys of ``clada.runtime.stats``)."""
        return runtime.stats(self.model)

    def remove(self) -> None:
        """Return the model to exactly dense."""
        runtime.remove(self.model)


def _dense_logits(model: nn.Module, tokens: torch.Tensor, prompt: int, scored: int,
                  dense: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Dense logits at positions prompt .. prompt+scored-1: (B, scored, V), computed inside ``dense()`` (the
    context that makes the model dense; none for an unpatched model)."""
    with dense():
        return model(input_ids=tokens[:, : prompt + scored]).logits[:, prompt:]


def bootstrap_interval(per_document: torch.Tensor, level: float = INTERVAL_LEVEL, draws: int = INTERVAL_DRAWS,
                       seed: int = 0) -> list[float]:
    """[low, high]: percentile bootstrap interval of the mean of ``per_document`` (N,) values, the documents resampled
    with replacement ``draws`` times (a fixed ``seed``: the same values give the same interval)."""
    values = per_document.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    means = values[torch.randint(values.numel(), (draws, values.numel()), generator=generator)].mean(1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return [low, high]


def nll_increase_by_document(nll_sparse: torch.Tensor, nll_dense: torch.Tensor) -> torch.Tensor:
    """(N,) float64 mean NLL increase (nats) of each document: ``nll_sparse``, ``nll_dense`` (N, S) are the per-token
    NLL of the same N documents' S scored tokens. ppl_increase = expm1 of their mean."""
    return (nll_sparse.double() - nll_dense.double()).mean(1)


def ppl_increase_interval(nll_increase: torch.Tensor, level: float = INTERVAL_LEVEL, draws: int = INTERVAL_DRAWS,
                          seed: int = 0) -> list[float]:
    """[low, high]: ``bootstrap_interval`` of ppl_increase over documents, from their ``nll_increase`` (N,)
    (``nll_increase_by_document``). Resampling whole documents keeps the pairing of sparse and dense and the
    dependence between a document's tokens."""
    return [math.expm1(v) for v in bootstrap_interval(nll_increase, level, draws, seed)]


def _summarise(nll_sparse: list, nll_dense: list, kl: list, stats: dict) -> dict:
    sparse_nll, dense_nll = torch.cat(nll_sparse), torch.cat(nll_dense)  # (N, S) each
    sparse = sparse_nll.double().mean().item()
    dense = dense_nll.double().mean().item()
    increase = nll_increase_by_document(sparse_nll, dense_nll)
    out = {
        "dense_ppl": math.exp(dense),
        "sparse_ppl": math.exp(sparse),
        "ppl_increase": math.exp(sparse - dense) - 1.0,
        "ppl_increase_interval": ppl_increase_interval(increase),
        "kl": torch.cat(kl).double().mean().item(),
    }
    out.update({k: stats.get(k) for k in ("rule", *SPARSITY_FIGURES)})
    out["tokens"] = int(sparse_nll.numel())
    out["documents"] = int(sparse_nll.shape[0])
    # per document (in document order): mean NLL increase (nats; ppl_increase = expm1 of their mean) and mean KL, what
    # a comparison of two methods on the same documents pairs (benchmarks/paired_quality.py)
    out["per_document"] = {
        "nll_increase": increase.tolist(),
        "kl": torch.cat([k.double().view(n.shape[0], -1).mean(1) for k, n in zip(kl, nll_sparse)]).tolist()}
    out["per_layer"] = stats["per_layer"]
    return out


@torch.no_grad()
def generation_eval(model: nn.Module, tokens: torch.Tensor, prompt: int, batch_size: int = 16,
                    progress: bool = True, method: Sparsifier | None = None,
                    reference: _DenseReference | None = None) -> dict:
    """Dense vs sparse in the exact generation regime on ``tokens`` (N, P+S+1).

    ``method``: the sparse method (default: the artifact the model is patched with). ``reference``: a
    TeacherForcedEvaluator of the same tokens, prompt and batch size whose dense logits are reused.
    """
    method = method or Sparsifier(model)
    scored = tokens.shape[1] - prompt - 1
    device = next(model.parameters()).device
    method.reset_stats()
    nll_s, nll_d, kls = [], [], []
    bar = tqdm(total=tokens.shape[0] * scored, desc="eval (token by token)", unit="tok", disable=not progress)
    for index, start in enumerate(range(0, tokens.shape[0], batch_size)):
        batch = tokens[start : start + batch_size].to(device)
        targets = batch[:, prompt + 1 :]
        if reference is not None:
            if index >= len(reference.batches) or not torch.equal(reference.batches[index]["tokens"], batch):
                raise ValueError("generation_eval: the dense reference was built on other tokens or batch size")
            dense = reference.batches[index]["dense"]
        else:
            dense = _dense_logits(model, batch, prompt, scored, method.dense)
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
    return _summarise(nll_s, nll_d, kls, method.stats())


class _DenseReference:
    """Dense teacher-forced reference of ``tokens`` (N, P+S+1) in batches: the scored positions' logits
    (b, S, V), the prompt's KV cache and the prompt's last-position logits (of a patched model: in its dense mode)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, prompt: int, batch_size: int = 16):
        self.model, self.prompt = model, prompt
        self.scored = tokens.shape[1] - prompt - 1
        device = next(model.parameters()).device
        self.batches = []
        with torch.no_grad(), runtime.dense(model) if runtime.is_patched(model) else nullcontext():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=batch[:, : prompt + self.scored]).logits[:, prompt:]
                prefill = model(input_ids=batch[:, :prompt], use_cache=True)
                self.batches.append({"tokens": batch, "dense": logits, "cache": output_cache(prefill),
                                     "last": prefill.logits[:, -1:], "nll_dense": _nll(logits, batch[:, prompt + 1 :])})

    def prompt_cache(self, batch: dict, observed: bool):
        """A fresh KV cache of ``batch``'s prompt: the patched model's own prefill where its rule watches the prefill
        (``observed``: it runs dense and shows the rule the prompt), else a copy of the cached dense one."""
        if observed:
            return output_cache(self.model(input_ids=batch["tokens"][:, : self.prompt], use_cache=True))
        return copy.deepcopy(batch["cache"])


class TeacherForcedEvaluator(_DenseReference):
    """``generation_eval``'s figures in one forward per batch, exact for methods without adaptation.

    Without adaptation a token's MLP masks depend only on its own activations (and, for prompt-based
    methods, on the dense prefill), so applying the masks of every scored position in one forward over the
    scored tokens on top of the dense prefill computes the same function as feeding them one at a time
    (equal up to float summation order). Build it on the unpatched model; the dense reference is reused
    by every method evaluated.
    """

    @torch.no_grad()
    def __call__(self, method: Sparsifier) -> dict:
        """Dense vs ``method`` on the reference tokens: the keys of ``generation_eval``."""
        if method.adaptive:
            raise ValueError("teacher-forced evaluation is exact only without adaptation; use generation_eval")
        method.reset_stats()
        nll_s, nll_d, kls = [], [], []
        for b in self.batches:
            scored_ids = b["tokens"][:, self.prompt : self.prompt + self.scored]
            cache = self.prompt_cache(b, method.needs_prompt)
            with method.teacher_forced():
                out = self.model(input_ids=scored_ids, **cache_kwargs(self.model, cache))
            nll_s.append(_nll(out.logits, b["tokens"][:, self.prompt + 1 :]).cpu())
            nll_d.append(b["nll_dense"].cpu())
            kls.append(_kl(b["dense"], out.logits).flatten().cpu())
        return _summarise(nll_s, nll_d, kls, method.stats())


class ProxyEvaluator(_DenseReference):
    """Fast teacher-forced stand-in for ``generation_eval`` used inside the search.

    The MLP masks of every scored position are applied in one forward over the scored tokens (on top
    of a cached dense prefill), which is exactly the generation regime except that the load signals
    come from the dense model's distributions instead of the sparse model's own. Build it on the unpatched
    model; each call applies the artifact it scores (masked reference) and removes it again.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, prompt: int, batch_size: int = 16):
        super().__init__(model, tokens, prompt, batch_size)
        for b in self.batches:
            # the distribution each scored step's fed token is drawn from: prompt's last position, then dense
            prev = torch.cat([b.pop("last"), b["dense"][:, :-1]], 1)
            b["surprisal"], b["entropy"] = load_signals(prev, b["tokens"][:, prompt : prompt + self.scored])

    def signals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense-model surprisal and entropy of every scored step, flattened."""
        return (torch.cat([b["surprisal"].flatten() for b in self.batches]),
                torch.cat([b["entropy"].flatten() for b in self.batches]))

    @torch.no_grad()
    def __call__(self, artifact: Artifact) -> dict:
        """Proxy figures of ``artifact`` on the reference tokens: the keys of ``generation_eval``."""
        runtime.apply(self.model, artifact, backend=QUALITY_BACKEND)
        observed = runtime.observes_prefill(artifact)
        nll_s, nll_d, kls = [], [], []
        try:
            for b in self.batches:
                m = relax_multiplier(b["surprisal"], b["entropy"], artifact.lam, artifact.gam, artifact.tau_s,
                                     artifact.tau_H)
                cache = self.prompt_cache(b, observed)
                with runtime.fixed_multiplier(self.model, m):
                    out = self.model(input_ids=b["tokens"][:, self.prompt : self.prompt + self.scored],
                                     **cache_kwargs(self.model, cache))
                nll_s.append(_nll(out.logits, b["tokens"][:, self.prompt + 1 :]).cpu())
                nll_d.append(b["nll_dense"].cpu())
                kls.append(_kl(b["dense"], out.logits).flatten().cpu())
            figures = runtime.stats(self.model)
        finally:
            runtime.remove(self.model)
        return _summarise(nll_s, nll_d, kls, figures)


def _pad_id(model: nn.Module) -> int:
    config = getattr(model, "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int = 64, batch_size: int = 8) -> torch.Tensor:
    """(N, new_tokens) greedy continuations of ``prompts`` (N, P), exactly ``new_tokens`` each (EOS suppressed)."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size].to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=_pad_id(model))
        rows.append(out[:, ids.shape[1] :].cpu())
    return torch.cat(rows)


def greedy_agreement(model: nn.Module, prompts: torch.Tensor, method: Sparsifier | None = None,
                     new_tokens: int = 64, batch_size: int = 8, reference: torch.Tensor | None = None) -> float:
    """Share of positions where the sparse greedy continuation of each prompt equals the dense one.

    Both continuations are ``new_tokens`` long (generation regime: dense prefill, sparse decode steps);
    ``reference``: the dense continuations if already computed (``greedy_tokens`` in dense mode).
    """
    method = method or Sparsifier(model)
    if reference is None:
        with method.dense():
            reference = greedy_tokens(model, prompts, new_tokens, batch_size)
    sparse = greedy_tokens(model, prompts, new_tokens, batch_size)
    return float((sparse == reference).float().mean())
