"""Which of a recipe's documents the calibration job uses for what: search, activations, validation, held-out.

Needs no optional dependency, so that ``clada eval`` and ``clada bench`` find the held-out documents of an
artifact without the search's packages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import split_documents
from .evaluate import tokenize_documents
from .recipe import Recipe


@dataclass
class TokenSplits:
    """Token ids (N, P+S+1) of a recipe's documents: calibration (= search + activation documents) and held-out.

    ``validation``: the last calibration documents, disjoint from the search documents (and from the
    activation documents the error tables use whenever the corpus has enough documents); may be empty.
    """

    calib: torch.Tensor
    held: torch.Tensor
    search: torch.Tensor
    act: torch.Tensor
    validation: torch.Tensor


def token_splits(recipe: Recipe, tokenizer, documents: list[str]) -> TokenSplits:
    """Split ``documents`` as the calibration job does (same seed, fraction and document counts)."""
    calib_docs, held_docs = split_documents(documents, recipe.heldout_fraction, recipe.seed)
    length = recipe.prompt_tokens + recipe.scored_tokens + 1
    calib = tokenize_documents(tokenizer, calib_docs, length)
    held = tokenize_documents(tokenizer, held_docs, length, max_docs=recipe.eval.heldout_docs)
    n_search = min(recipe.calibration.search_docs, max(1, calib.shape[0] // 2))
    n_val = min(recipe.search.validation_docs, calib.shape[0] - n_search)
    return TokenSplits(calib, held, calib[:n_search], calib[n_search:] if calib.shape[0] > n_search else calib,
                       calib[calib.shape[0] - n_val :] if n_val > 0 else calib[:0])
