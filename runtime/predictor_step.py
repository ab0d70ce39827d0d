"""The predictor rule's decode step: one gated MLP's call of one token row on the native CPU kernels.

With the predictor rule (``rules.PredictorRule``) and a backend other than ``masked``, ``apply`` gives each gated MLP
an instance ``forward`` (``PredictorSteps``; ``remove`` pops it). A sparse decode call of one token row on a CPU
whose native kernel (``runtime.native``) has the predictor's step runs as one call of it (``predictor_step``):

1. the 4-bit copy of gate and up (``runtime.predictor``, packed) read for the input channels |x|·w_in > tau_in·m
   only: the estimates of gate(x) and up(x);
2. h~ = act(gate~) * up~ and the kept neurons |h~|·w_mid > tau_mid·m (the rule's comparison);
3. the kept neurons' gate and up rows (the weights as the model holds them), h = act(gate) * up;
4. the gather kernel over down's rows of the kept neurons (down stored as input-channel rows, ``runtime.layout``).

Under the mixed rule (``rules.MixedRule``) the layers the threshold rule decides run its gathered step instead: gate
and up laid as one buffer of input-channel rows (``runtime.layout.store_rows_shared``), the native gather over the
rows of the kept input channels (``ChannelGate.gather``: compensation included), act(gate) * up, and the gather over
down's rows of the kept neurons, as the threshold rule's ``runtime.mlp_step`` does.

Only the copy's rows of kept input channels and the kept neurons' rows are read. The keep decisions are the
rule's up to the float32 summation order of the estimate (the masked reference sums the dequantised copy with a
matrix product): a neuron within rounding of its threshold may go the other way.

``backend="native"`` takes this step wherever it can, and the masked reference elsewhere (several token rows, a GPU).
``backend="auto"`` decides per dtype on the model's own first decode steps: after one untimed step they alternate
between this step and the MLPs' dense products, each decode step's MLP calls timed together (weights streaming from
memory as decoding reads them, not a loop over one layer's cached weights), and after ``TRIAL_STEPS`` of each the
step stays if its median beats the dense one by ``MARGIN``, else dense (``summary``; kept for the process, so that
applying the same artifact again does not time again). The medians are cached per machine beside the threshold
rule's timings (``runtime.selection``'s cache, keyed by processor, torch version, thread count, dtype, kernel build
and thresholds): a later process takes the cached decision at once, unless it was a close call (``CLOSE_CALL`` of the
edge), which is timed again at later processes up to ``SITTINGS`` sittings, each path's fastest median kept (a
neighbour's load only ever slows a sitting down). Calls the step cannot take run dense, and so does everything
where no kernel exists (a GPU, no C compiler: a warning at ``apply``). Dense calls count as nothing skipped and nothing of
the copy read.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import MLPAdapter, MLPParts
from .backends import BACKENDS
from .layout import can_share_rows, restore_layout, store_rows_contiguous, store_rows_shared
from .native import gather_kernel
from .mlp_step import step_modules
from .selection import CLOSE_CALL, SITTINGS, load_cache, store_cache
from .sparse import SparsityState, row_multipliers

TRIAL_STEPS = 4  # decode steps of each path auto times before it decides (after one untimed step)
# The step's median must beat the dense MLPs' by this share to be kept: 4 noisy steps per path cannot separate a few
# percent (SmolLM2-135M, float32, one thread, AMD EPYC Zen 3: the step timed 5% faster over the MLPs, 23.07 vs 24.35
# ms, and whole decode steps then ran 4% slower than dense).
MARGIN = 0.08
NATIVE = "native"


class PredictorSteps:
    """The predictor rule's step forwards of one patched model's gated MLPs, and auto's measured choice per dtype."""

    def __init__(self, adapter: MLPAdapter, state: SparsityState, parts: list[MLPParts], backend: str,
                 device: torch.device, dtype: torch.dtype):
        self.state, self.rule, self.backend = state, state.rule, backend
        self.act_name, self.weight_of = adapter.act_name, adapter.weight_of
        self.kernel = gather_kernel() if device.type == "cpu" else None
        # dtype -> {"path", "step_ms", "dense_ms", "steps", "sittings"}: shared by every apply in this process of an
        # artifact with the same thresholds on a model of the same shape, at the same thread count (what the timing
        # depends on)
        key = decision_key(self.rule, torch.get_num_threads())
        self.decisions = DECISIONS.setdefault(key, {})
        self.cache_digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]  # the key in the machine cache
        self.cached: dict[torch.dtype, dict] = {}  # dtype -> the machine cache's entry for it (close calls: re-timed)
        # dtype -> {"steps": n, path: [seconds of each timed step]}; made once the machine cache was looked up
        self.trials: dict[torch.dtype, dict] = {}
        self.owners = [part.owner for part in parts]
        self.activation = activation_kind(getattr(parts[0].owner, adapter.act_name)) if parts else None
        usable = self.kernel is not None and self.kernel.predictor_accepts(dtype) and self.activation is not None
        if backend == "auto" and not usable:
            where = "a GPU" if device.type != "cpu" else f"{dtype} weights on this CPU"
            warnings.warn(f"clada: no kernel computes the predictor rule for {where}; backend='auto' decodes dense "
                          "(backend='masked' computes the rule, reading every weight)", stacklevel=3)
        # down's rows of the kept neurons contiguous (the gather kernel's layout), unless auto already decided dense;
        # until auto decides, its timed dense steps multiply by a copy of down in its original layout (the product the
        # unpatched model runs), which the decision then keeps (dense) or drops (native)
        self.downs = [getattr(part.owner, part.out_name).inner for part in parts]
        self.down_copies: list[torch.Tensor | None] = [None] * len(parts)
        # the threshold rule's layers (MixedRule): gate and up as one buffer of input-channel rows, or None
        self.inputs = [[getattr(part.owner, name).inner for name in part.in_names] for part in parts]
        self.input_rows: list[torch.Tensor | None] = [None] * len(parts)
        if usable and backend == "auto" and dtype not in self.decisions:
            self._cached_decision(dtype)
        relay = usable and (backend != "auto" or self.decisions.get(dtype, {}).get("path") != "dense")
        for layer, part in enumerate(parts):
            if relay:
                store_rows_contiguous(adapter, self.downs[layer])
                if not self.rule.predicted[layer] and can_share_rows(adapter, self.inputs[layer]):
                    self.input_rows[layer] = store_rows_shared(self.inputs[layer])
            part.owner.forward = self._forward_of(layer, part)

    def _cache_key(self, dtype: torch.dtype) -> str:
        """The machine cache's key of this model's decision for ``dtype`` (selection's file: processor, torch and
        threads are in its name)."""
        return f"predictor|{self.kernel.path.stem}|{str(dtype).removeprefix('torch.')}|{self.cache_digest}"

    def _cached_decision(self, dtype: torch.dtype) -> dict | None:
        """The machine cache's decision for ``dtype`` where it has one that is no close call (or was timed
        ``SITTINGS`` times), now this process's too; else None and ``dtype``'s trial starts (a close call's entry
        kept to combine with it). Called once per dtype: the cache file is read once."""
        entry = load_cache(torch.device("cpu")).get(self._cache_key(dtype))
        if not isinstance(entry, dict) or not {"step_ms", "dense_ms", "sittings"} <= entry.keys():
            entry = None
        if entry is not None and (entry["sittings"] >= SITTINGS or abs(step_margin(entry) - 1.0) > CLOSE_CALL):
            decision = self.decisions[dtype] = {**decided(entry["step_ms"], entry["dense_ms"], entry["sittings"]),
                                                "cached": True}
            return decision
        if entry is not None:
            self.cached[dtype] = entry
        self.trials[dtype] = {"steps": 0, NATIVE: [], "dense": []}
        return None

    def _decide(self, dtype: torch.dtype, ms: dict[str, float]) -> dict:
        """auto's decision for ``dtype`` from this process's medians ``ms`` (path -> ms) and a close call's cached
        sittings (each path's fastest), stored in the machine cache."""
        entry = self.cached.pop(dtype, None)
        step_ms, dense_ms, sittings = ms[NATIVE], ms["dense"], 1
        if entry is not None:
            step_ms, dense_ms = min(step_ms, entry["step_ms"]), min(dense_ms, entry["dense_ms"])
            sittings += entry["sittings"]
        decision = self.decisions[dtype] = decided(step_ms, dense_ms, sittings)
        store_cache(torch.device("cpu"), {self._cache_key(dtype): {
            "step_ms": decision["step_ms"], "dense_ms": decision["dense_ms"], "sittings": sittings}})
        return decision

    def _settle(self, path: str) -> None:
        """After auto's decision: down back in its original layout (the trial's copies) if dense, the copies dropped
        if native."""
        for layer, copy in enumerate(self.down_copies):
            if path == "dense":
                param = self.downs[layer].weight
                param.data = copy if copy is not None and copy.shape == param.shape else param.data.contiguous()
                if self.input_rows[layer] is not None:
                    for proj in self.inputs[layer]:
                        restore_layout(proj)
                    self.input_rows[layer] = None
            self.down_copies[layer] = None

    def restore(self) -> None:
        """Give every MLP its own forward back."""
        for owner in self.owners:
            owner.__dict__.pop("forward", None)

    def stats_entries(self) -> dict:
        """What ``runtime.stats`` reports of these steps: ``{"predictor_path": summary()}``."""
        return {"predictor_path": self.summary()}

    def summary(self) -> dict:
        """auto's choice per dtype (``{"path": "native" | "dense", "step_ms", "dense_ms", "steps", "sittings"}``,
        and ``"cached": True`` where this process took it from the machine cache), or, for a named backend, that
        name."""
        if self.backend != "auto":
            return {"backend": self.backend}
        return {str(dtype).replace("torch.", ""): dict(d) for dtype, d in self.decisions.items()}

    def _usable(self, layer: int, x: torch.Tensor, rows: int) -> bool:
        kernel = self.kernel
        if kernel is None or rows != 1 or x.device.type != "cpu" or not kernel.predictor_accepts(x.dtype):
            return False
        if not self.rule.predicted[layer]:
            full = self.input_rows[layer]
            return full is not None and kernel.accepts(x.reshape(1, -1), full)
        return self.activation is not None and self.rule.copy.packed[layer] is not None

    def _forward_of(self, layer: int, part: MLPParts):
        owner, state, rule, act_name = part.owner, self.state, self.rule, self.act_name
        own = type(owner).forward.__get__(owner)
        modules = owner._modules

        def dense(x, gate, up, act, down):
            h = act(gate.inner(x)) * up.inner(x)
            inner = down.inner
            weight = self.weight_of(inner)
            if weight.is_contiguous() or type(inner) is not nn.Linear or x.dtype in self.decisions:
                return inner(h)  # (decided: the copy of the trial is gone, the layout is the decision's)
            copy = self.down_copies[layer]
            if copy is None or copy.dtype != weight.dtype or copy.device != weight.device:
                copy = self.down_copies[layer] = weight.contiguous()
            return F.linear(h, copy, inner.bias)

        def threshold_step(x, gate, act, down):
            both = gate.gate.gather(GATHER, x.reshape(1, -1), self.input_rows[layer])
            width = self.weight_of(gate.inner).shape[0]
            h = act(both[:, :width]) * both[:, width:]
            out = down.gate.gather(GATHER, h, self.weight_of(down.inner).t())
            return out.reshape(*x.shape[:-1], out.shape[-1])

        def step(x, gate, up, act, down):
            if not rule.predicted[layer]:
                return threshold_step(x, gate, act, down)
            rows_x = x.reshape(1, -1)
            m = row_multipliers(state.multiplier, rows_x)
            neurons = rule.weight["mid"][layer].numel()
            if not rule.reads_copy()[layer]:  # the layer skips nothing
                state.record_kept("in", layer, 1, rows_x.shape[1], rows_x.shape[1])
                state.record_kept("mid", layer, 1, neurons, neurons)
                return dense(x, gate, up, act, down)
            codes, scales = rule.copy.packed[layer]
            out, kept_in, kept_mid = self.kernel.predictor_step(
                rows_x.reshape(-1).contiguous(), rule.weight["in"][layer], float(rule.step_tau(layer, "in", m)),
                codes, scales, rule.weight["mid"][layer], float(rule.step_tau(layer, "mid", m)), self.activation,
                self.weight_of(gate.inner), self.weight_of(up.inner), self.weight_of(down.inner).t())
            state.record_kept("in", layer, 1, kept_in, rows_x.shape[1])
            state.record_kept("mid", layer, 1, kept_mid, neurons)
            state.path_calls[NATIVE] += 1
            return out.reshape(*x.shape[:-1], out.shape[-1])

        def forward(x, *args, **kwargs):
            found = step_modules(modules, part, act_name, state, args or kwargs)
            if found is None:
                return own(x, *args, **kwargs)
            gate, up, act, down = found
            rows = x.numel() // x.shape[-1]
            usable = self._usable(layer, x, rows) and self.weight_of(down.inner).t().is_contiguous()
            if self.backend != "auto":
                return step(x, gate, up, act, down) if usable else own(x)
            path, trial = self._path(layer, x.dtype) if usable else ("dense", None)
            run = (lambda: step(x, gate, up, act, down)) if path == NATIVE else (lambda: dense(x, gate, up, act, down))
            if trial is None:
                out = run()
            else:
                out, seconds = timed(path, run)
                trial[path][-1] += seconds
            if path != NATIVE:
                state.record_dense_layer(layer, rows)
            return out
        return forward

    def _path(self, layer: int, dtype: torch.dtype) -> tuple[str, dict | None]:
        """auto's path for a call of ``layer`` that the step can take, and the trial to time it into (None: decided,
        or the untimed first step). Until decided, decode steps alternate between the two paths, each timed over all
        its MLP calls; after ``TRIAL_STEPS`` of each the step stays if its median beats dense by ``MARGIN``."""
        decision = self.decisions.get(dtype)
        if decision is None and dtype not in self.trials:  # not looked up yet: a dtype other than the weights' at apply
            decision = self._cached_decision(dtype)
            if decision is not None:
                self._settle(decision["path"])
        if decision is not None:
            return decision["path"], None
        trial = self.trials[dtype]
        if layer == 0:  # a new decode step
            trial["steps"] += 1
            n = trial["steps"]
            if len(trial[NATIVE]) >= TRIAL_STEPS + 1 and len(trial["dense"]) >= TRIAL_STEPS:
                decision = self._decide(dtype, {p: 1e3 * statistics.median(trial[p][-TRIAL_STEPS:])
                                                for p in (NATIVE, "dense")})
                self._settle(decision["path"])
                return decision["path"], None
            trial[NATIVE if n % 2 else "dense"].append(0.0)
        path = NATIVE if trial["steps"] % 2 else "dense"
        return path, (trial if trial["steps"] > 1 else None)


DECISIONS: dict[tuple, dict[torch.dtype, dict]] = {}  # decision_key -> dtype -> auto's decision
GATHER = BACKENDS["native"]  # the threshold rule's layers' gathers (MixedRule)


def step_margin(timing: dict) -> float:
    """The step's ms over what it must beat (dense ms less ``MARGIN``): below 1 the step stays; 1 is the edge."""
    return timing["step_ms"] / (timing["dense_ms"] * (1 - MARGIN))


def decided(step_ms: float, dense_ms: float, sittings: int) -> dict:
    """auto's decision (``summary``'s entry) from the two paths' median ms over a decode step's MLP calls."""
    timing = {"step_ms": round(step_ms, 3), "dense_ms": round(dense_ms, 3)}
    return {"path": NATIVE if step_margin(timing) < 1.0 else "dense", **timing, "steps": TRIAL_STEPS,
            "sittings": sittings}


def decision_key(rule, threads: int) -> tuple:
    """What auto's decision depends on besides the dtype: the thresholds (the densities), the layers' sizes, the
    thread count and (mixed rule) which layers the copy decides."""
    mixed = () if all(rule.predicted) else (tuple(rule.predicted),)  # (the predictor rule's keys as before)
    return (tuple(rule.tau["in"].tolist()), tuple(rule.tau["mid"].tolist()), tuple(rule.weight["in"].shape),
            tuple(rule.weight["mid"].shape), threads, *mixed)


def timed(path: str, run) -> tuple[torch.Tensor, float]:
    """``run()`` and its wall-clock seconds (``path``: the path it runs, for tests that fix the timings)."""
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def activation_kind(module) -> str | None:
    """The native step's name (``native.ACTIVATIONS``) of an MLP's activation module, or None if it has none."""
    name = type(module).__name__
    if isinstance(module, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if (name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh")
            or (isinstance(module, nn.GELU) and module.approximate == "tanh")):
        return "gelu_tanh"
    return None
