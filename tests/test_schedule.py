"""The per-phase re-warming schedule: every phase warms up to the peak and decays again."""

from __future__ import annotations

import pytest
import torch

from pretrain.schedule import phase_lr_factor, phase_schedule, set_peak_lr


def test_each_phase_rewarms_and_decays():
    starts, steps = [0, 10], [10, 10]
    factors = [phase_lr_factor(s, starts, steps, warmup=3, min_ratio=0.1) for s in range(20)]
    for phase in (0, 10):
        assert factors[phase] == pytest.approx(0.25)  # first step of warm-up
        assert factors[phase + 3] == pytest.approx(1.0)  # peak after warm-up
        assert factors[phase + 9] == pytest.approx(0.1)  # decayed to the floor at the phase end
        decay = factors[phase + 3 : phase + 10]
        assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


@pytest.mark.parametrize("kind", ["rewarm_cosine", "wsd"])
def test_a_phase_shorter_than_the_warm_up_still_ends_at_the_floor(kind):
    # 3-step phases, 6 warm-up steps: the ramp is cut to leave the decay its steps (the phase ended at the
    # peak before, and the next one began there)
    f = [phase_lr_factor(s, [0, 3], [3, 3], warmup=6, min_ratio=0.1, kind=kind) for s in range(6)]
    assert f == pytest.approx([0.5, 1.0, 0.1] * 2)


@pytest.mark.parametrize("kind", ["rewarm_cosine", "wsd"])
def test_a_one_step_phase_is_at_the_floor_and_nothing_passes_it(kind):
    # rewarm_cosine ran a one-step phase (a small `tokens:` budget) at the peak, from the floor before it;
    # past the last step the factor went below the floor (never used for a step, but read by a resume)
    f = [phase_lr_factor(s, [0, 5, 6], [5, 1, 5], warmup=10, min_ratio=0.1, kind=kind) for s in range(12)]
    assert f[4] == pytest.approx(0.1) and f[5] == pytest.approx(0.1) and f[10] == pytest.approx(0.1)
    assert min(f) == pytest.approx(0.1)


def test_infinite_whose_warm_up_fills_phase_1_still_ends_it_at_the_plateau():
    for length in (10, 11):  # phase 1 ended at the peak, and phase 2 dropped to the plateau in one step
        f = [
            phase_lr_factor(s, [0, length], [length, 5], 10, 0.1, kind="infinite") for s in range(length + 5)
        ]
        assert f[length - 2 : length] == pytest.approx([1.0, 0.5])  # the peak, then the plateau
        assert f[length : length + 4] == [0.5] * 4 and f[-1] == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = phase_schedule(opt, [4, 4], warmup=1, min_ratio=0.0)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[4] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0) and lrs[3] == pytest.approx(0.0)


def test_a_new_peak_lr_takes_effect_at_the_resumed_step():
    def run(lr, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = phase_schedule(opt, [4, 4], warmup=1, min_ratio=0.1)
        for _ in range(steps):
            opt.step()
            sched.step()
        return opt, sched

    saved_opt, saved_sched = run(1.0, 5)
    opt, sched = run(1.0, 0)  # a resumed run: built with the new lr, then the old state loaded over it
    opt.load_state_dict(saved_opt.state_dict())
    sched.load_state_dict(saved_sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(saved_opt.param_groups[0]["lr"])  # the old peak's
    set_peak_lr(sched, 0.25)
    fresh, fresh_sched = run(0.25, 5)  # what a run with peak 0.25 from the start has at this step
    assert opt.param_groups[0]["lr"] == pytest.approx(fresh.param_groups[0]["lr"])
    for o, s in ((opt, sched), (fresh, fresh_sched)):
        o.step()
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(fresh.param_groups[0]["lr"])


def _shape(kind, steps=(10, 10, 10), **kw):
    starts = [sum(steps[:i]) for i in range(len(steps))]
    args = dict(warmup=2, min_ratio=0.1, decay_fraction=0.3, constant_ratio=0.5) | kw
    return [phase_lr_factor(s, starts, list(steps), kind=kind, **args) for s in range(sum(steps))]


def test_constant_warms_up_once_then_holds_the_peak():
    f = _shape("constant")
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and f[2:] == [1.0] * 28


def test_wsd_warms_holds_and_cools_down_in_every_phase():
    f = _shape("wsd")
    for p in (0, 10, 20):
        assert f[p : p + 2] == pytest.approx([1 / 3, 2 / 3])
        assert f[p + 2 : p + 7] == [1.0] * 5  # stable
        assert f[p + 7 : p + 10] == pytest.approx([0.7, 0.4, 0.1])  # the last 30% decays to min_ratio


def test_wsd_whose_decay_would_reach_into_the_warm_up_decays_after_it():
    # 20-step phases, 10 warm-up steps, decay over the last 80%: the tail starts where the ramp ends,
    # rather than cutting it off with a drop (it went 0.909 -> 0.606)
    f = _shape("wsd", steps=(20, 20), warmup=10, decay_fraction=0.8)
    for p in (0, 20):
        assert f[p : p + 10] == pytest.approx([(k + 1) / 11 for k in range(10)])
        assert f[p + 10 : p + 20] == pytest.approx([1 - 0.9 * (k + 1) / 10 for k in range(10)])
        assert all(a > b for a, b in zip(f[p + 10 : p + 20], f[p + 11 : p + 20], strict=False))


def test_infinite_cools_once_holds_the_plateau_and_anneals_at_the_end():
    f = _shape("infinite")
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[9] == pytest.approx(0.5) and all(a > b for a, b in zip(f[2:9], f[3:10], strict=True))
    assert f[10:27] == [0.5] * 17  # no re-warming between phases
    assert f[27:] == pytest.approx([0.5 - 0.4 / 3, 0.5 - 0.8 / 3, 0.1])
    one = _shape("infinite", steps=(20,))
    assert one[19] == pytest.approx(0.1) and one[13] == pytest.approx(0.5)


def test_the_default_schedule_is_unchanged():
    assert _shape("rewarm_cosine") == [
        phase_lr_factor(s, [0, 10, 20], [10, 10, 10], warmup=2, min_ratio=0.1) for s in range(30)
    ]
