"""The training step's metrics (clu): loss, batch accuracy (all rows and real rows), and the first step whose
loss or gradient was not finite, merged without a host sync per step (certjax/train.py's failure handling)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

NO_STEP = np.iinfo(np.int32).max  # "no non-finite step so far"


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the kept checkpoint."""


@flax.struct.dataclass
class FirstNonFinite(clu_metrics.Metric):
    """The first (0-based) step whose loss or gradient was not finite, NO_STEP if none: merged with min, so
    a window of steps reports its earliest failure without a host sync per step."""

    step: jax.Array

    @classmethod
    def from_model_output(cls, nonfinite_step, **_) -> "FirstNonFinite":
        return cls(step=jnp.asarray(nonfinite_step, jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.minimum(self.step, other.step))

    def reduce(self) -> "FirstNonFinite":
        return type(self)(step=jnp.min(self.step))

    def compute(self) -> jax.Array:
        return self.step


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    # on the real rows of the batch only (LiResNet++'s training log); nan when a batch has none
    accuracy_real: clu_metrics.Average.from_output("accuracy_real")
    first_nonfinite: FirstNonFinite


def batch_accuracies(logits, labels, num_real: int) -> dict[str, jax.Array]:
    """Per-example correctness of the whole batch and of its first num_real (real) rows, float32."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"accuracy": correct, "accuracy_real": correct[:num_real]}
