"""The report's pictures (pretrain.report) at the end of training, for trackers that show pictures.

The trainer does not write the report (`pretrain report` does, into the run directory): a user who
follows a run in W&B or MLflow should still find its loss matrix and curves there when it ends, without
a second command. They are drawn from metrics.json into a temporary directory and logged; the run
directory is left as it was.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pretrain.logs import log
from pretrain.trackers.logger import MetricsLogger


def log_report_pictures(logger: MetricsLogger, run_dir: Path, step: int) -> None:
    if not logger.takes_pictures:
        return
    from pretrain.report import ReportError, load_metrics, report_title, write_pictures

    try:
        data = load_metrics(run_dir)
    except ReportError as err:
        log.warning("no report pictures for the trackers: %s", err)
        return
    if not any(data["eval_loss"]):  # evaluation left to `pretrain eval` jobs: nothing to draw yet
        log.info("no evaluated rows yet: the trackers get no report pictures")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_pictures(data, tmp, report_title(data, run_dir)):
            logger.picture(f"report/{path.stem}", path, step)
