"""What a jump is written as: a PEFT adapter, or a Hugging Face model with the jump merged or folded into the base."""
