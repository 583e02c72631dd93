"""The training plot (`train.plot=true`): every panel shares one step axis, heatmap cells are
centred on their steps, and an LR panel draws the schedule. Read from the matplotlib figure."""
import math

import numpy as np
import pytest

from moedist.train.schedule import lr_at

SCHED = dict(lr=2e-3, warmup_steps=3, max_steps=12, min_lr=2e-4, schedule="cosine")


def _records(steps, experts=4, layers=2):
    rng = np.random.default_rng(0)
    recs = []
    for s in steps:
        load = rng.random((layers, experts))
        recs.append({"step": s, "loss": 5.0 / s, "lr": lr_at(s - 1, **SCHED),
                     "expert_load": (load / load.sum(1, keepdims=True)).tolist()})
        if s % 4 == 0:
            recs[-1]["val_loss"] = 4.0 / s
    return recs


def _draw(tmp_path, monkeypatch, records, **kw):
    """plot_run as the trainer calls it; returns (figure it saved, axes by y label)."""
    import matplotlib.figure

    from moedist.train.plot import plot_run

    saved = []
    real = matplotlib.figure.Figure.savefig

    def capture(fig, *a, **k):
        saved.append(fig)
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    out = tmp_path / "plot.png"
    assert plot_run(str(tmp_path / "metrics.jsonl"), str(out), "t", records, **kw) == str(out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    (fig,) = saved
    panels = {ax.get_ylabel().split("\n")[0]: ax for ax in fig.axes if ax.get_ylabel()}
    return fig, panels


@pytest.mark.parametrize("steps", [list(range(1, 13)), [2, 4, 6, 8, 10, 12]])
def test_panels_share_the_step_axis_and_lr_panel_draws_the_schedule(tmp_path, monkeypatch, steps):
    recs = _records(steps)
    fig, panels = _draw(tmp_path, monkeypatch, recs)
    loss = next(ax for k, ax in panels.items() if k.startswith("loss"))
    lr = panels.get("learning rate")
    assert lr is not None, f"no LR panel among {sorted(panels)}"
    heat = [panels[f"layer {i}"] for i in range(2)]
    steps_axes = [loss, lr, *heat]
    for ax in steps_axes[1:]:
        assert ax.get_xlim() == pytest.approx(loss.get_xlim()), (ax.get_ylabel(), ax.get_xlim(), loss.get_xlim())
        assert list(ax.get_xticks()) == list(loss.get_xticks())
        # same left and right edge on the page: the colour bars do not shrink the heatmaps
        assert ax.get_position().x0 == pytest.approx(loss.get_position().x0, abs=1e-3)
        assert ax.get_position().x1 == pytest.approx(loss.get_position().x1, abs=1e-3)
    # LR panel: one point per step, the schedule's values
    (line,) = [ln for ln in lr.get_lines() if len(ln.get_xdata()) == len(steps)]
    assert list(line.get_xdata()) == steps
    assert list(line.get_ydata()) == pytest.approx([lr_at(s - 1, **SCHED) for s in steps])
    # loss curve and heatmap cells: centred on the same steps
    assert list(loss.get_lines()[0].get_xdata()) == steps
    for i, ax in enumerate(heat):
        (mesh,) = ax.collections
        xs = np.asarray(mesh.get_coordinates())[0, :, 0]  # cell edges along the step axis
        assert list((xs[:-1] + xs[1:]) / 2) == pytest.approx(steps)
        shown = np.asarray(mesh.get_array()).reshape(4, len(steps))  # [E, steps]
        assert shown == pytest.approx(np.array([r["expert_load"][i] for r in recs]).T)
    lo, hi = loss.get_xlim()
    assert lo <= steps[0] - 0.5 and hi >= steps[-1] + 0.5 and math.isfinite(lo)


def test_initial_validation_point_at_step_zero_widens_every_panel(tmp_path, monkeypatch):
    _, panels = _draw(tmp_path, monkeypatch, _records(range(1, 6)), initial={"val_loss": 6.0})
    xlims = {k: ax.get_xlim() for k, ax in panels.items() if k != "share of routed pairs"}
    assert len({tuple(np.round(v, 9)) for v in xlims.values()}) == 1, xlims
    assert next(iter(xlims.values()))[0] <= 0


def test_one_record_and_no_moe_layers(tmp_path, monkeypatch):
    """A dense run (no expert_load) still gets loss and LR panels; one step is drawn."""
    recs = [{"step": 1, "loss": 3.0, "lr": 1e-3}]
    _, panels = _draw(tmp_path, monkeypatch, recs)
    assert "learning rate" in panels and not any(k.startswith("layer") for k in panels)
