"""The PyTorch side: torch modules that mirror our flax modules, for exporting trained models.

Each module here has the attribute names of its flax counterpart (an
``nn.ModuleList`` named like the scan for a scanned stack), so the state
dicts written by ``vsrllm_jax.formats.torch_layout`` load into them with
``strict=True`` and give the same outputs. This package imports torch and
numpy only, never jax or flax: an exported model runs where JAX is absent.
"""
