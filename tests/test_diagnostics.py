"""impartial.diagnostics: the recorder's values against a hand computation, the summary rules on synthetic
recordings, and the pictures."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import impartial
from impartial import solvers
from impartial._report import BlockReport, Report
from impartial.diagnostics import BlockStats, Recorder, block_stats, summarize
from impartial.diagnostics import _rules as rules
from impartial.solvers import Status


def _model(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.nn.Linear(5, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(3)]
    for m in [enc, *heads]:
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return enc, heads, x


def _step(enc, heads, x, scales=(1.0, 10.0, -3.0)):
    z = enc(x)
    losses = {f"t{i}": s * h(z).pow(2).mean() for i, (h, s) in enumerate(zip(heads, scales))}
    return z, losses


def test_recorded_values_match_the_task_gradients_at_the_block():
    enc, heads, x = _model()
    rec = Recorder(keep_norm=False)
    for _ in range(2):
        z, losses = _step(enc, heads, x)
        J = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses.values()])
        seen: list[torch.Tensor] = []
        z.register_hook(seen.append)  # the block tensor's hook sees the resolved direction, once
        rec.record(impartial.backward(losses, enc, solver=solvers.IMTLG(), keep_norm=False))
        (d,) = seen  # the resolved direction the block passed down
        d = d.reshape(-1)
    s = rec.series(0)
    assert rec.blocks == ("block 0: AddmmBackward0",) and s.tasks == ("t0", "t1", "t2")
    G = J @ J.T
    n = J.norm(dim=1)
    cos = G / torch.outer(n, n)
    torch.testing.assert_close(s.gram[-1], G)
    torch.testing.assert_close(s.norms[-1], n)
    torch.testing.assert_close(s.cosine[-1], cos)
    pairs = torch.tensor([cos[0, 1], cos[0, 2], cos[1, 2]])
    assert float(s.conflict[-1]) == pytest.approx(float((pairs < 0).double().mean()))
    assert float(s.min_cosine[-1]) == pytest.approx(float(pairs.min()))
    assert float(s.imbalance[-1]) == pytest.approx(float(n.max() / n.min()))
    assert float(s.ratio[-1]) == pytest.approx(float(d.norm() / J.sum(0).norm()), rel=1e-9)
    w = s.weights[-1]
    torch.testing.assert_close(w @ J, d)  # the recorded weights are the direction's
    assert s.steps.tolist() == [0, 1]


def test_ratio_from_the_keep_norm_scale_equals_the_ratio_from_the_weights():
    enc, heads, x = _model(1)
    with_w, from_scale = Recorder(), Recorder()
    _z, losses = _step(enc, heads, x)
    r = impartial.backward(losses, enc, solver=solvers.UPGrad())
    with_w.record(r)
    b = r.blocks[0]
    from_scale.record(
        Report(
            r.mode,
            r.solver,
            r.tasks,
            r.also,
            (BlockReport(b.name, b.shape, b.tasks, b.gram, None, b.scale, status=b.status),),
        )
    )
    assert float(from_scale.series(0).ratio[0]) == pytest.approx(float(with_w.series(0).ratio[0]), rel=1e-9)
    assert from_scale.series(0).weights.isnan().all()


def test_coordinate_solver_ratio_needs_keep_norm():
    enc, heads, x = _model(2)
    for keep in (True, False):
        _z, losses = _step(enc, heads, x)
        rec = Recorder(keep_norm=keep)
        rec.record(
            impartial.backward(losses, enc, solver=solvers.GradDrop(generator=torch.Generator()), keep_norm=keep)
        )
        assert math.isnan(float(rec.series(0).ratio[0])) != keep


def test_per_sample_weights_are_averaged_and_the_gram_summed():
    enc, heads, x = _model(3)
    _z, losses = _step(enc, heads, x)
    r = impartial.backward(losses, enc, solver=solvers.MGDA(), per_sample=True)
    rec = Recorder()
    rec.record(r)
    s = rec.series(0)
    b = r.blocks[0]
    G = b.gram.double().reshape(-1, 3, 3).sum(0)
    torch.testing.assert_close(s.gram[0], G)
    torch.testing.assert_close(s.weights[0], b.weights.double().reshape(-1, 3).mean(0))
    s_ = b.scale.double()
    assert float(s.ratio[0]) == pytest.approx(float(torch.where(s_ > 0, 1 / s_, 0.0).mean()))


def test_every_step_and_state_dict_round_trip_through_json():
    enc, heads, x = _model()
    rec = Recorder(every=2)
    for i in range(5):
        _z, losses = _step(enc, heads, x)
        rec.record(impartial.backward(losses, enc), step=10 * i)
    s = rec.series("block 0: AddmmBackward0")
    assert s.steps.tolist() == [0, 20, 40] and rec.calls == 5 and rec.solvers == ("IMTLG()",)
    back = Recorder()
    back.load_state_dict(json.loads(json.dumps(rec.state_dict())))
    t = back.series(0)
    for f in ("steps", "gram", "weights", "ratio", "stationary"):
        torch.testing.assert_close(getattr(t, f), getattr(s, f))
    assert back.blocks == rec.blocks and back.every == 2 and str(back.summary()) == str(rec.summary())


def test_recorder_errors_name_the_problem():
    with pytest.raises(ValueError, match="every"):
        Recorder(every=0)
    rec = Recorder()
    with pytest.raises(TypeError, match="Report"):
        rec.record({"not": "a report"})  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="0 recorded"):
        rec.series(0)
    with pytest.raises(KeyError, match="no recorded block"):
        rec.series("block 7: X")


# --- the rules, on synthetic recordings --------------------------------------------------------------------------


def _rows(cos: float, norms: list[float], k: int = 3) -> torch.Tensor:
    """``k`` task gradients with equal pairwise cosine ``cos`` and the given norms."""
    C = torch.full((k, k), cos, dtype=torch.float64).fill_diagonal_(1.0)
    L = torch.linalg.cholesky(C)
    return L * torch.tensor(norms, dtype=torch.float64)[:, None]


def _recording(Js: list[torch.Tensor], weights=None, status=None, keep_norm=True, solver="IMTLG()") -> Recorder:
    rec = Recorder(keep_norm=keep_norm)
    k = Js[0].shape[0]
    tasks = tuple(f"t{i}" for i in range(k))
    for n, J in enumerate(Js):
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        st = None if status is None else torch.tensor(status[n], dtype=torch.int8)
        b = BlockReport("AddmmBackward0 [32, 4]", (32, 4), tasks, J @ J.T, w, torch.tensor(1.0), status=st)
        rec.record(Report("auto", solver, tasks, (), (b,)))
    return rec


@pytest.mark.parametrize(
    "cos, norms, diagnosis",
    [
        (0.2, [1.0, 120.0, 5.0], "scale"),
        (-0.45, [1.0, 1.5, 2.0], "direction"),
        (-0.45, [1.0, 50.0, 2.0], "both"),
        (0.5, [1.0, 1.2, 2.0], "agree"),
        (0.02, [1.0, 4.0, 2.0], "mild"),
        (-0.02, [1.0, 2.0, 1.0], "mild"),  # every pair negative, but barely: projections change little
    ],
)
def test_diagnosis_follows_the_table(cos, norms, diagnosis):
    summary = summarize(_recording([_rows(cos, norms)] * 4))
    (st,) = summary.stats
    assert st.diagnosis == diagnosis
    assert summary.findings[0].rule == diagnosis


def test_scale_finding_states_the_numbers_and_why_pcgrad_changes_little():
    Js = [_rows(0.2, [1.0, 120.0, 5.0])] * 9 + [_rows(-0.3, [1.0, 120.0, 5.0])]
    text = " ".join(str(summarize(_recording(Js))).split())  # the summary wraps its lines
    assert "norms differ 120×" in text and "largest 't1', smallest 't0'" in text
    assert "IMTL-G" in text and "PCGrad alone changes little" in text
    assert "it acts only on conflicting pairs (10% of pairs, none in 90% of steps" in text
    assert "solver IMTLG()" in text


def test_thresholds_are_the_boundaries():
    base = {
        "block": "b",
        "tasks": ("a", "b"),
        "records": 1,
        "any_conflict": 0.0,
        "largest": "a",
        "smallest": "b",
        "ratio": 1.0,
        "stationary": 0.0,
        "zero": (0.0, 0.0),
        "weights": (1.0, 1.0),
        "share": (1.0, 1.0),
    }
    at = BlockStats(conflict=rules.CONFLICTING, min_cosine=rules.STRONG, imbalance=rules.IMBALANCED, **base)
    assert at.diagnosis == "both"
    below = BlockStats(
        conflict=rules.CONFLICTING - 1e-9, min_cosine=rules.STRONG, imbalance=rules.IMBALANCED - 1e-9, **base
    )
    assert below.diagnosis == "mild"
    agree = BlockStats(conflict=rules.AGREEING - 1e-9, min_cosine=0.5, imbalance=rules.BALANCED - 1e-9, **base)
    assert agree.diagnosis == "agree"
    weak = BlockStats(conflict=1.0, min_cosine=rules.STRONG + 1e-9, imbalance=1.0, **base)
    assert weak.diagnosis == "mild"


def test_further_findings():
    J = _rows(0.1, [1.0, 2.0, 3.0])
    stationary = summarize(_recording([J] * 10, status=[[int(Status.STATIONARY)]] + [[0]] * 9))
    assert [f.rule for f in stationary.findings] == ["mild", "stationary"]
    assert "Pareto-stationary in 10% of steps" in " ".join(str(stationary).split())
    zero = J.clone()
    zero[2] = 0
    z = summarize(_recording([zero] * 3))
    assert z.stats[0].imbalance == math.inf
    assert "task 't2' has a zero gradient here in 100% of steps" in " ".join(str(z).split())
    neglect = summarize(_recording([J] * 3, weights=[1.0, 1.0, 1e-3]))
    assert [f.text.split("'")[1] for f in neglect.findings if f.rule == "neglected"] == ["t2"]
    # a scale-invariant weighting (w_i ∝ 1/n_i) gives the large task a small weight, but an equal share
    even = summarize(_recording([_rows(0.1, [1.0, 1000.0, 1.0])] * 3, weights=[1.0, 1e-3, 1.0]))
    assert "neglected" not in {f.rule for f in even.findings}
    shrunk = [f.rule for f in summarize(_recording([J] * 3, weights=[0.01] * 3, keep_norm=False)).findings]
    assert "shrunk" in shrunk
    assert "shrunk" not in [f.rule for f in summarize(_recording([J] * 3, weights=[0.01] * 3)).findings]


def test_block_stats_reads_medians_and_means():
    Js = [_rows(0.3, [1.0, 4.0, 2.0]), _rows(-0.4, [1.0, 8.0, 2.0]), _rows(0.1, [1.0, 2.0, 2.0])]
    st = block_stats(_recording(Js).series(0))
    assert st.imbalance == pytest.approx(4.0) and st.min_cosine == pytest.approx(0.1)
    assert st.conflict == pytest.approx(1 / 3) and st.any_conflict == pytest.approx(1 / 3)


# --- pictures ------------------------------------------------------------------------------------------------------


def _real_recording(n: int = 4, rec: Recorder | None = None) -> Recorder:
    enc, heads, x = _model()
    rec = Recorder() if rec is None else rec
    for _ in range(n):
        _z, losses = _step(enc, heads, x)
        rec.record(impartial.backward(losses, enc, solver=solvers.IMTLG()))
    return rec


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rec = _real_recording()
    path = rec.plot(tmp_path / "conflicts.png", steps=[0, 3])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    no_weights = _recording([_rows(0.1, [1.0, 2.0, 3.0])] * 3)
    assert no_weights.plot(tmp_path / "nw.png").stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match=r"impartial\[graph\]"):
        _real_recording(1).plot(tmp_path / "x.png")


def test_to_tensorboard_writes_each_record_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = _real_recording(3)
    rec.to_tensorboard(tmp_path)
    rec.to_tensorboard(tmp_path)  # nothing new: nothing written
    _real_recording(2, rec)
    rec.to_tensorboard(tmp_path)
    ev = EventAccumulator(str(tmp_path))
    ev.Reload()
    steps = sorted(e.step for e in ev.Scalars("impartial/block 0/conflict"))
    assert steps == [0, 1, 2, 3, 4]
    assert "impartial/block 0/weight/t1" in ev.Tags()["scalars"]
