"""Files on disk: atomic writes, delta files (LoRA / diff), exported models."""
