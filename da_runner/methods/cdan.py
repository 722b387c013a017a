"""CDAN: conditional domain adversarial networks (Long et al., NeurIPS 2018).

The discriminator is conditioned on the classifier's predictions: it sees the multilinear map
T(f, g) = g ⊗ f of the features f (N, d) and the softmax predictions g (N, C), so aligning the
domains aligns the joint distribution of features and classes, not just the features. g is
detached (it conditions, it is not trained through D). By default the full map is used, as in
CDAN's digits code and Transfer-Learning-Library, with their wide discriminator (1024-1024 with
BatchNorm; configs/method/cdan.yaml); `randomized: true` uses the randomized map
(R_f f) ⊙ (R_g g) / sqrt(randomized_dim) instead, and `randomized: null` follows the paper's rule
(randomized when d * C exceeds `max_multilinear_dim`, 4096). Source and target run through the
networks in separate passes by default (`separate_forward`), so each BatchNorm layer of the
bottleneck and the discriminator normalises each domain with its own statistics; the reference
implementations concatenate them (docs/benchmarks.md measures both).

CDAN+E (`method=cdan_e`) weights each sample's domain loss by w = 1 + exp(-H(g)), so that confident
(easy-to-transfer) samples count more. Two readings of the normalisation exist:
`entropy_normalization: batch` (Transfer-Learning-Library: mean 1 over the whole batch, w detached)
and `domain` (CDAN's own code: each domain's weights sum to the same total, so a confident source
batch cannot outweigh a less confident target batch). `entropy_gradient: true` also follows CDAN's
own code: H is not detached and receives the domain loss's gradient reversed and scaled by lambda,
so the network lowers the entropy of the samples the discriminator still tells apart.

Options (configs/method/cdan.yaml): randomized (null = automatic, true, false), randomized_dim,
max_multilinear_dim, entropy, entropy_normalization, entropy_gradient, domain_outputs, bsp_weight /
bsp_k (BSP, as for DANN).
"""

import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods.base import Batch, StepContext
from da_runner.methods.dann import DANN
from da_runner.methods.registry import register
from da_runner.nn.grl import grad_reverse
from da_runner.nn.losses import RandomizedMultilinearMap, entropy, multilinear_map

ENTROPY_NORMALIZATIONS = ("batch", "domain")


@register("cdan", "cdan_e", "cdan_bsp")
class CDAN(DANN):
    def __init__(self, cfg, input_shape, num_classes):
        normalization = cfg.method.get("entropy_normalization", "batch")
        if normalization not in ENTROPY_NORMALIZATIONS:
            raise UserError(f"method.entropy_normalization must be one of {', '.join(ENTROPY_NORMALIZATIONS)}, "
                            f"got {normalization!r}")
        super().__init__(cfg, input_shape, num_classes)

    def adversary_input_dim(self) -> int:
        """Called by DANN.__init__ before it builds the discriminator: chooses the map."""
        options, d, c = self.cfg.method, self.features.out_features, self.num_classes
        randomized = options.get("randomized")
        if randomized is None:  # the paper's rule
            randomized = d * c > int(options.get("max_multilinear_dim", 4096))
        self.random_map = RandomizedMultilinearMap(d, c, int(options.get("randomized_dim", 1024))) if randomized else None
        return self.random_map.output_dim if randomized else d * c

    def adversary_input(self, f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        g = F.softmax(logits, dim=1).detach()
        return self.random_map(f, g) if self.random_map is not None else multilinear_map(f, g)

    def domain_weights(self, f: torch.Tensor, logits: torch.Tensor, batch: Batch, ctx: StepContext):
        return self.entropy_weights(logits, len(batch.x_s), ctx), None, {}

    def entropy_weights(self, logits: torch.Tensor, n_s: int, ctx: StepContext) -> torch.Tensor | None:
        """CDAN+E's weights 1 + exp(-H(g)) of the N_s + N_t rows (source first); None without `entropy`."""
        options = self.cfg.method
        if not options.get("entropy", False):
            return None
        h = entropy(F.softmax(logits, dim=1))
        h = grad_reverse(h, ctx.grl_lambda) if options.get("entropy_gradient", False) else h.detach()
        w = 1.0 + torch.exp(-h)
        if options.get("entropy_normalization", "batch") == "batch":
            return _mean_one(w)
        return torch.cat([_mean_one(w[:n_s]), _mean_one(w[n_s:])])  # mean 1 within each domain


def _mean_one(w: torch.Tensor) -> torch.Tensor:
    """w scaled to mean 1, the scale detached (a gradient through w reaches it only through w itself)."""
    return w * (len(w) / w.detach().sum())
