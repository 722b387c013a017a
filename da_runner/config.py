"""Checks of the composed config, so bad input fails at once with a message naming the key."""

import numbers

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from da_runner.data.augment import LEVELS as AUGMENT_LEVELS
from da_runner.data.classes import SETTINGS
from da_runner.errors import UserError
from da_runner.nn.backbones import TORCHVISION_RESNETS, check_timm_model, local_weights_file, torchvision_weights
from da_runner.schedules import GRL_SCHEDULES, LR_SCHEDULES
from da_runner.validators import VALIDATORS

# Keys a resumed run takes from the new command line instead of the checkpoint: they change where
# and how the run is shown, never what it computes.
RUNTIME_KEYS = ("resume", "device", "trainer.progress")
PRECISIONS = ("fp32", "bf16", "fp16")  # trainer.precision (trainer.AUTOCAST_DTYPES)


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Raise UserError for the first invalid key, naming the key, the rule and the value given."""
    positive_ints = ["trainer.max_steps", "trainer.batch_size", "trainer.eval_every", "trainer.ckpt_every",
                     "trainer.log_every", "trainer.eval_batch_size"]
    for key in positive_ints:
        value = _get(cfg, key)
        if not _is_int(value) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    for key in ["optim.lr"]:
        value = _get(cfg, key)
        if not _is_number(value) or value <= 0:
            raise UserError(f"{key} must be a number > 0, got {value!r}")
    for key in ["optim.weight_decay"]:
        value = _get(cfg, key)
        if not _is_number(value) or value < 0:
            raise UserError(f"{key} must be a number >= 0, got {value!r}")
    known = ", ".join(VALIDATORS)
    names = list(_get(cfg, "trainer.validators"))
    unknown = [n for n in names if n not in VALIDATORS]
    if unknown or not names:
        raise UserError(f"trainer.validators must be a non-empty list of {known}, got {names}")
    if cfg.trainer.select not in names:
        raise UserError(f"trainer.select must be one of trainer.validators ({', '.join(names)}), "
                        f"got {cfg.trainer.select!r}")
    if cfg.trainer.get("precision", "fp32") not in PRECISIONS:
        raise UserError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {cfg.trainer.precision!r}")
    if not isinstance(cfg.trainer.get("channels_last", False), bool):
        raise UserError(f"trainer.channels_last must be true or false, got {cfg.trainer.channels_last!r}")
    if not isinstance(cfg.trainer.get("compile", False), bool):
        raise UserError(f"trainer.compile must be true or false, got {cfg.trainer.compile!r}")
    if not isinstance(cfg.trainer.get("sync_bn", False), bool):
        raise UserError(f"trainer.sync_bn must be true or false, got {cfg.trainer.sync_bn!r}")
    augment = cfg.data.get("augment")
    if augment is not None and augment not in AUGMENT_LEVELS:
        raise UserError(f"data.augment must be one of {', '.join(AUGMENT_LEVELS)}, got {augment!r}")
    ema = cfg.trainer.get("ema")
    if ema is not None and (not _is_number(ema) or not 0 < ema < 1):
        raise UserError(f"trainer.ema must be null (off) or a decay in (0, 1), e.g. 0.999, got {ema!r}")
    ema_select = cfg.trainer.get("ema_select", False)
    if not isinstance(ema_select, bool):
        raise UserError(f"trainer.ema_select must be true or false, got {ema_select!r}")
    if ema_select and ema is None:
        raise UserError("trainer.ema_select=true needs a weight average to select by: set trainer.ema (e.g. 0.999)")
    if not _is_int(cfg.trainer.validation_samples) or cfg.trainer.validation_samples < 2:
        raise UserError(f"trainer.validation_samples must be an integer >= 2, got {cfg.trainer.validation_samples!r}")
    for key, value in cfg.method.items():  # the loss weights and gradient scales of every method
        if (key.endswith(("_weight", "_scale")) or key == "trade_off") and (not _is_number(value) or value < 0):
            raise UserError(f"method.{key} must be a number >= 0, got {value!r}")
    _validate_stages(cfg.method)
    for key in ("fixmatch_threshold", "confidence_threshold"):  # FixMatch's and mean teacher's
        threshold = cfg.method.get(key)
        if threshold is not None and (not _is_number(threshold) or not 0 < threshold <= 1):
            raise UserError(f"method.{key} must be a probability in (0, 1], got {threshold!r}")
    for key in ("fixmatch_align", "fixmatch_relative"):
        if not isinstance(cfg.method.get(key, False), bool):
            raise UserError(f"method.{key} must be true or false, got {cfg.method[key]!r}")
    alpha = cfg.method.get("teacher_alpha")  # mean teacher's EMA decay; 1 would freeze the teacher at its start
    if alpha is not None and (not _is_number(alpha) or not 0 <= alpha < 1):
        raise UserError(f"method.teacher_alpha must be a number in [0, 1) (the teacher's EMA decay, e.g. 0.99), "
                        f"got {alpha!r}")
    if "init_from" in cfg.method and not cfg.method.init_from and not cfg.resume:
        raise UserError(f"method={cfg.method.name} starts from a finished run: set method.init_from=<its run "
                        "directory or a checkpoint file>")
    d_lr, ndf = cfg.method.get("discriminator_lr"), cfg.method.get("discriminator_ndf")  # advent's discriminator
    if d_lr is not None and (not _is_number(d_lr) or d_lr < 0):
        raise UserError(f"method.discriminator_lr must be a number >= 0, got {d_lr!r}")
    if ndf is not None and (not _is_int(ndf) or ndf <= 0):
        raise UserError(f"method.discriminator_ndf must be a positive integer, got {ndf!r}")
    if cfg.data.get("task", "classification") not in ("classification", "segmentation"):
        raise UserError(f"data.task must be classification or segmentation, got {cfg.data.task!r}")
    if cfg.data.get("task") == "segmentation":
        # In-memory augmentation moves pixels the label maps would not follow; file-backed pairs transform
        # image and map together (data.joint_augment), with crops and flips only.
        allowed = ("none", "weak") if cfg.data.get("joint_augment", False) else ("none",)
        if (augment or "none") not in allowed:
            raise UserError(f"data.augment={augment} is not supported on data={cfg.data.get('name')} (a segmentation "
                            f"pair); use data.augment={' or '.join(allowed)}")
        if cfg.data.get("source_classes") is not None or cfg.data.get("target_classes") is not None:
            raise UserError("data.source_classes / data.target_classes select classes of classification pairs; a "
                            "segmentation pair labels every pixel and keeps all its classes")
    radius = cfg.method.get("vat_radius")
    if radius is not None and (not _is_number(radius) or radius <= 0):
        raise UserError(f"method.vat_radius must be a number > 0, got {radius!r}")
    if not _is_number(cfg.grl.hi):
        raise UserError(f"grl.hi must be a number, got {cfg.grl.hi!r}")
    if cfg.grl.name not in GRL_SCHEDULES:
        raise UserError(f"grl.name must be one of {', '.join(GRL_SCHEDULES)}, got {cfg.grl.name!r}")
    if cfg.optim.schedule not in LR_SCHEDULES:
        raise UserError(f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.optim.schedule!r}")
    if cfg.grl.name == "warm_start" and (not _is_number(cfg.grl.max_iters) or cfg.grl.max_iters <= 0):
        raise UserError(f"grl.max_iters must be a number > 0, got {cfg.grl.max_iters!r}")
    ramp_steps = cfg.grl.get("ramp_steps")
    if ramp_steps is not None and (not _is_int(ramp_steps) or ramp_steps <= 0):
        raise UserError(f"grl.ramp_steps must be null or a positive integer, got {ramp_steps!r}")
    for key in ("gamma", "decay", "power"):
        value = cfg.optim.get(key, 0.0)
        if not _is_number(value) or value < 0:
            raise UserError(f"optim.{key} must be a number >= 0, got {value!r}")
    for group, value in (cfg.optim.get("lr_mult") or {}).items():
        if not _is_number(value) or value < 0:
            raise UserError(f"optim.lr_mult.{group} must be a number >= 0, got {value!r}")
    for group, value in (cfg.optim.get("group_momentum") or {}).items():
        if value is not None and (not _is_number(value) or value < 0):
            raise UserError(f"optim.group_momentum.{group} must be null or a number >= 0, got {value!r}")
    bottleneck = cfg.backbone.get("bottleneck") or {}
    width = bottleneck.get("width")
    if width is not None and (not _is_int(width) or width <= 0):
        raise UserError(f"backbone.bottleneck.width must be null or a positive integer, got {width!r}")
    for key, value in (("backbone.bottleneck.dropout", bottleneck.get("dropout", 0.0)),
                       ("backbone.label_head_dropout", cfg.backbone.get("label_head_dropout", 0.0)),
                       ("backbone.domain_head_dropout", cfg.backbone.get("domain_head_dropout", 0.0))):
        if not _is_number(value) or not 0 <= value < 1:
            raise UserError(f"{key} must be a number in [0, 1), got {value!r}")
    for key, value in (("backbone.bottleneck.relu", bottleneck.get("relu", True)),
                       ("backbone.label_head_weight_norm", cfg.backbone.get("label_head_weight_norm", False))):
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
    validate_backbone(cfg.backbone)
    momentum = cfg.method.get("feature_momentum")
    if momentum is not None and (not _is_number(momentum) or momentum < 0):
        raise UserError(f"method.feature_momentum must be null or a number >= 0, got {momentum!r}")
    _validate_data(cfg.data)
    if not _is_int(cfg.seed):
        raise UserError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise UserError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if not isinstance(cfg.resume, bool):
        raise UserError(f"resume must be true or false, got {cfg.resume!r}")


def _validate_stages(method: DictConfig) -> None:
    """The keys of two-stage and pseudo-labelling methods (ADDA, SHOT), where a method has them."""
    for key, lowest in (("pretrain_steps", 0), ("pseudo_label_rounds", 0)):
        value = method.get(key)
        if key in method and (not _is_int(value) or value < lowest):
            raise UserError(f"method.{key} must be an integer >= {lowest}, got {value!r}")
    every = method.get("pseudo_label_every")
    if every is not None and (not _is_int(every) or every <= 0):
        raise UserError(f"method.pseudo_label_every must be null (once per epoch of the target training set) or a "
                        f"positive integer, got {every!r}")
    smoothing = method.get("label_smoothing", 0.0)
    if not _is_number(smoothing) or not 0 <= smoothing < 1:
        raise UserError(f"method.label_smoothing must be a number in [0, 1), got {smoothing!r}")


def validate_backbone(backbone: DictConfig) -> None:
    """The initial-weights keys of every backbone, and the model keys of torchvision's and timm's."""
    pretrained, weights = backbone.get("pretrained", False), backbone.get("weights")
    if not isinstance(pretrained, bool):
        raise UserError(f"backbone.pretrained must be true or false, got {pretrained!r}")
    if weights is not None:
        local_weights_file(weights)
    if pretrained and not weights and backbone.name in TORCHVISION_RESNETS:
        torchvision_weights(backbone.name, str(backbone.get("pretrained_tag", "DEFAULT")))
    if backbone.name == "timm":
        check_timm_model(backbone.get("model"))
        if not isinstance(backbone.get("kwargs") or {}, (dict, DictConfig)):
            raise UserError(f"backbone.kwargs must be a mapping of timm.create_model options, got {backbone.kwargs!r}")


def _validate_data(data: DictConfig) -> None:
    """The keys that data configs share (the builders check their dataset names, and
    data/classes.py that the classes named exist)."""
    fraction = data.get("source_val_fraction")
    if fraction is not None and (not _is_number(fraction) or not 0 < fraction < 1):
        raise UserError(f"data.source_val_fraction must be a number in (0, 1), got {fraction!r}")
    for key, forms in (("source_classes", (ListConfig,)), ("target_classes", (ListConfig, DictConfig))):
        value = data.get(key)
        if value is not None and (not isinstance(value, forms) or len(value) == 0):
            shape = "a non-empty list of classes" + (" or a map {target class: source class}" if len(forms) > 1 else "")
            raise UserError(f"data.{key} must be null or {shape}, got {value!r}")
    setting = data.get("setting")
    if setting is not None and setting not in SETTINGS:
        raise UserError(f"data.setting must be null (inferred) or one of {', '.join(SETTINGS)}, got {setting!r}")
    threshold = data.get("unknown_threshold", 0.5)
    if not _is_number(threshold) or not 0 < threshold <= 1:
        raise UserError(f"data.unknown_threshold must be a number in (0, 1], got {threshold!r}")
    if "image_size" not in data:  # the file-backed image pairs have the keys below
        return
    for key in ("image_size", "resize"):
        if not _is_int(data[key]) or data[key] <= 0:
            raise UserError(f"data.{key} must be a positive integer, got {data[key]!r}")
    if data.resize < data.image_size:
        raise UserError(f"data.resize must be >= data.image_size (the crop is taken from the resized image), "
                        f"got {data.resize!r} < {data.image_size!r}")
    if data.num_workers != "auto" and (not _is_int(data.num_workers) or data.num_workers < 0):
        raise UserError(f"data.num_workers must be auto or an integer >= 0, got {data.num_workers!r}")
    if not isinstance(data.pin_memory, bool):
        raise UserError(f"data.pin_memory must be true or false, got {data.pin_memory!r}")


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def differences(a: DictConfig, b: DictConfig, ignore=RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs (ignoring `ignore`)."""
    flat_a = flatten(OmegaConf.to_container(a, resolve=True))
    flat_b = flatten(OmegaConf.to_container(b, resolve=True))
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if k not in ignore and flat_a.get(k) != flat_b.get(k)]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
