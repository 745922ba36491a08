"""Tracking: the only package that imports mlflow (run tracker, store, parent/child runs for sweeps, runs table).

Other packages import what they need from here: `from gancore.tracking import make_tracker, ...`.

    tracker.py  the Tracker interface; MLflowTracker, the recorder (metrics, images, artifacts); log_to_run
    outbox.py   the run dir's on-disk outbox of tracking records (outages) and Delivery of a record to the store
    sender.py   Sender (the background thread: queue, batching, backoff, outage state); sync_run_dir for jobs/sync.py
    store.py    which store (URI), reachability, the client, experiments, opening a run (new or resumed), run tags
    runs.py     reading runs back: list_runs, runs_table, compare_runs / compare_table (two runs side by side),
                metric_history
    models.py   a finished run's generator as an MLflow model (runs:/RUN_ID/generator): log_generator_model, load_generator
"""

from gancore.tracking.models import (  # noqa: F401
    Generator,
    is_model_uri,
    load_generator,
    log_generator_model,
)
from gancore.tracking.sender import sync_run_dir  # noqa: F401
from gancore.tracking.runs import compare_runs, compare_table, list_runs, metric_history, runs_table  # noqa: F401
from gancore.tracking.store import (  # noqa: F401
    check_reachable,
    open_run_info,
    open_store,
    resolve_uri,
    run_tags,
)
from gancore.tracking.tracker import (  # noqa: F401
    MLflowTracker,
    NullTracker,
    Tracker,
    log_to_run,
    make_tracker,
)
