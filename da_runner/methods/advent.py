"""AdvEnt: adversarial entropy minimisation for semantic segmentation (Vu et al., ADVENT, CVPR 2019).

A fully-convolutional discriminator D tells source from target by the weighted self-information maps
I = -p log2 p of the segmentation network's per-pixel predictions (nn/losses.self_information), and
the network learns to make target maps look like source ones (low entropy, source-like structure):

    segmentation network:  L = CE(C(G(x_s)), y_s) + adversarial_weight * BCE(D(I(x_t)), source)
                               (+ entropy_weight * mean pixel entropy of the target: AdvEnt + MinEnt)
    discriminator:         L_D = (BCE(D(I(x_s)), source) + BCE(D(I(x_t)), target)) / 2

with source label 1 and target 0, D's parameters fixed in the first loss and the maps detached in the
second. D (ndf 64): five 4x4 convolutions of stride 2, widths ndf, 2 ndf, 4 ndf, 8 ndf, 1, LeakyReLU
0.2 between them. Defaults (configs/method/advent.yaml) are the paper's: adversarial weight 1e-3, D
trained with Adam at 1e-4, betas (0.9, 0.99), following the network's lr schedule. The paper's
GTA5 -> Cityscapes mIoU (DeepLab-v2 ResNet-101): AdvEnt 43.8, AdvEnt + MinEnt 45.5.
"""

from omegaconf import OmegaConf
from torch import nn

from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.losses import map_discriminator_loss, self_information


def map_discriminator(in_channels: int, ndf: int) -> nn.Sequential:
    """ADVENT's fully-convolutional discriminator: (N, C, H, W) maps -> (N, 1, H / 32, W / 32) logits."""
    widths = [in_channels, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(width_in, width_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
    layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


@register("advent")
class AdvEnt(Method):
    tasks = ("segmentation",)

    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        options = cfg.method
        self.discriminator = map_discriminator(num_classes, int(options.discriminator_ndf))
        # D's lr follows the trainer's schedule in proportion: lr_mult = discriminator_lr / optim.lr.
        d_groups = [{"params": list(self.discriminator.parameters()),
                     "lr_mult": float(options.discriminator_lr) / float(cfg.optim.lr), "group": "heads"}]
        d_optim = OmegaConf.create({"name": "adam", "lr": float(options.discriminator_lr), "weight_decay": 0.0,
                                    "betas": list(options.discriminator_betas)})
        self.optimizers = {"main": build_optimizer(self.param_groups(self.features, self.classifier), cfg.optim),
                           "discriminator": build_optimizer(d_groups, d_optim)}

    def step(self, batch: Batch, ctx: StepContext):
        options = self.cfg.method
        if self.separate_forward:
            # One pass per domain, as the reference code: the domains' images may differ in size (GTA5 at
            # 1280x720, Cityscapes at 1024x512), and each BatchNorm layer sees one domain at a time.
            logits_s = self.classifier(self.features(batch.x_s))
            logits_t = self.classifier(self.features(batch.x_t))
            loss_seg = self.classification_loss(logits_s, batch.y_s)
        else:
            # One pass over both domains: BatchNorm layers that train normalise with the statistics of the
            # two domains together, the statistics their running averages, used in evaluation, converge to.
            n_s, _, logits, loss_seg = self.forward_both(batch)
            logits_s, logits_t = logits[:n_s], logits[n_s:]
        info_s, info_t = self_information(logits_s), self_information(logits_t)

        # The network: make the target's maps pass for source ones, D held fixed.
        self.discriminator.requires_grad_(False)
        loss_adv, _ = map_discriminator_loss(self.discriminator(info_t), is_source=True)
        self.discriminator.requires_grad_(True)
        loss = loss_seg + float(options.adversarial_weight) * self.ramp(ctx) * loss_adv
        loss_target_predictions, target_terms = self.target_prediction_terms(logits_t, ctx, batch, logits_s)
        loss = loss + loss_target_predictions
        self.optimizer_step(self.optimizers["main"], loss)

        # The discriminator, on the same maps without their graph.
        loss_d_s, acc_s = map_discriminator_loss(self.discriminator(info_s.detach()), is_source=True)
        loss_d_t, acc_t = map_discriminator_loss(self.discriminator(info_t.detach()), is_source=False)
        loss_disc = (loss_d_s + loss_d_t) / 2
        self.optimizer_step(self.optimizers["discriminator"], loss_disc)
        return {"loss": loss.detach(), "loss_cls": loss_seg.detach(), "loss_adv": loss_adv.detach(),
                "loss_disc": loss_disc.detach(), "domain_acc": ((acc_s + acc_t) / 2).detach(), **target_terms}

