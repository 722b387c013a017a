"""What adaptation did, in pictures and numbers: proxy A-distance, a t-SNE plot of the features,
the features for TensorBoard's projector, and for 2-D data the classifier's decision boundary.

These run at the end of training (`trainer.analysis=true`), on fixed-size samples so that their cost
does not grow with the dataset; the decision boundary of 2-D data is also drawn at every evaluation.
Target labels are used here only to *colour* plots and to report the adjusted Rand index, never to
choose anything.
"""

from pathlib import Path

import numpy as np
import torch

from da_runner.data.domain import DomainPair
from da_runner.evaluation import outputs


def proxy_a_distance(f_s: torch.Tensor, f_t: torch.Tensor, seed: int = 0) -> float:
    """Proxy A-distance (Ben-David et al., 2007; Ganin et al., JMLR 2016): 2 (1 - 2 err), err the
    test error of a linear domain classifier (standardised logistic regression) trained on half of
    the source and target features and tested on the other half. Equal-size samples of both
    domains; about 0 for indistinguishable domains, 2 for perfectly separable ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(f_s), len(f_t))
    generator = np.random.default_rng(seed)
    x_s = f_s.cpu().double().numpy()[generator.permutation(len(f_s))[:n]]
    x_t = f_t.cpu().double().numpy()[generator.permutation(len(f_t))[:n]]
    x, domain = np.concatenate([x_s, x_t]), np.r_[np.zeros(n), np.ones(n)]
    x_fit, x_test, d_fit, d_test = train_test_split(x, domain, test_size=0.5, stratify=domain, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_fit, d_fit)
    error = 1.0 - classifier.score(x_test, d_test)
    return 2.0 * (1.0 - 2.0 * error)


def feature_figure(f_s, y_s, f_t, y_t, seed: int = 0):
    """t-SNE (scikit-learn) of source and target features, side by side coloured by domain and by
    class. Returns a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    features = torch.cat([f_s, f_t]).cpu().float().numpy()
    perplexity = min(30.0, (len(features) - 1) / 3)
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)
    n_s = len(f_s)
    fig, (by_domain, by_class) = plt.subplots(1, 2, figsize=(11, 5))
    by_domain.scatter(*xy[:n_s].T, s=4, c="tab:blue", label="source")
    by_domain.scatter(*xy[n_s:].T, s=4, c="tab:red", label="target")
    by_domain.legend(markerscale=3)
    by_domain.set_title("t-SNE of the features, by domain")
    labels = torch.cat([y_s, y_t]).cpu().numpy()
    markers = np.r_[np.zeros(n_s, dtype=bool), np.ones(len(f_t), dtype=bool)]
    by_class.scatter(*xy[~markers].T, s=4, c=labels[~markers], cmap="tab10", vmin=0, vmax=9, marker="o")
    by_class.scatter(*xy[markers].T, s=8, c=labels[markers], cmap="tab10", vmin=0, vmax=9, marker="x")
    by_class.set_title("by class (o source, x target)")
    for ax in (by_domain, by_class):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


@torch.no_grad()
def decision_boundary_figure(method, pair: DomainPair, title: str, resolution: int = 200):
    """The classifier's predicted class over the plane, with source and target test points (2-D
    inputs only). Returns a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = torch.cat([pair.source_train.x, pair.target_test.x]).cpu()
    low, high = points.min(0).values - 0.5, points.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(low[0], high[0], resolution), torch.linspace(low[1], high[1], resolution),
                            indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1).to(pair.source_train.x.device)
    was_training = method.training
    method.eval()
    predicted = method.predict(grid).argmax(1).view(resolution, resolution).cpu()
    method.train(was_training)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.contourf(gx.numpy(), gy.numpy(), predicted.numpy(), alpha=0.25, cmap="coolwarm",
                levels=np.arange(pair.num_classes + 1) - 0.5)
    source, target = pair.source_train, pair.target_test
    ax.scatter(*source.x.cpu().T, c=source.y.cpu(), cmap="coolwarm", s=8, marker="o", label="source (train)")
    ax.scatter(*target.x.cpu().T, c=target.y.cpu(), cmap="coolwarm", s=14, marker="x", label="target (test)")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_decision_boundary(method, pair: DomainPair, run_dir: Path, logger, step: int, max_steps: int,
                          name: str) -> None:
    """The decision boundary at this evaluation to TensorBoard; as PNG at the first evaluation and
    at the end (run_dir/analysis/decision_boundary_{first_eval,final}.png)."""
    fig = decision_boundary_figure(method, pair, f"{name}, step {step} of {max_steps}")
    out_dir = Path(run_dir) / "analysis"
    out_dir.mkdir(exist_ok=True)
    first = out_dir / "decision_boundary_first_eval.png"
    if not first.exists():
        fig.savefig(first, dpi=100)
    if step == max_steps:
        fig.savefig(out_dir / "decision_boundary_final.png", dpi=100)
    logger.figure("analysis/decision_boundary", fig, step)


def run_analysis(method, pair: DomainPair, run_dir: Path, logger, step: int, samples: int, batch_size: int,
                 seed: int = 0) -> dict:
    """End-of-run analysis; returns the numbers for metrics.json and writes the figures (PNG under
    run_dir/analysis/ and TensorBoard), and the features with domain / label metadata for the
    projector."""
    from sklearn.metrics import adjusted_rand_score

    out_dir = Path(run_dir) / "analysis"
    out_dir.mkdir(exist_ok=True)
    source = outputs(method, pair.source_train.sample(samples, seed), batch_size)
    target = outputs(method, pair.target_test.sample(samples, seed + 1), batch_size)
    target_all = outputs(method, pair.target_test, batch_size)
    results = {
        "proxy_a_distance": proxy_a_distance(source.features, target.features, seed),
        # agreement of the target predictions' clustering with the true classes (1 = identical partition)
        "target_ari": adjusted_rand_score(target_all.labels.cpu().numpy(), target_all.logits.argmax(1).cpu().numpy()),
    }
    logger.scalars("analysis", results, step)

    fig = feature_figure(source.features, source.labels, target.features, target.labels, seed)
    fig.savefig(out_dir / "features_tsne.png", dpi=100)
    logger.figure("analysis/features_tsne", fig, step)

    features = torch.cat([source.features, target.features]).cpu()
    metadata = [("source", int(y)) for y in source.labels.cpu()] + [("target", int(y)) for y in target.labels.cpu()]
    logger.writer.add_embedding(features, metadata=metadata, metadata_header=["domain", "label"], tag="features",
                                global_step=step)
    return results
