"""Label-free validators: scores that rank checkpoints (or hyperparameters) without target labels.

Each takes what a run can legitimately look at (labelled *source* validation data, *unlabelled*
target data) and returns one number. `HIGHER_IS_BETTER` gives each one's direction; the trainer
selects the checkpoint with the best value of `trainer.select`.

    source_acc  accuracy on held-out source data (the classic, and weak under shift, criterion)
    entropy     mean entropy of the target predictions (lower: more confident)
    im          information maximisation: entropy of the mean target prediction (diversity) minus
                the mean entropy (confidence) (higher is better)
    snd         soft neighbourhood density (Saito et al., ICCV 2021): entropy of each target
                sample's softmax over its similarities to the other target samples, averaged
                (higher: denser neighbourhoods, better clustered predictions)
    dev         deep embedded validation (You et al., ICML 2019): the source validation loss,
                importance-weighted towards the target by a domain classifier on the features,
                with a control variate (lower is better)
"""

import numpy as np
import torch
import torch.nn.functional as F

from da_runner.nn.losses import entropy as row_entropy

HIGHER_IS_BETTER = {"source_acc": True, "entropy": False, "im": True, "snd": True, "dev": False}
VALIDATORS = tuple(HIGHER_IS_BETTER)


def mean_entropy(logits_t: torch.Tensor) -> float:
    """Mean entropy (nats) of the target predictions. (N, C) -> float."""
    return row_entropy(F.softmax(logits_t, dim=1)).mean().item()


def information_maximization(logits_t: torch.Tensor) -> float:
    """H(mean prediction) - mean H(prediction): high when predictions are confident and spread over
    the classes. (N, C) -> float in [-log C, log C]."""
    p = F.softmax(logits_t, dim=1)
    return (row_entropy(p.mean(0, keepdim=True))[0] - row_entropy(p).mean()).item()


def soft_neighborhood_density(logits_t: torch.Tensor, temperature: float = 0.05) -> float:
    """SND on the target predictions (Saito et al., ICCV 2021): L2-normalised softmax outputs,
    cosine similarities to every other sample, softmax(similarity / T) per row (self excluded), and
    the mean entropy of those rows. (N, C) -> float."""
    p = F.normalize(F.softmax(logits_t, dim=1), dim=1)
    similarity = p @ p.T / temperature
    n = len(p)
    others = similarity[~torch.eye(n, dtype=torch.bool, device=p.device)].view(n, n - 1)
    return row_entropy(F.softmax(others, dim=1)).mean().item()


def domain_density_ratio(f_s_fit: torch.Tensor, f_t_fit: torch.Tensor, f_query: torch.Tensor) -> np.ndarray:
    """p_target(x) / p_source(x) at f_query, from a logistic-regression domain classifier trained on
    source and target features (standardised): (n_s / n_t) * P(target | x) / P(source | x)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([f_s_fit, f_t_fit]).cpu().double().numpy()
    is_target = np.r_[np.zeros(len(f_s_fit)), np.ones(len(f_t_fit))]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(x, is_target)
    p_target = classifier.predict_proba(f_query.cpu().double().numpy())[:, 1].clip(1e-6, 1 - 1e-6)
    return (len(f_s_fit) / len(f_t_fit)) * p_target / (1 - p_target)


def deep_embedded_validation(losses_val: torch.Tensor, weights: np.ndarray) -> float:
    """DEV risk (You et al., ICML 2019) from per-sample source validation losses and their density
    ratios w: mean(w * l) + eta * mean(w) - eta with the control variate eta = -Cov(w l, w) / Var(w)."""
    weighted = weights * losses_val.cpu().double().numpy()
    variance = np.var(weights, ddof=1)
    eta = -np.cov(weighted, weights)[0, 1] / variance if variance > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


def compute(names, *, source_acc: float, logits_t: torch.Tensor, f_s_fit: torch.Tensor, f_t: torch.Tensor,
            f_s_val: torch.Tensor, logits_s_val: torch.Tensor, y_s_val: torch.Tensor) -> dict[str, float]:
    """The validators `names` for one evaluation.

    logits_t, f_t: predictions and features of an unlabelled target sample; f_s_fit: features of a
    source training sample (DEV's domain classifier learns source vs target from f_s_fit and f_t);
    f_s_val, logits_s_val, y_s_val: the held-out source validation set.
    """
    values = {}
    for name in names:
        if name == "source_acc":
            values[name] = source_acc
        elif name == "entropy":
            values[name] = mean_entropy(logits_t)
        elif name == "im":
            values[name] = information_maximization(logits_t)
        elif name == "snd":
            values[name] = soft_neighborhood_density(logits_t)
        elif name == "dev":
            losses = F.cross_entropy(logits_s_val, y_s_val, reduction="none")
            values[name] = deep_embedded_validation(losses, domain_density_ratio(f_s_fit, f_t, f_s_val))
        else:
            raise ValueError(f"unknown validator {name!r}")
    return values


def score(name: str, value: float) -> float:
    """The value oriented so that higher is better (for choosing the best checkpoint)."""
    return value if HIGHER_IS_BETTER[name] else -value
