"""Pieces that several model families share, under public names: `layers` (mean shift, MaxMin, the
normalised linear head, the rounding allowances), `lipschitz` (LiResNet's conv / dense maps, power iteration
and Lipschitz layers), `cholesky` (LiResNet++'s orthogonalisation), `chord` (LiResNet++'s Cholesky
neck and CHORD layers), `lot_certify` (LOT's float64 certifying forward) and `solve` (batched solves that
cannot deadlock XLA:CPU's pool)."""
