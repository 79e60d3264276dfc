"""tfds builders of local data sets: LRS3 as VSP-LLM prepares it, image captions."""
