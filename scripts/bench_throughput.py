"""Training throughput of the runner against a bare PyTorch loop doing the same work.

The bare loop runs the same modules (built by the same builders, same seed) through the same
forward / backward / optimizer step on batches prepared beforehand (ready float tensors on the
device): the runner's extra cost (batch sampling and conversion, schedules, logging, progress bar,
method dispatch) is what the ratio shows. Runs alternate bare / runner so both see the same
machine state; the median of the per-repeat ratios is reported.

    python scripts/bench_throughput.py                       # DANN on the embedded pair
    python scripts/bench_throughput.py method=source_only --steps 300 --repeats 5
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose

from da_runner.config import resolve_device
from da_runner.config_tree import initialize_configs
from da_runner.data import BatchStream, build_pair
from da_runner.methods import build_method
from da_runner.methods.dann import domain_loss_and_acc
from da_runner.nn.grl import grad_reverse
from da_runner.trainer import seed_everything, train


def bare_loop_steps_per_s(cfg, steps: int, warmup: int = 10) -> float:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    pair = build_pair(cfg.data).to(device)
    method = build_method(cfg, pair.input_shape, pair.num_classes).to(device).train()
    bs = int(cfg.trainer.batch_size)
    src, tgt = BatchStream(pair.source_train, bs, 1), BatchStream(pair.target_train, bs, 2)
    batches = [(*next(src), next(tgt)[0]) for _ in range(64)]  # ready tensors, cycled
    optimizer = method.optimizers["main"]
    adversarial = hasattr(method, "discriminator")

    def one_step(x_s, y_s, x_t):
        if adversarial:
            f = method.features(torch.cat([x_s, x_t]))
            loss = F.cross_entropy(method.classifier(f[: len(x_s)]), y_s)
            is_source = torch.cat([torch.ones(len(x_s), device=device), torch.zeros(len(x_t), device=device)])
            loss = loss + domain_loss_and_acc(method.discriminator(grad_reverse(f, 1.0)), is_source)[0]
        else:
            loss = F.cross_entropy(method.classifier(method.features(x_s)), y_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        one_step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        one_step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def runner_steps_per_s(cfg, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train(cfg, run_dir)
    return metrics["train_steps_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="da-run overrides, e.g. method=source_only device=cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with initialize_configs():
        cfg = compose("config", overrides=[*args.overrides, f"trainer.max_steps={args.steps}",
                                           f"trainer.eval_every={args.steps}", f"trainer.ckpt_every={args.steps}"])
    print(f"method={cfg.method.name} data={cfg.data.name} backbone={cfg.backbone.name} "
          f"batch={cfg.trainer.batch_size}+{cfg.trainer.batch_size} device={resolve_device(cfg.device)} "
          f"threads={torch.get_num_threads()} steps={args.steps}")
    ratios = []
    for r in range(args.repeats):
        bare = bare_loop_steps_per_s(cfg, args.steps)
        runner = runner_steps_per_s(cfg, args.steps)
        ratios.append(runner / bare)
        print(f"repeat {r}: bare {bare:.2f} steps/s, runner {runner:.2f} steps/s, ratio {runner / bare:.3f}")
    print(f"median ratio runner/bare: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
