"""Export a trained model for use without certjax's model code:

    python -m certjax.export --workdir runs/lot_s --out lot_s_export/

Writes to --out (a new directory, built beside it and renamed when complete, so never half-written):
- `forward_uint8.jax`, `forward_float32.jax`: serialized `jax.export` artifacts of the certifying forward
  (`Certifier._eval_step`, the one `--mode=evaluate` and `certjax.restore` run) for uint8 [B, 32, 32, 3]
  images in [0, 255] and float32 ones in [0, 1], B = the checkpoint's `train.eval_batch_size`. Inputs: the
  weights (as a flat list) and the images; outputs: logits [B, C] float32 and the per-example bound of
  their rounding error [B]. Lowered for CPU and CUDA (`platforms=("cpu", "cuda")`).
- `ibp_uint8.jax`, `ibp_float32.jax` (the l_inf families with `certify.method` both | ibp only): the interval
  bound step (`Certifier._ibp_step`, the one `certjax.restore` certifies the prediction with). Inputs: the
  weights, the images, the classes to certify [B] int32 and the box radius in normalised units (float32);
  output: [B] bool, the class certified by interval bounds over the box.
- `weights.npz`: the flat list of arrays (parameters, model state, the per-checkpoint cached weights and
  bounds of `certificate_bounds`), `arr_0` ... in order.
- `manifest.json`: family, threat model, eps, certify method, mean / std, the pixel-to-normalised eps scale,
  input shape, batch size, number of classes, the pairwise Lipschitz bounds of the margins (l_2; the l_inf
  families use the constant 2), the Lipschitz report, the artifacts by program and image dtype, the certjax
  and jax versions and the SHA-256 of every other file; its own content is hashed too.

`certjax.load_exported(D)` (certjax/inference/exported.py) certifies with it using jax and numpy only, with
the API's fields and numbers (tests/test_export.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from certjax.inference.exported import FORMAT_VERSION, manifest_bytes, sha256_file
from certjax.progress import tracked

PLATFORMS = ("cpu", "cuda")
IMAGE_DTYPES = ("uint8", "float32")
ARTIFACTS = {dtype: f"forward_{dtype}.jax" for dtype in IMAGE_DTYPES}  # the certifying forward
# the interval bound step, for the families with certify.method both | ibp
IBP_ARTIFACTS = {dtype: f"ibp_{dtype}.jax" for dtype in IMAGE_DTYPES}


def sealed_manifest_bytes(manifest: dict) -> bytes:
    body = manifest_bytes(manifest)
    return manifest_bytes({"manifest": manifest, "manifest_sha256": hashlib.sha256(body).hexdigest()})


def _programs(model):
    """{program: (function of (weights, images, ...), its arguments after the images as ShapeDtypeStructs)}
    and the flat weights: the certifying forward, and the interval bound step where the model certifies by
    interval bounds too, each as the API calls it (certjax.inference.restore)."""
    exp = model._exp
    variables = {**model._model_state, **model._bounds["variables"]}
    gain = np.float32(model._bounds.get("input_error_gain", 1.0))
    leaves, treedef = jax.tree.flatten((model._params, variables))

    def forward(weights, images):
        params, state = jax.tree.unflatten(treedef, weights)
        return exp.certifier._eval_step(params, state, {"image": images}, gain)

    def interval(weights, images, classes, eps_normalised):
        params, state = jax.tree.unflatten(treedef, weights)
        return exp.certifier._ibp_step(params, state, {"image": images, "label": classes}, eps_normalised)

    programs = {"forward": (forward, ())}
    if exp.certify_method != "margin":
        classes = jax.ShapeDtypeStruct((model.batch_size,), jnp.int32)
        programs["ibp"] = (interval, (classes, jax.ShapeDtypeStruct((), jnp.float32)))
    return programs, [np.asarray(leaf) for leaf in leaves]


def export_model(model, out_dir: str, platforms=PLATFORMS) -> dict:
    """Write the export of a restored model to a new directory.

    Args:
      model: a restored model (`certjax.inference.restore.CertifiedModel`).
      out_dir: the directory to create (never overwritten).
      platforms: what the artifacts are lowered for.
    Returns:
      The manifest.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(
            f"{out_dir} exists: pass a new --out directory (an export is never overwritten)"
        )
    exp = model._exp
    programs, leaves = _programs(model)
    weight_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    names = {"forward": ARTIFACTS, "ibp": IBP_ARTIFACTS}
    batch = model.batch_size
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
    try:
        artifacts = [(p, dtype, name) for p in programs for dtype, name in names[p].items()]
        for program, dtype, name in tracked(artifacts, "export", unit="programs"):
            function, extra_specs = programs[program]  # one lowering per program and input dtype
            images = jax.ShapeDtypeStruct((batch, *exp.image_shape), jnp.dtype(dtype))
            exporter = jax.export.export(jax.jit(function), platforms=tuple(platforms))
            exported = exporter(weight_specs, images, *extra_specs)
            with open(os.path.join(staging, name), "wb") as f:
                f.write(exported.serialize())
        np.savez(os.path.join(staging, "weights.npz"), *leaves)
        manifest = _manifest(model, staging, platforms, {p: names[p] for p in programs}, len(leaves))
        with open(os.path.join(staging, "manifest.json"), "wb") as f:
            f.write(sealed_manifest_bytes(manifest))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _manifest(model, staging: str, platforms, artifacts: dict, num_weights: int) -> dict:
    """The manifest of the files written to staging (see the module docstring)."""
    import certjax

    info = model.info
    return {
        "format": FORMAT_VERSION,
        "family": info["family"],
        "variant": info["variant"],
        "threat_model": info["threat_model"],
        "eps": info["eps"],
        "certify_method": model._exp.certify_method,
        "input_scale": float(model._exp.input_scale),  # pixel eps -> normalised (the ibp program's radius)
        "mean": info["mean"],
        "std": info["std"],
        "dataset": info["dataset"],
        "num_classes": info["num_classes"],
        "input_shape": info["input_shape"],
        "batch_size": model.batch_size,
        "pair_lipschitz": info["pair_lipschitz"],
        "lipschitz": _jsonable(info["lipschitz"]),
        "checkpoint": {"workdir": info["workdir"], "which": info["checkpoint"], "step": info["step"]},
        "platforms": list(platforms),
        "artifacts": artifacts,
        "num_weights": num_weights,
        "certjax_version": certjax.__version__,
        "jax_version": jax.__version__,
        "sha256": {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))},
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m certjax.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", required=True, help="run directory with checkpoints (launch.py --workdir)"
    )
    parser.add_argument("--out", required=True, help="new directory for the export")
    parser.add_argument("--checkpoint", default="best", help="best, last or a step (default best)")
    args = parser.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines
    from certjax.inference.restore import restore

    try:
        model = restore(args.workdir, args.checkpoint)
        manifest = export_model(model, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"certjax: export error: {error}", file=sys.stderr)
        return 2
    print(
        f"exported {manifest['family']} step {manifest['checkpoint']['step']} ({manifest['threat_model']}, "
        f"eps {manifest['eps']:.5f}, platforms {', '.join(manifest['platforms'])}) "
        f"to {os.path.abspath(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
