"""The bundled GRPO runner (LoRA via peft), its tasks, and the train -> jump -> train pipeline. Nothing below imports it."""
