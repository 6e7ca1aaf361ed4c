"""certjax: certified-robust Lipschitz classifiers in JAX/Flax.

`certjax.restore(workdir)` loads a trained model to certify images (certjax/inference/restore.py);
`certjax.load_exported(directory)` loads an exported one with jax and numpy only
(certjax/inference/exported.py).
Both are imported on first use, so that `import certjax.inference.exported` never pulls in flax.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("restore", "CertifiedModel"):
        from certjax.inference import restore

        return getattr(restore, name)
    if name in ("load_exported", "ExportedModel"):
        from certjax.inference import exported

        return getattr(exported, name)
    raise AttributeError(f"module 'certjax' has no attribute {name!r}")
