"""ADDA: adversarial discriminative domain adaptation (Tzeng et al., CVPR 2017).

Two stages in one run, switched by `ctx.step`:

1. steps [0, pretrain_steps): a source encoder and a classifier learn the labelled source data
   (cross-entropy, with the `optim` group's optimizer and learning-rate schedule).
2. steps [pretrain_steps, max_steps): a target encoder starts as a copy of the source encoder; the
   source encoder and classifier are frozen. A discriminator D (default 500-500-2, ReLU) learns to
   tell source features (label 1) from target features (label 0); the target encoder learns to make
   D call its features source (the inverted-label GAN loss, no gradient reversal). D and the target
   encoder each have their own Adam optimizer (paper: lr 2e-4, beta1 0.5) at a constant learning
   rate. The `grl` schedules do not apply. Neither encoder draws dropout masks in stage 2 (the source
   encoder runs in eval mode; the target encoder's dropout layers are switched off, its BatchNorm
   layers keep training on target batches), so dropout noise cannot tell the domains apart.

Evaluation uses the target encoder + classifier once stage 2 has begun (the source encoder before).
Both stages are logged (`train/stage`) and both resume exactly: the copy is made on the first step
of stage 2, and after that lives in the checkpoint.
"""

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.backbones import build_features
from da_runner.nn.heads import mlp_head
from da_runner.nn.losses import domain_labels, domain_loss_and_acc


DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@register("adda")
class ADDA(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)  # self.features is the source encoder
        options = cfg.method
        self.pretrain_steps = int(options.pretrain_steps)
        if self.pretrain_steps < 0:
            raise UserError(f"method.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        self.target_features = build_features(cfg.backbone, input_shape)
        self.discriminator = mlp_head(self.features.out_features, options.discriminator, 2)
        # A flag in the state dict, so a resumed run knows whether the target encoder was initialised.
        self.register_buffer("stage2_started", torch.zeros((), dtype=torch.bool))
        adversarial = OmegaConf.create({"name": "adam", "lr": float(options.adversarial_lr),
                                        "betas": list(options.adversarial_betas), "weight_decay": 0.0})
        # Param groups without "lr_mult" keep their own learning rate: the trainer's schedule skips them.
        self.optimizers = {
            "source": build_optimizer(self.param_groups(self.features, self.classifier), cfg.optim),
            "discriminator": build_optimizer([{"params": self.discriminator.parameters()}], adversarial),
            "target": build_optimizer([{"params": self.target_features.parameters()}], adversarial),
        }

    def step(self, batch: Batch, ctx: StepContext):
        if ctx.step < self.pretrain_steps:
            loss_cls = F.cross_entropy(self.classifier(self.features(batch.x_s)), batch.y_s)
            self.optimizer_step(self.optimizers["source"], loss_cls)
            return {"loss": loss_cls.detach(), "loss_cls": loss_cls.detach(), "stage": torch.tensor(1.0)}

        if not self.stage2_started:
            self.target_features.load_state_dict(self.features.state_dict())
            self.stage2_started.fill_(True)
        n_s = len(batch.x_s)
        is_source = domain_labels(n_s, len(batch.x_t), batch.x_s.device)

        # Discriminator: source features (frozen encoder) -> 1, target features -> 0.
        with torch.no_grad():
            self.features.eval()  # the frozen encoder is a fixed function: no dropout, fixed BatchNorm
            f_s = self.features(batch.x_s)
            self.features.train()
        self.disable_dropout(self.target_features)
        f_t = self.target_features(batch.x_t)
        loss_domain, domain_acc = domain_loss_and_acc(self.discriminator(torch.cat([f_s, f_t.detach()])), is_source)
        self.optimizer_step(self.optimizers["discriminator"], loss_domain)

        # Target encoder: fool the discriminator with inverted labels (target -> 1).
        loss_target, _ = domain_loss_and_acc(self.discriminator(f_t), torch.ones(len(f_t), device=f_t.device))
        self.optimizer_step(self.optimizers["target"], loss_target)
        return {"loss": (loss_domain + loss_target).detach(), "loss_domain": loss_domain.detach(),
                "loss_target": loss_target.detach(), "domain_acc": domain_acc.detach(), "stage": torch.tensor(2.0)}

    @staticmethod
    def disable_dropout(encoder: nn.Module) -> None:
        """Dropout layers of `encoder` to eval mode (no draws), the rest left as it is. The frozen source
        encoder runs without dropout; if the target encoder drew dropout masks, the discriminator would
        tell the domains apart by that noise alone and win whatever the features (LeNet, whose features
        are a dropout layer's output: discriminator accuracy 1.0 from step 50 of stage 2, and the
        target encoder collapsing onto one class)."""
        for module in encoder.modules():
            if isinstance(module, DROPOUT_LAYERS):
                module.eval()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.target_features if self.stage2_started else self.features
        f = encoder(x)
        return f, self.classifier(f)

