"""Using a trained model (shared/DESIGN.md, "Layout"): `restore` (a checkpoint with its certificate bounds,
certjax.restore), `certify_files` (launch.py --mode=certify), `export` (python -m certjax.export) and
`exported` (certjax.load_exported: certify with jax and numpy only); `images` checks the user's inputs and
`certificates` builds the dict `certify` returns, both shared by the API and the export. This package imports
nothing itself, so that `import certjax.inference.exported` never pulls in flax."""
