"""Per-call state of a patched model: what one caller's model calls set and read while they run.

A patched model holds one rule, one set of weights and one set of statistics, shared by every caller. What a
``generate`` call changes as it goes -- the threshold multiplier of the running step, the rows of the call, the
load signals' history, whether the calls run dense (``runtime.dense``) or under a fixed multiplier -- lives in
a ``CallState``, one per thread: concurrent ``generate`` calls on one model from several threads (a thread-pool
service) each see only their own. A thread's first use starts from the defaults below.
"""

from __future__ import annotations

import threading

import torch


class SignalHistory:
    """The last model call's output distributions, by cache position.

    ``logits`` (B, P, V): the last P positions' next-token logits, of cache positions ``end - P .. end - 1``
    (``end`` None: positions unknown, the last row predicts the next token fed).
    """

    __slots__ = ("logits", "end")

    def __init__(self, logits: torch.Tensor, end: int | None):
        self.logits, self.end = logits, end

    def predicting(self, position: int | None, rows: int) -> torch.Tensor | None:
        """(B, V) logits of the distribution that predicted the token at cache ``position`` (None: the token
        after the last row), or None if this history has no such row or not ``rows`` batch rows."""
        if self.logits.shape[0] != rows:
            return None
        if position is None or self.end is None:
            return self.logits[:, -1]
        i = position - 1 - (self.end - self.logits.shape[1])
        return self.logits[:, i] if 0 <= i < self.logits.shape[1] else None

    def reorder(self, index: torch.Tensor) -> None:
        """Follow a reordering of the batch rows (beam search): row i becomes row ``index[i]``."""
        self.logits = self.logits.index_select(0, index.to(self.logits.device))


class CallState(threading.local):
    """One thread's state of calls into one patched model (see the module doc).

    multiplier: None (the call runs dense) or the threshold multiplier (``sparse.row_multipliers``);
    batch: rows of the current model call; observing: dense calls show their activations to rules that watch the
    prefill; tracking: the load signals set the multiplier (off inside ``runtime.dense``/``fixed_multiplier``);
    history: the last call's distributions; end: cache position after the current call's new tokens (None:
    unknown), for the history it leaves; reordering: a beam reorder is being followed (nested reorder calls count once);
    prompt_mask: the current call's attention mask (B, cache + new tokens; rules watching the prefill skip padding);
    thresholds: the step's thresholds of every layer (``SparsityState.step_thresholds``).
    """

    def __init__(self) -> None:
        self.multiplier: torch.Tensor | None = None
        self.batch = 1
        self.observing = True
        self.tracking = True
        self.history: SignalHistory | None = None
        self.end: int | None = None
        self.reordering = False
        self.prompt_mask: torch.Tensor | None = None
        self.thresholds: tuple | None = None  # (multiplier, token rows, rule.tau_version, {side: (L, N, 1)})
