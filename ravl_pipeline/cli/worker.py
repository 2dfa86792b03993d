"""``ravl worker``: a Celery worker that executes the pipeline's steps when
runs use the Celery executor (``RAVL_EXECUTOR=celery``).

Start one or more on any machine that sees the same ``data/`` folder (the
assets read and write there), the same ``params.yaml`` and the same Dagster
instance storage; they take steps from the broker (``RAVL_CELERY_BROKER``,
default ``redis://127.0.0.1:6379/0``). Each task rebuilds the job from the
worker's environment (``RAVL_DATA_DIR``, ``RAVL_PARAMS``) and runs one step;
the model-heavy steps still claim a ``ravl_model`` pool slot from the
instance before they are submitted."""
from __future__ import annotations

import os

from ..definitions import celery_settings

try:
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task
except ImportError:  # pragma: no cover - dagster-celery is a dev dependency
    make_app = None


def register(sub) -> None:
    p = sub.add_parser("worker", help="a Celery worker for runs with RAVL_EXECUTOR=celery", description=__doc__)
    p.add_argument("--concurrency", type=int, default=1,
                   help="steps this worker runs at once, each in its own process (default 1)")
    p.add_argument("--name", default=None, help="worker name (default: ravl-<pid>@<host>)")
    p.add_argument("--loglevel", default="WARNING", help="Celery log level")
    p.set_defaults(func=run)


def celery_app():
    """The Celery application the executor submits to: dagster-celery's
    queue and task, on this deployment's broker and result backend."""
    if make_app is None:
        raise ValueError("ravl worker needs the dagster-celery package (`pip install -e '.[dev]'`)")
    settings = celery_settings()
    app = make_app(CeleryExecutor.for_cli(broker=settings["broker"], backend=settings["backend"]).app_args())
    create_task(app)
    return app


def run(args) -> int:
    name = args.name or f"ravl-{os.getpid()}"
    celery_app().worker_main(["worker", "--prefetch-multiplier=1", f"--concurrency={args.concurrency}",
                              f"--loglevel={args.loglevel}", "-n", f"{name}@%h", "--without-gossip",
                              "--without-mingle"])
    return 0
