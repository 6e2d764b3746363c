"""Generic parameter-efficient fine-tuning pieces: LoRA, freezing policies, parameter accounting."""
