"""Training: the loop (loop.py) and what it uses: checkpoint state, signals, fast path, statistics, EMA, report."""
