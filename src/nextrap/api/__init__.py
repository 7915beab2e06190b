"""The library's entry points: fit, extend, inspect (diagnose), push, fold; the CLI and the RL runner call these."""
