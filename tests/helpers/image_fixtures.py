"""What the image-path tests share: a captions folder on disk and perturbed random towers."""
import json

import numpy as np
import torch
from PIL import Image

# Three captions in the synthetic grammar's words (the embedded LLM's tokenizer knows them).
WORDS = ("bin blue at f two now", "lay green by a one soon", "place red in c nine again")


def write_caption_folder(root, size=(40, 48), counts=(("train", 16), ("validation", 8),
                                                      ("test", 8))) -> None:
  """Random RGB PNGs of ``size`` (H, W) + ``captions.jsonl`` (image, caption, split) in
  ``root``; captions cycle through WORDS."""
  rng = np.random.default_rng(0)
  lines = []
  for split, num in counts:
    for i in range(num):
      name = f"{split}_{i}.png"
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / name)
      lines.append(json.dumps(dict(image=name, caption=WORDS[i % 3], split=split)))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
  """Random weights far from the init (LayerNorms not identity, biases nonzero)."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model.eval()
