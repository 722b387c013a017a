"""Accuracy of a method's predictions on in-memory domains."""

import torch

from da_runner.data.memory import InMemoryDomain


@torch.no_grad()
def accuracies(method, domain: InMemoryDomain, batch_size: int = 1024) -> dict[str, float]:
    """Fraction of `domain` classified correctly by `method.predict` (key "") and by each of
    `method.predict_heads` (key: the head's name). Eval mode, no gradients."""
    was_training = method.training
    method.eval()
    correct: dict[str, torch.Tensor] = {}
    for x, y in domain.batches(batch_size):
        for name, logits in {"": method.predict(x), **method.predict_heads(x)}.items():
            correct[name] = correct.get(name, 0) + (logits.argmax(1) == y).sum()
    method.train(was_training)
    return {name: count.item() / len(domain) for name, count in correct.items()}


def evaluate(method, pair, batch_size: int = 1024) -> dict[str, float]:
    """`source_acc` on held-out source data and `target_acc` on the target test set, plus
    `<domain>_acc_<head>` for each further prediction head of the method."""
    record = {}
    for domain_name, domain in (("source", pair.source_val), ("target", pair.target_test)):
        for head, value in accuracies(method, domain, batch_size).items():
            record[f"{domain_name}_acc" + (f"_{head}" if head else "")] = value
    return record

