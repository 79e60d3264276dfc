"""Tiny random transformers models saved to a directory, as the tests load them."""
import torch
import transformers


def saved_llama(directory, **config) -> transformers.LlamaForCausalLM:
  """A seeded random ``LlamaForCausalLM`` of ``config``, saved to ``directory`` (eval mode)."""
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  hf.save_pretrained(directory)
  return hf
