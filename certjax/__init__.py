"""certjax: certified-robust Lipschitz classifiers in JAX/Flax.

`certjax.restore(workdir)` loads a trained model to certify images (certjax/inference/restore.py);
`certjax.load_exported(directory)` loads an exported one with jax and numpy only
(certjax/inference/exported.py).
Both are imported on first use, so that `import certjax.inference.exported` never pulls in flax; `__all__`
and `dir(certjax)` list them all the same.
"""

__version__ = "0.1.0"

# The public API: name -> the module that defines it, imported on first use (module __getattr__, PEP 562).
_LAZY = {
    "restore": "certjax.inference.restore",
    "CertifiedModel": "certjax.inference.restore",
    "load_exported": "certjax.inference.exported",
    "ExportedModel": "certjax.inference.exported",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'certjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
