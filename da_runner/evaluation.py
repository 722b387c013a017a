"""Accuracy of a method's predictions on an in-memory domain."""

import torch

from da_runner.data.memory import InMemoryDomain


@torch.no_grad()
def accuracy(method, domain: InMemoryDomain, batch_size: int = 1024) -> float:
    """Fraction of `domain` that `method.predict` classifies correctly (eval mode, no gradients)."""
    was_training = method.training
    method.eval()
    correct = torch.zeros((), dtype=torch.long, device=domain.y.device)
    for x, y in domain.batches(batch_size):
        correct += (method.predict(x).argmax(1) == y).sum()
    method.train(was_training)
    return correct.item() / len(domain)
