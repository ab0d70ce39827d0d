"""Sparsity rules: which channels of an MLP activation a decode step keeps, one registry of them.

A rule answers, for a decoder layer ``l``, a side and a call's activations ``x`` (..., C) with the step's
threshold multiplier ``m`` (one per token row, 1 = base, < 1 = relaxed), a boolean keep mask (..., C):

- side ``"in"``: the MLP input x (columns of gate/up, fc1); a skipped channel saves its column of every
  input projection;
- side ``"mid"``: the intermediate neurons (columns of down, fc2); ``mid_at`` says where the rule looks at
  them: ``"down_input"`` (h, the input of the output projection) or ``"activation"`` (act(gate(x)), CATS);
- sides ``"attn_in"`` and ``"attn_out"`` (artifacts that carry them, threshold-form rules only): the attention
  block's input (columns of q/k/v or the fused projection) and its output (columns of o), under the same rule.

The threshold rule ``|x|·w > tau·m`` is written once, in :func:`threshold_keep`; the masked reference, every
kernel backend (``runtime.backends``; the compiled and Triton kernels make the same float32 comparison) and the
calibration's error tables use it. With compensation (an artifact's ``center_in``/``center_mid``, per layer and
channel) the rule looks at ``x - c`` (:func:`centred`, in x's dtype) and a skipped channel stands for ``c``
instead of 0: the gathering backends sum the kept rows of ``x - c`` and add the projection of ``c``.

Prefix-driven sparsity (an artifact's ``prefix_in``/``prefix_mid`` exponents alpha, per layer): the dense prefill of
each sequence gives every channel of an MLP side its prompt norm ``p`` (:func:`prompt_norms`), and while that
sequence decodes its channel weights are ``w * p**alpha / mean(p**alpha)`` (:meth:`SparsityRule.keep_weight`, one row
per batch row; a long prompt costs one pass over activations the prefill computes anyway). Rules that need the dense
prefill (GRIFFIN, a prefix-driven threshold rule) observe it through ``observe_prefill``. The predictor rule
(:class:`PredictorRule`, ``runtime.predictor``) decides the ``mid`` side from the MLP input, through a low-bit copy
of gate and up: its ``in`` mask is the copy's rows read, and gate and up see the whole input. Rules are named in the
artifact (metadata ``rule``) and built by :func:`build_rule`.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import torch

from .predictor import BITS, GROUP, SCALE_CHOICES, UNNAMED_SCALES, LowBitCopy

MLP_SIDES = ("in", "mid")
ATTENTION_SIDES = ("attn_in", "attn_out")  # the attention input (columns of q/k/v) and output (columns of o)
SIDES = MLP_SIDES + ATTENTION_SIDES
# runtime.stats() key of each side's realised share of skipped channels (mean over layers)
SPARSITY_KEYS = {"in": "input_sparsity", "mid": "mlp_sparsity", "attn_in": "attention_input_sparsity",
                 "attn_out": "attention_output_sparsity"}
# runtime.stats() figures of realised sparsity, in the order reports show them (the attention ones None where the
# artifact leaves attention dense)
SPARSITY_FIGURES = (SPARSITY_KEYS["mid"], SPARSITY_KEYS["in"], "mlp_reads_saved", SPARSITY_KEYS["attn_in"],
                    SPARSITY_KEYS["attn_out"], "attention_reads_saved", "reads_saved", "relaxed_share")


def channel_scores(x: torch.Tensor, channel_weight: torch.Tensor) -> torch.Tensor:
    """(..., C) float32 scores |x| * w of activations ``x`` (..., C) under per-channel weights ``w`` (C,)."""
    return x.abs().float() * channel_weight


def threshold_keep(x: torch.Tensor, channel_weight: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """(..., C) bool: True where |x| * w > tau (``tau`` broadcastable to (..., 1), float32)."""
    return channel_scores(x, channel_weight) > tau


def prompt_norms(h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) float32 squared prompt norms of activations ``h`` (B, T, C): per channel, the sum over the T tokens of
    the squared row-normalised activation (GRIFFIN's statistic, squared so that chunks of a prompt add up).
    ``valid`` (B, T): the tokens that count (an attention mask: left padding does not), None: all."""
    squares = h.float().square()  # one temporary; sum_t h[t, c]^2 / ||h[t]||^2 as a batched vector-matrix product
    inverse = squares.sum(-1).clamp_min(1e-24).reciprocal()
    if valid is not None:
        inverse = inverse * valid.to(inverse.dtype)
    return torch.bmm(inverse.unsqueeze(1), squares).squeeze(1)


def prompt_positions(valid: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """(B, T) mask of the prompt tokens of ``rows`` (B, T, C) that count, from an attention mask ``valid`` (B, >= T:
    its last T columns), or None (every token: no mask, or one that does not fit)."""
    if valid is None or valid.dim() != 2 or valid.shape[0] != rows.shape[0] or valid.shape[1] < rows.shape[1]:
        return None
    return valid[:, valid.shape[1] - rows.shape[1]:]


def per_token_rows(per_sequence: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Values of B sequences, ``per_sequence`` (B, C), given to each token row of a call's ``x`` (..., C) (its rows
    sequence-major, the same number per sequence), in x's shape; None if x's rows are not a multiple of B."""
    rows = x.numel() // x.shape[-1]
    if rows % per_sequence.shape[0]:
        return None
    return per_sequence.repeat_interleave(rows // per_sequence.shape[0], 0).view(x.shape)


def prior_weight(channel_weight: torch.Tensor, squared_norms: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, C) channel weights ``w * p**alpha / mean(p**alpha)`` of B sequences, ``p`` = sqrt(``squared_norms``)
    (B, C) (:func:`prompt_norms`); ``channel_weight`` (C,) float32."""
    prior = squared_norms.pow(alpha / 2)
    return channel_weight * (prior / prior.mean(-1, keepdim=True).clamp_min(1e-12))


def centred(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """``x - center`` in x's dtype (what a compensated rule scores and a gathering backend sums); ``x`` if None."""
    return x if center is None else x - center.to(x.dtype)


def compensated(x: torch.Tensor, keep: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """``x`` with its skipped entries (``keep`` False) replaced by ``center`` (None: by 0), in x's dtype."""
    if center is None:
        return x * keep.to(x.dtype)
    return torch.where(keep, x, center.to(x.dtype))


class SparsityRule:
    """Base rule. Subclasses set ``name``, ``sides``, ``mid_at`` and implement ``keep``.

    ``in_bytes_saved_by_mid``: share of the input projections' bytes a skipped neuron also saves (CATS:
    up's half of a gated MLP; GRIFFIN: all of gate and up, whose output rows it never computes).
    ``threshold_form``: ``keep`` is exactly ``threshold_keep(centred(x, center(l, side)), channel_weight(l, side),
    step_tau(l, side, m))``, so the kernel backends can compute it inside their kernels.
    ``masked``: what a side's projections compute with under a keep mask (the masked reference).
    """

    name: ClassVar[str] = ""
    sides: tuple[str, ...] = MLP_SIDES  # per instance: a threshold-form rule adds the artifact's attention sides
    mid_at: ClassVar[str] = "down_input"
    threshold_form: ClassVar[bool] = False
    observes_prefill: bool = False  # per instance: a threshold-form rule with prompt-prior exponents watches too

    def __init__(self, artifact, device: torch.device | str = "cpu"):
        self.params = dict(artifact.rule)
        if self.threshold_form and artifact.has_attention:
            self.sides = type(self).sides + ATTENTION_SIDES
        known = MLP_SIDES + (ATTENTION_SIDES if artifact.has_attention else ())
        self.tau = {side: artifact.tau_base(side).float().to(device) for side in known}
        self.tau_version = 0  # bumped whenever tau changes (``set_tau``, ``to``): thresholds cached per step follow
        self.weight = {side: artifact.channel_weight(side).float().to(device) for side in known}
        self.centers = {side: self._layer_centers(artifact.center(side), device) for side in MLP_SIDES}
        self._center_casts: dict = {}  # (side, layer, dtype) -> the center cast to an activation dtype
        # per MLP side and layer the prompt prior's exponent (0: none); only threshold-form rules follow it
        with_prefix = self.threshold_form and artifact.has_prefix
        self.prefix = {side: [float(a) for a in artifact.prefix(side)] if with_prefix else [] for side in MLP_SIDES}
        self.observes_prefill = type(self).watches_prefill(artifact)
        self._sequences = threading.local()  # per thread (runtime.calls): what its last prefill showed

    @classmethod
    def watches_prefill(cls, artifact) -> bool:
        """Whether this rule, built from ``artifact``, looks at each sequence's dense prefill (GRIFFIN; a threshold
        rule with prompt-prior exponents)."""
        return cls.observes_prefill or (cls.threshold_form and artifact.has_prefix)

    @property
    def sequences(self) -> dict:
        """The calling thread's per-sequence state of its last prefill, keyed by (layer, side) (rule-specific)."""
        return self._sequences.__dict__.setdefault("state", {})

    def forget_prefill(self) -> None:
        """A new sequence starts (its prefill has not been seen yet): drop the calling thread's per-sequence state."""
        if self.observes_prefill:
            self._sequences.__dict__["state"] = {}

    @staticmethod
    def _layer_centers(center: torch.Tensor | None, device) -> list[torch.Tensor | None]:
        """Per layer the (C,) float32 compensation, None for a layer without (absent, or a row of zeros)."""
        if center is None:
            return []
        return [row.float().to(device) if bool(row.any()) else None for row in center]

    def in_bytes_saved_by_mid(self, gated: bool) -> float:
        return 0.0

    def masked(self, layer: int, side: str, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """What ``layer``'s ``side`` projections compute with under the keep mask ``keep`` of ``x`` (..., C): ``x``
        with the skipped entries set to their compensation (0 without)."""
        return compensated(x, keep, self.center(layer, side, x.dtype))

    def bind(self, adapter, parts: list) -> None:
        """Called by ``runtime.apply`` with the model's adapter and MLP parts before anything is wrapped (rules that
        keep something of the model: the predictor's low-bit copy)."""

    def mlp_bytes_saved(self, share_in: torch.Tensor, share_mid: torch.Tensor, ran_in: torch.Tensor,
                        bytes_in: torch.Tensor, bytes_mid: torch.Tensor, gated: bool) -> torch.Tensor:
        """(L,) MLP weight bytes a decode step does not read, per layer, from the skipped shares (L,) of each side
        (over every decode row), the share ``ran_in`` (L,) of decode rows the rule ran on (the others dense), and the
        bytes (L,) of the input projections (together) and of the output projection."""
        return share_in * bytes_in + share_mid * (bytes_mid + self.in_bytes_saved_by_mid(gated) * bytes_in)

    def to(self, device: torch.device) -> None:
        self.tau = {k: v.to(device) for k, v in self.tau.items()}
        self.tau_version += 1
        self.weight = {k: v.to(device) for k, v in self.weight.items()}
        self.centers = {k: [None if c is None else c.to(device) for c in v] for k, v in self.centers.items()}
        self._center_casts = {}

    def channel_weight(self, layer: int, side: str) -> torch.Tensor:
        """(C,) float32 base channel weights of ``layer``'s ``side``."""
        return self.weight[side][layer]

    def keep_weight(self, layer: int, side: str, x: torch.Tensor) -> torch.Tensor:
        """Channel weights a decode call with activations ``x`` (..., C) compares with: (C,), or, under a prompt prior
        of several sequences, one row per token row (the shape of ``x``; the rows of ``x`` sequence-major).

        Without a prior seen for this layer and side (no exponent, no prefill yet in this thread, or a call of
        another batch than the prefill's) the base weights."""
        prior = self.sequences.get((layer, side)) if self.observes_prefill else None
        if prior is None:
            return self.weight[side][layer]
        weight = prior[1]
        if weight.dim() == 1:
            return weight
        rows = per_token_rows(weight, x)
        return self.weight[side][layer] if rows is None else rows

    def observe_prior(self, layer: int, side: str, x: torch.Tensor, batch: int,
                      valid: torch.Tensor | None = None) -> None:
        """Add a dense prefill's activations ``x`` ((B, T, C) or (B*T, C)) to the prompt prior of ``layer``'s
        ``side`` (chunks of one prompt add up; ``forget_prefill`` starts anew); ``valid``: see ``observe_prefill``."""
        alpha = self.prefix[side][layer] if self.prefix.get(side) else 0.0
        if alpha == 0.0:
            return
        rows = centred(x, self.center(layer, side, x.dtype)).reshape(batch, -1, x.shape[-1])
        norms = prompt_norms(rows, prompt_positions(valid, rows))
        known = self.sequences.get((layer, side))
        if known is not None and known[0].shape == norms.shape:
            norms = norms + known[0]
        weight = prior_weight(self.weight[side][layer], norms, alpha)
        self.sequences[(layer, side)] = (norms, weight[0].contiguous() if batch == 1 else weight.contiguous())

    def center(self, layer: int, side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """(C,) value a skipped channel of ``layer``'s ``side`` stands for, in ``dtype`` (cast once, then kept), or
        None (0: no compensation)."""
        centers = self.centers.get(side)
        center = centers[layer] if centers else None
        if center is None or dtype == center.dtype:
            return center
        key = (side, layer, dtype)
        cast = self._center_casts.get(key)
        if cast is None:
            cast = self._center_casts[key] = center.to(dtype)
        return cast

    def step_tau(self, layer: int, side: str, multiplier: torch.Tensor) -> torch.Tensor:
        """Thresholds tau_base[layer] * m, float32, of the shape of ``multiplier`` (..., 1)."""
        return self.tau[side][layer] * multiplier

    def step_tau_all(self, side: str, multiplier: torch.Tensor) -> torch.Tensor:
        """``step_tau`` of every layer at once: (L, *multiplier.shape), the same products."""
        tau = self.tau[side]
        return tau.reshape(-1, *([1] * multiplier.dim())) * multiplier

    def set_tau(self, side: str, tau: torch.Tensor) -> None:
        """Replace the base thresholds (L,) of ``side`` in place."""
        self.tau[side].copy_(tau)
        self.tau_version += 1

    def keep(self, layer: int, side: str, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        """(..., C) bool keep mask of ``x`` (..., C); ``multiplier`` (..., 1) float32, one per token row."""
        raise NotImplementedError

    def threshold_form_keep(self, layer: int, side: str, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        """The threshold rule's keep mask: |x - c|·w > tau_base[layer]·m (``keep_weight``, ``center``)."""
        weight = self.keep_weight(layer, side, x)
        x = centred(x, self.center(layer, side, x.dtype))
        return threshold_keep(x, weight, self.step_tau(layer, side, multiplier))

    def observe_prefill(self, layer: int, side: str, x: torch.Tensor, batch: int,
                        valid: torch.Tensor | None = None) -> None:
        """See the dense prefill's activations ``x`` ((B, T, C), or flattened (B*T, C)) of a batch of ``batch``;
        ``valid``: the call's attention mask (B, >= T; its last T columns are this call's tokens, 0 = padding), or
        None."""


class ThresholdRule(SparsityRule):
    """CLADA and the threshold baselines: keep iff |x - c|·w > tau_base[l]·m (every side the artifact has; c = 0
    without compensation, and always on the attention sides)."""

    name = "threshold"
    threshold_form = True

    def keep(self, layer, side, x, multiplier):
        return self.threshold_form_keep(layer, side, x, multiplier)

    def observe_prefill(self, layer, side, x, batch, valid=None):
        if side in MLP_SIDES:
            self.observe_prior(layer, side, x, batch, valid)


class DenseRule(SparsityRule):
    """Nothing skipped: the dense model itself, through the same runtime."""

    name = "dense"
    sides = ()


class CatsRule(ThresholdRule):
    """CATS: neuron j kept iff |act(gate(x))_j| > tau_base_mid[l]·m (channel weights of the artifact, ones)."""

    name = "cats"
    sides = ("mid",)
    mid_at = "activation"

    def in_bytes_saved_by_mid(self, gated: bool) -> float:
        return 0.5 if gated else 0.0  # up's rows (half of the input projections' bytes); gate is always computed


class GriffinRule(SparsityRule):
    """GRIFFIN: per sequence and layer, the k = (1 - sparsity)·I neurons whose prompt statistic (``prompt_norms``:
    column norms of the row-normalised prompt activations, padding excluded) is largest, chosen at the dense prefill
    and fixed while decoding (params: sparsity)."""

    name = "griffin"
    sides = ("mid",)
    observes_prefill = True

    def __init__(self, artifact, device="cpu"):
        super().__init__(artifact, device)
        sparsity = float(self.params.get("sparsity", -1.0))
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"griffin rule: sparsity {sparsity} is outside [0, 1)")
        self.sparsity = sparsity

    @property
    def masks(self) -> dict[int, torch.Tensor]:
        """layer -> (B, I) bool keep mask of the calling thread's last prefill."""
        return self._sequences.__dict__.setdefault("masks", {})

    def in_bytes_saved_by_mid(self, gated: bool) -> float:
        return 1.0

    def observe_prefill(self, layer, side, x, batch, valid=None):
        rows = x.reshape(batch, -1, x.shape[-1])
        k = max(1, round((1.0 - self.sparsity) * x.shape[-1]))
        top = prompt_norms(rows, prompt_positions(valid, rows)).topk(k, dim=-1).indices
        self.masks[layer] = torch.zeros(batch, x.shape[-1], dtype=torch.bool, device=x.device).scatter_(1, top, True)

    def keep(self, layer, side, x, multiplier):
        mask = self.masks.get(layer)
        keep = None if mask is None else per_token_rows(mask, x)
        if keep is None:
            raise RuntimeError("griffin: a decode step without the dense prefill of its prompt (same batch) first")
        return keep


class PredictorRule(SparsityRule):
    """Neurons chosen from a low-bit copy of gate and up (``runtime.predictor``; params: bits, group, scales, the last
    absmax where the artifact names none, as the copies of artifacts from before the key had it): neuron j of
    layer l is kept iff |h~_j|·c_j > tau_base_mid[l]·m, h~ estimated from the copy on the MLP input whose channels
    |x_i|·w_i <= tau_base_in[l]·m are skipped (the copy's rows the step does not read). The ``in`` side's mask is
    therefore the copy's: gate and up see the whole input, for the kept neurons only. A layer with tau_base_mid < 0
    skips nothing and reads no copy. Bytes saved: a skipped neuron's gate row, up row and down column, less the
    copy's rows read. ``predicted`` (per layer): whether the copy decides the layer; ``MixedRule`` leaves some layers
    to the threshold rule."""

    name = "predictor"

    def __init__(self, artifact, device="cpu"):
        super().__init__(artifact, device)
        self.bits, self.group = int(self.params.get("bits", BITS)), int(self.params.get("group", GROUP))
        self.scales = str(self.params.get("scales", UNNAMED_SCALES))
        if not 2 <= self.bits <= 8 or self.group < 1:
            raise ValueError(f"{artifact.source}: predictor rule: bits {self.bits} (2..8) or group {self.group} (>= 1) "
                             "out of range")
        if self.scales not in SCALE_CHOICES:
            raise ValueError(f"{artifact.source}: predictor rule: scales {self.scales!r} is not one of "
                             f"{', '.join(SCALE_CHOICES)}")
        self.predicted = self._predicted_layers(artifact)
        self.copy = None  # runtime.predictor.LowBitCopy, made by bind
        self.copy_share = 0.0  # the copy's bytes over those of gate and up (bind: the model's weight size)
        self._reads_copy: tuple[int, list[bool]] = (-1, [])  # (tau_version, per layer: tau_mid >= 0)
        self._masks = threading.local()  # the calling thread's intermediate masks, by layer

    def _predicted_layers(self, artifact) -> list[bool]:
        """Per layer whether the copy decides it (here: every layer)."""
        return [True] * len(self.tau["mid"])

    def bind(self, adapter, parts):
        layers = [layer for layer, predicted in enumerate(self.predicted) if predicted]
        self.copy = LowBitCopy(adapter, parts, self.bits, self.group, self.scales, layers)
        element = adapter.weight(getattr(parts[0].owner, parts[0].in_names[0])).element_size()
        self.copy_share = self.copy.share_of_input_bytes(element)

    def reads_copy(self) -> list[bool]:
        """Per layer whether a decode step reads the copy (tau_base_mid >= 0)."""
        version, reads = self._reads_copy
        if version != self.tau_version:
            reads = [p and t >= 0 for p, t in zip(self.predicted, self.tau["mid"].tolist())]
            self._reads_copy = (self.tau_version, reads)
        return reads

    def masked(self, layer, side, x, keep):
        # the in side's mask is of the copy's rows: gate and up see the whole input (for the kept neurons only)
        return x if side == "in" and self.predicted[layer] else super().masked(layer, side, x, keep)

    def mlp_bytes_saved(self, share_in, share_mid, ran_in, bytes_in, bytes_mid, gated):
        reads = torch.tensor(self.reads_copy(), dtype=share_in.dtype, device=share_in.device)
        predicted = torch.tensor(self.predicted, device=share_in.device)
        by_copy = share_mid * (bytes_mid + bytes_in) - reads * self.copy_share * (ran_in - share_in) * bytes_in
        return torch.where(predicted, by_copy, super().mlp_bytes_saved(share_in, share_mid, ran_in, bytes_in,
                                                                       bytes_mid, gated))

    def keep(self, layer, side, x, multiplier):
        if not self.predicted[layer]:  # the threshold rule's layer (MixedRule)
            return self.threshold_form_keep(layer, side, x, multiplier)
        masks = self._masks.__dict__
        if side == "mid":
            keep = masks.get(layer)
            if keep is None or keep.shape != x.shape:
                raise RuntimeError("predictor: an intermediate without the MLP input it was estimated from")
            return keep
        if self.copy is None:
            raise RuntimeError("predictor: the rule was not bound to a model (runtime.apply binds it)")
        if not self.reads_copy()[layer]:
            keep_in = torch.ones(x.shape, dtype=torch.bool, device=x.device)
            masks[layer] = torch.ones((*x.shape[:-1], self.weight["mid"][layer].numel()), dtype=torch.bool,
                                      device=x.device)
            return keep_in
        keep_in = threshold_keep(x, self.weight["in"][layer], self.step_tau(layer, "in", multiplier))
        estimate = self.copy.estimate(layer, x * keep_in.to(x.dtype))
        masks[layer] = threshold_keep(estimate, self.weight["mid"][layer], self.step_tau(layer, "mid", multiplier))
        return keep_in


class MixedRule(PredictorRule):
    """The predictor rule on the layers the artifact names (params: those of ``predictor`` and ``predicted``, one
    boolean per layer), the threshold rule on the others (``|x - c|·w > tau_base[l]·m`` on both MLP sides,
    compensation included, no copy made or read): the calibration picks each layer's rule where its error per byte
    skipped is lower."""

    name = "mixed"

    def _predicted_layers(self, artifact):
        predicted, layers = self.params.get("predicted"), len(self.tau["mid"])
        if (not isinstance(predicted, list) or len(predicted) != layers
                or not all(isinstance(p, bool) for p in predicted)):
            raise ValueError(f"{artifact.source}: mixed rule: 'predicted' must list {layers} booleans (one per "
                             f"layer), not {predicted!r}")
        return predicted


RULES: dict[str, type[SparsityRule]] = {cls.name: cls for cls in (ThresholdRule, DenseRule, CatsRule, GriffinRule,
                                                                  PredictorRule, MixedRule)}


def observes_prefill(artifact) -> bool:
    """Whether the rule ``artifact`` names looks at each sequence's dense prefill (GRIFFIN; a threshold rule with
    prompt-prior exponents), so that its decode steps depend on the prompt the model saw first."""
    rule = RULES.get(artifact.rule.get("name", "threshold"))
    return rule is not None and rule.watches_prefill(artifact)


def check_rule(artifact) -> None:
    """Build the rule ``artifact`` names on the CPU without a model: an unknown rule or a bad rule parameter is one
    ``ArtifactError`` naming the file, before any model loads (``apply`` builds it again)."""
    from ..artifacts import ArtifactError

    try:
        build_rule(artifact)
    except ArtifactError:
        raise
    except ValueError as exc:
        message = str(exc)
        raise ArtifactError(message if message.startswith(str(artifact.source)) else f"{artifact.source}: {message}"
                            ) from None


def build_rule(artifact, device: torch.device | str = "cpu") -> SparsityRule:
    """The rule the artifact names (metadata ``rule.name``; format-1 artifacts: ``threshold``)."""
    name = artifact.rule.get("name", "threshold")
    if name not in RULES:
        from ..artifacts import ArtifactError

        raise ArtifactError(f"{artifact.source}: unknown sparsity rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name](artifact, device)
