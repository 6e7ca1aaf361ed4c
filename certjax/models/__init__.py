"""Model families, found by name (`config.model.name`): each module here ending with `FAMILY = Family(...)`.

A family is a record (issue 21, principle 1): its threat model, how to build its network, how to get its
guaranteed Lipschitz bounds for a checkpoint, and its optional hooks, each with its default here. Every
family's network returns one `ModelOutput` (certjax/models/common/output.py), and `certified_logits` runs its
certifying forward. Nothing outside a family's module and its config file branches on the family's name.

`FAMILIES` maps name -> Family. It imports the family modules on first use only, so importing this package
stays cheap. A family outside the package is named by its module, "package.module" (its FAMILY has that
name), and found on first use, so a new family is one model file and one config file wherever they live;
`register_family` adds one explicitly.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from certjax.models.common.output import ModelOutput, certified_logits

__all__ = ["FAMILIES", "Family", "ModelOutput", "certified_logits", "get_family", "register_family"]

THREAT_MODELS = ("linf", "l2")


def no_certificate_bounds(model, variables, image_shape, **options) -> dict:
    """The bounds of a family without measured ones: nothing cached for evaluation, no pair Lipschitz
    matrix (the threat model's constant bound: 2 for 1-Lipschitz l_inf logits), nothing to report."""
    del model, variables, image_shape, options
    return {"variables": {}, "pair_lipschitz": None, "assumed_pair_lipschitz": None, "report": {}}


def never_recalibrates(model_config) -> bool:
    """Running statistics are used as training left them (no family-specific recomputation)."""
    del model_config
    return False


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: what the trainer, the certifier, the API and the audit need to know about it.

    Args:
      name: the family's key in `FAMILIES` (= `config.model.name`, the module's file name for the families
        of this package).
      threat_model: "linf" or "l2": the norm its certificates are in (certjax.certify.margins.THREAT_MODELS).
      build: `build(model_config, num_classes) -> flax.linen.Module` whose
        `apply(variables, images, p, *, train=False, interval=None, certify=False)` returns a `ModelOutput`.
      certificate_bounds: `certificate_bounds(model, variables, image_shape, *, bound_method="exact",
        assumed=True) -> dict` with "variables" (extra
        collections for evaluation), "pair_lipschitz" ([C, C] guaranteed Lipschitz bound of every margin, or
        None for the threat model's constant), "assumed_pair_lipschitz" (the bound the architecture
        promises, or None), "report" (measured figures) and optionally "input_error_gain" (how much the
        network can amplify an error of its normalised input; 1 when absent). image_shape is the batch
        shape (1, H, W, C) of the dataset's images; bound_method names the guaranteed bound of every layer
        (certjax.certify.spectral.BOUND_METHODS) and the report says which ("bound_method"); assumed=False
        may skip the assumed figure (None). Default: `no_certificate_bounds`.
      interval_bounds: whether `apply(..., interval=Interval(lower, upper))` also returns interval bounds of
        the logits (`ModelOutput.logit_bounds`), for IBP certification and training
        (certjax.certify.interval).
      recalibrates_statistics: `recalibrates_statistics(model_config) -> bool`: recompute running means by one
        deterministic pass before evaluation (`apply(..., train=True, dropout=False)` sows "batch_means").
        Default: `never_recalibrates`.
    """

    name: str
    threat_model: str
    build: Callable
    certificate_bounds: Callable = no_certificate_bounds
    interval_bounds: bool = False
    recalibrates_statistics: Callable = never_recalibrates

    def __post_init__(self):
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(
                f"family {self.name!r}: threat_model {self.threat_model!r}; valid: {THREAT_MODELS}"
            )


class _Registry(Mapping):
    """name -> Family: the modules of certjax/models that define FAMILY, imported on first use, and the
    families added by `register_family`."""

    def __init__(self):
        self._modules: list | None = None  # the family modules, imported once
        self._registered: dict[str, Family] = {}

    def _families(self) -> dict[str, Family]:
        if self._modules is None:
            modules = []
            for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
                if not info.ispkg and not info.name.startswith("_"):  # common/: shared pieces
                    modules.append(importlib.import_module(f"{__name__}.{info.name}"))
            self._modules = [m for m in modules if isinstance(vars(m).get("FAMILY"), Family)]
        # each module's FAMILY read at every look-up, so that a test may replace one (monkeypatch)
        found = {family.name: family for family in (vars(m)["FAMILY"] for m in self._modules)}
        return {**found, **self._registered}

    def register(self, family: Family) -> None:
        self._registered[family.name] = family

    def __getitem__(self, name: str) -> Family:
        families = self._families()
        if name not in families and "." in name:
            return self._outside(name)
        return families[name]

    def _outside(self, name: str) -> Family:
        """A family outside certjax: `name` is "package.module" of a module ending with a FAMILY of that name
        (importable: on sys.path / PYTHONPATH), registered on first use."""
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
                raise  # the module exists but something it imports does not: say so
            raise KeyError(name) from error
        family = vars(module).get("FAMILY")
        if not isinstance(family, Family) or family.name != name:
            raise KeyError(name)
        self.register(family)
        return family

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._families()))

    def __len__(self) -> int:
        return len(self._families())


FAMILIES: Mapping[str, Family] = _Registry()


def register_family(family: Family) -> Family:
    """Add a family defined outside certjax/models (a name already taken is replaced).

    Args:
      family: the record, e.g. the FAMILY of a module in another package.

    Returns:
      The family, so that a module can write `FAMILY = register_family(Family(...))`.
    """
    if not isinstance(family, Family):
        raise TypeError(f"register_family needs a Family record, got {type(family).__name__}")
    FAMILIES.register(family)
    return family


def get_family(name: str) -> Family:
    """The family record named `name`.

    Args:
      name: `config.model.name`.

    Returns:
      Its Family; a ValueError naming the valid ones if there is none.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[name]
