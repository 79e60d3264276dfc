"""The projector catalog (``registry``): every module below registers its projectors."""
from vsrllm_jax.models.projectors import (adapters, attention_family, conv_abstractor,  # noqa: F401
                                          linear, mlp, moe, multiscale_contrastive, pooling,
                                          query, text_aware)
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput
from vsrllm_jax.models.projectors.registry import (build, config_fields, get_class, loss_names,
                                                   names, register)

__all__ = ["Projector", "ProjectorOutput", "build", "config_fields", "get_class", "loss_names",
           "names", "register"]
