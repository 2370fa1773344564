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

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slc.core.config import ModelConfig, TrainConfig
from slc.nn.candidates import Candidates

Loss = Callable[[Tensor, Tensor], Tensor]

POLS_ALIGNED = {"bce", "self_norm", "nce", "batch_ce", "batch_max_margin", "sphereface2", "uniface"}


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


# --- The related work's losses: each with its hyper-parameters in its own `train.<section>` ---


def z_loss(logits: Tensor, targets: Tensor, *, a: float, b: float, candidates: Candidates | None = None) -> Tensor:
    """Z-loss (de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss
    belonging to the spherical family", arXiv:1604.08859, 2016): each example's logits standardised
    over the classes, z = (o - mean) / std, then (1 / a) softplus(a (b - z_y)).

    Standardising makes it invariant to a per-example shift and scale of the logits, so by the
    paper's argument it is not aligned. b caps how far z_y is pushed (z_y is at most sqrt(k - 1)),
    a sets the hinge's softness. Sampled, the mean and variance over k are estimated from the
    candidates, each weighed by 1 / P(sampled); with every class a candidate they are exact.
    """
    weight = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device) if candidates is None \
        else torch.exp(-candidates.log_inclusion).to(logits.dtype)
    weight = weight / weight.sum()
    mean = logits @ weight
    centred = logits - mean[:, None]
    std = torch.sqrt(centred.pow(2) @ weight + 1e-12)
    standardised = _true_logits(centred, targets) / std
    return (F.softplus(a * (b - standardised)) / a).mean()


def smooth_topk(logits: Tensor, targets: Tensor, *, top: int, alpha: float, tau: float,
                candidates: Candidates | None = None) -> Tensor:
    """Smooth top-k SVM loss L_{k,tau} (Berrada, Zisserman & Kumar, "Smooth Loss Functions for Deep
    Top-k Classification", ICLR 2018, eq. 8): tau log sum over k-subsets S of exp((alpha [y not in S]
    + mean_{j in S} s_j) / tau), less tau log of the same sum over the subsets that hold y.

    Both sums are elementary symmetric polynomials of x_j = exp(s_j / (k tau)): with e_r those of
    the classes other than y, the loss is tau log(e^(alpha/tau) e_k + x_y e_(k-1)) - tau log(x_y e_(k-1)).
    e_r is computed in log space by the recurrence e_r(x_1..x_i) = e_r(x_1..x_(i-1)) + x_i
    e_(r-1)(x_1..x_(i-1)), one cumulative log-sum-exp per r: O(k n), as the paper's own algorithm.
    A per-example shift moves every subset's mean alike, so it is not aligned. top = 1 is the smooth
    multiclass SVM, whose log-sum-exp takes the log-q correction when sampled; top > 1 has no
    sampled form here (refused before training).
    """
    if candidates is not None and top > 1:
        raise ValueError(f"smooth_top{top} has no sampled form: set train.candidates: null")
    true = _true_logits(logits, targets)
    log_x = (_corrected(logits, candidates) if top == 1 else logits) / (top * tau)
    # log 0, for y's own x and the empty prefix: finite, far below every log x (-inf gives NaN gradients)
    log_zero = log_x.detach().amin(dim=1, keepdim=True) - 1e3
    others = log_x.scatter(1, targets[:, None], log_zero)
    log_e = [torch.zeros_like(true)]  # log e_0 = 0, then log e_1 .. log e_top of the other classes
    terms = others  # x_i e_0 of the prefix before class i
    for _ in range(top):
        prefix = torch.logcumsumexp(terms, dim=1)  # log e_r of the classes up to each i
        log_e.append(prefix[:, -1])
        terms = others + torch.cat([log_zero, prefix[:, :-1]], dim=1)  # x_i e_r of the prefix before i
    log_with_y = true / (top * tau) + log_e[top - 1]
    return (tau * torch.logaddexp(alpha / tau + log_e[top], log_with_y) - tau * log_with_y).mean()


def _margin_ce(logits: Tensor, targets: Tensor, true: Tensor, candidates: Candidates | None) -> Tensor:
    """Softmax cross-entropy with each example's true logit replaced by `true` (log-q corrected when sampled)."""
    return F.cross_entropy(_corrected(logits.scatter(1, targets[:, None], true[:, None]), candidates), targets)


def cosface(logits: Tensor, targets: Tensor, *, scale: float, margin: float,
            candidates: Candidates | None = None) -> Tensor:
    """CosFace's large margin cosine loss (Wang et al., CVPR 2018; AM-softmax, Wang et al. 2018):
    softmax cross-entropy on s cos(theta) with s m taken off the true class's logit. The logits
    are those of the bias-free cosine head at scale s. A softmax over one example's logits, shifted
    alike: not aligned."""
    return _margin_ce(logits, targets, _true_logits(logits, targets) - scale * margin, candidates)


def arcface(logits: Tensor, targets: Tensor, *, scale: float, margin: float,
            candidates: Candidates | None = None) -> Tensor:
    """ArcFace's additive angular margin (Deng et al., CVPR 2019): softmax cross-entropy with the true
    class's logit s cos(theta) replaced by s cos(theta + m). Where theta + m would pass pi, it takes
    s (cos(theta) - m sin(m)) instead, so the logit keeps falling with theta (the paper's code,
    insightface, does the same). The logits are those of the bias-free cosine head at scale s, so
    cos(theta) = logit / s (clamped inside [-1, 1], where arccos's slope is finite). A softmax over
    one example's logits: not aligned, like ce, though its margin reads a logit's absolute value."""
    cosine = (_true_logits(logits, targets) / scale).clamp(-1 + 1e-6, 1 - 1e-6)
    sine = torch.sqrt(1 - cosine.pow(2))
    with_margin = torch.where(cosine > math.cos(math.pi - margin), cosine * math.cos(margin) - sine * math.sin(margin),
                              cosine - margin * math.sin(margin))
    return _margin_ce(logits, targets, scale * with_margin, candidates)


def _binary_terms(logits: Tensor, targets: Tensor, positive: Tensor, negative: Tensor,
                  candidates: Candidates | None) -> Tensor:
    """Per example: `positive` of its true logit plus `negative` summed over its other classes'
    logits, each other class weighed by 1 / P(sampled) when sampled (an unbiased sum over k)."""
    onehot = F.one_hot(targets, logits.shape[1]).bool()
    weight = 1.0 if candidates is None else torch.exp(-candidates.log_inclusion)
    per_class = torch.where(onehot, positive, negative * weight)
    return per_class.sum(dim=1).mean()


def sphereface2(logits: Tensor, targets: Tensor, *, scale: float, margin: float, lam: float,
                candidates: Candidates | None = None) -> Tensor:
    """SphereFace2-C (Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
    Recognition", ICLR 2022, eq. 8 with t = 1): one binary classifier per class on normalised
    features, (lam / s) softplus(-(s (cos_y - m) + b)) + ((1 - lam) / s) sum_(j != y)
    softplus(s (cos_j + m) + b). Its bias b is one threshold shared by every class; here the cosine
    head's per-class biases hold it (each starts at the paper's balanced value, `threshold_bias`), so a
    logit is s cos + b and the threshold on every logit is 0: PoLS in face recognition's form, aligned.
    The similarity adjustment g (t = 3 in the paper) is left out: it needs cos apart from b."""
    shift = scale * margin
    return _binary_terms(logits, targets, lam / scale * F.softplus(-(logits - shift)),
                         (1 - lam) / scale * F.softplus(logits + shift), candidates)


def uniface(logits: Tensor, targets: Tensor, *, scale: float, margin: float, lam: float,
            candidates: Candidates | None = None) -> Tensor:
    """UniFace's unified cross-entropy with margin, L_uce-m (Zhou et al., "UniFace: Unified
    Cross-Entropy Loss for Deep Face Recognition", ICCV 2023; their head.py): softplus(-(s (cos_y - m)
    - b)) + lam sum_(j != y) softplus(s cos_j - b), one threshold b for every class and example. As in
    `sphereface2`, the cosine head's per-class biases hold -b (each starting at the paper's -log(10 k)),
    so the logit's threshold is 0 for every class: aligned."""
    return _binary_terms(logits, targets, F.softplus(-(logits - scale * margin)), lam * F.softplus(logits),
                         candidates)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "max_margin": max_margin,
    "bce": bce,
    "self_norm": self_norm,
    "nce": nce,
    "batch_ce": batch_ce,
    "batch_max_margin": batch_max_margin,
    "z_loss": z_loss,
    "smooth_top1": functools.partial(smooth_topk, top=1),
    "smooth_top5": functools.partial(smooth_topk, top=5),
    "cosface": cosface,
    "arcface": arcface,
    "sphereface2": sphereface2,
    "uniface": uniface,
}
PAPER_LOSSES = ("ce", "max_margin", "bce", "self_norm", "nce", "batch_ce", "batch_max_margin")


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


# The related losses' `train:` section, holding all of their hyper-parameters.
SECTIONS = {"z_loss": "z_loss", "smooth_top1": "smooth_topk", "smooth_top5": "smooth_topk", "cosface": "cosface",
            "arcface": "arcface", "sphereface2": "sphereface2", "uniface": "uniface"}
NO_SAMPLED_FORM = {"smooth_top5"}


def make_loss(name: str, cfg: TrainConfig, class_counts: np.ndarray | None = None,
              generator: torch.Generator | None = None) -> Loss:
    """LOSSES[name] with its keyword-only hyper-parameters bound from the `train:` params."""
    if name in SECTIONS:
        return functools.partial(LOSSES[name], **dataclasses.asdict(getattr(cfg, SECTIONS[name])))
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
LOSS_TRAIN_KEYS = frozenset(_TRAIN_KEYS.values()) | frozenset(SECTIONS.values())  # train keys only some losses read


def train_keys_of(name: str) -> set[str]:
    """The loss-specific `train:` keys that loss `name` reads (e.g. max_margin: {"margin"})."""
    if name in SECTIONS:
        return {SECTIONS[name]}
    return {_TRAIN_KEYS[key] for key in _keyword_only(name) if key in _TRAIN_KEYS}


def _keyword_only(name: str) -> list[str]:
    """A loss's hyper-parameters (keyword-only), less `candidates`, which each step passes."""
    return [p.name for p in inspect.signature(LOSSES[name]).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "candidates"]


# --- The heads that the margin and unified-threshold losses are defined on ---

def head_of(loss: str, model: ModelConfig, cfg: TrainConfig) -> ModelConfig:
    """The model a run of `loss` trains: CosFace, ArcFace, SphereFace2 and UniFace are losses of a
    cosine head at their own scale (`train.<loss>.scale`), whatever `model.head` says; every other
    loss trains `model` as it is."""
    if loss not in HEAD_BIASES:
        return model
    return dataclasses.replace(model, head="cosine", scale=getattr(cfg, SECTIONS[loss]).scale)


def threshold_bias(scale: float, margin: float, lam: float, num_classes: int) -> float:
    """SphereFace2's starting bias: where, with every cosine 0, the positive term's pull on b equals
    the k - 1 negatives' (lam sigmoid(s m - b) = (1 - lam)(k - 1) sigmoid(s m + b)), solved for e^b."""
    ratio, boost = lam / ((1 - lam) * max(num_classes - 1, 1)), math.exp(scale * margin)
    linear = boost * (1 - ratio)  # the positive root of u^2 + linear u - ratio, without cancellation
    return math.log(2 * ratio / (linear + math.sqrt(linear ** 2 + 4 * ratio)))


# Per head loss: (the head's starting per-class bias, whether the bias trains) from its section and k.
HEAD_BIASES: dict[str, Callable[[object, int], tuple[float, bool]]] = {
    "cosface": lambda section, k: (0.0, False),  # the papers' heads have no bias
    "arcface": lambda section, k: (0.0, False),  # and arcface reads cos(theta) as logit / s
    "sphereface2": lambda section, k: (threshold_bias(section.scale, section.margin, section.lam, k), True),
    "uniface": lambda section, k: (-math.log(10 * k), True),  # UniFace's head.py starts b at log(10 k)
}


def start_head_bias(head: torch.nn.Linear, loss: str, cfg: TrainConfig, num_classes: int, fresh: bool) -> None:
    """Set a head loss's biases to their start (`fresh`: not when resuming) and freeze those that do not train."""
    if loss not in HEAD_BIASES:
        return
    start, trains = HEAD_BIASES[loss](getattr(cfg, SECTIONS[loss]), num_classes)
    if fresh:
        with torch.no_grad():
            head.bias.fill_(start)
    head.bias.requires_grad_(trains)
