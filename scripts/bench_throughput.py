"""Training throughput of the runner against a bare PyTorch loop doing the same work.

The bare loop runs the same modules (built by the same builders, same seed) through the same
forward / backward / optimizer step, on batches prepared the way a hand-written loop would:

- in-memory data (the digits): batches prepared beforehand (ready float tensors on the device,
  cycled), so the runner's whole extra cost (batch sampling and conversion, schedules, logging,
  progress bar, method dispatch) is what the ratio shows;
- file-backed data (Office-31, any image folder): a plain `torch.utils.data.DataLoader` per domain
  over the same files and training transform (same decoder, resize, random resized crop and flip),
  shuffled, the last incomplete batch dropped, with the same number of persistent workers and the
  same pinned-memory setting, each uint8 batch normalised on the device as the runner does. What
  the ratio shows is then everything the runner adds to such a loop: its resumable batch order and
  per-image augmentation seeds as well as the schedules, logging and dispatch.

The runner is `train(...)`, as `da-run` calls it; its rate is `train_steps_per_s` of metrics.json
(every step from the first, evaluation and checkpoints excluded). The bare loop times `--steps`
steps after `--warmup` untimed ones. Runs alternate bare / runner so both see the same machine
state; the median of the per-repeat ratios is reported, with the smallest and the largest.

    python scripts/bench_throughput.py                       # DANN on the embedded pair
    python scripts/bench_throughput.py method=source_only --steps 300 --repeats 5
    python scripts/bench_throughput.py data=office31 data.root=<root> backbone=resnet18 backbone.pretrained=false \\
        optim.lr_mult.backbone=1 data.image_size=64 data.resize=73 trainer.batch_size=32 --steps 120
"""

import argparse
import itertools
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose

from da_runner.config import resolve_device
from da_runner.config_tree import initialize_configs
from da_runner.data import BatchStream, build_pair
from da_runner.data.files import ImageFileDomain, default_num_workers
from da_runner.methods import build_method
from da_runner.nn.grl import grad_reverse
from da_runner.nn.losses import domain_labels, domain_loss_and_acc
from da_runner.trainer import seed_everything, train


def compose_config(overrides, steps: int):
    """The configuration `da-run <overrides>` composes, for a run of `steps` steps that evaluates and
    checkpoints only at its end and skips the end-of-run analysis (neither is timed)."""
    with initialize_configs():
        return compose("config", overrides=[f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                                            f"trainer.ckpt_every={steps}", "trainer.analysis=false", *overrides])


def describe(cfg) -> str:
    data = cfg.data
    workers = default_num_workers() if data.get("num_workers") == "auto" else data.get("num_workers")
    size = f" image_size={data.image_size} resize={data.resize} num_workers={workers}" if "image_size" in data else ""
    return (f"method={cfg.method.name} data={data.name}{size} backbone={cfg.backbone.name} "
            f"batch={cfg.trainer.batch_size}+{cfg.trainer.batch_size} device={resolve_device(cfg.device)} "
            f"threads={torch.get_num_threads()}")


def plain_loader_batches(domain: ImageFileDomain, batch_size: int):
    """Endless (x, y) batches of a hand-written loop over image files: a plain DataLoader over the
    domain's files and training transform (shuffle, drop_last, its workers and pin_memory setting),
    iterated epoch after epoch; batches normalised on the device as the runner does."""
    loader = domain.loader("weak", batch_size=batch_size, shuffle=True, drop_last=True,
                           persistent_workers=domain.num_workers > 0)
    for x, y in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield domain.prepare(x), y.to(domain.device, non_blocking=True)


def bare_batches(pair, batch_size: int):
    """The bare loop's endless (x_s, y_s, x_t) batches: from plain DataLoaders for file-backed data,
    else 64 batches prepared beforehand, cycled."""
    if isinstance(pair.source_train, ImageFileDomain):
        source, target = (plain_loader_batches(d, batch_size) for d in (pair.source_train, pair.target_train))
        return ((*s, t[0]) for s, t in zip(source, target))
    src, tgt = BatchStream(pair.source_train, batch_size, 1), BatchStream(pair.target_train, batch_size, 2)
    return itertools.cycle([(*next(src), next(tgt)[0]) for _ in range(64)])


def bare_loop_steps_per_s(cfg, steps: int, warmup: int = 10) -> float:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    pair = build_pair(cfg.data).to(device)
    method = build_method(cfg, pair.input_shape, pair.num_classes).to(device).train()
    batches = bare_batches(pair, int(cfg.trainer.batch_size))
    optimizer = method.optimizers["main"]
    adversarial = hasattr(method, "discriminator")

    def one_step(x_s, y_s, x_t):
        if adversarial:
            f = method.features(torch.cat([x_s, x_t]))
            loss = F.cross_entropy(method.classifier(f[: len(x_s)]), y_s)
            is_source = domain_labels(len(x_s), len(x_t), device)
            loss = loss + domain_loss_and_acc(method.discriminator(grad_reverse(f, 1.0)), is_source)[0]
        else:
            loss = F.cross_entropy(method.classifier(method.features(x_s)), y_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        one_step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def runner_steps_per_s(cfg) -> float:
    """Steps/s of `train(cfg, ...)`: metrics.json's train_steps_per_s, unrounded."""
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train(cfg, run_dir)
    return int(cfg.trainer.max_steps) / metrics["train_time_s"]


def report(name_a: str, name_b: str, ratios: list[float]) -> None:
    print(f"median ratio {name_a}/{name_b}: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} repeats)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="da-run overrides, e.g. method=source_only device=cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of the bare loop before its timed ones")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = compose_config(args.overrides, args.steps)
    print(f"{describe(cfg)} steps={args.steps}", flush=True)
    ratios = []
    for r in range(args.repeats):
        bare = bare_loop_steps_per_s(cfg, args.steps, args.warmup)
        runner = runner_steps_per_s(cfg)
        ratios.append(runner / bare)
        print(f"repeat {r}: bare {bare:.3f} steps/s, runner {runner:.3f} steps/s, ratio {runner / bare:.3f}", flush=True)
    report("runner", "bare", ratios)


if __name__ == "__main__":
    main()
