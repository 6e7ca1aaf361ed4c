"""Model families, found by name (`config.model.name`).

A family is a module here exporting `THREAT_MODEL` ("linf" or "l2") and `build(model_config, num_classes)`
returning a Flax module whose `apply(variables, images, p, train=...)` gives `(logits, logit_scale)`.
Nothing outside the family's module and its config file branches on the family name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "linf_dist": "certjax.models.linf_dist",
    "sortnet": "certjax.models.sortnet",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; valid: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
