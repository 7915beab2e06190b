"""Integrations with training frameworks, each in its own module so that a framework is imported only by the
module that needs it (``nextrap.integrations.trl``: TRL / Hugging Face Trainer, the ``trl`` extra)."""
