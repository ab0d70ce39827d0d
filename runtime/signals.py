"""Cognitive-load signals and the per-token threshold multiplier.

Units (natural logs, normalised by ln|V| so both lie on a vocabulary-independent scale):
- surprisal  s_t = -ln p_{t-1}(x_t) / ln|V|   (x_t: the token being fed at step t; >1 only if p < 1/|V|)
- entropy    H_t = -sum_v p_{t-1}(v) ln p_{t-1}(v) / ln|V|   in [0, 1]
where p_{t-1} is the model's own (sparse) next-token distribution from the previous step.
Multiplier: m_t = max(0, 1 + lam*[s_t > tau_s] + gam*[H_t > tau_H]), lam, gam in [-1, 0];
the thresholds of step t are tau_base[l] * m_t. A token is "relaxed" when m_t < 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .calls import SignalHistory
from .compat import cached_tokens, call_cache


def load_signals(logits: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised surprisal of ``next_ids`` and entropy of the distributions ``logits``.

    logits: (..., V); next_ids: (...) integer. Returns (surprisal, entropy), each (...) float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    norm = math.log(logits.shape[-1])
    surprisal = -logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) / norm
    entropy = -(logp.exp() * logp).sum(-1) / norm
    return surprisal, entropy


def relax_multiplier(surprisal: torch.Tensor, entropy: torch.Tensor, lam: float, gam: float,
                     tau_s: float, tau_H: float) -> torch.Tensor:
    """m = max(0, 1 + lam*[s > tau_s] + gam*[H > tau_H]), elementwise, float32."""
    m = 1.0 + lam * (surprisal > tau_s).float() + gam * (entropy > tau_H).float()
    return m.clamp_min(0.0)


MAX_DECODE_TOKENS = 16  # new tokens per row on top of a cache up to which a call is a (sparse) decode step


class SignalTracker:
    """Forward hooks on a causal LM that set the calling thread's multiplier (``runtime.calls``) for each call.

    - Prefill (several new tokens and an empty cache, or more than ``MAX_DECODE_TOKENS``) runs dense; a call on an
      empty cache starts a new sequence (rules that watch the prefill forget the previous one's).
    - A decode step feeds k = 1..``MAX_DECODE_TOKENS`` new tokens per row on top of a cache (k > 1: speculative
      verification, chunked decoding). Its multiplier, one per row and shared by the row's k positions, comes from
      the distribution that predicted the row's first new token (kept from the previous call, by cache position,
      so that a cache cropped after verification finds the right one) and that token itself. The later
      positions' own signals would need this call's logits; they use the first position's.
    - Without a previous distribution for the rows (first step, another batch) the multiplier is 1.
    Beam search: the history follows the cache's reorders (``follow``).
    While the model runs its original modules everywhere (``runtime.routing``), decode steps are only counted.
    ``call.tracking = False`` leaves the multiplier to the caller (``runtime.dense``, ``runtime.fixed_multiplier``).
    """

    def __init__(self, state, lam: float, gam: float, tau_s: float, tau_H: float):
        self.state = state
        self.lam, self.gam, self.tau_s, self.tau_H = lam, gam, tau_s, tau_H

    def pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        call = self.state.call
        if ids is not None:
            call.batch = int(ids.shape[0])
        mask = kwargs.get("attention_mask")
        call.prompt_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if not call.tracking:
            return None
        self.follow(call_cache(kwargs))
        new = ids.shape[1] if ids is not None and ids.dim() == 2 else 0
        position = cached_tokens(kwargs)
        call.end = position + new if position is not None and new else None  # for post_forward's history
        if position == 0 or (position is None and new > 1):  # a new sequence: its prefill is still to be seen
            self.state.rule.forget_prefill()
        if new == 0 or new > MAX_DECODE_TOKENS or (new > 1 and not position):
            call.multiplier = None  # prefill, chunked prefill or embeddings input: dense
            return None
        st = self.state
        st.record_decode_step(ids.shape[0], new)
        st.record_dense_step(ids.shape[0] * new)  # sides running their original modules (runtime.routing)
        if st.passing_through:  # every side does: no signals needed
            call.multiplier = None
            return None
        prev = call.history.predicting(position, ids.shape[0]) if call.history is not None else None
        if prev is None:
            m = torch.ones(ids.shape[0], device=ids.device)
        else:
            surprisal, entropy = load_signals(prev, ids[:, 0])
            m = relax_multiplier(surprisal, entropy, self.lam, self.gam, self.tau_s, self.tau_H)
        st.record_multiplier(m.unsqueeze(1).expand(-1, new))
        call.multiplier = m.unsqueeze(1)
        return None

    def post_forward(self, module, args, kwargs, output):
        call = self.state.call
        if not call.tracking:
            return None
        if self.state.passing_through:
            call.history = None
            return None
        logits = getattr(output, "logits", None)
        if logits is None or logits.dim() != 3:
            call.history = None
            return None
        kept = logits[:, -MAX_DECODE_TOKENS:].detach()
        if kept.shape[1] < logits.shape[1]:
            kept = kept.clone()  # do not hold on to a long prefill's logits
        call.history = SignalHistory(kept, call.end)
        return None

    def follow(self, cache) -> None:
        """Make ``cache``'s ``reorder_cache`` (beam search) reorder the calling thread's signal history too."""
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is None or getattr(reorder, "_clada_follows", False):
            return
        try:
            cache.reorder_cache = self._following(reorder, 0)
        except AttributeError:  # a cache type that refuses instance attributes
            pass

    def follow_model(self, model) -> None:
        """Wrap a model class's own ``_reorder_cache`` (legacy tuple caches of transformers 4.x), if it has one, in an
        instance attribute (``remove`` drops it) that reorders the signal history too."""
        owner = next((c for c in type(model).__mro__ if "_reorder_cache" in vars(c)), None)
        if owner is None or owner.__module__.startswith("transformers.generation"):  # 4.x's base raises
            return
        model._reorder_cache = self._following(model._reorder_cache, 1)

    def _following(self, inner: Callable, beam_arg: int) -> Callable:
        """``inner`` (a reorder taking the beam indices as positional argument ``beam_arg``) that also reorders the
        signal history, once for nested reorders."""
        def reorder(*args, **kwargs):
            call = self.state.call
            outer = not call.reordering
            call.reordering = True
            try:
                result = inner(*args, **kwargs)
            finally:
                if outer:
                    call.reordering = False
            if outer:
                self.reorder(args[beam_arg] if len(args) > beam_arg else kwargs["beam_idx"])
            return result
        reorder._clada_follows = True
        return reorder

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the calling thread's signal history as beam search reorders the batch rows."""
        history = self.state.call.history
        if history is not None and history.logits.shape[0] == beam_idx.numel():
            history.reorder(beam_idx)
