r"""Image captioning: a frozen CLIP / SigLIP vision tower, a projector, a frozen LLM.

  python -m vsrllm_jax.train --workdir=/ckpt/captions --config=configs/image_caption.py:\
manifest_dir=/data/my_images,tower=/models/clip-vit-base-patch16,llm=/models/Llama-3.2-1B

``manifest_dir`` holds the images and ``captions.jsonl`` (one
``{"image": "relative/path.jpg", "caption": "...", "split": "train"}`` per
line; splits train / validation / test). The tower's ``config.json`` (and
``preprocessor_config.json``) set the image size, resize mode and pixel
normalisation; features are the hidden states of ``feature_layer`` (LLaVA:
-2 without CLIP's class token), computed once and cached. Images travel as
one-frame clips; ``data.max_frames`` is the tower's token count.
"""
from __future__ import annotations

from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, manifest_dir="", tower="", llm="", projector="mlp", seed=0,
                          steps=5000, feature_layer=-2, drop_cls=True)
  c = common.get_base_config()
  c.seed = args.seed
  c.total_steps = args.steps
  c.data.name = "image_captions"
  c.data.manifest_dir = args.manifest_dir
  c.data.instruction = "Describe this image. Input:"
  c.data.max_instruction_tokens = 24
  c.data.max_label_tokens = 48
  c.encoder = common.ConfigDict(dict(name="vision_tower", path=args.tower,
                                     feature_layer=args.feature_layer, drop_cls=args.drop_cls,
                                     post_layernorm=None))
  c.llm.path = args.llm
  c.llm.tokenizer_path = args.llm
  c.projector = common.ConfigDict(dict(name=args.projector))
  c.decode.max_new_tokens = 48
  if args.tower:
    set_tower_shapes(c)
  return c


def set_tower_shapes(c) -> None:
  """data.image_size / resize_mode / max_frames from the tower's config files."""
  from vsrllm_jax.formats import hf_vision  # pylint: disable=g-import-not-at-top
  tower = hf_vision.read_config(c.encoder.path, feature_layer=c.encoder.feature_layer,
                                        drop_cls=c.encoder.drop_cls)
  c.data.image_size = tower.image_size
  c.data.resize_mode = tower.resize_mode
  c.data.max_frames = tower.num_features     # tokens per image (cached features' length)
  c.data.frame_buckets = (1,)                # raw images: one frame each
