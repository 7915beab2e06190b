"""The one exception type the library raises for bad input; the CLI turns it into a one-line error."""


class NextrapError(Exception):
    """A problem with the user's input or environment, worded so it can be printed as is."""
