"""The process nextrap runs in: threads and signals, progress reporting, torch.distributed ranks."""
