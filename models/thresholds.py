"""Default thresholds of the gradwatch diagnosis, each with where it comes from.

Every value can be overridden per job with ``analysis.thresholds`` (a flat mapping of the names
below to numbers); unknown names are ignored, values that are not numbers are ignored too.
``docs/diagnosis.md`` explains how each threshold is used by the rules.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

# name -> (default, source)
THRESHOLDS: dict[str, tuple[float, str]] = {
    # --- gradient ratios (first weighted layer / last weighted layer; dL/dh_1 / dL/dh_T) ------
    "vanishing_ratio": (
        1e-4,
        "gradwatch benchmark labelling criteria (benchmark/README.md): key ratio below 1e-4 in every "
        "epoch and at initialisation. AUTOTRAINER (Zhang et al., ICSE 2021) uses 1e-3 on the "
        "first/last ratio; we keep a 10x margin so shallow sigmoid/tanh nets (ratio 1e-2..1e-1 at "
        "init, Glorot & Bengio 2010) are not flagged.",
    ),
    "exploding_ratio": (
        1e4,
        "benchmark/README.md: first/last or temporal ratio above 1e4 in every epoch. AUTOTRAINER's "
        "70 fires on healthy nets whose last layer learns slowly.",
    ),
    "temporal_vanishing_ratio": (
        1e-4,
        "benchmark/README.md key ratio for recurrent nets (||dL/dh_1|| / ||dL/dh_T||), same bound "
        "as the depth ratio; Bengio et al. 1994, Pascanu et al. 2013 (gradient through time "
        "shrinks geometrically when the recurrent Jacobian's spectral radius is < 1).",
    ),
    "temporal_exploding_ratio": (
        1e4,
        "benchmark/README.md; Pascanu et al. 2013: spectral radius > 1 makes dL/dh_t grow "
        "geometrically back in time.",
    ),
    # --- loss history ---------------------------------------------------------------------------
    "loss_divergence_factor": (
        100.0,
        "benchmark/README.md: an epoch's mean training loss above 100x the loss at initialisation "
        "counts as exploding.",
    ),
    "loss_spike_factor": (
        1e4,
        "a single step's loss 1e4x the loss at initialisation (100x the epoch-mean criterion): "
        "no well-posed run reaches that even transiently; catches a spike an epoch mean dilutes.",
    ),
    "grad_growth_factor": (
        1e4,
        "a layer's epoch-mean gradient norm 1e4x its norm at initialisation while the loss has not "
        "improved: same order as the ratio bound (benchmark/README.md).",
    ),
    # --- whole-network gradient collapse (the blind spot of the ratio rule) ---------------------
    "collapse_sensitivity": (
        1e-3,
        "first-order loss sensitivity ||g_l||*||W_l|| / loss of EVERY layer below 1e-3 at "
        "initialisation and in every epoch. For a homogeneous (ReLU) net sum_l <g_l, W_l> = "
        "<dL/dz, z> (Euler), so this is how much a 100% change of a layer's weights moves the "
        "loss. Healthy nets measure 1e-2..1 at init (gradwatch bench, docs/diagnosis.md); a deep "
        "ReLU net with weight variance 1/n (He et al. 2015, sec. 2.2) shrinks it by 2^(-L/2).",
    ),
    # --- 'the model learns little' (benchmark/README.md) ---------------------------------------
    "learned_little_accuracy_frac": (
        0.2,
        "benchmark/README.md: final accuracy below chance + 20% of the way from chance to 100%.",
    ),
    "learned_little_mse_frac": (
        0.7,
        "benchmark/README.md: final MSE above 0.7x the target variance.",
    ),
    "learned_little_loss_frac": (
        0.85,
        "when no metric is reported (external jobs): the best epoch loss is still above 0.85x the "
        "loss at initialisation. For cross-entropy, chance+20% accuracy corresponds to roughly a "
        "10-20% loss drop (gradwatch bench measurements).",
    ),
    "plateau_rel_change": (
        0.01,
        "loss plateau: the epoch-mean loss moved by less than 1% relative over the last epochs "
        "(Goodfellow et al. 2016, ch. 8.2: plateaus of the loss surface).",
    ),
    "plateau_min_epochs": (
        3,
        "number of epochs a plateau must span before it is reported.",
    ),
    # --- activations ----------------------------------------------------------------------------
    "saturation_frac": (
        0.5,
        "Glorot & Bengio 2010 (fig. 2): the top sigmoid layer of a deep net sits at 0 for most "
        "units; more than half of a layer's outputs within 0.01 of the asymptotes is reported.",
    ),
    "dead_relu_frac": (
        0.5,
        "Lu et al. 2019 ('Dying ReLU and initialization'): a layer with more than half of its "
        "units dead for every sample of a batch has lost most of its capacity.",
    ),
    # --- early stop -----------------------------------------------------------------------------
    "certain_min_epochs": (
        2,
        "a vanishing or ratio-exploding pattern must hold at initialisation and in this many "
        "epochs, with no loss progress, before training stops early (non-finite loss and loss "
        "divergence stop at once).",
    ),
    "certain_update_ratio": (
        1e-2,
        "a whole-network collapse (ratio near 1) is only certain for early stop while no layer's "
        "weights moved by more than 1% over the last epoch (update_ratio): a net that can still "
        "escape the collapse must be moving.",
    ),
    "certain_progress_rel": (
        0.05,
        "'no loss progress' for early stop: the last epoch's mean loss is not below 95% of the "
        "previous epoch's.",
    ),
}

DEFAULTS: dict[str, float] = {k: v[0] for k, v in THRESHOLDS.items()}


def resolve(overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Defaults merged with per-job overrides (``analysis.thresholds``)."""
    out = dict(DEFAULTS)
    if overrides:
        for key, value in dict(overrides).items():
            if key not in out or isinstance(value, bool):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[key] = v
    return out


def source(name: str) -> str:
    return THRESHOLDS[name][1]
