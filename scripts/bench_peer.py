"""DANN through pytorch-adapt (an installable peer library) and through da_runner, side by side:
the same networks, SGD settings and batches; steps/s of each and their ratio.

    pip install --no-deps pytorch-adapt==0.0.83 torchmetrics==0.9.3 pytorch-metric-learning==1.6.3
    python scripts/bench_peer.py --root <data root>                         # digits, then Office-31
    python scripts/bench_peer.py --root <root> --workload office31 --steps 60 --repeats 3 data.image_size=224 data.resize=256

(pytorch-adapt 0.0.83 pins torchmetrics 0.9.3, which imports pkg_resources: on a Python without
setuptools add `"setuptools<81"` to the pip command.)

Workloads (each with `method=dann grl=constant optim.schedule=constant method.separate_forward=true`,
then any overrides given on the command line):

    digits:   experiment=digits_mnistm: real MNIST -> MNIST-M (files under --root), the DANN paper's
              network (conv 32-48, label head 100-100, discriminator 100-1, no BatchNorm), 64 + 64
              images of 3 x 28 x 28 per step, held in memory
    office31: Office-31 amazon -> webcam from its JPEG files (--root), ResNet-18 from random weights
              with the 256-d BatchNorm bottleneck, a linear label head and the 1024-1024 BatchNorm
              discriminator, data.image_size=64 data.resize=73, 32 + 32 images per step, decoded by
              the loader's workers

Both sides train copies of the same modules, built by da_runner's builders from the same seed:
G = method.features, C = method.classifier, D = method.discriminator of `method=dann`, and both
optimise with SGD at the configured lr, momentum, weight decay and Nesterov flag, the lr constant and
the gradient reversal weight 1 (the peer's DANN has no schedules of its own; the workloads fix
da_runner's to the same constants). Both draw their batches from da_runner's batch streams with the
same seeds, so they see the same images, in the same order, with the same crops and flips.

What each side does per step:

    da_runner: `train(cfg, run_dir)`, exactly as `da-run` runs (its rate is every step from the
        first, evaluation and checkpoints excluded: train_time_s of metrics.json). Per step: the lr
        and lambda schedules and the lr of each param group; next(source), next(target); DANN's
        `method.step`: G on x_s and on x_t (one pass per domain: method.separate_forward=true, so
        that BatchNorm sees one domain at a time, as the peer's hook does), C on both domains'
        features (the target logits feed only optional add-ons, off here), the gradient reversal,
        D on each domain's reversed features, the loss CE(C(G(x_s)), y_s) + BCE over all 2B
        discriminator outputs (the mean of the two domains' means), the discriminator's accuracy,
        zero_grad, backward, one SGD step over all parameters; a non-finite-loss check, and every
        10 steps (trainer.log_every) the terms read back and written to TensorBoard and the progress
        bar updated.
    pytorch-adapt: a plain loop over the same streams, each step next(source), next(target) and
        `pytorch_adapt.adapters.DANN.training_step({"src_imgs", "src_labels", "target_imgs",
        "src_domain", "target_domain"})` with models G, C and D (D's one logit squeezed to (N,),
        the shape the peer's domain loss expects) and one SGD per model. Its DANNHook: G on x_s and
        on x_t, the gradient reversal, D on each domain's reversed features, the per-sample BCE of
        each domain and its mean, C on the source features and its CE; a SumWeighter with weights
        0.5 on each domain's loss and 1 on the CE makes its loss the same function as da_runner's
        (its default MeanWeighter would average the three terms instead); zero_grad of the three
        optimizers, backward, each optimizer's step, and `.item()` of every loss term each step
        (the loss dictionary it returns). Domain labels are da_runner's (source 1, target 0).

Before timing, `--check-steps` (3) steps of both sides on the same batches from the same initial
weights must give the same losses and weights (printed: the largest differences): the two sides then
compute the same function, and the ratio compares only how they get there. The sides alternate
(peer, da_runner) `--repeats` times; each prints steps/s, then the median of the per-repeat ratios
da_runner / peer with the smallest and the largest.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import compose_config, describe, report, runner_steps_per_s  # noqa: E402

from da_runner.config import resolve_device, validate  # noqa: E402
from da_runner.data import build_pair  # noqa: E402
from da_runner.methods import Batch, StepContext, build_method  # noqa: E402
from da_runner.trainer import seed_everything  # noqa: E402

PEER_INSTALL = ("pip install --no-deps pytorch-adapt==0.0.83 torchmetrics==0.9.3 pytorch-metric-learning==1.6.3 "
                "\"setuptools<81\"")
SAME_FUNCTION = ["method=dann", "grl=constant", "grl.hi=1.0", "optim.schedule=constant", "method.separate_forward=true"]
WORKLOADS = {
    "digits": (["experiment=digits_mnistm"], 1000),
    "office31": (["data=office31", "data.source=amazon", "data.target=webcam", "backbone=resnet18",
                  "backbone.pretrained=false", "optim.lr_mult.backbone=1", "data.image_size=64", "data.resize=73",
                  "trainer.batch_size=32", "trainer.eval_batch_size=128"], 100),
}


def import_peer():
    try:
        from pytorch_adapt.adapters import DANN
        from pytorch_adapt.containers import Models, Optimizers
        from pytorch_adapt.weighters import SumWeighter
    except ImportError as err:
        sys.exit(f"bench_peer.py needs pytorch-adapt ({err}); install it with:\n    {PEER_INSTALL}")
    return DANN, Models, Optimizers, SumWeighter


class OneLogit(nn.Module):
    """D's (N, 1) logit as (N,): pytorch-adapt's domain loss reads a 2-D output as class logits."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x):
        return self.discriminator(x).squeeze(1)


def peer_adapter(method, cfg):
    """pytorch-adapt's DANN adapter over the method's G, C and D, one SGD per model with da_runner's
    settings, and the loss weighted as da_runner's DANN weighs it."""
    DANN, Models, Optimizers, SumWeighter = import_peer()
    optim = cfg.optim
    multipliers = {float(v) for v in (optim.get("lr_mult") or {}).values()}
    if cfg.optim.name != "sgd" or multipliers - {1.0}:
        sys.exit("bench_peer.py compares plain SGD at one lr: use optim=sgd with every optim.lr_mult at 1")
    sgd = {"lr": float(optim.lr), "momentum": float(optim.momentum), "weight_decay": float(optim.weight_decay),
           "nesterov": bool(optim.nesterov)}
    models = Models({"G": method.features, "C": method.classifier, "D": OneLogit(method.discriminator)})
    weighter = SumWeighter(weights={"src_domain_loss": 0.5, "target_domain_loss": 0.5, "src_c_loss": 1.0})
    return DANN(models=models, optimizers=Optimizers((torch.optim.SGD, sgd)), hook_kwargs={"weighter": weighter})


class PeerSide:
    """One pytorch-adapt DANN on fresh copies of da_runner's modules, fed by da_runner's streams."""

    def __init__(self, cfg, pair=None):
        self.device = resolve_device(cfg.device)
        seed_everything(int(cfg.seed))
        self.pair = pair if pair is not None else build_pair(cfg.data).to(self.device)
        self.method = build_method(cfg, self.pair.input_shape, self.pair.num_classes).to(self.device).train()
        self.adapter = peer_adapter(self.method, cfg)
        self.batch_size, self.seed = int(cfg.trainer.batch_size), int(cfg.seed)
        n = self.batch_size
        self.src_domain = torch.ones(n, device=self.device)
        self.target_domain = torch.zeros(n, device=self.device)

    def streams(self):
        """The training streams `train` draws from (the same seeds: the same batches)."""
        return (self.pair.source_train.stream(self.batch_size, seed=2 * self.seed + 1),
                self.pair.target_train.stream(self.batch_size, seed=2 * self.seed + 2))

    def step(self, x_s, y_s, x_t) -> dict:
        return self.adapter.training_step({"src_imgs": x_s, "src_labels": y_s, "target_imgs": x_t,
                                           "src_domain": self.src_domain, "target_domain": self.target_domain})

    def steps_per_s(self, steps: int) -> float:
        source, target = self.streams()  # their workers start at the first batch, inside the timing, as in train
        start = time.perf_counter()
        for _ in range(steps):
            x_s, y_s = next(source)
            self.step(x_s, y_s, next(target)[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)


def check_same_function(cfg, steps: int) -> tuple[float, float]:
    """Both sides `steps` steps from the same weights on the same batches: the largest difference of
    their losses and of their weights afterwards."""
    peer = PeerSide(cfg)
    seed_everything(int(cfg.seed))
    ours = build_method(cfg, peer.pair.input_shape, peer.pair.num_classes).to(peer.device).train()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), peer.method.state_dict().values()))
    source, target = peer.streams()
    ctx = StepContext(step=0, max_steps=steps, progress=0.0, grl_lambda=1.0, lr=float(cfg.optim.lr))
    loss_gap = 0.0
    for _ in range(steps):
        x_s, y_s = next(source)
        x_t = next(target)[0]
        ours_loss = float(ours.step(Batch(x_s=x_s, y_s=y_s, x_t=x_t), ctx)["loss"])
        peer_loss = peer.step(x_s, y_s, x_t)["total_loss"]["total"]
        loss_gap = max(loss_gap, abs(ours_loss - peer_loss))
    weight_gap = max((a.float() - b.float()).abs().max().item()
                     for a, b in zip(ours.state_dict().values(), peer.method.state_dict().values()))
    return loss_gap, weight_gap


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="da-run overrides applied to every workload, e.g. device=cuda")
    parser.add_argument("--root", default=os.environ.get("DA_DATA_ROOT"),
                        help="data root with MNIST/, mnist_m/ and office31/ (default: $DA_DATA_ROOT)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append",
                        help="digits and/or office31 (default: both)")
    parser.add_argument("--steps", type=int, help="steps per run (default: 1000 digits, 100 Office-31)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the same-function check (0: skip)")
    args = parser.parse_args()
    import_peer()
    if not args.root:
        sys.exit("bench_peer.py reads real data: pass --root <data root> or set DA_DATA_ROOT")
    for name in args.workload or ["digits", "office31"]:
        preset, default_steps = WORKLOADS[name]
        steps = args.steps or default_steps
        cfg = compose_config([*SAME_FUNCTION, *preset, f"data.root={args.root}", *args.overrides], steps)
        validate(cfg)
        print(f"== {name}: {describe(cfg)} steps={steps}", flush=True)
        if args.check_steps:
            loss_gap, weight_gap = check_same_function(cfg, args.check_steps)
            print(f"same function: {args.check_steps} steps from the same weights on the same batches: losses differ "
                  f"by at most {loss_gap:.2e}, weights by at most {weight_gap:.2e}", flush=True)
        ratios = []
        for r in range(args.repeats):
            peer = PeerSide(cfg).steps_per_s(steps)
            ours = runner_steps_per_s(cfg)
            ratios.append(ours / peer)
            print(f"repeat {r}: pytorch-adapt {peer:.3f} steps/s, da_runner {ours:.3f} steps/s, "
                  f"ratio {ours / peer:.3f}", flush=True)
        report("da_runner", "pytorch-adapt", ratios)


if __name__ == "__main__":
    main()
