"""The budgeted streaming engine: rank-1 features, inner products and projections read unit by unit under
--max-memory, for LoRA factors and for full-parameter tensors."""
