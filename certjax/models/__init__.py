"""Model families, found by name (`config.model.name`).

A family is a module here exporting `THREAT_MODEL` ("linf" or "l2") and `build(model_config, num_classes)`
returning a Flax module whose `apply(variables, images, p, train=...)` gives `(logits, logit_scale)`.
Optional hooks: `recalibrates_statistics(model_config)` (recompute running means before evaluation) and
`certificate_bounds(model, variables)` -> dict(variables=extra collections for evaluation,
pair_lipschitz=[C, C]
bound of each margin's Lipschitz constant, assumed_pair_lipschitz=the bound the architecture promises,
report=measured figures, optionally input_error_gain=how much the network can amplify an error of its
input, default 1); l_inf families without it use the constant 2.
Nothing outside the family's module and its config file branches on the family name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "linf_dist": "certjax.models.linf_dist",
    "sortnet": "certjax.models.sortnet",
    "lot": "certjax.models.lot",
    "liresnet": "certjax.models.liresnet",
    "liresnet_pp": "certjax.models.liresnet_pp",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; valid: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
