"""Data sets, preprocessing, tokenization and the input pipeline (see sources.py)."""


def frame_channels(data_cfg) -> int:
  """Channels of a frame: RGB for images (one-frame clips), grayscale for lip videos."""
  return 3 if data_cfg.get("name") == "image_captions" else 1
