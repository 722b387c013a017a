"""Loss terms shared by the methods. Shapes: N samples, d feature dimensions, C classes."""

import functools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255  # a segmentation label that counts nowhere, in the loss and the metrics (Cityscapes' void)


def in_float32(loss_fn):
    """Run `loss_fn` outside autocast on float32 copies of its tensor arguments (also inside lists).

    Under `trainer.precision=fp16 | bf16` the methods' forward passes run in low precision; batch
    statistics (covariances, kernel matrices, singular values, norms) must not: their sums overflow
    float16's range (65,504) and, scaled by the fp16 grad scaler, so would their gradients, skipping
    every step; bfloat16 keeps the range but only 3 significant digits."""

    def to_float32(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.float()
        if isinstance(value, (list, tuple)):
            return type(value)(to_float32(v) for v in value)
        return value

    def device_type(value) -> str | None:
        if torch.is_tensor(value):
            return value.device.type
        if isinstance(value, (list, tuple)):
            return next(filter(None, map(device_type, value)), None)
        return None

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(device_type(args) or "cpu", enabled=False):
            return loss_fn(*to_float32(args), **{k: to_float32(v) for k, v in kwargs.items()})

    return wrapper


def domain_labels(n_s: int, n_t: int, device=None) -> torch.Tensor:
    """The domain targets of a batch of n_s source rows followed by n_t target rows: (n_s + n_t,) float,
    1 for source and 0 for target (what `domain_loss_and_acc` takes as `is_source`)."""
    is_source = torch.zeros(n_s + n_t, device=device)
    is_source[:n_s] = 1.0
    return is_source


def domain_loss_and_acc(logits: torch.Tensor, is_source: torch.Tensor,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain discriminator loss and accuracy.

    logits: (N, 1) for a single-logit head (binary cross-entropy) or (N, 2) for a two-way softmax.
    is_source: (N,) float, 1 for source rows and 0 for target rows.
    weights: optional (N,) per-sample weights (mean 1); the loss is the weighted mean.
    """
    if logits.shape[1] == 1:
        logits = logits.squeeze(1)
        per_sample = F.binary_cross_entropy_with_logits(logits, is_source, reduction="none")
        correct = (logits > 0).float() == is_source
    else:
        target = is_source.long()
        per_sample = F.cross_entropy(logits, target, reduction="none")
        correct = logits.argmax(1) == target
    # The normaliser is detached: where the weights carry a gradient (CDAN+E's entropy_gradient), it
    # reaches them only through the weighted sum.
    loss = per_sample.mean() if weights is None else (weights * per_sample).sum() / weights.detach().sum()
    return loss, correct.float().mean()


def multilinear_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """CDAN's multilinear map (Long et al., NeurIPS 2018): the flattened outer product g ⊗ f.

    f: (N, d) features, g: (N, C) class probabilities -> (N, C * d) with [n, c * d + j] = g[n, c] * f[n, j].
    """
    return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """CDAN's randomized multilinear map: (R_f f) ⊙ (R_g g) / sqrt(output_dim).

    R_f (d, output_dim) and R_g (C, output_dim) are drawn once from a standard normal and kept fixed
    (stored as buffers, so they are checkpointed). Unbiased for the inner products of the full map.
    f: (N, d), g: (N, C) -> (N, output_dim).
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("R_f", torch.randn(features_dim, output_dim))
        self.register_buffer("R_g", torch.randn(num_classes, output_dim))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.R_f) * (g @ self.R_g) / math.sqrt(self.output_dim)


def entropy(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities p: (N, C) -> (N,)."""
    return -(p * (p + eps).log()).sum(1)


def entropy_weights(p: torch.Tensor) -> torch.Tensor:
    """CDAN+E's sample weights w = 1 + exp(-H(p)), normalised to mean 1 over the batch: (N, C) -> (N,).

    Confident predictions (low entropy) weigh more in the domain loss. No gradient flows through them.
    """
    w = 1.0 + torch.exp(-entropy(p.detach()))
    return w * (len(w) / w.sum())


@in_float32
def bsp_penalty(f_s: torch.Tensor, f_t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Batch spectral penalization (Chen et al., ICML 2019): sum of the squared k largest singular
    values of the source and of the target feature matrices. f_s: (N_s, d), f_t: (N_t, d) -> scalar."""
    return (torch.linalg.svdvals(f_s)[:k].pow(2).sum() + torch.linalg.svdvals(f_t)[:k].pow(2).sum())


# ---------------------------------------------------------------------------------------------------
# Discrepancy and target-prediction terms of the non-adversarial methods (DAN, JAN, Deep CORAL, MCD,
# MDD, MCC, MinEnt, BNM, AFN).


# Far below the mean squared distance of any non-collapsed features, far above float32 underflow.
MIN_MEAN_SQ_DIST = 1e-6


def kernel_bandwidths(setting, sq_dist: torch.Tensor) -> torch.Tensor:
    """Squared bandwidths sigma_u^2 of a Gaussian kernel family -> (U,).

    setting: a float, the sigma of a single kernel; or a list of multipliers, sigma_u^2 =
    multiplier_u * mean(sq_dist) (DAN's family around the mean squared distance; the mean is
    detached so the network cannot shrink the MMD by inflating the bandwidth). The mean is floored
    at MIN_MEAN_SQ_DIST: when the features of a batch collapse to one point (a randomly initialised
    network can get there by minimising the MMD before it learns to classify), a zero bandwidth
    would make every kernel 0/0.
    """
    if isinstance(setting, (int, float)):
        return torch.tensor([float(setting) ** 2], dtype=sq_dist.dtype, device=sq_dist.device)
    mean_sq_dist = sq_dist.detach().mean().clamp_min(MIN_MEAN_SQ_DIST)
    return torch.as_tensor(list(setting), dtype=sq_dist.dtype, device=sq_dist.device) * mean_sq_dist


def gaussian_kernels(sq_dist: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Sum over u of exp(-d^2 / (2 sigma_u^2)): squared distances of any shape, (U,) -> same shape."""
    return torch.exp(-sq_dist.unsqueeze(-1) / (2 * bandwidths)).sum(-1)


@in_float32
def joint_mmd(layers_s, layers_t, kernel_settings, linear: bool = False) -> torch.Tensor:
    """Squared (joint) MMD between source and target (JAN, Long et al., ICML 2017; one layer: DAN).

    layers_s, layers_t: lists of (N_s, d_l) and (N_t, d_l) activations of the same layers;
    kernel_settings: per layer, see `kernel_bandwidths`. The joint kernel is the product over layers
    of each layer's kernel. -> scalar.

    Quadratic estimator (biased, Gretton et al., JMLR 2012): mean k_ss + mean k_tt - 2 mean k_st,
    bandwidths from the mean squared distance over all pairs of distinct samples.
    Linear-time estimator (linear=True, used by DAN): over quadruples (s, s', t, t') of consecutive
    samples, the mean of k(s, s') + k(t, t') - k(s, t') - k(s', t); computes only those kernel values
    (bandwidths from their distances) and uses the first min(N_s, N_t) // 2 * 2 samples of each domain.
    """
    n_s = len(layers_s[0])
    if not linear:
        k = 1.0
        for z_s, z_t, setting in zip(layers_s, layers_t, kernel_settings):
            z = torch.cat([z_s, z_t])
            sq_dist = torch.cdist(z, z).pow(2)
            distinct = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
            k = k * gaussian_kernels(sq_dist, kernel_bandwidths(setting, sq_dist[distinct]))
        return k[:n_s, :n_s].mean() + k[n_s:, n_s:].mean() - 2 * k[:n_s, n_s:].mean()
    m = min(n_s, len(layers_t[0])) // 2 * 2
    if m == 0:
        raise ValueError("the linear-time MMD needs at least 2 samples per domain")
    k_pairs = 1.0
    for z_s, z_t, setting in zip(layers_s, layers_t, kernel_settings):
        s1, s2, t1, t2 = z_s[0:m:2], z_s[1:m:2], z_t[0:m:2], z_t[1:m:2]
        # rows: (s, s'), (t, t'), (s, t'), (s', t)
        sq_dist = torch.stack([(a - b).pow(2).sum(1) for a, b in ((s1, s2), (t1, t2), (s1, t2), (s2, t1))])
        k_pairs = k_pairs * gaussian_kernels(sq_dist, kernel_bandwidths(setting, sq_dist))
    return (k_pairs[0] + k_pairs[1] - k_pairs[2] - k_pairs[3]).mean()


def mk_mmd(f_s: torch.Tensor, f_t: torch.Tensor, multipliers=(0.125, 0.25, 0.5, 1.0, 2.0),
           linear: bool = False) -> torch.Tensor:
    """DAN's multi-kernel MMD^2 (Long et al., ICML 2015) between features f_s (N_s, d) and f_t
    (N_t, d), with equal kernel weights. -> scalar."""
    return joint_mmd([f_s], [f_t], [list(multipliers)], linear)


@in_float32
def coral_loss(f_s: torch.Tensor, f_t: torch.Tensor, mean_weight: float = 0.0) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops): ||C_s - C_t||_F^2 / (4 d^2), C the unbiased
    feature covariance of each domain, plus `mean_weight` times the mean squared difference of the
    feature means (Transfer-Learning-Library's CORAL loss is 4 times this with mean_weight 1/4).
    f_s: (N_s, d), f_t: (N_t, d) -> scalar."""
    d = f_s.shape[1]
    loss = (torch.cov(f_s.T) - torch.cov(f_t.T)).pow(2).sum() / (4 * d * d)
    if mean_weight:
        loss = loss + mean_weight * (f_s.mean(0) - f_t.mean(0)).pow(2).mean()
    return loss


def classifier_discrepancy(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """MCD's discrepancy (Saito et al., CVPR 2018): mean absolute difference of the two classifiers'
    class probabilities. (N, C), (N, C) -> scalar."""
    return (F.softmax(logits_1, dim=1) - F.softmax(logits_2, dim=1)).abs().mean()


def class_balance_loss(logits: torch.Tensor, eps: float = 1e-6, prior: torch.Tensor | None = None) -> torch.Tensor:
    """-sum_k prior_k log(mean_i p_ik): the cross-entropy between a class distribution `prior` (C,)
    (default uniform: -mean_k log(mean_i p_ik)) and the batch's mean prediction, smallest when the
    predictions spread over the classes as `prior` does. Transfer-Learning-Library's MCD adds it, uniform,
    on target predictions. (N, C), or per pixel (N, C, H, W) with the mean over every pixel -> scalar."""
    p = F.softmax(logits, dim=1)
    mean_p = p.movedim(1, -1).reshape(-1, p.shape[1]).mean(0)  # (C,): over samples (and pixels)
    if prior is None:
        return -torch.log(mean_p + eps).mean()
    return -(prior * torch.log(mean_p + eps)).sum()


def label_frequencies(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The share of each class among `labels` (any shape; `ignore_index` left out): (num_classes,) float."""
    labels = labels[labels != ignore_index].long()
    return torch.bincount(labels, minlength=num_classes).float() / max(1, labels.numel())


def mdd_adversary_loss(logits_adv_s: torch.Tensor, logits_adv_t: torch.Tensor, pred_s: torch.Tensor,
                       pred_t: torch.Tensor, margin: float) -> torch.Tensor:
    """The loss MDD's auxiliary classifier f' minimises (Zhang et al., ICML 2019), i.e. minus the
    margin disparity discrepancy D_gamma:

        margin * CE(f'(x_s), h_f(x_s))  -  mean log(1 - softmax(f'(x_t))[h_f(x_t)])

    f' learns to agree with the main classifier's labels h_f on source and to disagree on target; the
    feature extractor maximises this through a gradient reversal layer. logits_adv_*: (N, C) of f';
    pred_*: (N,) labels predicted by the main classifier. -> scalar.
    """
    agree_s = F.cross_entropy(logits_adv_s, pred_s)
    p_t = F.softmax(logits_adv_t, dim=1).gather(1, pred_t.unsqueeze(1)).squeeze(1)
    # clamp: log(1 - p) is -inf when f' agrees with certainty; the gradient stays finite.
    disagree_t = -torch.log((1 - p_t).clamp_min(1e-6)).mean()
    return margin * agree_s + disagree_t


@in_float32
def mcc_loss(logits_t: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum class confusion (Jin et al., ECCV 2020) on target logits (N, C) -> scalar.

    Y = softmax(logits / T); sample weights W = N * (1 + exp(-H(Y_i))) / sum_j (1 + exp(-H(Y_j)))
    (no gradient through them); class correlation C = Y^T diag(W) Y; each column normalised to sum
    1; the loss is the total off-diagonal mass divided by the number of classes.
    """
    y = F.softmax(logits_t / temperature, dim=1)
    w = entropy_weights(y)  # = N * (1 + exp(-H)) / sum(1 + exp(-H))
    confusion = y.T @ (w.unsqueeze(1) * y)
    confusion = confusion / confusion.sum(0, keepdim=True)
    num_classes = confusion.shape[0]
    return (confusion.sum() - confusion.trace()) / num_classes


@in_float32
def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float,
                  logits_source: torch.Tensor | None = None, align: bool = False,
                  relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled loss (Sohn et al., NeurIPS 2020): the class predicted on the weak view
    of each sample is the pseudo-label of its strong view, kept where the weak prediction's
    probability reaches `threshold`:

        mean_i 1[max_k p_ik >= threshold] * CE(logits_strong_i, argmax_k p_ik),  p = softmax(logits_weak)

    (a mean over all N samples, masked ones counting 0, as in the paper). No gradient flows
    through the weak view. AdaMatch's two changes for domain shift (Berthelot et al., ICLR 2022),
    from the source batch's predictions q = softmax(logits_source) (weak views, no gradient):
    `align`, distribution alignment, p <- normalise(p * mean_i q_i / mean_i p_i), so that the
    target's pseudo-labels follow the source's class proportions; `relative`, the threshold times
    the source's mean confidence mean_i max_k q_ik (AdaMatch: 0.9 of it). Returns the loss and the
    fraction of samples kept. (N, C), (N, C) [, (M, C)] -> scalars."""
    with torch.no_grad():
        p = F.softmax(logits_weak.detach(), dim=1)
        if align or relative:
            if logits_source is None:
                raise ValueError("distribution alignment and the relative threshold need the source logits")
            q = F.softmax(logits_source.detach(), dim=1)
        if align:
            p = p * q.mean(0) / p.mean(0).clamp_min(1e-6)
            p = p / p.sum(1, keepdim=True)
        if relative:
            threshold = threshold * q.max(dim=1).values.mean()
        confidence, pseudo_labels = p.max(dim=1)
        mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(logits_strong, pseudo_labels, reduction="none") * mask).mean()
    return loss, mask.mean()


@in_float32
def consistency_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-ensembling's confidence-thresholded consistency (French et al., ICLR 2018; mean_teacher):
    mean_i m_i * mean_k (p_ik - q_ik)^2 with p = softmax(logits_student), q = softmax(logits_teacher)
    and m_i = 1[max_k q_ik >= threshold].
    The teacher's side carries no gradient. (N, C), (N, C) -> the loss (scalar) and the mask (N,)
    as floats."""
    p = F.softmax(logits_student, dim=1)
    q = F.softmax(logits_teacher.detach(), dim=1)
    # >=, as FixMatch's threshold here; the reference compares with > (the same but for exact ties).
    mask = (q.max(dim=1).values >= threshold).float()
    return ((p - q).pow(2).mean(dim=1) * mask).mean(), mask


@in_float32
def class_balance_bce(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Self-ensembling's class-balance loss (mean_teacher): sum_k BCE(a_k, 1 / C), with
    a_k = mean_i softmax(logits)_ik, the binary cross-entropy between each class's mean predicted
    probability and the uniform share, smallest when the predictions spread evenly over the C classes. (N, C) -> scalar."""
    a = F.softmax(logits, dim=1).mean(dim=0)
    u = 1.0 / logits.shape[1]
    return -(u * torch.log(a + eps) + (1 - u) * torch.log(1 - a + eps)).sum()


@in_float32
def self_information(logits: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information maps (Vu et al., CVPR 2019): I = -p log2 p / log2 C per class
    and pixel, p = softmax over the C classes; summed over the classes it is the pixel's entropy
    normalised to [0, 1] (the reference code's prob_2_entropy). Logits (N, C, H, W) -> (N, C, H, W),
    what the AdvEnt discriminator sees."""
    p = F.softmax(logits, dim=1)
    return -p * torch.log2(p + 1e-30) / math.log2(logits.shape[1])


def map_discriminator_loss(d_out: torch.Tensor, is_source: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of a fully-convolutional discriminator's logit maps (N, 1, h, w) against one
    domain label for every position (source 1, target 0), and the share of positions it gets right."""
    target = torch.full_like(d_out, 1.0 if is_source else 0.0)
    loss = F.binary_cross_entropy_with_logits(d_out.float(), target.float())
    return loss, ((d_out > 0) == bool(is_source)).float().mean()


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004): mean prediction entropy (nats). (N, C), or per
    pixel (N, C, H, W) (ADVENT's MinEnt, whose entropy is in bits over log2 C: the same up to the factor ln C),
    -> scalar."""
    return entropy(F.softmax(logits, dim=1)).mean()


@in_float32
def information_maximization_terms(logits: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """SHOT's information maximisation (Liang et al., ICML 2020) on target logits (N, C):

        L_ent = mean_i H(p_i)          (confident predictions)
        L_div = H(mean_i p_i)          (diverse predictions; the loss is L_ent - L_div)

    with H(q) = -sum_k q_k log(q_k + eps), eps 1e-5 as in the reference code (digit/loss.py, Entropy;
    digit/uda_digit.py, train_target). Returns (L_ent, L_div), two scalars. -L_div equals
    KL(mean p || uniform) - log C; `class_balance_loss` is the other KL, KL(uniform || mean p) + const:
    both push the mean prediction towards uniform, with different gradients."""
    p = F.softmax(logits, dim=1)
    return entropy(p, eps).mean(), entropy(p.mean(0, keepdim=True), eps)[0]


@in_float32
def bnm_loss(logits: torch.Tensor) -> torch.Tensor:
    """Batch nuclear-norm maximisation (Cui et al., CVPR 2020): minus the mean singular value of the
    (N, C) prediction matrix, i.e. its nuclear norm divided by min(N, C), as the official code
    computes it (the paper's text divides by N: 6.4 times weaker at N = 64, C = 10). (N, C) -> scalar."""
    return -torch.linalg.svdvals(F.softmax(logits, dim=1)).mean()


@in_float32
def afn_loss(f: torch.Tensor, delta_r: float = 1.0, radius: float | None = None) -> torch.Tensor:
    """Adaptive feature norm (Xu et al., ICCV 2019) on features (N, d) -> scalar.

    Stepwise AFN (radius None): mean (||f_i||.detach() + delta_r - ||f_i||)^2, which pushes every
    norm up by delta_r per step (its value is always delta_r^2; the gradient does the work).
    Hard AFN (radius R): mean (R - ||f_i||)^2.
    """
    norms = f.norm(dim=1)
    goal = norms.detach() + delta_r if radius is None else torch.full_like(norms, float(radius))
    return (goal - norms).pow(2).mean()


@in_float32
def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_i CE(softmax(target_logits_i), logits_i): cross-entropy to soft targets, no gradient through
    them. Equal to KL(p_target || p) plus the targets' entropy, a constant for `logits`. (N, C), (N, C) -> scalar."""
    targets = F.softmax(target_logits.detach(), dim=1)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


@contextmanager
def batch_norm_statistics_frozen(module: nn.Module):
    """Inside the block the BatchNorm layers of `module` still normalise with batch statistics (in
    training mode) but leave their running statistics as they are (momentum 0), so that extra forward
    passes on perturbed inputs (VAT) do not count as data."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield module
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _unit_l2(d: torch.Tensor) -> torch.Tensor:
    """Each sample of d scaled to L2 norm 1 over all its dimensions."""
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (d.dim() - 1)))


def virtual_adversarial_loss(model, x: torch.Tensor, logits: torch.Tensor, radius: float,
                             xi: float = 1e-6) -> torch.Tensor:
    """Virtual adversarial training (Miyato et al., TPAMI 2018) as VADA and DIRT-T use it (Shu et al.,
    ICLR 2018; their code's `vat_loss`, one power iteration): the direction r in which the prediction
    on x changes fastest is the gradient, at a random perturbation of norm `xi`, of
    CE(softmax(logits), model(x + r)); the loss is CE(softmax(logits), model(x + radius * r / |r|)),
    the prediction's smoothness within an L2 ball of `radius` around each input. `logits` = model(x)
    (no gradient flows through them). The extra passes leave BatchNorm's running statistics alone.
    """
    with batch_norm_statistics_frozen(model):
        d = (xi * _unit_l2(torch.randn_like(x))).requires_grad_(True)
        direction = torch.autograd.grad(soft_cross_entropy(logits, model(x + d)), d)[0]
        x_adversarial = (x + radius * _unit_l2(direction)).detach()
        return soft_cross_entropy(logits, model(x_adversarial))
