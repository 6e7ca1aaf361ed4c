"""The kernels of certjax's hot ops: the l_p-dist op (jnp path, Pallas kernels and kernel="auto"'s
choice, certjax.kernels.linf_dist), the sort neuron, the fast-gradient convolution and LOT's orthogonal
convolution; shared/DESIGN.md, "Kernels"."""
