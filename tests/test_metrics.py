"""Forgetting metrics on hand-made matrices whose answers are worked out by hand below."""

from __future__ import annotations

import json
import math

import pytest

from pretrain.metrics import MetricsError, accuracy_metrics, forgetting_metrics
from pretrain.trackers import MetricsLogger
from pretrain.trackers.forgetting import log_forgetting
from pretrain.trackers.tensorboard_backend import TensorBoardBackend

DOMAINS = ["code", "docs", "plays", "news"]  # news: evaluated only, never trained
PHASES = ["code", "docs", "plays"]
LOSS = [
    [4.0, 4.0, 4.0, 5.0],  # initial
    [2.0, 3.5, 3.8, 5.1],  # after phase 1 (code)
    [1.7, 2.0, 3.6, 5.2],  # after phase 2 (docs): code still improves
    [3.0, 1.8, 1.5, 5.4],  # after phase 3 (plays): code forgets, docs improves
]
PPL = [[50.0, 50.0, 50.0, 150.0], [7.0, 33.0, 45.0, 160.0], [5.5, 7.4, 37.0, 180.0], [10.0, 20.0, 30.0, 40.0]]


def metrics(loss=LOSS, ppl=PPL, domains=DOMAINS, phases=PHASES):
    return forgetting_metrics(domains, phases, loss, ppl)


def test_full_matrix_every_metric():
    m = metrics()
    # code: last 3.0 minus its best from phase 1 on (1.7 after phase 2); docs: 1.8 - 2.0
    assert m["forgetting"] == pytest.approx({"code": 1.3, "docs": -0.2})
    assert list(m["forgetting"]) == ["code", "docs"]  # plays is the last phase's domain, news untrained
    assert m["avg_forgetting"] == pytest.approx((1.3 - 0.2) / 2)
    # L[phase(j)][j] - L[last][j]: code 2.0 - 3.0, docs 2.0 - 1.8
    assert m["bwt"] == pytest.approx((-1.0 + 0.2) / 2)
    # drops during own phase: code 4.0 -> 2.0, docs 3.5 -> 2.0, plays 3.6 -> 1.5
    assert m["plasticity"] == pytest.approx((2.0 + 1.5 + 2.1) / 3)
    # before their first phase: docs 4.0 -> 3.5 (row 1), plays 4.0 -> 3.6 (row 2); phase 1 left out
    assert m["fwt"] == pytest.approx((0.5 + 0.4) / 2)
    assert m["avg_final_loss"] == pytest.approx((3.0 + 1.8 + 1.5 + 5.4) / 4)
    assert m["avg_final_perplexity"] == pytest.approx((10 + 20 + 30 + 40) / 4)  # from the ppl matrix
    assert m["phases_done"] == 3


def test_untrained_domain_reported_as_such():
    u = metrics()["untrained"]
    assert list(u) == ["news"]
    assert u["news"] == pytest.approx({"initial": 5.0, "final": 5.4, "change": 0.4})


def test_partial_matrix_uses_rows_present():
    m = metrics(loss=LOSS[:3], ppl=PPL[:3])  # phase 3 not done yet
    assert m["phases_done"] == 2
    assert m["forgetting"] == pytest.approx({"code": 1.7 - 2.0})  # docs is the last phase present
    assert m["bwt"] == pytest.approx(2.0 - 1.7)
    assert m["plasticity"] == pytest.approx((2.0 + 1.5) / 2)
    assert m["fwt"] == pytest.approx(0.5)
    assert m["avg_final_loss"] == pytest.approx((1.7 + 2.0 + 3.6 + 5.2) / 4)
    assert m["avg_final_perplexity"] == pytest.approx((5.5 + 7.4 + 37.0 + 180.0) / 4)
    assert list(m["untrained"]) == ["news"]  # plays is pending, not untrained
    assert m["untrained"]["news"]["change"] == pytest.approx(0.2)


def test_one_phase_gives_none_not_zero():
    m = metrics(loss=LOSS[:2], ppl=PPL[:2])
    assert m["forgetting"] == {}
    assert m["avg_forgetting"] is None and m["bwt"] is None and m["fwt"] is None
    assert m["plasticity"] == pytest.approx(2.0)
    assert m["avg_final_loss"] == pytest.approx((2.0 + 3.5 + 3.8 + 5.1) / 4)


def test_initial_row_only():
    m = metrics(loss=LOSS[:1], ppl=PPL[:1])
    assert m["phases_done"] == 0 and m["plasticity"] is None and m["forgetting"] == {}
    assert m["avg_final_loss"] == pytest.approx((4.0 + 4.0 + 4.0 + 5.0) / 4)
    assert m["untrained"]["news"]["change"] == 0


def test_domain_trained_twice_uses_latest_phase_for_forgetting_and_first_for_fwt():
    domains, phases = ["code", "docs", "plays"], ["code", "docs", "code", "plays"]
    loss = [
        [4.0, 4.0, 4.0],
        [2.0, 3.8, 3.9],  # phase 1: code
        [3.0, 2.0, 3.7],  # phase 2: docs
        [1.5, 2.6, 3.5],  # phase 3: code again
        [2.1, 2.9, 1.0],  # phase 4: plays
    ]
    m = forgetting_metrics(domains, phases, loss, loss)
    assert m["forgetting"] == pytest.approx({"code": 2.1 - 1.5, "docs": 2.9 - 2.0})
    assert m["bwt"] == pytest.approx(((1.5 - 2.1) + (2.0 - 2.9)) / 2)  # code from phase 3, not phase 1
    assert m["plasticity"] == pytest.approx((2.0 + 1.8 + 1.5 + 2.5) / 4)  # every phase counts
    assert m["fwt"] == pytest.approx(((4.0 - 3.8) + (4.0 - 3.5)) / 2)  # code's second phase is no transfer


def test_domain_retrained_in_last_phase_is_not_forgotten():
    domains, phases = ["code", "docs"], ["code", "docs", "code"]
    loss = [[4.0, 4.0], [2.0, 3.8], [3.0, 2.0], [1.5, 2.6]]
    m = forgetting_metrics(domains, phases, loss, loss)
    assert m["forgetting"] == pytest.approx({"docs": 0.6})
    assert m["bwt"] == pytest.approx(-0.6)


def test_result_is_strict_json():
    m = metrics()
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    m1 = metrics(loss=LOSS[:2], ppl=PPL[:2])
    assert json.loads(json.dumps(m1, allow_nan=False))["bwt"] is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_names_row_and_domain(bad):
    loss = [list(r) for r in LOSS]
    loss[2][1] = bad
    with pytest.raises(MetricsError, match=r"eval_loss of domain 'docs' after phase 2 \(docs\) \(row 2\)"):
        metrics(loss=loss)


def test_non_finite_perplexity_and_missing_cells():
    ppl = [list(r) for r in PPL]
    ppl[3][0] = math.inf
    with pytest.raises(MetricsError, match=r"perplexity of domain 'code' after phase 3 \(plays\)"):
        metrics(ppl=ppl)
    loss = [list(r) for r in LOSS]
    loss[1][3] = None
    with pytest.raises(MetricsError, match=r"'news' after phase 1 \(code\) \(row 1\) is missing"):
        metrics(loss=loss)
    with pytest.raises(MetricsError, match=r"after phase 1 \(code\) \(row 1\) has not been evaluated"):
        metrics(loss=[LOSS[0], None, LOSS[2]], ppl=PPL[:3])


def test_metrics_error_is_a_value_error():
    assert issubclass(MetricsError, ValueError)  # pretrain.results records ValueErrors as "error"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": [LOSS[0], LOSS[1][:3]], "ppl": PPL[:2]}, r"row 1\) has 3 values, expected one per domain"),
        ({"loss": LOSS + [LOSS[3]], "ppl": PPL + [PPL[3]]}, r"5 rows but 3 phases allow at most 4"),
        ({"ppl": PPL[:3]}, r"perplexity has 3 rows but eval_loss has 4"),
        ({"phases": ["code", "maths", "plays"]}, r"phase 2 trains 'maths', which is not in domains"),
        ({"loss": [], "ppl": []}, r"no rows"),
        ({"domains": ["code", "code", "plays", "news"]}, r"distinct"),
        ({"ppl": [PPL[0], PPL[1], PPL[2], PPL[3][:2]]}, r"perplexity: after phase 3 \(plays\) \(row 3\)"),
    ],
)
def test_shape_errors(kwargs, message):
    with pytest.raises(MetricsError, match=message):
        metrics(**kwargs)


class RecordingBackend:
    """A tracker backend that keeps what it is given: {tag: (value, x)}, x the phase as TensorBoard has it."""

    name, resumes, pictures = "recording", False, False

    def __init__(self):
        self.points, self.texts, self.flushed = {}, {}, False

    def scalars(self, values, step, phase):
        self.points.update({tag: (value, phase) for tag, value in values.items()})

    def text(self, tag, text, step, phase):
        self.texts[tag] = (text, phase)

    def flush(self):
        self.flushed = True


def _log(metrics, phase):
    w = RecordingBackend()
    log_forgetting(MetricsLogger([w]), metrics, phase=phase, step=10 * phase)
    return w


def test_log_forgetting_writes_scalars_and_domains_at_the_phase():
    w = _log(metrics(), phase=3)
    assert w.points["forgetting/avg_forgetting"] == (pytest.approx(0.55), 3)
    assert w.points["forgetting/bwt"] == (pytest.approx(-0.4), 3)
    assert w.points["forgetting/avg_final_perplexity"] == (pytest.approx(25.0), 3)
    assert w.points["forgetting/domain/code"] == (pytest.approx(1.3), 3)
    assert w.points["forgetting/untrained/news"] == (pytest.approx(0.4), 3)
    assert "forgetting/domain/plays" not in w.points and w.flushed


def test_log_forgetting_skips_undefined_and_records_errors():
    w = _log(metrics(loss=LOSS[:2], ppl=PPL[:2]), phase=1)
    assert "forgetting/bwt" not in w.points and "forgetting/avg_forgetting" not in w.points
    assert "forgetting/plasticity" in w.points
    w = _log({"error": "eval_loss of domain 'docs' ... is nan"}, phase=2)
    assert w.points == {} and "nan" in w.texts["forgetting/error"][0]


def test_log_forgetting_real_summary_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger([TensorBoardBackend(tmp_path)])
    log_forgetting(logger, metrics(), phase=3, step=30)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (point,) = events.Scalars("forgetting/plasticity")
    assert point.step == 3 and point.value == pytest.approx(5.6 / 3, rel=1e-6)


# Accuracy matrix: columns are tasks, higher is better. In eighths (as if 8 documents per task), so every
# sum and difference below is exact in binary floating point and the results are compared with ==.
TASKS = ["t_code", "t_docs", "general"]  # general: linked to no domain, evaluated only
TASK_DOMAINS = {"t_code": "code", "t_docs": "docs"}  # phase 3 (plays) trains no task
ACC = [
    [4 / 8, 3 / 8, 5 / 8],  # initial
    [6 / 8, 4 / 8, 5 / 8],  # after phase 1 (code): t_code learns, t_docs gains before its phase
    [7 / 8, 7 / 8, 4 / 8],  # after phase 2 (docs): t_code still improves, t_docs learns
    [4 / 8, 6 / 8, 2 / 8],  # after phase 3 (plays): both lose
]


def acc_metrics(acc=ACC, task_domains=TASK_DOMAINS):
    return accuracy_metrics(TASKS, PHASES, task_domains, acc)


def test_accuracy_metrics_follow_their_definitions_with_signs_as_for_losses():
    m = acc_metrics()
    # forgetting = best accuracy since the task's phase minus the last: t_code 7/8 (row 2) - 4/8, t_docs
    # 7/8 - 6/8; + = forgot, as for losses
    assert m["forgetting"] == {"t_code": 3 / 8, "t_docs": 1 / 8}
    assert m["avg_forgetting"] == 2 / 8
    # bwt = last minus right after the task's own phase: t_code 4/8 - 6/8, t_docs 6/8 - 7/8; - = forgetting
    assert m["bwt"] == (-2 / 8 - 1 / 8) / 2
    # plasticity = gain during the task's phase: t_code 4/8 -> 6/8, t_docs 4/8 -> 7/8; phase 3 trains none
    assert m["plasticity"] == (2 / 8 + 3 / 8) / 2
    # fwt = gain before the task's first phase, from the initial model: t_docs 3/8 -> 4/8 (phase 1 left out)
    assert m["fwt"] == 1 / 8
    assert m["avg_final_accuracy"] == (4 / 8 + 6 / 8 + 2 / 8) / 3 == 0.5
    assert m["untrained"] == {"general": {"initial": 5 / 8, "final": 2 / 8, "change": -3 / 8}}
    assert m["phases_done"] == 3 and "avg_final_loss" not in m
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_accuracy_metrics_partway_and_without_linked_tasks():
    m = acc_metrics(acc=ACC[:2])  # after phase 1: nothing to forget yet
    assert m["forgetting"] == {} and m["bwt"] is None and m["fwt"] is None
    assert m["plasticity"] == 2 / 8 and m["avg_final_accuracy"] == (6 / 8 + 4 / 8 + 5 / 8) / 3
    plain = acc_metrics(task_domains={})  # no task linked to a phase: every task is evaluated only
    assert plain["forgetting"] == {} and plain["plasticity"] is None and plain["fwt"] is None
    assert plain["untrained"]["t_code"] == {"initial": 4 / 8, "final": 4 / 8, "change": 0.0}


def test_accuracy_metrics_name_a_bad_cell_and_refuse_two_tasks_on_one_domain():
    acc = [list(r) for r in ACC]
    acc[1][2] = None
    with pytest.raises(
        MetricsError, match=r"accuracy of task 'general' after phase 1 \(code\) \(row 1\) is missing"
    ):
        acc_metrics(acc=acc)
    with pytest.raises(MetricsError, match="links two tasks to one domain"):
        acc_metrics(task_domains={"t_code": "code", "t_docs": "code"})
    with pytest.raises(MetricsError, match=r"phase 1 trains 't_code', which is not in tasks"):
        accuracy_metrics(["general"], PHASES, TASK_DOMAINS, [[0.5]])
