"""Tracking: the only package that imports mlflow (run tracker, store, parent/child runs for sweeps, runs table).

Other packages import what they need from here: `from gancore.tracking import make_tracker, ...`.

    tracker.py  the Tracker interface, MLflowTracker (batched metrics, images, artifacts), log_to_run
    store.py    which store (URI), reachability, the client, experiments, run info, run tags
    runs.py     reading runs back: list_runs, runs_table
"""

from gancore.tracking.runs import list_runs, runs_table  # noqa: F401
from gancore.tracking.store import check_reachable, open_run_info, open_store, resolve_uri, run_tags  # noqa: F401
from gancore.tracking.tracker import MLflowTracker, NullTracker, Tracker, log_to_run, make_tracker  # noqa: F401
