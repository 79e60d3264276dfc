"""Every on-disk weight format behind one mapping mechanism (``tensor_map``).

Containers: ``safetensors_io`` (single or sharded), ``torch_pickle`` (through an
allow-list). Formats: ``hf_llm`` and ``hf_vision`` (Hugging Face directories),
``fairseq_avhubert``, ``encoder_dir`` (the compact encoder and any encoder kind
without a format of its own), ``torch_layout`` (projectors and the compact
encoder for PyTorch), and the export bundle's contract (``export_bundle``, no JAX).
This package imports nothing itself, so that the PyTorch side may import
``export_bundle`` without JAX.
"""
