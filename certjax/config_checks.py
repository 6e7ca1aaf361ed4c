"""Config validation before any compute: every problem at once, each naming the key and the fix.

A typo in a key (`train.epoch`), a ratio outside [0, 1], a batch that the devices cannot split evenly or a
negative radius would otherwise surface minutes later (after the data is read and the step compiled) as a
shape error or a silently ignored setting. `check_config` runs first in training; launch.py also checks
the `--config.*` override keys against the config file before flags are parsed (ml_collections would stop
with a traceback).
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Iterable

import ml_collections

# Keys the code reads with .get() that a family's get_config may leave out (see evaluate.radii_of).
OPTIONAL_KEYS = frozenset(
    {
        "certify.radii",
        "certify.bound_method",
        "optimizer.lookahead",
        "optimizer.momentum_decay",
        "optimizer.cosine_floor",
    }
)
SUBSET_MODES = ("first", "random")  # data.real_subset_mode: certjax.data.sources.subset_indices
LOOKAHEAD_KEYS = ("alpha", "k", "sync_every_epoch", "enabled")  # what certjax.optim.make_optimizer reads


class ConfigError(ValueError):
    """One or more invalid config values; the message lists each with its fix."""


class ErrorList(list):
    """The messages of the failed checks of one config, each "key: value; the fix"."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def value(self, key: str):
        """config["section.name"], None where the section has no such key."""
        section, name = key.split(".")
        return self.config[section].get(name, None)

    def need(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.append(f"{key}: {message}")

    def one_of(self, key: str, valid) -> None:
        """The value of `key` must be a key of the registry (or an element of the tuple) `valid`."""
        value = self.value(key)
        self.need(value in valid, key, f"{value!r}; use one of {sorted(valid)}")

    def positive_integers(self, keys) -> None:
        for key in keys:
            value = self.value(key)
            self.need(isinstance(value, int) and value >= 1, key, f"{value!r}; must be an integer >= 1")

    def optional_counts(self, keys) -> None:
        """Integers >= 0 where 0 means off / all; an absent key is fine."""
        for key in keys:
            value = self.value(key)
            if value is not None:
                ok = isinstance(value, int) and value >= 0
                self.need(ok, key, f"{value!r}; must be an integer >= 0 (0 = off/all)")


def flat_keys(config, prefix: str = "") -> dict[str, object]:
    """{"train.epochs": 100, ...} for every leaf of a (nested) ConfigDict or dict."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flat_keys(value, path + "."))
        else:
            out[path] = value
    return out


def reference_config(config) -> ml_collections.ConfigDict | None:
    """The family's own get_config(variant) (configs/<family>.py), or None where configs/ is not importable
    (certjax installed without the repository) or the config names no family."""
    family = config.get("family", "")
    if not family:
        return None
    try:
        module = importlib.import_module(f"configs.{family}")
    except ImportError:
        return None
    return module.get_config(config.get("variant", ""))


def unknown_key_errors(keys: Iterable[str], reference, where: str) -> list[str]:
    """One message per key absent from `reference`, with the nearest valid keys."""
    valid = set(flat_keys(reference)) | OPTIONAL_KEYS
    errors = []
    for key in keys:
        if key in valid or any(key.startswith(v + ".") for v in valid):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "no similar key"
        section = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in valid if section and k.startswith(section + "."))
        listing = (
            f" Keys under {section}: {', '.join(s.split('.')[-1] for s in siblings)}." if siblings else ""
        )
        errors.append(f"{key}: no such key in {where} ({hint}).{listing}")
    return errors


def augment_errors(augment, pad_modes) -> list[str]:
    """The crop/flip settings of both sources and RandAugment's (certjax/data/augment.py)."""
    from certjax.data.randaugment import NUM_BINS

    errors = []
    sources = [("augment", augment)]
    generated = augment.get("generated", None)
    if generated is not None:
        if isinstance(generated, (dict, ml_collections.ConfigDict)):
            unknown = sorted(set(generated.keys()) - {"pad", "pad_mode", "flip"})
            if unknown:
                errors.append(f"augment.generated: unknown key(s) {unknown}; valid: pad, pad_mode, flip")
            sources.append(("augment.generated", generated))
        else:
            errors.append(
                f"augment.generated: {generated!r}; None (as the real images) or dict(pad=..., pad_mode=..., "
                "flip=...)"
            )
    for where, settings in sources:
        pad, mode, flip = (settings.get(k, None) for k in ("pad", "pad_mode", "flip"))
        if pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
            errors.append(f"{where}.pad: {pad!r}; must be an integer >= 0")
        if mode is not None and mode not in pad_modes:
            errors.append(f"{where}.pad_mode: {mode!r}; use one of {list(pad_modes)}")
        if flip is not None and not isinstance(flip, bool):
            errors.append(f"{where}.flip: {flip!r}; must be True or False")
    randaugment = augment.get("randaugment", None) or {}
    prob = randaugment.get("prob", 0.0)
    if not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0):
        errors.append(f"augment.randaugment.prob: {prob!r}; the probability per real image must be in [0, 1]")
    num_ops = randaugment.get("num_ops", 2)
    if not (isinstance(num_ops, int) and num_ops >= 1):
        errors.append(f"augment.randaugment.num_ops: {num_ops!r}; must be an integer >= 1 (torchvision: 2)")
    magnitude = randaugment.get("magnitude", 9)
    if not (isinstance(magnitude, int) and 0 <= magnitude < NUM_BINS):
        errors.append(
            f"augment.randaugment.magnitude: {magnitude!r}; a bin in [0, {NUM_BINS - 1}] (torchvision: 9)"
        )
    return errors


def lookahead_errors(spec) -> list[str]:
    """optimizer.lookahead: None (off) or dict(alpha in (0, 1], k >= 0, sync_every_epoch, enabled)."""
    if spec is None:
        return []
    if not isinstance(spec, (ml_collections.ConfigDict, dict)):
        return [
            f"optimizer.lookahead: {spec!r}; use None (no Lookahead) or dict(alpha=0.5, k=6, "
            "sync_every_epoch=True) (LiResNet++: timm's defaults plus a sync at every epoch end)"
        ]
    errors = [
        f"optimizer.lookahead.{key}: no such key; valid: {', '.join(LOOKAHEAD_KEYS)}"
        for key in spec
        if key not in LOOKAHEAD_KEYS
    ]
    alpha, k = spec.get("alpha", 0.5), spec.get("k", 6)
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        errors.append(
            f"optimizer.lookahead.alpha: {alpha!r}; the slow weights' step must be in (0, 1] (timm: 0.5), "
            "e.g. --config.optimizer.lookahead.alpha=0.5"
        )
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
        errors.append(f"optimizer.lookahead.k: {k!r}; an integer >= 0 (steps per sync; 0 = epoch ends only)")
    elif k == 0 and not spec.get("sync_every_epoch", True) and spec.get("enabled", True):
        errors.append(
            "optimizer.lookahead: k = 0 and sync_every_epoch = False never synchronise; set k >= 1, "
            "sync_every_epoch=True, or lookahead.enabled=False"
        )
    return errors


def model_errors(config) -> list[str]:
    """model.name (certjax.models.FAMILIES), model.kernel (certjax.kernels.linf_dist.KERNELS) and the assumed
    figure's estimator (certjax.models.common.lipschitz.ASSUMED_ESTIMATORS)."""
    from certjax.kernels.linf_dist import KERNELS
    from certjax.models import FAMILIES
    from certjax.models.common.lipschitz import ASSUMED_ESTIMATORS

    errors = ErrorList(config)
    errors.one_of("model.name", FAMILIES)
    kernel = config.model.get("kernel", "auto")  # configs saved before the switch have none: "auto"
    errors.need(kernel in KERNELS, "model.kernel", f"{kernel!r}; use one of {sorted(KERNELS)}")
    if "assumed_estimator" in config.model:
        errors.one_of("model.assumed_estimator", ASSUMED_ESTIMATORS)
    if "eval_lanczos_steps" in config.model:
        errors.positive_integers(["model.eval_lanczos_steps"])
    return errors


def loss_errors(config, family) -> list[str]:
    """loss.name (certjax.losses.LOSSES), loss.bound (LOSS_BOUNDS; "ibp" only where the family has interval
    bounds) and loss.eps_train. family: the config's model family, None if model.name is unknown."""
    from certjax.losses import LOSS_BOUNDS, LOSSES

    errors = ErrorList(config)
    errors.one_of("loss.name", LOSSES)
    loss_bound = config.loss.get("bound", None)
    if loss_bound is not None:
        errors.need(
            loss_bound in LOSS_BOUNDS, "loss.bound", f"{loss_bound!r}; use one of {', '.join(LOSS_BOUNDS)}"
        )
        errors.need(
            loss_bound != "ibp" or family is None or family.interval_bounds,
            "loss.bound",
            f"'ibp': model.name {config.model.name!r} has no interval bounds; use loss.bound=lipschitz",
        )
    eps_train = config.loss.get("eps_train", 0.0)
    errors.need(eps_train >= 0, "loss.eps_train", f"{eps_train!r}; must be >= 0")
    return errors


def train_errors(config, device_count: int, process_count: int) -> list[str]:
    """The train section's counts, and a batch that every device and process can take an equal share of."""
    errors = ErrorList(config)
    errors.positive_integers(
        (
            "train.epochs",
            "train.batch_size",
            "train.eval_batch_size",
            "train.log_every_steps",
            "train.eval_every_epochs",
        )
    )
    errors.optional_counts(("train.eval_subset",))
    batch = config.train.batch_size
    if isinstance(batch, int) and batch >= 1:
        for count, what in ((device_count, "devices"), (process_count, "processes")):
            if batch % count:
                fix = count * math.ceil(batch / count)
                errors.append(
                    f"train.batch_size: {batch} does not split evenly over the {count} {what}; use a "
                    f"multiple of {count}, e.g. --config.train.batch_size={fix}"
                )
    return errors


def checkpoint_errors(config) -> list[str]:
    """checkpoint.every_epochs and checkpoint.keep: integers >= 1."""
    errors = ErrorList(config)
    errors.positive_integers(("checkpoint.every_epochs", "checkpoint.keep"))
    return errors


def data_errors(config) -> list[str]:
    """The data section: subsets and limits, the real fraction, the epoch definition, the dataset's name
    (certjax.data.sources.NUM_CLASSES) and its per-channel normalisation."""
    from certjax.data.sources import NUM_CLASSES

    errors = ErrorList(config)
    errors.optional_counts(("data.real_subset", "data.generated_limit", "data.reader_threads"))
    fraction = config.data.real_fraction
    errors.need(
        isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0,
        "data.real_fraction",
        f"{fraction!r}; the real share of every batch must be in [0, 1] (0.3 = the paper's 30 % real)",
    )
    errors += epoch_definition_errors(config)
    errors += label_check_errors(config)
    errors.one_of("data.dataset", NUM_CLASSES)
    errors.one_of("data.real_subset_mode", SUBSET_MODES)
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    errors.need(len(mean) == 3, "data.mean", f"{mean}; one value per RGB channel (3 values)")
    errors.need(
        len(std) == 3 and all(s > 0 for s in std),
        "data.std",
        f"{std}; 3 positive values (one per RGB channel)",
    )
    return errors


def label_check_errors(config) -> list[str]:
    """data.label_report (a path, "" = found beside the generated file) and data.min_label_agreement (a
    fraction of the checking model's clean accuracy, certjax/label_check.py); configs saved before them have
    neither."""
    errors = ErrorList(config)
    report, minimum = errors.value("data.label_report"), errors.value("data.min_label_agreement")
    if report is not None and not isinstance(report, str):
        errors.append(
            f'data.label_report: {report!r}; a path to a JSON report of certjax check-labels, or ""'
        )
    elif report and not config.data.get("generated", ""):
        errors.append(
            f"data.label_report: {report!r} without data.generated: a label report is of a generated file; "
            "set both or neither"
        )
    if minimum is not None:
        number = isinstance(minimum, (int, float)) and not isinstance(minimum, bool)
        errors.need(
            number and 0.0 <= minimum <= 1.0,
            "data.min_label_agreement",
            f"{minimum!r}; a fraction in [0, 1] of the checking model's clean accuracy (default 0.5; 0 = "
            "never stop a run on its labels)",
        )
    return errors


def epoch_definition_errors(config) -> list[str]:
    """data.epoch_definition (certjax.data.pipeline.EPOCH_DEFINITIONS), and a real pass that can end."""
    from certjax.data.pipeline import EPOCH_DEFINITIONS, real_count

    errors = ErrorList(config)
    batch, fraction = config.train.batch_size, config.data.real_fraction
    definition = config.data.get("epoch_definition", "real_set")  # configs saved before it: real_set
    errors.need(
        definition in EPOCH_DEFINITIONS,
        "data.epoch_definition",
        f"{definition!r}; use 'real_set' (ceil(N_real / batch) steps per epoch, the seed) or 'real_pass' "
        "(one pass over the real images at the batch's real count)",
    )
    if (
        definition == "real_pass"
        and config.data.get("generated", "")
        and isinstance(batch, int)
        and isinstance(fraction, (int, float))
        and 0.0 <= fraction <= 1.0
    ):
        errors.need(
            real_count(batch, fraction) > 0,
            "data.epoch_definition",
            f"'real_pass' with data.real_fraction={fraction} and batch {batch}: 0 real images per batch, so "
            "no pass over the real set ever ends; raise data.real_fraction or use 'real_set'",
        )
    return errors


def certify_errors(config, family) -> list[str]:
    """certify.eps, certify.radii and the certification method for the family (None if model.name is
    unknown: the method is then not checked)."""
    from certjax.certify.margins import certify_method

    errors = ErrorList(config)
    eps = config.certify.eps
    errors.need(
        isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0,
        "certify.eps",
        f"{eps!r}; the certified radius must be finite and >= 0 (pixel units, e.g. 8/255 or 36/255)",
    )
    radii = config.certify.get("radii", None) or ()
    errors.need(all(r >= 0 for r in radii), "certify.radii", f"{tuple(radii)}; radii must be >= 0")
    if "bound_method" in config.certify:
        from certjax.certify.spectral import BOUND_METHODS

        errors.one_of("certify.bound_method", BOUND_METHODS)
    if family is not None:
        try:
            certify_method(config, family)
        except ValueError as error:
            errors.append(str(error))
    return errors


def optimizer_errors(config) -> list[str]:
    """optimizer.name and optimizer.schedule (the keys of certjax.optim's OPTIMIZERS and SCHEDULES), the
    learning rate and the non-negative settings, NAdam's betas, Lookahead and the milestones."""
    from certjax.optim import OPTIMIZERS, SCHEDULES

    errors = ErrorList(config)
    opt = config.optimizer
    errors.one_of("optimizer.name", OPTIMIZERS)
    errors.one_of("optimizer.schedule", SCHEDULES)
    errors.need(
        math.isfinite(opt.lr) and opt.lr > 0, "optimizer.lr", f"{opt.lr!r}; the learning rate must be > 0"
    )
    for key in ("weight_decay", "clip_norm", "warmup_epochs", "scale_lr"):
        value = opt.get(key, 0.0)
        errors.need(value >= 0, f"optimizer.{key}", f"{value!r}; must be >= 0")
    # a warmup as long as the run or longer is no error: training scales it to half the run
    # (certjax.optim.schedules.fit_warmup), so a short run of a recipe with a warmup just works
    if opt.get("name") == "nadam":
        errors += nadam_errors(config)
    errors += lookahead_errors(opt.get("lookahead", None))
    milestones = tuple(opt.get("milestones", ()) or ())
    errors.need(
        all(0 < m <= 1 for m in milestones),
        "optimizer.milestones",
        f"{milestones}; fractions of the run in (0, 1]",
    )
    return errors


def nadam_errors(config) -> list[str]:
    """torch.optim.NAdam's ranges for optimizer.b1, b2, eps and momentum_decay."""
    errors = ErrorList(config)
    opt = config.optimizer
    for key in ("b1", "b2"):
        value = opt.get(key, None)
        errors.need(
            isinstance(value, (int, float)) and 0 <= value < 1,
            f"optimizer.{key}",
            f"{value!r}; NAdam's betas must be in [0, 1) (torch's defaults: b1 0.9, b2 0.999)",
        )
    errors.need(opt.get("eps", -1) >= 0, "optimizer.eps", f"{opt.get('eps')!r}; must be >= 0 (torch: 1e-8)")
    decay = opt.get("momentum_decay", 4e-3)
    errors.need(decay >= 0, "optimizer.momentum_decay", f"{decay!r}; must be >= 0 (torch's default 4e-3)")
    return errors


def p_schedule_errors(config) -> list[str]:
    """The l_p schedule (certjax.optim.schedules.schedule_values), where it is enabled."""
    errors = ErrorList(config)
    if "p_schedule" in config and config.p_schedule.get("enabled", False):
        ps = config.p_schedule
        errors.need(
            0 <= ps.start_fraction <= ps.end_fraction <= 1,
            "p_schedule.start_fraction",
            f"start {ps.start_fraction}, end {ps.end_fraction}; need 0 <= start <= end <= 1",
        )
        errors.need(
            ps.p_start >= 1 and ps.p_end >= ps.p_start,
            "p_schedule.p_start",
            f"p_start {ps.p_start}, p_end {ps.p_end}; need 1 <= p_start <= p_end",
        )
    return errors


def check_config(config, *, device_count: int = 1, process_count: int = 1, unknown_keys: bool = True) -> None:
    """Raise ConfigError listing every invalid value of a training config, section by section.

    Args:
      config: the whole training config.
      device_count, process_count: the batch must split evenly over both.
      unknown_keys: also name every key that the family's own get_config(variant) lacks (a typo).

    Returns:
      None if the config is valid.
    """
    from certjax.data.augment import PAD_MODES
    from certjax.models import FAMILIES, get_family

    errors: list[str] = []
    if unknown_keys:
        reference = reference_config(config)
        if reference is not None:
            where = f"configs/{config.family}.py:{config.get('variant', '')}"
            errors += unknown_key_errors(flat_keys(config), reference, where)
    family = get_family(config.model.name) if config.model.name in FAMILIES else None
    errors += model_errors(config)
    errors += loss_errors(config, family)
    errors += train_errors(config, device_count, process_count)
    errors += checkpoint_errors(config)
    errors += data_errors(config)
    errors += augment_errors(config.augment, PAD_MODES)
    errors += certify_errors(config, family)
    errors += optimizer_errors(config)
    errors += p_schedule_errors(config)
    if errors:
        raise ConfigError(f"{len(errors)} invalid config value(s):\n" + "\n".join(f"  - {e}" for e in errors))
