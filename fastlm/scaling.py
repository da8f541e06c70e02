"""The scaling study: how held-out loss falls with model size, measured on this machine.

``python -m fastlm scaling`` trains a ladder of Llama-family byte-level models (widths and depths growing together)
on the same corpus with the same token budget and schedule, records each one's held-out loss, fits

    L(N) = a * N^(-alpha) + c          (N = non-embedding parameters, as in Kaplan et al. 2020)

and writes scaling.json, scaling.md (the table and the fit), loss_vs_params.png and loss_vs_flops.png to --out.

The default corpus is the Python standard library's sources (several MB, on every machine): large enough that no
model sees a token twice, so held-out loss measures generalization rather than memorization. The default ladder
(5 rungs, 25K to 2.7M non-embedding parameters, 1.2M tokens each) takes about 13 minutes on a 2-core CPU (12m41s
measured: 33 s for the smallest rung, 416 s for the largest); --budget multiplies the tokens per model and --rungs
adds larger models (up to 59M), for a GPU.

The fit: for a fixed alpha, a and c follow by linear least squares; alpha is found by a grid search refined by
golden-section search (and scipy.optimize.curve_fit polishes the result when scipy is installed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# (d_model, n_layer, n_head): width and depth grow together, head_dim 16..64. The first DEFAULT_RUNGS (25K to 2.7M
# non-embedding parameters) fit the CPU default; the rest (6M to 59M) are for --rungs on a GPU.
LADDER = [(32, 2, 2), (64, 2, 4), (96, 3, 4), (128, 4, 4), (192, 6, 6), (256, 8, 8), (384, 8, 6), (512, 10, 8),
          (640, 12, 10)]
TINY_LADDER = [(8, 1, 2), (16, 1, 2), (24, 2, 2), (32, 2, 2), (48, 2, 4)]
DEFAULT_RUNGS = 5


MIN_STEPS = 5  # training steps per model at least, whatever the token budget


def ladder_configs(rungs: int = DEFAULT_RUNGS, *, tiny: bool = False, seqlen: int = 128, vocab_size: int = 256):
    from fastlm.config import Config
    ladder = TINY_LADDER if tiny else LADDER
    if not 1 <= rungs <= len(ladder):
        raise ValueError(f"rungs must be between 1 and {len(ladder)}, got {rungs}")
    return [Config(name=f"ladder-{d}x{n_layer}", family="llama", vocab_size=vocab_size, n_layer=n_layer,
                   n_head=n_head, n_kv_head=n_head, d_model=d, max_seqlen=seqlen, multiple_of=8)
            for d, n_layer, n_head in ladder[:rungs]]


def learning_rate(n_params: int) -> float:
    """Smaller models take larger steps (the log-linear trend of Kaplan et al. 2020, doubled for short runs)."""
    return 2 * max(0.003239 - 0.0001395 * math.log(n_params), 3e-4)


MAX_ALPHA = 5.0   # the exponents searched: (0, MAX_ALPHA]


def fit_power_law(n, loss, *, use_scipy: bool | None = None) -> dict:
    """Least-squares fit of loss = a * n^(-alpha) + c with a, c >= 0 and alpha in (0, MAX_ALPHA], over at least three
    distinct sizes n. Returns a, alpha, c, the RMS residual and the method; where the loss does not fall with n
    (a = 0) alpha is 0 and a "note" says so."""
    n = np.asarray(n, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if n.shape != loss.shape or n.ndim != 1 or len(n) < 3:
        raise ValueError(f"need at least 3 (params, loss) points of equal length, got {n.shape} and {loss.shape}")
    if not (np.isfinite(n) & (n > 0)).all():
        raise ValueError(f"params must be positive finite numbers, got {n.tolist()}")
    if not np.isfinite(loss).all():
        raise ValueError(f"losses must be finite numbers, got {loss.tolist()}")
    if len(np.unique(n)) < 3:
        raise ValueError(f"need at least 3 distinct model sizes to fit a, alpha and c, got {n.tolist()}")
    scale = n.min()  # fit in units of the smallest model: keeps n^-alpha well conditioned

    def solve(alpha):
        x = (n / scale) ** -alpha
        A = np.stack([x, np.ones_like(x)], axis=1)
        (a, c), *_ = np.linalg.lstsq(A, loss, rcond=None)
        if c < 0:      # constrain c >= 0: refit through the origin
            a, c = float(x @ loss / (x @ x)), 0.0
        if a < 0:      # a flat curve: the best constant
            a, c = 0.0, float(loss.mean())
        return float(((a * x + c - loss) ** 2).sum()), a, c

    grid = np.linspace(0.005, MAX_ALPHA, 1000)
    sse = [solve(a)[0] for a in grid]
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):   # golden-section search on the bracket around the best grid point
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if solve(m1)[0] < solve(m2)[0]:
            hi = m2
        else:
            lo = m1
    alpha = (lo + hi) / 2
    err, a, c = solve(alpha)
    method = "numpy"
    if use_scipy is not False:
        try:
            from scipy.optimize import curve_fit
        except ImportError:
            if use_scipy:
                raise
        else:
            try:
                popt, _ = curve_fit(lambda x, a_, al, c_: a_ * (x / scale) ** -al + c_, n, loss, p0=[a, alpha, c],
                                    bounds=([0, 0, 0], [np.inf, MAX_ALPHA, np.inf]), maxfev=10000)
                cand = float((((popt[0] * (n / scale) ** -popt[1] + popt[2]) - loss) ** 2).sum())
                if cand <= err:
                    a, alpha, c, err, method = float(popt[0]), float(popt[1]), float(popt[2]), cand, "scipy"
            except RuntimeError:
                pass  # curve_fit did not converge: keep the numpy solution
    fit = {"a": a * scale ** alpha, "alpha": alpha, "c": c, "rms": math.sqrt(err / len(n)), "method": method}
    if a == 0:   # (reported for n in parameters above, not in units of the smallest model)
        fit.update(alpha=0.0, note="the loss does not fall with N: no power law fits; L(N) = c, the mean loss")
    elif not grid[0] < alpha < MAX_ALPHA * 0.999:
        fit["note"] = (f"alpha sits at the edge of the exponents searched ({grid[0]:g} .. {MAX_ALPHA:g}): these "
                       f"losses do not determine a power law")
    return fit


def predict(fit: dict, n) -> np.ndarray:
    return fit["a"] * np.asarray(n, dtype=np.float64) ** -fit["alpha"] + fit["c"]


def run(*, data: str | None = "stdlib", rungs: int = DEFAULT_RUNGS, tiny: bool = False, budget: float = 1.0,
        tokens: int | None = None, batch_size: int = 8, seqlen: int = 128, backend: str = "auto", device=None,
        out: str = "fastlm-scaling", seed: int = 0, progress: bool = True, log=print) -> dict:
    """Train the ladder and fit the law. ``tokens`` (default 1.2M, tiny 12K) times ``budget`` tokens per model."""
    from fastlm.config import is_int, is_real, plain
    from fastlm.summary import forward_flops_per_token, param_counts
    from fastlm.train import ByteTokenizer, check_out_dir, load_corpus, resolve_device, train
    if not is_int(rungs):
        raise ValueError(f"rungs must be an integer, got {rungs!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not is_real(budget) or not 0 < budget < math.inf:
        raise ValueError(f"budget must be positive and finite, got {budget!r}")
    for name, value in (("batch_size", batch_size), ("seqlen", seqlen), ("tokens", 1 if tokens is None else tokens)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rungs, seed, budget, tokens, batch_size, seqlen = map(plain, (rungs, seed, budget, tokens, batch_size, seqlen))
    from fastlm.backends import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    resolve_device(device)
    check_out_dir(out)
    if tiny and (seqlen > 32 or batch_size > 4):
        if log:
            log(f"tiny ladder: seqlen {seqlen} -> {min(seqlen, 32)}, batch size {batch_size} -> {min(batch_size, 4)} "
                f"(the tiny ladder's limits)")
        seqlen, batch_size = min(seqlen, 32), min(batch_size, 4)
    base = tokens if tokens is not None else (12_000 if tiny else 1_200_000)
    steps = int(base * budget) // (batch_size * seqlen)
    if steps < MIN_STEPS:
        if log:
            log(f"{int(base * budget):,} tokens per model is under {MIN_STEPS} steps of {batch_size}x{seqlen}: each "
                f"model trains {MIN_STEPS} steps ({MIN_STEPS * batch_size * seqlen:,} tokens)")
        steps = MIN_STEPS
    text = load_corpus(data)
    configs = ladder_configs(rungs, tiny=tiny, seqlen=seqlen)
    os.makedirs(out, exist_ok=True)
    rows = []
    for cfg in configs:
        params = param_counts(cfg)
        flops_per_token = 3 * forward_flops_per_token(cfg, (seqlen + 1) / 2)
        lr = learning_rate(params["non_embedding"])
        if log:
            log(f"[{cfg.name}] {params['non_embedding']:,} non-embedding params, {steps} steps of "
                f"{batch_size}x{seqlen} tokens, lr {lr:.2e}")
        res = train(cfg, text=text, tokenizer=ByteTokenizer(), steps=steps, batch_size=batch_size, seqlen=seqlen,
                    lr=lr, warmup=max(steps // 20, 1), eval_every=max(steps // 5, 1), backend=backend,
                    device=device, seed=seed, progress=progress, log=None, plot=False)
        hist = res["history"]
        tokens_per_step = batch_size * seqlen
        rows.append({"name": cfg.name, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                     "params": params["total"], "non_embedding_params": params["non_embedding"],
                     "train_flops_per_token": flops_per_token, "tokens": res["tokens"],
                     "train_flops": flops_per_token * res["tokens"], "lr": lr, "steps": steps,
                     "final_train_loss": hist["loss"][-1], "eval_loss": res["eval_loss"],
                     "seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"],
                     "eval_curve": {"tokens": [s * tokens_per_step for s in hist["eval_step"]],
                                    "flops": [s * tokens_per_step * flops_per_token for s in hist["eval_step"]],
                                    "loss": hist["eval_loss"]}})
        if log:
            log(f"[{cfg.name}] held-out loss {res['eval_loss']:.4f} in {res['seconds']:.1f} s "
                f"({res['tokens_per_s']:,.0f} tokens/s)")
    n = [r["non_embedding_params"] for r in rows]
    fit = fit_power_law(n, [r["eval_loss"] for r in rows]) if len(rows) >= 3 else None
    result = {"corpus": data or "fastlm/data", "seqlen": seqlen, "batch_size": batch_size, "steps": steps,
              "tokens_per_model": steps * batch_size * seqlen, "budget": budget, "models": rows, "fit": fit,
              "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "note": "held-out loss in nats per byte; N = non-embedding parameters"}
    _write(result, out)
    if log:
        log(_table(result))
        log(f"wrote {out}/scaling.json, scaling.md, loss_vs_params.png, loss_vs_flops.png")
    return result


def _table(result: dict) -> str:
    lines = ["| model | d_model | layers | params | non-emb params | train FLOPs | held-out loss | fit | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    fit = result["fit"]
    for r in result["models"]:
        pred = f"{float(predict(fit, r['non_embedding_params'])):.4f}" if fit else "-"
        lines.append(f"| {r['name']} | {r['d_model']} | {r['n_layer']} | {r['params']:,} | "
                     f"{r['non_embedding_params']:,} | {r['train_flops']:.3g} | {r['eval_loss']:.4f} | {pred} | "
                     f"{r['seconds']:.1f} |")
    if fit:
        # three points determine the three parameters: a curve through them (residual ~0) tells nothing about the
        # fit; the constraints (a, c >= 0) can keep it off them, and then the residual is reported
        exact = len(result["models"]) == 3 and fit["rms"] < 1e-6 * max(abs(m["eval_loss"]) for m in result["models"])
        residual = ("exact through 3 points: no residual to judge the fit by" if exact else
                    f"RMS residual {fit['rms']:.4f}")
        lines.append(f"\nFit: L(N) = {fit['a']:.4g} * N^(-{fit['alpha']:.4f}) + {fit['c']:.4f}  "
                     f"({residual}, {fit['method']}); {result['tokens_per_model']:,} tokens per "
                     f"model, corpus {result['corpus']}, seqlen {result['seqlen']}")
        if fit.get("note"):
            lines.append(f"Note: {fit['note']}")
    return "\n".join(lines)


def _write(result: dict, out: str):
    with open(os.path.join(out, "scaling.json.tmp"), "w") as f:
        json.dump(result, f, indent=2)
    os.replace(os.path.join(out, "scaling.json.tmp"), os.path.join(out, "scaling.json"))
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write("# fastlm scaling study\n\n" + _table(result) + "\n")
    from fastlm._plots import pyplot
    plt = pyplot("the scaling plots")
    if plt is None:
        return
    rows, fit = result["models"], result["fit"]
    n = np.array([r["non_embedding_params"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(n, [r["eval_loss"] for r in rows], "o", label="held-out loss")
    if fit:
        xs = np.logspace(np.log10(n.min()) - 0.2, np.log10(n.max()) + 0.2, 100)
        ax.plot(xs, predict(fit, xs), "-", label=f"{fit['a']:.3g}·N^-{fit['alpha']:.3f} + {fit['c']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"loss vs model size ({result['tokens_per_model']:,} tokens each)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_vs_params.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.plot(r["eval_curve"]["flops"], r["eval_curve"]["loss"], "o-", ms=3, label=f"{r['non_embedding_params']:,}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (matmuls, 3 x forward)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("loss vs training compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="non-emb params", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_vs_flops.png"), dpi=110)
    plt.close(fig)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm scaling", description="Train a ladder of model sizes on one "
                                "corpus and fit L(N) = a*N^-alpha + c.")
    p.add_argument("--data", default="stdlib", help="text file, directory, 'stdlib' (default) or 'default' "
                                                    "(the corpus shipped in fastlm/data)")
    p.add_argument("--rungs", type=int, default=DEFAULT_RUNGS,
                   help=f"models in the ladder (default {DEFAULT_RUNGS}; at most {len(LADDER)}, {len(TINY_LADDER)} "
                        f"with --tiny)")
    p.add_argument("--budget", type=float, default=1.0, help="multiply the tokens per model (e.g. 20 on a GPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens per model before --budget (default 1200000, with --tiny 12000; at least {MIN_STEPS} "
                   "steps)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per step (small: a short, token-limited run gains more from extra updates)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="fastlm-scaling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long ladder of tiny models (for tests; seqlen at most 32, batch size at most 4)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from fastlm.train import check_out_dir, check_threads
        check_threads(args.threads)
        check_out_dir(args.out, "--out")
        run(data=None if args.data == "default" else args.data, rungs=args.rungs, tiny=args.tiny,
            budget=args.budget, tokens=args.tokens, batch_size=args.batch_size, seqlen=args.seqlen,
            backend=args.backend, device=args.device, out=args.out, seed=args.seed, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
