"""Pieces that several model families share, under public names: `layers` (mean shift, MaxMin, the
normalised linear head, the rounding allowances), `lipschitz` (LiResNet's conv / dense maps, power iteration
and Lipschitz layers), `cholesky` (LiResNet++'s orthogonalisation) and `lot_certify` (LOT's float64
certifying forward)."""
