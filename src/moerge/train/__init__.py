"""Training experts (LoRA with PEFT) and contributor-side steps."""
