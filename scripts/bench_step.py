"""Steps/s of one method's training step alone, on random batches already on the device (no data
loading): fp32 and bf16 + channels_last, each eager and compiled (`nn.Module.compile` on every
network, as `trainer.compile=true` does). The first 3 steps (the compiler's) are timed apart; then
the median of three timed rounds of 40 steps, after one untimed round.

    python scripts/bench_step.py data=office31 backbone=resnet50 backbone.pretrained=false trainer.batch_size=32 device=cuda
"""

import sys
import time

import torch
from hydra import compose

from da_runner.config import resolve_device
from da_runner.config_tree import initialize_configs
from da_runner.methods import Batch, StepContext, build_method


def main():
    with initialize_configs():
        cfg = compose("config", overrides=sys.argv[1:])
    device = resolve_device(cfg.device)
    size, bs, classes = int(cfg.data.image_size), int(cfg.trainer.batch_size), 31

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ctx = StepContext(step=0, max_steps=100, progress=0.5, grl_lambda=0.5, lr=0.01)
    for bf16, compiled in ((False, False), (True, False), (False, True), (True, True)):
        torch.manual_seed(0)
        method = build_method(cfg, (3, size, size), classes).to(device).train()
        x_s, x_t = (torch.randn(bs, 3, size, size, device=device) for _ in range(2))
        y_s = torch.randint(0, classes, (bs,), device=device)
        if bf16:
            method.to(memory_format=torch.channels_last)
            x_s, x_t = (x.contiguous(memory_format=torch.channels_last) for x in (x_s, x_t))
        if compiled:
            for module in method.children():
                module.compile()
        batch = Batch(x_s, y_s, x_t)

        def steps(n: int) -> float:
            sync()
            start = time.perf_counter()
            for _ in range(n):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    method.step(batch, ctx)
            sync()
            return time.perf_counter() - start

        first = steps(3)
        rates = sorted([40 / steps(40) for _ in range(4)][1:])  # the first round untimed
        name = ("bf16 + channels_last" if bf16 else "fp32") + (" + compile" if compiled else "")
        print(f"{name} (first 3 steps {first:.1f} s): median {rates[1]:.2f} steps/s = {rates[1] * 2 * bs:.0f} "
              f"images/s ({' '.join(f'{r:.2f}' for r in rates)}) image_size={size} batch={bs}+{bs}", flush=True)


if __name__ == "__main__":
    main()
