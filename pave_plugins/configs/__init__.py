"""Hydra configs shipped with pave_plugins (found by ``hydra_plugins.pave_plugins``).

All configs live in a ``pave/`` subgroup (``method/pave/*.yaml``, ``modelpool/pave/*.yaml``)
because FusionBench's own config folder comes first on the search path and would shadow a clash.
"""
