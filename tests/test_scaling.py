"""fastlm.scaling: the power-law fit recovers known laws, and a tiny ladder runs end to end (CLI included)."""
import json

import numpy as np
import pytest
import torch

from fastlm import scaling
from fastlm.summary import param_counts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("a,alpha,c", [(3.2, 0.25, 1.1), (40.0, 0.6, 0.0), (8.0, 0.076, 0.5), (1e12, 2.5, 1.0)])
def test_fit_recovers_a_known_law(a, alpha, c):
    n = np.logspace(4, 7.5, 6)
    loss = a * n ** -alpha + c
    fit = scaling.fit_power_law(n, loss, use_scipy=False)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["a"] == pytest.approx(a, rel=1e-2)
    assert fit["c"] == pytest.approx(c, abs=1e-3)
    np.testing.assert_allclose(scaling.predict(fit, n), loss, rtol=1e-5)


def test_fit_with_noise_and_constraints():
    rng = np.random.default_rng(0)
    n = np.logspace(4, 7, 7)
    loss = 5.0 * n ** -0.3 + 1.5 + rng.normal(0, 0.005, n.shape)
    fit = scaling.fit_power_law(n, loss, use_scipy=False)
    assert abs(fit["alpha"] - 0.3) < 0.05 and abs(fit["c"] - 1.5) < 0.05 and fit["rms"] < 0.01
    # loss still falling fast at the largest size: c is held at >= 0 rather than going negative
    fit = scaling.fit_power_law(n, 2.0 * n ** -0.05 - 0.9, use_scipy=False)
    assert fit["c"] >= 0.0 and fit["a"] >= 0.0
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit_power_law([1, 2], [1, 2])


def test_fit_of_a_loss_that_does_not_fall_says_so():
    """Losses flat or rising with N: no power law; the fit is the mean loss (a = 0, alpha = 0) with a note, which
    the table prints."""
    n = [1e4, 1e5, 1e6, 1e7]
    for loss in ([2.0, 2.1, 2.2, 2.3], [2.0, 2.0, 2.0, 2.0]):
        fit = scaling.fit_power_law(n, loss)
        assert fit["a"] == 0.0 and fit["alpha"] == 0.0 and fit["c"] == pytest.approx(np.mean(loss))
        assert "the loss does not fall with N" in fit["note"]
    # falling then rising, or flat with noise: the exponent runs to an edge of its range, which the note says
    for noisy in ([2.3, 2.2, 2.25, 2.4], [2.0, 2.05, 1.98, 2.02]):
        assert "alpha sits at the edge of the exponents searched" in scaling.fit_power_law(n, noisy)["note"]
    assert "note" not in scaling.fit_power_law(n, [3.0, 2.6, 2.4, 2.3])
    models = [dict(name=f"m{i}", d_model=8, n_layer=1, params=int(x), non_embedding_params=int(x), train_flops=1.0,
                   eval_loss=y, seconds=1.0) for i, (x, y) in enumerate(zip(n, loss))]
    table = scaling._table(dict(models=models, fit=fit, tokens_per_model=10, corpus="c", seqlen=8))
    assert table.endswith("Note: the loss does not fall with N: no power law fits; L(N) = c, the mean loss")


@pytest.mark.parametrize("n, loss, match", [
    ([1e5, 1e5, 1e5], [3.0, 2.5, 2.0], r"need at least 3 distinct model sizes .* got \[100000.0, 100000.0, 100000.0\]"),
    ([1e4, 1e5, 1e5], [3.0, 2.5, 2.0], "need at least 3 distinct model sizes"),
    ([1e4, np.nan, 1e6], [3.0, 2.5, 2.2], r"params must be positive finite numbers, got \[10000.0, nan, 1000000.0\]"),
    ([1e4, 1e5, np.inf], [3.0, 2.5, 2.2], "params must be positive finite numbers"),
    ([1e4, 0, 1e6], [3.0, 2.5, 2.2], "params must be positive finite numbers"),
    ([1e4, -1e5, 1e6], [3.0, 2.5, 2.2], "params must be positive finite numbers"),
    ([1e4, 1e5, 1e6], [3.0, np.nan, 2.2], r"losses must be finite numbers, got \[3.0, nan, 2.2\]"),
    ([1e4, 1e5, 1e6], [3.0, 2.5, -np.inf], "losses must be finite numbers"),
])
def test_fit_rejects_non_finite_and_non_positive_points(n, loss, match):
    with pytest.raises(ValueError, match=match):
        scaling.fit_power_law(n, loss)


def test_scipy_refinement_agrees():
    pytest.importorskip("scipy")
    n = np.logspace(4, 7, 6)
    loss = 3.0 * n ** -0.2 + 1.0
    fit = scaling.fit_power_law(n, loss, use_scipy=True)
    assert fit["alpha"] == pytest.approx(0.2, rel=1e-3)


def test_ladder_grows():
    configs = scaling.ladder_configs()
    sizes = [param_counts(c)["non_embedding"] for c in configs]
    assert len(configs) >= 5 and sizes == sorted(sizes) and sizes[-1] / sizes[0] > 100
    with pytest.raises(ValueError, match="rungs must be between 1 and"):
        scaling.ladder_configs(99)


def test_tiny_ladder_end_to_end(tmp_path):
    res = scaling.run(data=None, tiny=True, backend="torch", out=str(tmp_path), progress=False, log=None)
    models = res["models"]
    assert len(models) == 5
    losses = [m["eval_loss"] for m in models]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]                 # 65x the parameters, same tokens: lower held-out loss
    assert all(m["tokens"] == res["tokens_per_model"] for m in models)
    assert res["fit"] is not None and res["fit"]["alpha"] >= 0
    for name in ("scaling.json", "scaling.md", "loss_vs_params.png", "loss_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 200, name
    from fastlm.summary import forward_flops_per_token   # 3 x forward at the causal mean context, per token
    for m, cfg in zip(models, scaling.ladder_configs(5, tiny=True, seqlen=res["seqlen"])):
        assert m["train_flops_per_token"] == 3 * forward_flops_per_token(cfg, (res["seqlen"] + 1) / 2)
        assert m["train_flops"] == m["train_flops_per_token"] * m["tokens"]
    assert "RMS residual" in (tmp_path / "scaling.md").read_text()
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["models"][0]["non_embedding_params"] == models[0]["non_embedding_params"]


def test_cli(tmp_path, capsys):
    assert scaling.cli(["--tiny", "--data", "default", "--tokens", "2000", "--rungs", "3", "--out", str(tmp_path),
                        "--backend", "torch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Fit: L(N) =" in out and (tmp_path / "loss_vs_params.png").exists()
    assert "exact through 3 points: no residual to judge the fit by" in out and "RMS residual" not in out
    assert scaling.cli(["--tiny", "--budget", "0", "--out", str(tmp_path)]) == 2
    assert "budget must be positive" in capsys.readouterr().err


def test_settings_changed_by_the_run_are_reported(tmp_path):
    """--tiny caps seqlen and batch size, and a token budget under MIN_STEPS steps is raised: the run says so."""
    lines = []
    res = scaling.run(data=None, tiny=True, rungs=1, seqlen=64, batch_size=8, tokens=10, backend="torch",
                      out=str(tmp_path), progress=False, log=lines.append)
    assert "tiny ladder: seqlen 64 -> 32, batch size 8 -> 4 (the tiny ladder's limits)" in lines
    assert f"10 tokens per model is under {scaling.MIN_STEPS} steps of 4x32: each model trains {scaling.MIN_STEPS} " \
           f"steps ({scaling.MIN_STEPS * 128} tokens)" in lines
    assert res["tokens_per_model"] == scaling.MIN_STEPS * 128


@pytest.mark.parametrize("kw, match", [
    (dict(seqlen=0), "seqlen must be a positive integer, got 0"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(tokens=-5), "tokens must be a positive integer, got -5"),
    (dict(tokens=0), "tokens must be a positive integer"),
    (dict(seqlen=True), "seqlen must be a positive integer, got True"),
    (dict(budget=float("nan")), "budget must be positive and finite, got nan"),
    (dict(budget=float("inf")), "budget must be positive and finite, got inf"),
    (dict(rungs=2.5), "rungs must be an integer"),
    (dict(seed="0"), "seed must be an integer, got '0'"),
])
def test_bad_arguments_are_rejected_before_training(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        scaling.run(data=None, tiny=True, backend="torch", out=str(tmp_path / "out"), progress=False, log=None, **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seqlen", "0"], "seqlen must be a positive integer, got 0"),
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--tokens", "-5"], "tokens must be a positive integer, got -5"),
    (["--threads", "-1"], "--threads must be an integer in [1, "),
    (["--device", "foo"], "device must be cpu, cuda or cuda:N, got 'foo'"),
])
def test_cli_rejects_bad_numbers(tmp_path, capsys, argv, message):
    threads = torch.get_num_threads()
    assert scaling.cli(["--tiny", "--data", "default", "--out", str(tmp_path), "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert torch.get_num_threads() == threads


def test_out_that_is_a_file_is_rejected_up_front(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(ValueError, match=f"out {tmp_path / 'afile'} is a file; expected a directory"):
        scaling.run(data="nonexistent", tiny=True, out=str(tmp_path / "afile"), progress=False, log=None)
    assert scaling.cli(["--tiny", "--data", "default", "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert f"error: --out {tmp_path / 'afile'} is a file; expected a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"


def test_three_rung_fit_reports_its_residual_unless_exact():
    # a = c >= 0 constrain the curve: three losses that do not fall with size are not fit exactly, and the residual
    # says so; three that do are passed through exactly, which the table says instead of a meaningless 0
    n = [1e4, 1e5, 1e6]

    def table(losses):
        models = [dict(name=f"m{i}", d_model=8, n_layer=1, params=p, non_embedding_params=p, train_flops=1.0,
                       eval_loss=loss, seconds=1.0) for i, (p, loss) in enumerate(zip(n, losses))]
        result = dict(models=models, fit=scaling.fit_power_law(n, losses), tokens_per_model=1000, corpus="c",
                      seqlen=8)
        return scaling._table(result)
    assert "exact through 3 points" in table([4.0, 3.0, 2.6])
    assert "RMS residual" in table([3.0, 3.5, 2.9])
