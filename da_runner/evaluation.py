"""Evaluation: accuracies on the labelled splits and the label-free validators.

Target *labels* are used here only to report the target metrics (`target_acc` and those of the
pair's setting, da_runner/tasks.py) and the oracle; every validator sees target inputs only.
"""

from dataclasses import dataclass

import torch

from da_runner import validators as V
from da_runner.data.domain import Domain, DomainPair
from da_runner.tasks import accuracy


@dataclass
class Outputs:
    """A method's outputs on one domain: features (N, d), logits (N, C), extra heads, labels (N,)."""

    features: torch.Tensor
    logits: torch.Tensor
    heads: dict[str, torch.Tensor]
    labels: torch.Tensor


@torch.no_grad()
def outputs(method, domain: Domain, batch_size: int = 1024) -> Outputs:
    """Run `method` (eval mode, no gradients) over a whole domain."""
    was_training = method.training
    method.eval()
    features, logits, heads, labels = [], [], {}, []
    for x, y in domain.batches(batch_size):
        f, out = method.embed(x)
        features.append(f)
        logits.append(out)
        for name, head_logits in method.predict_heads(x).items():
            heads.setdefault(name, []).append(head_logits)
        labels.append(y)
    method.train(was_training)
    return Outputs(torch.cat(features), torch.cat(logits), {k: torch.cat(v) for k, v in heads.items()},
                   torch.cat(labels))


@dataclass
class ValidationData:
    """What evaluation looks at, fixed for a run: the labelled splits and fixed-size samples of the
    unlabelled target training data and of the source training data (for the validators)."""

    pair: DomainPair
    target_sample: Domain  # labels never read
    source_sample: Domain

    @classmethod
    def of(cls, pair: DomainPair, sample_size: int, seed: int = 0) -> "ValidationData":
        return cls(pair, pair.target_train.sample(sample_size, seed), pair.source_train.sample(sample_size, seed + 1))


def evaluate(method, data: ValidationData, task, validators=("source_acc",), batch_size: int = 1024) -> dict[str, float]:
    """One evaluation record: `source_acc`, the target metrics of `task` (`target_acc`, ...),
    `<domain>_acc_<head>` for further heads, and the value of each validator in `validators`. The
    task computes it (da_runner/tasks.py): a classification task with `classification_record`, a
    segmentation task batch by batch."""
    return task.evaluate(method, data, validators, batch_size)


def classification_record(method, data: ValidationData, task, validators, batch_size: int) -> dict[str, float]:
    """`evaluate` for classification tasks, from the outputs of every split held at once."""
    source_val = outputs(method, data.pair.source_val, batch_size)
    target_test = outputs(method, data.pair.target_test, batch_size)
    # The source validation split holds the source's classes only: the accuracy of the argmax over them.
    record = {"source_acc": accuracy(task.predict_known(source_val.logits), source_val.labels),
              **task.target_metrics(target_test.logits, target_test.labels)}
    for head, head_logits in source_val.heads.items():
        record[f"source_acc_{head}"] = accuracy(task.predict_known(head_logits), source_val.labels)
        record[f"target_acc_{head}"] = task.target_accuracy(target_test.heads[head], target_test.labels)
    needs_target = [name for name in validators if name != "source_acc"]
    if needs_target:
        target = outputs(method, data.target_sample, batch_size)
        source_fit = outputs(method, data.source_sample, batch_size) if "dev" in validators else source_val
        values = V.compute(needs_target, source_acc=record["source_acc"], logits_t=task.known_logits(target.logits),
                           f_t=target.features, f_s_fit=source_fit.features, f_s_val=source_val.features,
                           logits_s_val=task.known_logits(source_val.logits), y_s_val=source_val.labels)
        record.update(values)
    return record
