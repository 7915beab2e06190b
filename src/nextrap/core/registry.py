"""The extrapolation methods' names, in one place and with no torch import: ``methods`` implements and validates
them, the command line offers them."""

METHODS: tuple[str, ...] = ("next", "next-paper", "linear", "expo", "relex")
FITTED: tuple[str, ...] = ("next", "next-paper")  # methods that learn a model from the trajectory
