"""What every family's network returns (`ModelOutput`), and its certifying forward (`certified_logits`).

Issue 21, principle 2: one output type, whose fields say what they are, instead of tuples whose second element
meant a logit scale, a [C, C] pair bound or a placeholder depending on the family; and a certifying forward
asked for explicitly (`certify=True`), not switched on by making a collection mutable.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from certjax.certify.interval import Interval

ROUNDING = "rounding"  # the collection in which a certifying forward's layers sow their rounding bounds


@flax.struct.dataclass
class ModelOutput:
    """One forward pass of a family's network.

    logits: [B, C] raw logits (what certificates are about).
    logit_scale: scalar multiplying the logits in the cross-entropy term of the loss (the l_inf families'
      learnable scale; 1 for LOT), None where the family has none.
    pair_bound: [C, C] training-time Lipschitz estimate of every margin z_i - z_j (LiResNet, LiResNet++: the
      power-iteration K times ||w_i - w_j||), differentiable, for the EMMA / GloRo losses; None otherwise.
    logit_bounds: Interval of the logits over the input interval, when `interval=` was given (l_inf).
    """

    logits: jax.Array
    logit_scale: jax.Array | None = None
    pair_bound: jax.Array | None = None
    logit_bounds: Interval | None = None


def certified_logits(model, variables, images):
    """The certifying forward of a family's network: logits and a bound of their rounding error.

    Runs `model.apply(variables, images, p=inf, train=False, certify=True)`, in which each layer sows a bound
    of its own rounding error into the "rounding" collection (LOT and the LiResNets run their body in float64
    and sow the bound of that forward); the sum of the sown bounds bounds every logit's absolute error.

    Args:
      model: a family's flax module (`Family.build(...)`).
      variables: the checkpoint's collections plus those of the family's `certificate_bounds` ("variables").
      images: normalised images [B, H, W, C], float32.

    Returns:
      (logits float32 [B, C], per-example bound of every logit's rounding error float32 [B]; zeros for a
      network that sows none). The error of the input's own normalisation is the caller's to add
      (certjax.certify.rounding.normalisation_error_linf / _l2).
    """
    output, aux = model.apply(
        variables, images, jnp.float32(jnp.inf), train=False, certify=True, mutable=[ROUNDING]
    )
    errors = jax.tree.leaves(aux.get(ROUNDING, {}))
    if not errors:
        return output.logits, jnp.zeros(output.logits.shape[:1], jnp.float32)
    return output.logits, sum(errors)
