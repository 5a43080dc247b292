"""Tools outside the ``prerl`` package (nothing in ``src/prerl`` imports them): the GPU memory
estimator (``memory_estimate``) and its mapping from Hydra configs (``estimate_config``)."""
