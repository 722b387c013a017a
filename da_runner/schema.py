"""The schema of the composed config: every key any shipped config can hold, declared once, with its
type and range or choices (da_runner/rules.py) and the text that documents it (`da-run --help` shows
it, for the keys of the config being composed). A key that a config holds and this file does not
declare is an error, so a new key cannot go unchecked (tests/test_schema.py composes every shipped
config). Rules that tie keys together live at the end (ACROSS_KEYS).

`check(cfg)` raises UserError at the first bad value: the key, the rule in words and the value given."""

import json
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from da_runner.data.augment import LEVELS as AUGMENT_LEVELS
from da_runner.data.classes import SETTINGS
from da_runner.errors import UserError
from da_runner.methods import METHODS
from da_runner.nn.backbones import BACKBONES
from da_runner.rules import (AnyOf, Boolean, Choice, Integer, ListOf, MapOf, Matches, Nullable, Number, Rule, Text,
                             Values)
from da_runner.schedules import GRL_SCHEDULES, LR_SCHEDULES
from da_runner.validators import VALIDATORS


@dataclass(frozen=True)
class Key:
    rule: Rule
    doc: str


# Shorthands for the common kinds of value.
POSITIVE_INT = Integer(ge=1)
COUNT = Integer(ge=0)
WEIGHT = Number(ge=0)        # a loss weight or a scale: 0 turns its term off
POSITIVE = Number(gt=0)
PROBABILITY = Number(gt=0, le=1, text="a probability in (0, 1]")
DROPOUT = Number(ge=0, lt=1)
WIDTHS = ListOf(POSITIVE_INT, noun="positive integers")
BETAS = ListOf(Number(ge=0, lt=1), length=2, noun="numbers in [0, 1)")
GROUPS = ("backbone", "bottleneck", "heads")  # the parameter groups of every method (methods/base.py)
CLASSES = ListOf(AnyOf(Integer(ge=0), Text()), min_length=1, noun="class indices >= 0 or names")

TOP = {
    "seed": Key(Integer(ge=0), "seeds weight init, batch order and every random draw of training"),
    "device": Key(Matches(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"),
                  "auto: CUDA when present, else CPU"),
    "resume": Key(Boolean(), "true: continue the run in hydra.run.dir from its checkpoints/last.pt"),
}

TRAINER = {
    "max_steps": Key(POSITIVE_INT, "training iterations; schedules run on progress p = step / max_steps"),
    "batch_size": Key(POSITIVE_INT, "per domain: each step sees batch_size source + batch_size target samples"),
    "eval_every": Key(POSITIVE_INT, "evaluate every N steps (and at the end)"),
    "ckpt_every": Key(POSITIVE_INT, "write checkpoints/last.pt every N steps (and at the end)"),
    "log_every": Key(POSITIVE_INT, "write train/* scalars to TensorBoard every N steps"),
    "eval_batch_size": Key(POSITIVE_INT, "batch size of evaluation passes"),
    "precision": Key(Choice("fp32", "bf16", "fp16"), "autocast of the training step's forward passes"),
    "channels_last": Key(Boolean(), "convolution weights and image batches in NHWC layout"),
    "compile": Key(Boolean(), "torch.compile every network of the method"),
    "sync_bn": Key(Boolean(), "several processes: BatchNorm statistics over all of them (GPUs only)"),
    "select": Key(Choice(*VALIDATORS, text=f"one of trainer.validators ({', '.join(VALIDATORS)} at most)"),
                  "the validator that chooses checkpoints/best.pt"),
    "validators": Key(ListOf(Choice(*VALIDATORS), min_length=1, noun=", ".join(VALIDATORS)),
                      "label-free validators logged at every evaluation"),
    "validation_samples": Key(Integer(ge=2), "unlabelled samples per domain the validators look at"),
    "ema": Key(Nullable(Number(gt=0, lt=1, text="a decay in (0, 1), e.g. 0.999"), "off"),
               "decay of an exponential moving average of the weights"),
    "ema_select": Key(Boolean(), "true: best.pt is chosen by the weight average's evaluation"),
    "progress": Key(Boolean(), "show the progress bar"),
    "analysis": Key(Boolean(), "at the end: proxy A-distance, t-SNE, projector, target ARI"),
    "analysis_samples": Key(POSITIVE_INT, "samples per domain for the end-of-run analysis"),
}

OPTIM = {
    "name": Key(Choice("sgd", "adam"), "the optimizer"),
    "lr": Key(POSITIVE, "initial learning rate"),
    "momentum": Key(Number(ge=0), "SGD momentum"),
    "nesterov": Key(Boolean(), "SGD: Nesterov momentum"),
    "betas": Key(BETAS, "Adam's (beta1, beta2)"),
    "weight_decay": Key(Number(ge=0), "L2 penalty"),
    "schedule": Key(Choice(*LR_SCHEDULES), "learning-rate schedule"),
    "alpha": Key(Number(ge=0), "schedule=ganin: lr / (1 + alpha * p) ** beta"),
    "beta": Key(Number(ge=0), "schedule=ganin: lr / (1 + alpha * p) ** beta"),
    "gamma": Key(Number(ge=0), "schedule=inv: lr * (1 + gamma * step) ** -decay"),
    "decay": Key(Number(ge=0), "schedule=inv: lr * (1 + gamma * step) ** -decay"),
    "power": Key(Number(ge=0), "schedule=poly: lr * (1 - p) ** power"),
    "lr_mult": Key(MapOf(Number(ge=0), GROUPS), "per-group multipliers of the scheduled lr"),
    "group_momentum": Key(MapOf(Nullable(Number(ge=0)), GROUPS), "per-group momentum in place of `momentum`"),
}

GRL = {
    "name": Key(Choice(*GRL_SCHEDULES), "schedule of the gradient-reversal coefficient lambda"),
    "hi": Key(Number(), "final value of lambda"),
    "gamma": Key(Number(ge=0), "ganin: steepness of 2 / (1 + exp(-gamma p)) - 1"),
    "alpha": Key(Number(ge=0), "warm_start: steepness"),
    "max_iters": Key(POSITIVE, "warm_start: the step scale"),
    "ramp_fraction": Key(Number(gt=0, le=1), "linear: fraction of training over which lambda ramps up to hi"),
    "ramp_steps": Key(Nullable(POSITIVE_INT), "linear: reach hi at this step (null: ramp_fraction decides)"),
    "start": Key(Number(ge=0, lt=1), "step: fraction of training before adaptation starts"),
}

BACKBONE = {
    "name": Key(Choice(*BACKBONES), "the feature extractor (da_runner/nn/backbones.py)"),
    "arch": Key(Choice("resnet50", "resnet101", "mobilenet_v3_large"), "deeplabv3: the encoder"),
    "model": Key(Nullable(Text()), "timm: a model name, optionally with a weights tag"),
    "kwargs": Key(MapOf(AnyOf(Number(), Text(), Boolean())), "timm: more options of timm.create_model"),
    "pretrained": Key(Boolean(), "start from the published ImageNet weights"),
    "pretrained_tag": Key(Text(), "which published weights"),
    "weights": Key(Nullable(Text(), "none"), "a local checkpoint file to start from"),
    "channels": Key(AnyOf(POSITIVE_INT, ListOf(POSITIVE_INT, min_length=1, noun="positive integers")),
                    "width(s) of the convolutions"),
    "hidden": Key(ListOf(POSITIVE_INT, min_length=1, noun="positive integers"), "mlp: layer sizes"),
    "batch_norm": Key(Boolean(), "BatchNorm after each convolution"),
    "dropout": Key(DROPOUT, "dropout probability inside the network"),
    "noise": Key(Number(ge=0), "vada_small: std of the Gaussian noise after each dropout"),
    "input_norm": Key(Nullable(Choice("instance"), "none"), "instance: standardise each image per channel"),
    "hypercolumns": Key(Boolean(), "fcn_digits: every stage's maps at the input's resolution (false: the last, upsampled)"),
    "bottleneck.width": Key(Nullable(POSITIVE_INT, "no bottleneck"), "Linear -> BatchNorm -> ReLU width"),
    "bottleneck.batch_norm": Key(Boolean(), "BatchNorm after the bottleneck's Linear"),
    "bottleneck.relu": Key(Boolean(), "ReLU after the bottleneck's Linear"),
    "bottleneck.dropout": Key(DROPOUT, "dropout after the bottleneck"),
    "bottleneck.l2_dropout": Key(Boolean(), "scale kept units by 1 / sqrt(1 - p) (AFN)"),
    "label_head": Key(WIDTHS, "hidden sizes of the label classifier"),
    "label_head_batch_norm": Key(Boolean(), "BatchNorm in the label classifier"),
    "label_head_dropout": Key(DROPOUT, "dropout in the label classifier"),
    "label_head_weight_norm": Key(Boolean(), "weight-normalised last layer (SHOT)"),
    "label_head_aspp": Key(Boolean(), "deeplabv3: DeepLabV3's ASPP head"),
    "domain_head": Key(WIDTHS, "hidden sizes of the domain discriminator"),
    "domain_head_batch_norm": Key(Boolean(), "BatchNorm in the domain discriminator"),
    "domain_head_dropout": Key(DROPOUT, "dropout in the domain discriminator"),
}

SIZE = ListOf(POSITIVE_INT, length=2, noun="positive integers [width, height]")
DATA = {
    "_target_": Key(Text(), "the builder of the pair (da_runner/data/)"),
    "name": Key(Text(), "the pair's name (run directories, summaries)"),
    "root": Key(Nullable(Text()), "folder holding the datasets"),
    "download": Key(Boolean(), "fetch missing files from the official sources"),
    "cache_dir": Key(Nullable(Text(), "the per-user cache"), "decoded-tensor cache"),
    "seed": Key(Integer(ge=0), "fixes the subsets and the source validation split"),
    "task": Key(Choice("classification", "segmentation"), "what the labels are"),
    "source": Key(Text(), "labelled source domain"),
    "target": Key(Text(), "unlabelled target domain"),
    "source_dir": Key(Nullable(Text()), "image_folder: the source folder"),
    "target_dir": Key(Nullable(Text()), "image_folder: the target folder"),
    "source_classes": Key(Nullable(CLASSES, "all"), "the source classes used"),
    "target_classes": Key(Nullable(AnyOf(CLASSES, MapOf(AnyOf(Integer(ge=0), Text()), non_empty=True)), "all"),
                          "the target classes: a list, or a map {target class: source class}"),
    "setting": Key(Nullable(Choice(*SETTINGS), "inferred"), "closed | partial | open_set"),
    "unknown_threshold": Key(Number(gt=0, le=1), "open-set pairs: below this top probability a sample is unknown"),
    "source_val_fraction": Key(Number(gt=0, lt=1), "held-out source data for label-free model selection"),
    "augment": Key(Choice(*AUGMENT_LEVELS), "training augmentation"),
    "invert": Key(Number(ge=0, le=1), "the probability of a training image's colours being inverted"),
    "invert_channels": Key(Boolean(), "data.invert draws for each channel of an image separately"),
    "joint_augment": Key(Boolean(), "segmentation files: transforms move each label map with its image"),
    "channels": Key(Values(1, 3), "1 (grey) or 3 (RGB)"),
    "size": Key(POSITIVE_INT, "images are resized to size x size"),
    "image_size": Key(POSITIVE_INT, "network input side of file-backed images"),
    "resize": Key(POSITIVE_INT, "file-backed images are first resized to resize x resize"),
    "crop": Key(Nullable(SIZE, "no crop"), "[width, height] of augment=weak's random crop"),
    "num_workers": Key(AnyOf(Choice("auto"), Integer(ge=0)), "DataLoader worker processes per stream"),
    "pin_memory": Key(Boolean(), "page-locked batches for copies to the GPU"),
    "source_size": Key(AnyOf(POSITIVE_INT, SIZE), "source samples, or [width, height] of its images"),
    "target_size": Key(AnyOf(POSITIVE_INT, SIZE), "target samples, or [width, height] of its images"),
    "target_train_size": Key(POSITIVE_INT, "target samples for training"),
    "target_test_size": Key(POSITIVE_INT, "target samples for reporting accuracy"),
    "source_subset": Key(Nullable(POSITIVE_INT, "all"), "number of source training samples to use"),
    "target_subset": Key(Nullable(POSITIVE_INT, "all"), "number of target training samples to use"),
    "samples_per_domain": Key(POSITIVE_INT, "toy2d: points per split"),
    "noise": Key(Number(ge=0), "toy2d: std of make_moons' noise"),
    "angle": Key(Number(), "toy2d: rotation of the target, in degrees"),
}

METHOD = {
    "name": Key(Choice(*sorted(METHODS)), "the method (da_runner/methods/<name>.py)"),
    "trade_off": Key(WEIGHT, "weight of the method's adaptation loss"),
    "domain_weight": Key(WEIGHT, "weight of the domain loss"),
    "adversarial_weight": Key(WEIGHT, "weight of the adversarial loss"),
    "entropy_weight": Key(WEIGHT, "weight of the target entropy"),
    "balance_weight": Key(WEIGHT, "weight of the class-balance term"),
    "class_balance_weight": Key(WEIGHT, "weight of the class-balance term"),
    "bnm_weight": Key(WEIGHT, "batch nuclear-norm maximisation (0: off)"),
    "bsp_weight": Key(WEIGHT, "batch spectral penalization (0: off)"),
    "bsp_k": Key(POSITIVE_INT, "how many of the largest singular values BSP penalises"),
    "im_weight": Key(WEIGHT, "weight of information maximisation"),
    "importance_weight": Key(WEIGHT, "weight of the importance discriminator's loss"),
    "mean_weight": Key(WEIGHT, "weight of the mean-difference term"),
    "consistency_weight": Key(WEIGHT, "weight of the consistency term"),
    "fixmatch_weight": Key(WEIGHT, "FixMatch's pseudo-label loss on strong target views (0: off)"),
    "pseudo_label_weight": Key(WEIGHT, "weight of the cross-entropy to the pseudo-labels"),
    "source_vat_weight": Key(WEIGHT, "weight of VAT on the source"),
    "target_weight": Key(WEIGHT, "weight of conditional entropy + VAT on the target"),
    "teacher_weight": Key(WEIGHT, "weight of the KL to the teacher's predictions"),
    "reversal_scale": Key(WEIGHT, "scale of the reversed disparity gradient"),
    "ramp_trade_off": Key(Boolean(), "the adaptation weights times the grl schedule's value"),
    "separate_forward": Key(Boolean(), "one pass per domain (per-domain BatchNorm statistics)"),
    "domain_outputs": Key(Values(1, 2), "1: a logit + BCE | 2: softmax over the domains"),
    "entropy": Key(Boolean(), "CDAN+E: entropy-conditioned sample weights"),
    "entropy_gradient": Key(Boolean(), "CDAN+E: the weights receive the reversed gradient"),
    "entropy_normalization": Key(Choice("batch", "domain"), "CDAN+E: weights of mean 1 per batch or per domain"),
    "randomized": Key(Nullable(Boolean(), "by max_multilinear_dim"), "CDAN: the randomized multilinear map"),
    "randomized_dim": Key(POSITIVE_INT, "CDAN: output size of the randomized map"),
    "max_multilinear_dim": Key(POSITIVE_INT, "CDAN: largest full multilinear map under randomized=null"),
    "kernel_multipliers": Key(ListOf(POSITIVE, min_length=1, noun="numbers > 0"), "MMD: kernel bandwidths"),
    "linear": Key(Boolean(), "MMD: the linear-time estimator"),
    "prediction_sigma": Key(POSITIVE, "JAN: bandwidth of the kernel on the predictions"),
    "layer": Key(Choice("logits", "features"), "CORAL: the layer aligned"),
    "margin": Key(POSITIVE, "MDD: the margin gamma"),
    "num_k": Key(POSITIVE_INT, "MCD: generator updates per iteration"),
    "temperature": Key(POSITIVE, "softmax temperature"),
    "delta_r": Key(Number(ge=0), "AFN: norm increase asked at each step"),
    "radius": Key(Nullable(POSITIVE, "stepwise AFN"), "AFN: pull all norms to this radius"),
    "feature_momentum": Key(Nullable(Number(ge=0), "optim.momentum"), "SGD momentum of the feature extractor"),
    "discriminator": Key(WIDTHS, "hidden sizes of the discriminator"),
    "discriminator_ndf": Key(POSITIVE_INT, "width of the map discriminator's first convolution"),
    "discriminator_lr": Key(Number(ge=0), "the discriminator's Adam lr"),
    "discriminator_betas": Key(BETAS, "the discriminator's Adam betas"),
    "adversarial_lr": Key(POSITIVE, "ADDA stage 2: Adam lr"),
    "adversarial_betas": Key(BETAS, "ADDA stage 2: Adam betas"),
    "pretrain_steps": Key(COUNT, "stage 1 length in steps"),
    "init_from": Key(Nullable(Text()), "a finished run directory or checkpoint to start from"),
    "label_smoothing": Key(DROPOUT, "epsilon of the label-smoothed cross-entropy"),
    "pseudo_label_every": Key(Nullable(POSITIVE_INT, "once per epoch of the target set"),
                              "steps between pseudo-label refreshes"),
    "pseudo_label_rounds": Key(COUNT, "hard-label refinement rounds"),
    "fixmatch_threshold": Key(PROBABILITY, "FixMatch: confidence above which a weak view is pseudo-labelled"),
    "fixmatch_align": Key(Boolean(), "AdaMatch: distribution alignment"),
    "fixmatch_relative": Key(Boolean(), "AdaMatch: the threshold relative to the source confidence"),
    "confidence_threshold": Key(PROBABILITY, "mean teacher: confidence above which a target sample counts"),
    "teacher_alpha": Key(Number(ge=0, lt=1, text="a number in [0, 1) (the teacher's EMA decay, e.g. 0.99)"),
                          "mean teacher: EMA decay of the teacher's weights"),
    "teacher_every": Key(POSITIVE_INT, "DIRT-T: steps between teacher refreshes"),
    "average_decay": Key(Number(ge=0, lt=1), "DIRT-T: decay of the weight average"),
    "vat_radius": Key(POSITIVE, "L2 radius of VAT's perturbation"),
    "class_weight_update_every": Key(POSITIVE_INT, "PADA: steps between class-weight updates"),
    "unknown_target": Key(Number(gt=0, lt=1), "OSBP: the unknown probability set on target samples"),
}

BY_GROUP = {"trainer": TRAINER, "optim": OPTIM, "grl": GRL, "backbone": BACKBONE, "data": DATA, "method": METHOD}
SCHEMA: dict[str, Key] = {**TOP, **{f"{group}.{k}": v for group, keys in BY_GROUP.items() for k, v in keys.items()}}


def _leaves(node: DictConfig, prefix: str = ""):
    """(key, value) of every declared-or-not leaf of `node`; declared mappings count as one leaf."""
    for name in node.keys():
        key = f"{prefix}{name}"
        if OmegaConf.is_missing(node, name):
            raise UserError(f"{key} has no value: set it on the command line ({key}=...)")
        value = node[name]
        if isinstance(value, DictConfig) and key not in SCHEMA:
            yield from _leaves(value, key + ".")
        else:
            yield key, value


def leaves(cfg: DictConfig):
    """(full key, value) of every key of the checked groups and the top-level keys."""
    for key in TOP:
        if key in cfg:
            yield key, cfg[key]
    for group in BY_GROUP:
        yield from _leaves(cfg[group], group + ".")


def describe(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)


def check_value(key: str, value) -> None:
    entry = SCHEMA.get(key)
    if entry is None:
        raise UserError(f"{key} is not a key of da-run's config (schema: da_runner/schema.py), "
                        f"got {key}={describe(value)}")
    if not entry.rule.allows(value):
        raise UserError(f"{key} must be {entry.rule.text}, got {describe(value)}")


def check(cfg: DictConfig) -> None:
    """Raise UserError for the first key whose value breaks its rule, then for the first broken rule
    across keys."""
    for key, value in leaves(cfg):
        check_value(key, value)
    for rule in ACROSS_KEYS:
        message = rule(cfg)
        if message:
            raise UserError(message)


def as_override(value) -> str:
    """`value` as the command line writes it (trainer.ema=null, backbone.label_head=[100,100])."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":")).replace('"', "")


def help_text(cfg: DictConfig) -> str:
    """Every key of `cfg` as an override with its current value, the rule it must follow and what it does:
    the keys section of `da-run --help`."""
    lines = []
    for key, value in leaves(cfg):
        entry = SCHEMA.get(key)
        if entry is not None:
            lines.append(f"  {key}={as_override(value)}\n      {entry.rule.text}; {entry.doc}")
    return "\n".join(lines)


# --- rules across keys: each returns the message of the broken rule, or None ---

def _select_is_a_validator(cfg):
    if cfg.trainer.select not in cfg.trainer.validators:
        return (f"trainer.select must be one of trainer.validators ({', '.join(cfg.trainer.validators)}), "
                f"got {cfg.trainer.select!r}")


def _ema_select_needs_ema(cfg):
    if cfg.trainer.ema_select and cfg.trainer.ema is None:
        return "trainer.ema_select=true needs a weight average to select by: set trainer.ema (e.g. 0.999)"


def _init_from_given(cfg):
    if "init_from" in cfg.method and not cfg.method.init_from and not cfg.resume:
        return (f"method={cfg.method.name} starts from a finished run: set method.init_from=<its run directory or "
                "a checkpoint file>")


def _segmentation_pairs(cfg):
    if cfg.data.get("task") != "segmentation":
        return None
    # In-memory augmentation moves pixels the label maps would not follow; file-backed pairs transform
    # image and map together (data.joint_augment), with crops and flips only.
    augment = cfg.data.get("augment") or "none"
    allowed = ("none", "weak") if cfg.data.get("joint_augment", False) else ("none",)
    if augment not in allowed:
        return (f"data.augment={augment} is not supported on data={cfg.data.get('name')} (a segmentation pair); use "
                f"data.augment={' or '.join(allowed)}")
    if cfg.data.get("source_classes") is not None or cfg.data.get("target_classes") is not None:
        return ("data.source_classes / data.target_classes select classes of classification pairs; a segmentation "
                "pair labels every pixel and keeps all its classes")


def _crop_within_resize(cfg):
    if "image_size" in cfg.data and cfg.data.resize < cfg.data.image_size:
        return (f"data.resize must be >= data.image_size (the crop is taken from the resized image), got "
                f"{cfg.data.resize!r} < {cfg.data.image_size!r}")


def _backbone_initial_weights(cfg):
    """The initial weights named exist (a local file, a torchvision weights entry, a timm model)."""
    from da_runner.nn.backbones import TORCHVISION_RESNETS, check_timm_model, local_weights_file, torchvision_weights

    backbone = cfg.backbone
    if backbone.get("weights") is not None:
        local_weights_file(backbone.weights)
    if backbone.get("pretrained", False) and not backbone.get("weights") and backbone.name in TORCHVISION_RESNETS:
        torchvision_weights(backbone.name, str(backbone.get("pretrained_tag", "DEFAULT")))
    if backbone.name == "timm":
        check_timm_model(backbone.get("model"))


ACROSS_KEYS = [_select_is_a_validator, _ema_select_needs_ema, _init_from_given, _segmentation_pairs,
               _crop_within_resize, _backbone_initial_weights]

