"""One Trajectory interface (``interface``) that LoRA (``lora``) and full-parameter (``full``) runs implement, and
``opening``, which tells them apart from the folder."""
