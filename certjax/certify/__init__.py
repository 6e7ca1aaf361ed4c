"""All certificate math (shared/DESIGN.md, "Certification"): margins and radii per threat model
(`margins`), floating-point rounding named once (`rounding`), interval bounds (`interval`), guaranteed
operator norms (`norms`). Import the module you need; this package re-exports nothing."""
