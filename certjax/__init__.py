"""certjax: certified-robust Lipschitz classifiers in JAX/Flax."""
