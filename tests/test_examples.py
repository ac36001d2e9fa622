"""The VAE zoo under ``examples/``: the demo's ``--quick`` run, and each model's basic contract.

Kept fast (the whole file runs in well under a minute on 2 cores): tiny batches, a few steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import impartial  # noqa: E402
from impartial import solvers  # noqa: E402
from vae_zoo import data, multimodal, tabular  # noqa: E402
from vae_zoo.train import METHODS, NESTED, ClampedMGDA, label, make_solver, step  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: extra intra-op threads only fight over the shared cores (and slow everyone down)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return data.digits_trio(seed=0)


@pytest.fixture(scope="module")
def wine():
    return data.tabular("wine", seed=0)


def _multi(name, digits):
    train, _ = digits
    torch.manual_seed(0)
    return multimodal.MODELS[name]({m: v[0].numel() for m, v in train.x.items()}, hidden=32, z_dim=8)


def _batch(model, digits, wine, n=32):
    if isinstance(model, multimodal.MultimodalVAE):
        return {m: v[:n] for m, v in digits[0].x.items()}
    return wine.x[:n], wine.observed[:n]


ALL = [*multimodal.MODELS, *tabular.MODELS]


def _model(name, digits, wine):
    if name in multimodal.MODELS:
        return _multi(name, digits)
    torch.manual_seed(0)
    return tabular.MODELS[name](wine)


@pytest.mark.parametrize("method", ["vanilla", "imtlg"])
@pytest.mark.parametrize("name", ALL)
def test_loss_is_finite_and_decreases(name, method, digits, wine):
    model = _model(name, digits, wine)
    batch = _batch(model, digits, wine)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    solver = make_solver(method)
    totals = []
    for _ in range(8):
        tasks, also = model.loss(batch)
        total = sum(tasks + also)
        assert all(torch.isfinite(t) for t in tasks + also)
        totals.append(float(total.detach()))
        opt.zero_grad()
        if solver is None:
            total.backward()
        else:
            impartial.backward(tasks, model.encoder_params, solver=solver, also=also)
        opt.step()
    assert sum(totals[-2:]) < sum(totals[:2]), totals


@pytest.mark.parametrize("name", list(multimodal.MODELS))
def test_multimodal_accepts_missing_modalities_and_cross_generates(name, digits):
    model = _multi(name, digits)
    _, test = digits
    x = {m: v[:7] for m, v in test.x.items()}
    for given in (["image"], ["text"], ["hard"], ["image", "text"], ["text", "hard"]):
        partial = {m: (x[m] if m in given else None) for m in model.names}
        out = model.generate(partial)
        assert set(out) == set(model.names)
        for m, v in out.items():
            assert v.shape == x[m].shape, (given, m)
            assert torch.isfinite(v).all()
        assert model.embed({m: x[m] for m in given}).shape == (7, model.z_dim)
    assert model.generate({"text": x["text"]}, targets=["image"])["image"].shape == (7, 64)
    text = model.generate({"image": x["image"]})["text"]
    assert torch.allclose(text.sum(-1), torch.ones(7, data.WORD_LEN))  # per-position character probabilities


def test_digits_trio_views_share_the_class(digits):
    train, test = digits
    words = ["".join(data.ALPHABET[i] for i in row.argmax(-1)).rstrip("_") for row in train.x["text"][:20]]
    assert words == [data.WORDS[y] for y in train.y[:20]]
    assert train.x["hard"].shape[1] == 16 * 16 and len(train) + len(test) == 1797


@pytest.mark.parametrize("name", list(tabular.MODELS))
def test_tabular_imputes_every_entry(name, wine):
    model = _model(name, None, wine)
    pred = model.impute(wine.x, wine.observed)
    assert pred.shape == wine.x.shape and torch.isfinite(pred).all()
    cat = [j for j, k in enumerate(wine.kinds) if k == "cat"]
    assert set(pred[:, cat].unique().tolist()) <= set(range(wine.n_classes[cat[0]]))


def test_wine_columns_get_the_likelihoods_their_values_call_for(wine):
    kinds = dict(zip(wine.names, wine.kinds))
    assert kinds["magnesium"] == kinds["proline"] == "count"
    assert kinds["label"] == "cat" and kinds["alcohol"] == "real" and kinds["color_intensity"] == "pos"


def test_iwae_column_tasks_have_the_iwae_gradient(wine):
    torch.manual_seed(0)
    model = tabular.IWAE(wine, K=5).double()
    batch = (wine.x[:16].double(), wine.observed[:16])
    torch.manual_seed(1)
    tasks, also = model.loss(batch)
    split = torch.autograd.grad(sum(tasks + also), list(model.parameters()), allow_unused=True)
    torch.manual_seed(1)
    whole = torch.autograd.grad(-model.bound(batch), list(model.parameters()), allow_unused=True)
    for a, b in zip(split, whole):
        if a is not None:
            torch.testing.assert_close(a, b)


def _dreg_transcription(model, batch, seed):
    """The DReG encoder gradient of the bound, written out: ``Σₖ w̃ₖ² (∂ log wₖ/∂zₖ)(∂zₖ/∂φ)`` with ``q``'s
    parameters held constant in ``log wₖ``, averaged over rows; for ``−bound`` (the loss), negated."""
    from torch.distributions import Normal

    x, obs = batch
    torch.manual_seed(seed)
    mu, logvar = model.posterior(x, obs)
    sd = (0.5 * logvar).exp()
    z = mu + sd * torch.randn((model.K, *mu.shape), dtype=mu.dtype)  # [K, n, z_dim]
    zk = z.detach().requires_grad_()
    log_q = Normal(mu.detach(), sd.detach()).log_prob(zk).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(zk).sum(-1) - sum(model.column_nll(zk, x, obs))
    log_w = log_p - log_q  # [K, n]
    w = torch.softmax(log_w.detach(), dim=0)
    (dlogw_dz,) = torch.autograd.grad(log_w.sum(), zk)  # sample k of row n depends on z[k, n] only
    seed_z = -(w.pow(2)[..., None] * dlogw_dz) / x.shape[0]
    return torch.autograd.grad(z, model.encoder_params, grad_outputs=seed_z)


def test_dreg_encoder_gradient_is_the_estimator_and_its_decoder_gradient_is_iwaes(wine):
    torch.manual_seed(0)
    model = tabular.DReG(wine, K=5).double()
    batch = (wine.x[:16].double(), wine.observed[:16])
    torch.manual_seed(1)
    tasks, also = model.loss(batch)
    params = model.encoder_params + list(model.heads.parameters())
    dreg = torch.autograd.grad(sum(tasks + also), params)
    enc, dec = dreg[: len(model.encoder_params)], dreg[len(model.encoder_params) :]
    for a, b in zip(enc, _dreg_transcription(model, batch, seed=1)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.manual_seed(1)
    iwae_tasks, iwae_also = tabular.IWAE.loss(model, batch)
    iwae = torch.autograd.grad(sum(iwae_tasks + iwae_also), params)
    for a, b in zip(dec, iwae[len(model.encoder_params) :]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # not vacuous: the encoder gradients of the two estimators differ
    assert max(float((a - b).abs().max()) for a, b in zip(enc, iwae)) > 1e-3


def test_methods_build_their_solvers():
    assert make_solver("vanilla") is None
    assert isinstance(make_solver("gradnorm-pcgrad"), solvers.Compose)
    assert {type(make_solver(m)).__name__ for m in METHODS[1:3]} == {"IMTLG", "PCGrad"}
    gradnorm = make_solver("gradnorm")
    assert isinstance(gradnorm, solvers.GradNorm) and gradnorm.alpha == 0.0
    first = make_solver("gradnorm1-pcgrad").solvers[0]
    assert first.alpha == 1.0 and first.progress == "grad"
    assert type(make_solver("mgda")) is solvers.MGDA and type(make_solver("nsgd")) is solvers.NSGD
    shared, per_block = make_solver("gradnorm-pcgrad-shared").solvers[0], make_solver("gradnorm")
    assert shared.for_block(0) is shared.for_block(1) is shared  # the old behaviour, kept to measure the change
    assert per_block.for_block(0) is not per_block.for_block(1)


def test_clamped_mgda_is_the_reference_clamp_of_mgda():
    J = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1e-4]], dtype=torch.float64)
    G = J @ J.T
    w = solvers.MGDA().weights(G)
    torch.testing.assert_close(ClampedMGDA().weights(G), torch.minimum(w, torch.tensor(1e-3, dtype=w.dtype)))
    assert (w > 1e-3).sum() >= 2  # several tasks in the support: they all get 1e-3


def test_nested_reaches_the_backward_and_labels_the_runs(wine):
    import demo

    args = demo.parse(["--models", "hivae", "--methods", "vanilla,imtlg", "--nested", "resolved,direct", "--seeds=1"])
    cfgs = demo.configs(args)
    assert [label(vars(c)) for c in cfgs] == ["vanilla", "imtlg", "imtlg, direct"]
    grads = {}
    for nested in NESTED:  # the encoder of s sits below the block at z: the two conventions differ there
        model = _model("hivae", None, wine)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(3)
        step(model, _batch(model, None, wine), opt, make_solver("imtlg"), nested=nested)
        grads[nested] = torch.cat([p.grad.reshape(-1) for p in model.enc_s.parameters()])
    assert not torch.allclose(grads["resolved"], grads["direct"])


def test_quick_demo_writes_table_and_figure(tmp_path):
    import demo

    records = demo.main(["--quick", "--jobs", "1", "--out", str(tmp_path)])
    assert not [r for r in records if "error" in r]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    table = (tmp_path / "table.md").read_text()
    assert "worst modality" in table and "worst column" in table and "±" in table
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(records)
    # what the solver saw at the blocks (seed 0 of each solver run): a picture per model and the summary
    for model in ("mmvae", "vae"):
        assert (tmp_path / f"conflicts_{model}.png").stat().st_size > 10_000
    summary = (tmp_path / "conflicts.md").read_text()
    assert "## mmvae, imtlg" in summary and "norms differ" in summary and "→" in summary


def test_nested_table_pairs_the_conventions_by_seed():
    from vae_zoo import report

    def rec(nested, seed, label_err):
        errors = {"alcohol": 0.2, "label": label_err}
        config = {"model": "hivae", "method": "imtlg", "nested": nested, "seed": seed}
        return {"config": config, "names": list(errors), "metrics": {"error": errors}}

    runs = [rec("resolved", 0, 0.3), rec("resolved", 1, 0.1), rec("direct", 0, 0.25), rec("direct", 1, 0.23)]
    row = report.nested_table(runs).splitlines()[-1]
    # worst column per seed: resolved 0.3, 0.2; direct 0.25, 0.23 → paired differences −0.05, +0.03; means over
    # the columns: resolved 0.25, 0.15; direct 0.225, 0.215 → −0.025, +0.065; the label moved by +0.04 on average
    assert row == "| imtlg | 0.250 ± 0.050 | 0.240 ± 0.010 | -0.010 ± 0.040 | 1/2 | 0.020 ± 0.045 | label +0.040 |"
    assert report.nested_table(runs[:2]) == ""


def test_demo_progress_is_plain_lines_off_a_terminal(capsys):
    import demo

    bar = demo.progress(3)  # pytest captures stderr: not a terminal
    assert bar.disable
    demo.finished(bar, {"config": {"model": "vae", "method": "imtlg", "seed": 0}, "seconds": 1.2}, 1, 2)
    assert capsys.readouterr().err == "[1/2 runs] vae imtlg seed 0 (1 s)\n"


def test_per_sample_digits_trains_through_the_per_sample_gram() -> None:
    """One epoch of ``examples/per_sample_digits.py`` each way: UPGrad runs the per-sample path (it asserts so at
    every step) and both lower the training loss."""
    import per_sample_digits as ex

    for method in ex.METHODS:
        run = ex.train(method, seed=0, epochs=2, batch=16, lr=0.1, limit=256)
        (first, *_), (last, *_) = run["curve"]
        assert last < first < 2.5
    assert 0 < run["conflicting"] < 1
