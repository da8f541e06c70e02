"""matplotlib, optional: the plots of bench, train and scaling are skipped (with a note) where it is not installed
(``pip install fastlm[plots]``), and nothing else is lost."""
from __future__ import annotations

import sys


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or None, after a note on stderr naming ``what`` is skipped, when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed: {what} skipped (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
