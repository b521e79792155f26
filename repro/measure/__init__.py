"""Measurements of models: complexity (params, multiply-adds), paper-row checks (verify),
throughput (timing, cpuload, fuse, steps, machine facts)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
