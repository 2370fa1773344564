"""The seven losses of Keren, Sabato & Schuller (ICDM 2018), one signature for all.

Every entry of `LOSSES` maps logits `(m, k)` and int64 targets `(m,)` to a scalar. Hyper-parameters
are keyword-only arguments, bound from params.yaml by `make_loss`, so the registry holds plain
functions and nothing reads a global. Each loss is written in a numerically stable form
(log-sum-exp, softplus, max) so that it stays finite, with finite gradients, for float32 logits
up to +-1e4 and for batches of m*k in the millions.

Every loss also takes `candidates` (`slc.nn.candidates`): the logits are then those of a sampled set
of classes, and each loss applies the correction its definition needs: a sum over classes weighs
each sampled class by 1/P(sampled) and a log-sum-exp subtracts log P(sampled) from its logits (the
log-q correction of sampled softmax), so both estimate their full-k value; nce's noise becomes
the shared negatives; the max of the margin losses is taken over the candidates (a lower bound of
the full max). With every class a candidate each loss equals its full form.

`POLS_ALIGNED` names the losses whose minimisers separate every true logit from every false logit
across examples (the Principle of Logit Separation); `ce` and `max_margin` only compare logits
within one example and are invariant to a per-example shift, so they cannot guarantee it.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slc.core.config import TrainConfig
from slc.nn.candidates import Candidates

Loss = Callable[[Tensor, Tensor], Tensor]

POLS_ALIGNED = {"bce", "self_norm", "nce", "batch_ce", "batch_max_margin"}


def _true_logits(logits: Tensor, targets: Tensor) -> Tensor:
    return logits.gather(1, targets[:, None]).squeeze(1)


def _best_false_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """max_{j != y_i} z_ij per example (the rival a margin loss pushes down)."""
    true = F.one_hot(targets, logits.shape[1]).bool()
    return logits.masked_fill(true, float("-inf")).amax(dim=1)


def _corrected(logits: Tensor, candidates: Candidates | None) -> Tensor:
    """Logits minus log P(class sampled): their log-sum-exp estimates the one over all k classes."""
    return logits if candidates is None else logits - candidates.log_inclusion


def ce(logits: Tensor, targets: Tensor, *, candidates: Candidates | None = None) -> Tensor:
    """Softmax cross-entropy, the non-aligned baseline (sampled: sampled softmax, log-q corrected)."""
    return F.cross_entropy(_corrected(logits, candidates), targets)


def max_margin(logits: Tensor, targets: Tensor, *, margin: float, candidates: Candidates | None = None) -> Tensor:
    """Crammer-Singer multiclass hinge: the true logit must beat the best rival by `margin`."""
    rival = _best_false_logits(logits, targets)
    return F.relu(margin - _true_logits(logits, targets) + rival).mean()


def bce(logits: Tensor, targets: Tensor, *, candidates: Candidates | None = None) -> Tensor:
    """One logistic regression per class (one-vs-all), summed over classes, mean over the batch.

    Each logit is pushed above 0 for its own class and below 0 for all others, a threshold shared
    by every example, which is why it is aligned. Written with softplus via
    `binary_cross_entropy_with_logits`, so large logits never overflow. Sampled, each class's
    term is weighed by 1 / P(sampled), an unbiased estimate of the sum over all k classes.
    """
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    weight = None if candidates is None else torch.exp(-candidates.log_inclusion)
    return F.binary_cross_entropy_with_logits(logits, onehot, weight=weight, reduction="sum") / logits.shape[0]


def self_norm(logits: Tensor, targets: Tensor, *, alpha: float, candidates: Candidates | None = None) -> Tensor:
    """Devlin et al. (2014): cross-entropy plus alpha * (log partition)^2.

    The penalty pins each example's log-sum-exp near 0, so logits become log-probabilities on a
    scale shared by all examples, which removes the per-example shift that `ce` leaves free.
    """
    log_partition = torch.logsumexp(_corrected(logits, candidates), dim=1)
    return (log_partition - _true_logits(logits, targets)).mean() + alpha * log_partition.pow(2).mean()


def nce(logits: Tensor, targets: Tensor, *, noise_samples: int, noise_probs: Tensor | None,
        generator: torch.Generator | None, candidates: Candidates | None = None) -> Tensor:
    """Noise-contrastive estimation (Gutmann & Hyvarinen 2010; Mnih & Teh 2012).

    Per example: a logistic regression of the true class (label 1) against `noise_samples`
    classes drawn from q (label 0), on logits shifted by -log(n q(j)); at the optimum the logits
    are self-normalised log-probabilities. Noise draws may hit the true class, as in the original
    estimator. q is uniform when `noise_probs` is None. Draws come from `generator` (on the CPU,
    whatever device the logits are on) so that a seeded training run is reproducible. Sampled, the
    noise is the candidates' n uniform negatives, shared by every example of the batch.
    """
    if candidates is not None:
        true_shifted = _true_logits(logits, targets) - candidates.log_noise_rate
        return _nce_loss(true_shifted, logits[:, candidates.noise] - candidates.log_noise_rate)
    m, k = logits.shape
    if noise_probs is None:
        noise = torch.randint(k, (m, noise_samples), generator=generator)
        log_nq = torch.full((k,), math.log(noise_samples / k))
    else:
        if noise_probs.shape != (k,):
            raise ValueError(f"nce: noise_probs has shape {tuple(noise_probs.shape)} but the logits "
                             f"have {k} classes: build the loss from this dataset's class counts")
        noise = torch.multinomial(noise_probs, m * noise_samples, replacement=True,
                                  generator=generator).view(m, noise_samples)
        log_nq = torch.log(noise_samples * noise_probs)
    noise = noise.to(logits.device)
    log_nq = log_nq.to(device=logits.device, dtype=logits.dtype)
    return _nce_loss(_true_logits(logits, targets) - log_nq[targets], logits.gather(1, noise) - log_nq[noise])


def _nce_loss(true_shifted: Tensor, noise_shifted: Tensor) -> Tensor:
    """Logistic regression of true (label 1) against noise (label 0) on logits shifted by log(n q)."""
    # -log sigma(s) = softplus(-s); -log(1 - sigma(s)) = softplus(s)
    return (F.softplus(-true_shifted) + F.softplus(noise_shifted).sum(dim=1)).mean()


def batch_ce(logits: Tensor, targets: Tensor, *, candidates: Candidates | None = None) -> Tensor:
    """The paper's batch cross-entropy KL(P_B || Q_B), in its exact log-sum-exp form.

    Q_B is a softmax over all m*k logits of the batch and P_B puts 1/m on each true (i, y_i), so
    true logits compete with false logits of *other* examples: that is what aligns it with PoLS.
    KL = mean_i(logsumexp(all logits) - z_{i,y_i}) - log m, exactly. The authors' TensorFlow code
    computes sum P log(P / (Q + eps) + eps) with eps = 1e-6; once m*k is large, Q's entries fall
    far below eps, so eps dominates the ratio and the loss and its gradient no longer follow the
    KL. The form here needs no eps and is stable for any batch size and logit magnitude.
    """
    m = logits.shape[0]
    true = _true_logits(logits, targets)
    return torch.logsumexp(_corrected(logits, candidates).flatten(), dim=0) - true.mean() - math.log(m)


def batch_max_margin(logits: Tensor, targets: Tensor, *, margin: float,
                     candidates: Candidates | None = None) -> Tensor:
    """The paper's batch max-margin: Crammer-Singer plus one hinge across the whole batch.

    The second term asks the smallest true logit of the batch to beat the largest false logit of
    the batch by `margin`, which is PoLS itself on the batch; it is weighted 1/m so that a single
    pair of examples does not dominate the per-example terms.
    """
    true = _true_logits(logits, targets)
    rival = _best_false_logits(logits, targets)
    per_example = F.relu(margin - true + rival).mean()
    across_batch = F.relu(margin - true.min() + rival.max()) / logits.shape[0]
    return per_example + across_batch


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "max_margin": max_margin,
    "bce": bce,
    "self_norm": self_norm,
    "nce": nce,
    "batch_ce": batch_ce,
    "batch_max_margin": batch_max_margin,
}


def _uniform_noise(class_counts: np.ndarray | None) -> Tensor | None:
    return None  # nce draws uniformly over however many classes the logits have


def _frequency_noise(class_counts: np.ndarray | None) -> Tensor:
    """Class frequencies in the training set, add-one smoothed so that every class can be drawn."""
    if class_counts is None:
        raise ValueError("train.nce_noise = 'frequency' needs the training class counts: pass "
                         "class_counts=np.bincount(train_labels, minlength=k) to make_loss")
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64) + 1.0
    return (counts / counts.sum()).float()


NCE_NOISE: dict[str, Callable[[np.ndarray | None], Tensor | None]] = {
    "uniform": _uniform_noise,
    "frequency": _frequency_noise,
}


def make_loss(name: str, cfg: TrainConfig, class_counts: np.ndarray | None = None,
              generator: torch.Generator | None = None) -> Loss:
    """LOSSES[name] with its keyword-only hyper-parameters bound from the `train:` params."""
    available = {
        "margin": lambda: cfg.margin,
        "alpha": lambda: cfg.self_norm_alpha,
        "noise_samples": lambda: cfg.nce_noise_samples,
        "noise_probs": lambda: NCE_NOISE[cfg.nce_noise](class_counts),
        "generator": lambda: generator,
    }
    return functools.partial(LOSSES[name], **{key: available[key]() for key in _keyword_only(name)})


# The `train:` key behind each keyword-only loss hyper-parameter (generator is not a setting).
_TRAIN_KEYS = {"margin": "margin", "alpha": "self_norm_alpha", "noise_samples": "nce_noise_samples",
               "noise_probs": "nce_noise"}
LOSS_TRAIN_KEYS = frozenset(_TRAIN_KEYS.values())  # train keys that only some losses read


def train_keys_of(name: str) -> set[str]:
    """The loss-specific `train:` keys that loss `name` reads (e.g. max_margin: {"margin"})."""
    return {_TRAIN_KEYS[key] for key in _keyword_only(name) if key in _TRAIN_KEYS}


def _keyword_only(name: str) -> list[str]:
    """A loss's hyper-parameters (keyword-only), less `candidates`, which each step passes."""
    return [p.name for p in inspect.signature(LOSSES[name]).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "candidates"]
