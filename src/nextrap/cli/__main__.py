"""``python -m nextrap.cli``: the ``nextrap`` command (torchrun's ``--no-python`` runs the console script instead)."""

from nextrap.cli import main

main()
