"""VADA: virtual adversarial domain adaptation (Shu, Bui, Narui & Ermon, ICLR 2018, "A DIRT-T Approach
to Unsupervised Domain Adaptation").

Domain-adversarial training plus the cluster assumption on the target: decision boundaries should not
cross dense regions of target data, so target predictions are made confident (conditional entropy)
and locally smooth (virtual adversarial training), and the source predictions smooth as well:

    min_{G,C}  CE(C(G(x_s)), y_s) + lambda_d * L_dom + lambda_s * VAT(x_s) + lambda_t * (H(C(G(x_t))) + VAT(x_t))
    min_D      0.5 * [BCE(D(G(x_s)), 1) + BCE(D(G(x_t)), 0)]

L_dom is the discriminator's loss with the domain labels swapped (the non-saturating GAN loss of the
authors' code, no gradient reversal); D has its own optimizer and is stepped first, on the same batch.
VAT is `virtual_adversarial_loss` (radius `method.vat_radius`). Defaults (configs/method/vada.yaml) are
those of the authors' code (`run_dirtt.py`): lambda_d 1e-2, lambda_s 1, lambda_t 1e-2, radius 3.5,
Adam lr 1e-3 with beta1 0.5 for both optimizers, and the small network on instance-normalised inputs
(configs/backbone/vada_small.yaml); they evaluate an exponential moving average of the weights (decay
0.998: `trainer.ema=0.998`, set by experiment=vada_mnist_mnistm). Each domain has its own forward pass
(`separate_forward`, BatchNorm statistics per domain), as in their code.

A finished VADA run is the starting point of DIRT-T (method=dirt_t).
"""

import torch
from torch import nn

from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.heads import domain_head
from da_runner.nn.losses import domain_labels, domain_loss_and_acc, entropy_loss, virtual_adversarial_loss


class Classifier(nn.Module):
    """features + classifier under those names (so a method's state dict loads into it), as one module."""

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ClusterAssumptionMixin:
    """The target terms VADA and DIRT-T share: conditional entropy plus VAT, and VAT on any batch."""

    def student(self) -> Classifier:
        """The trained network as one module (not a submodule: its weights are registered once)."""
        return Classifier(self.features, self.classifier)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def vat(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return virtual_adversarial_loss(self.student(), x, logits, float(self.cfg.method.vat_radius))

    def cluster_terms(self, x_t: torch.Tensor, logits_t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_entropy": entropy_loss(logits_t), "loss_vat_target": self.vat(x_t, logits_t)}


@register("vada")
class VADA(ClusterAssumptionMixin, Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.discriminator = domain_head(cfg.backbone, self.features.out_features, 1)
        self.optimizers = {
            "main": build_optimizer(self.param_groups(self.features, self.classifier), cfg.optim),
            "discriminator": build_optimizer(self.param_groups(self.discriminator), cfg.optim),
        }

    def step(self, batch: Batch, ctx: StepContext):
        options = self.cfg.method
        n_s, f, logits, loss_cls = self.forward_both(batch)
        is_source = domain_labels(n_s, len(f) - n_s, f.device)

        # The discriminator first: source features -> 1, target -> 0 (the features held fixed).
        loss_disc, domain_acc = domain_loss_and_acc(self.apply_per_domain(self.discriminator, f.detach(), n_s),
                                                    is_source)
        self.optimizer_step(self.optimizers["discriminator"], loss_disc)

        # The features are trained to make the updated discriminator swap the labels.
        loss_domain, _ = domain_loss_and_acc(self.apply_per_domain(self.discriminator, f, n_s), 1 - is_source)
        terms = {"loss_cls": loss_cls, "loss_domain": loss_domain,
                 **self.cluster_terms(batch.x_t, logits[n_s:])}
        loss = (loss_cls + float(options.domain_weight) * loss_domain
                + float(options.target_weight) * (terms["loss_entropy"] + terms["loss_vat_target"]))
        if float(options.source_vat_weight) > 0:
            terms["loss_vat_source"] = self.vat(batch.x_s, logits[:n_s])
            loss = loss + float(options.source_vat_weight) * terms["loss_vat_source"]
        self.optimizer_step(self.optimizers["main"], loss)
        return {"loss": loss.detach(), "loss_disc": loss_disc.detach(), "domain_acc": domain_acc.detach(),
                **{name: value.detach() for name, value in terms.items()}}
