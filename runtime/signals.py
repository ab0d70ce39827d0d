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

import torch


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


class SignalTracker:
    """Forward hooks on a causal LM that set ``state.multiplier`` for each decode step from the previous step.

    Prefill (more than one new token) runs dense. A decode step (one new token per row) gets the
    multiplier computed from the previous call's last-position distribution and the token now fed.
    ``enabled = False`` leaves ``state.multiplier`` to the caller (``runtime.dense``, ``runtime.fixed_multiplier``).
    """

    def __init__(self, state, lam: float, gam: float, tau_s: float, tau_H: float):
        self.state = state
        self.lam, self.gam, self.tau_s, self.tau_H = lam, gam, tau_s, tau_H
        self.prev_logits: torch.Tensor | None = None  # (B, V) of the previous call's last position
        self.enabled = True

    def pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.state.batch = int(ids.shape[0])
        if not self.enabled:
            return None
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1:
            self.state.multiplier = None  # prefill or embeddings input: dense
            self.prev_logits = None
            return None
        prev = self.prev_logits
        if prev is None or prev.shape[0] != ids.shape[0]:
            self.state.multiplier = torch.ones(ids.shape[0], 1, device=ids.device)
            return None
        surprisal, entropy = load_signals(prev, ids[:, 0])
        m = relax_multiplier(surprisal, entropy, self.lam, self.gam, self.tau_s, self.tau_H)
        self.state.record_multiplier(m)
        self.state.multiplier = m.unsqueeze(1)
        return None

    def post_forward(self, module, args, kwargs, output):
        if not self.enabled:
            return None
        logits = getattr(output, "logits", None)
        if logits is not None:
            self.prev_logits = logits[:, -1, :].detach()
        return None
