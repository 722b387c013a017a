"""Do the loader workers keep up with the compute? Images/s of the file-backed stream alone, of the
training step alone (on batches decoded beforehand, cycled) and of training steps fed by the
streams, plus the share of the fed steps' time spent waiting for a batch.

Fed / compute near 1 (and little waiting) means the workers do not starve the compute; fed close
to the loader's own rate means they do, and more workers (data.num_workers) or a smaller
data.resize would help.

    python scripts/bench_loader.py data=office31 data.root=<root> backbone=lenet --steps 20
    python scripts/bench_loader.py data=office31 data.root=<root> data.image_size=64 data.resize=73 device=cuda
"""

import argparse
import time

import torch
from hydra import compose

from da_runner.config import resolve_device, validate
from da_runner.config_tree import initialize_configs
from da_runner.data import build_pair
from da_runner.methods import Batch, StepContext, build_method
from da_runner.trainer import seed_everything


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="da-run overrides, e.g. data=office31 data.root=/data backbone=lenet")
    parser.add_argument("--steps", type=int, default=20, help="measured batches (steps) per phase")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured batches first (workers starting, caches)")
    args = parser.parse_args()
    with initialize_configs():
        cfg = compose("config", overrides=args.overrides)
    validate(cfg)
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed))
    pair = build_pair(cfg.data).to(device)
    bs = int(cfg.trainer.batch_size)
    method = build_method(cfg, pair.input_shape, pair.num_classes).to(device).train()
    print(f"data={pair.name} image_size={cfg.data.get('image_size')} num_workers={pair.source_train.num_workers} "
          f"method={cfg.method.name} backbone={cfg.backbone.name} batch={bs}+{bs} device={device} "
          f"threads={torch.get_num_threads()} steps={args.steps}")

    def ctx(step: int) -> StepContext:
        return StepContext(step=step, max_steps=args.steps, progress=step / args.steps, grl_lambda=1.0,
                           lr=float(cfg.optim.lr))

    def timed_steps(next_batches) -> tuple[float, float]:
        """Images/s of `steps` training steps (after `warmup` untimed ones) and the share of their
        time spent in next_batches()."""
        waiting = 0.0
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                synchronize(device)
                waiting, start = 0.0, time.perf_counter()
            before = time.perf_counter()
            x_s, y_s, x_t = next_batches(i)
            waiting += time.perf_counter() - before
            method.step(Batch(x_s=x_s, y_s=y_s, x_t=x_t, y_t=None), ctx(i))
        synchronize(device)
        elapsed = time.perf_counter() - start
        return args.steps * 2 * bs / elapsed, waiting / elapsed

    # Each phase has the CPU to itself: no stream's workers are alive (and reading ahead) outside it.
    # 1. the step alone, on (evaluation) batches decoded beforehand
    ready = [(x, y) for _, (x, y) in zip(range(4), pair.source_train.batches(bs))]
    compute_rate, _ = timed_steps(lambda i: (*ready[i % len(ready)], ready[(i + 1) % len(ready)][0]))

    # 2. the loader alone: one stream, as fast as it can decode
    source = pair.source_train.stream(bs, seed=1)
    for _ in range(args.warmup):
        next(source)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(source)
    loader_rate = args.steps * bs / (time.perf_counter() - start)
    del source  # its workers stop

    # 3. steps fed by a source and a target stream, as in training
    source, target = pair.source_train.stream(bs, seed=1), pair.target_train.stream(bs, seed=2)
    fed_rate, waiting = timed_steps(lambda i: (*next(source), next(target)[0]))

    print(f"loader alone (one stream):      {loader_rate:8.1f} images/s")
    print(f"training step alone:            {compute_rate:8.1f} images/s")
    print(f"training step fed by streams:   {fed_rate:8.1f} images/s "
          f"({fed_rate / compute_rate:.2f} of the step alone; {100 * waiting:.0f}% of the time waiting for batches)")


if __name__ == "__main__":
    main()
