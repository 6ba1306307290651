"""matplotlib for the benchmarks' figures, drawn to files: `pyplot()` is None where it is not installed
(`pip install -e ".[benchmarks]"`), and the benchmarks then write their tables only."""


def pyplot():
    """`matplotlib.pyplot` with the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
