"""The packaged configs: ``common`` builds the base, every other module is a preset
with a ``get_config(arg)``. ``packaged.define_config_flag`` lets ``--config`` name
one of them from anywhere (``contrastive``, ``configs/contrastive.py``) or take a path."""
