"""fastlm.train: the loss falls, checkpoints round-trip, resume continues the same loss curve, saves are atomic,
bad input gets clear errors, and the train / generate CLIs run."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastlm import train as T
from fastlm.config import Config
from fastlm.generate import cli as generate_cli
from fastlm.model import Transformer
from fastlm.summary import cli as summary_cli

TEXT = T.load_corpus()
TINY = dict(family="llama", vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seqlen=64,
            multiple_of=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return Config(name="test-tiny", **{**TINY, **kw})


class _ShiftedBytes(T.ByteTokenizer):
    """Byte ids + 200: ids past the vocab_size it claims (256)."""
    byte_level = False

    def encode(self, text):
        return [i + 200 for i in super().encode(text)]


def _train(**kw):
    # (on the CPU where there is a GPU too: the expectations below are CPU results)
    args = dict(text=TEXT, steps=20, batch_size=4, seqlen=32, lr=3e-3, warmup=5, eval_every=10, eval_batches_max=2,
                backend="torch", device="cpu", progress=False, log=None)
    args.update(kw)
    return T.train(args.pop("config", _cfg()), **args)


def test_default_corpus_is_shipped():
    assert T.default_corpus_files(), "fastlm/data/*.txt missing"
    assert len(TEXT.encode()) > 60_000


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_falls(family):
    cfg = _cfg(family=family, n_kv_head=2) if family == "gpt2" else _cfg()
    res = _train(config=cfg, steps=200, batch_size=8, warmup=20, eval_every=100)
    h = res["history"]
    first = sum(h["loss"][:10]) / 10
    last = sum(h["loss"][-10:]) / 10
    assert first > 5.0                          # ~ln(256) = 5.55 for an untrained byte model
    assert last < 2.9, (first, last)            # it learned the byte statistics and more
    assert h["eval_loss"][-1] < h["eval_loss"][0] < 3.3
    assert res["perplexity"] == pytest.approx(torch.tensor(res["eval_loss"]).exp().item(), rel=1e-6)


def test_save_load_identical_logits(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    res = _train(steps=5, out=str(tmp_path), config=_cfg(rope_scaling=scaling))
    model, info = T.load_checkpoint(str(tmp_path), backend="torch")
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), res["model"].eval()(x))
    assert info["step"] == 5 and info["config"] == res["config"] and info["tokenizer"].name == "byte"
    assert info["config"].rope_scaling == scaling
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_resume_continues_the_same_curve(tmp_path):
    full = _train(steps=16, eval_every=4)
    _train(steps=16, eval_every=4, out=str(tmp_path), stop_after=8, plot=False)  # "interrupted" after step 8
    resumed = _train(steps=16, eval_every=4, out=str(tmp_path), resume=True, plot=False)
    a, b = full["history"], resumed["history"]
    assert b["step"] == list(range(1, 17))
    assert resumed["tokens"] == 8 * 4 * 32 and full["tokens"] == 16 * 4 * 32       # the steps this run trained
    torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(b["eval_loss"]), torch.tensor(a["eval_loss"]), rtol=1e-5, atol=1e-6)
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_resume_keeps_the_run_settings(tmp_path, capsys, monkeypatch):
    """A resumed run trains with the interrupted run's settings: the CLI's --resume takes every setting not given
    from the checkpoint (and continues the same loss curve), while a setting that differs (an argument of train(), an
    option given to the CLI) or a model / tokenizer option is an error naming it."""
    settings = dict(batch_size=3, seqlen=24, lr=1e-3, warmup=2, seed=5, grad_clip=0.5, weight_decay=0.05)
    full = _train(steps=8, eval_every=4, **settings)
    _train(steps=8, eval_every=4, out=str(tmp_path), stop_after=4, plot=False, **settings)
    assert T.run_settings(str(tmp_path)) == {**settings, "grad_accum": 1, "dtype": "fp32"}
    with pytest.raises(ValueError, match=r"other settings: seqlen=32 \(the checkpoint's: 24\), batch_size=4 .*"
                                         r"lr=0.003 \(the checkpoint's: 0.001\), warmup=5 .*seed=0 "):
        _train(steps=8, out=str(tmp_path), resume=True)
    for extra, named in ((["--lr", "0.5"], "lr=0.5 (the checkpoint's: 0.001)"),
                         (["--preset", "llama-tiny"], "--preset"), (["--tokenizer", "byte"], "--tokenizer")):
        assert T.cli(["--out", str(tmp_path), "--resume", "--steps", "8", "--no-progress"] + extra) == 2
        assert named in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the CLI trains on the CPU, as _train did
    assert T.cli(["--out", str(tmp_path), "--resume", "--steps", "8", "--eval-every", "4", "--backend", "torch",
                  "--no-progress"]) == 0
    resumed = T.load_checkpoint(str(tmp_path), backend="torch")[1]["history"]
    assert resumed["step"] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(full["history"]["loss"]), rtol=1e-5,
                               atol=1e-6)


def test_checkpoint_of_a_compiled_or_parametrized_model_loads(tmp_path):
    """save_checkpoint unwraps torch.compile's module (its state dict prefixes every name with _orig_mod.) and saves
    a parametrized Linear's weight as it computes it (weight norm here): both load into a plain model."""
    model = Transformer(_cfg(), backend="torch")
    file = T.save_checkpoint(str(tmp_path), torch.compile(model, backend="eager"))
    loaded, _ = T.load_model(file, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.nn.utils.parametrizations.weight_norm(model.layers[0].attn.wq)
    loaded, _ = T.load_model(T.save_checkpoint(str(tmp_path), model), backend="torch")
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-6, atol=1e-6)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    res = _train(steps=3, out=str(tmp_path), plot=False)
    before = (tmp_path / T.CHECKPOINT).read_bytes()
    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(str(tmp_path), res["model"], step=99)
    assert (tmp_path / T.CHECKPOINT).read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert T.load_checkpoint(str(tmp_path), backend="torch")[1]["step"] == 3


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        T.load_checkpoint(str(tmp_path / "nothing"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        T.load_checkpoint(str(bad))
    res = _train(steps=2, out=str(tmp_path / "run"), plot=False)
    good = (tmp_path / "run" / T.CHECKPOINT).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        T.load_checkpoint(str(tmp_path / "trunc.safetensors"))
    # tensors that don't match the stored config
    other = tmp_path / "other.safetensors"
    T.save_checkpoint(str(other), res["model"])
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(other), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = meta["config"].replace('"d_model": 32', '"d_model": 48')
    save_file(tensors, str(other), metadata=meta)
    with pytest.raises(ValueError, match="does not match its config.*shape mismatch"):
        T.load_checkpoint(str(other))
    # a NaN weight (generation would print garbage): refused by name
    nan = tmp_path / "nan.safetensors"
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(nan), metadata={**meta, "config": meta["config"].replace('"d_model": 48', '"d_model": 32')})
    with pytest.raises(ValueError, match=r"is corrupt: non-finite values \(NaN or inf\) in \['norm.weight'\]"):
        T.load_model(str(nan))
    # weights stored as integers (or booleans, complex numbers) would be cast silently: refused by name
    for dtype in (torch.int32, torch.bool, torch.complex64):
        odd = tmp_path / f"odd_{str(dtype)[6:]}.safetensors"
        save_file({k: v.to(dtype) if k == "model.layers.0.attn.wq.weight" else v for k, v in tensors.items()
                   if k != "model.norm.weight"} | {"model.norm.weight": torch.ones(32)}, str(odd),
                  metadata={**meta, "config": meta["config"].replace('"d_model": 48', '"d_model": 32')})
        with pytest.raises(ValueError, match=rf"dtype mismatch layers.0.attn.wq.weight: {dtype} \(a floating-point"):
            T.load_model(str(odd))


def test_bad_data_and_args(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        T.load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="has no .txt"):
        T.load_corpus(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="'/dev/null' is neither a regular file nor a directory"):
        T.load_corpus("/dev/null")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="too few for seqlen"):
        _train(text="short text")
    with pytest.raises(ValueError, match=r"text must be encodable as UTF-8, but it holds a lone surrogate at "
                                         r"character 5: '\\ud800'"):
        _train(text=TEXT[:5] + "\ud800" + TEXT)
    with pytest.raises(ValueError, match="longer than the model's context"):
        _train(seqlen=65)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        _train(steps=0)
    with pytest.raises(ValueError, match="unknown Config field 'width'"):
        T.parse_overrides("width=3")
    with pytest.raises(ValueError, match="rope_scaling takes a dict"):
        T.parse_overrides("rope_scaling=linear")
    assert T.parse_overrides("d_model=64,tie_embeddings=true,rope_base=5e5") == dict(
        d_model=64, tie_embeddings=True, rope_base=500000.0)
    assert T.parse_overrides("family=llama, n_layer = 3") == dict(family="llama", n_layer=3)
    with pytest.raises(ValueError, match="--config expects key=value pairs separated by commas, got 'n_layer'"):
        T.parse_overrides("d_model=64,n_layer")
    with pytest.raises(ValueError, match="--config: tie_embeddings='yes' is not a valid"):
        T.parse_overrides("tie_embeddings=yes")
    with pytest.raises(ValueError, match="--config: n_layer='2.5' is not a valid"):
        T.parse_overrides("n_layer=2.5")
    with pytest.raises(ValueError, match="the training text is empty"):
        _train(text=" \n\t")
    with pytest.raises(ValueError, match="resume needs out="):
        _train(resume=True)
    with pytest.raises(ValueError, match=r"token id \d+ does not fit the model's vocab_size=256"):
        _train(tokenizer=_ShiftedBytes())


def test_corpus_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    assert T.load_corpus(str(tmp_path)) == "hello \n\nworld"
    assert "def " in T.load_corpus("stdlib")[:200_000]


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is not None,
                    reason="tiktoken is installed: the missing-package error cannot be provoked")
def test_missing_tokenizer_package():
    with pytest.raises(ImportError, match="needs the tiktoken package"):
        T.make_tokenizer("tiktoken")


class _FakeTiktoken:
    """tiktoken's interface (get_encoding -> an encoding with n_vocab, encode_ordinary, decode), as bytes + 3, so that
    the tiktoken tokenizer runs offline and without the package; an encoding it does not know fails as an offline
    download does."""
    class Encoding:
        n_vocab = 259

        def encode_ordinary(self, text):
            return [b + 3 for b in text.encode()]

        def decode(self, ids):
            return bytes(i - 3 for i in ids).decode(errors="replace")

    @classmethod
    def get_encoding(cls, name):
        if name != "gpt2":
            raise ConnectionError(f"could not download the {name} BPE ranks")
        return cls.Encoding()


def test_tiktoken_run_round_trips_through_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", _FakeTiktoken)
    tokenizer = T.make_tokenizer("tiktoken")
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.spec()) == ("tiktoken:gpt2", 259,
                                                                      {"kind": "tiktoken", "encoding": "gpt2"})
    assert tokenizer.encode("ab") == [100, 101] and tokenizer.decode([100, 101]) == "ab"
    out = str(tmp_path / "run")
    _train(steps=2, warmup=0, eval_every=2, tokenizer=tokenizer, out=out,
           config=Config.from_name("llama-tiny", vocab_size=259, max_seqlen=64))
    model, info = T.load_checkpoint(out, backend="torch")
    assert info["tokenizer"].spec() == tokenizer.spec() and info["tokenizer"].encode("é") == tokenizer.encode("é")
    with pytest.raises(RuntimeError, match="tiktoken could not load encoding 'cl100k_base' .* offline, use "
                                           "--tokenizer byte"):
        T.make_tokenizer("tiktoken", encoding="cl100k_base")


def test_sentencepiece_run_carries_its_model(tmp_path, capsys, monkeypatch):
    """A SentencePiece run: the checkpoint carries the tokenizer model itself, so moving or deleting the .model file
    keeps it resumable and sampleable (CLI included); the model's bytes are checked against the spec's sha256."""
    spm = pytest.importorskip("sentencepiece")   # (in requirements-cpu.txt: CI runs this)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:60000])
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    tokenizer = T.make_tokenizer("sentencepiece", str(tmp_path / "spm.model"))
    assert tokenizer.vocab_size == 300
    run = tmp_path / "run"
    _train(steps=4, eval_every=2, stop_after=2, text=None, data=str(corpus), tokenizer=tokenizer,
           config=_cfg(vocab_size=300), out=str(run), plot=False)
    (tmp_path / "spm.model").unlink()
    model, info = T.load_checkpoint(str(run), backend="torch")
    assert info["tokenizer"].encode("The old house") == tokenizer.encode("The old house")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.cli(["--out", str(run), "--resume", "--backend", "torch", "--no-progress"]) == 0
    assert generate_cli(["--checkpoint", str(run), "--backend", "torch", "--max-new-tokens", "4", "The old"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("The old")
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(run / T.CHECKPOINT, bad, tokenizer=json.dumps({**tokenizer.spec(), "sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"its tokenizer .* cannot be built: the sentencepiece model it carries has "
                                         r"sha256 \w{12}, its spec says 000000000000"):
        T.load_checkpoint(str(bad))


def test_tokenizer_model_file_needs_sentencepiece(tmp_path, capsys):
    with pytest.raises(ValueError, match="read by the sentencepiece tokenizer only; got tokenizer 'byte'"):
        T.make_tokenizer("byte", "x.model")
    assert T.cli(["--tokenizer-model", "x.model", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--tokenizer-model x.model) is read by the sentencepiece tokenizer only" in capsys.readouterr().err
    assert not (tmp_path / T.CHECKPOINT).exists()


def test_held_out_split_is_the_corpus_end_and_disjoint():
    train_ids, val_ids = T.split_tokens(torch.arange(1000), 32)
    assert torch.equal(torch.cat([train_ids, val_ids]), torch.arange(1000)) and len(val_ids) == 100
    assert len(T.split_tokens(torch.arange(100), 32)[1]) == 33                    # at least one window + 1


def test_evaluate_is_the_token_mean_of_the_model_loss():
    torch.manual_seed(0)
    model = Transformer(_cfg(), backend="torch")
    val = torch.randint(0, 256, (300,))
    with torch.no_grad():
        parts = [(model(x, y).item(), y.numel()) for x, y in T.eval_batches(val, 3, 16, 8)]
    got = T.evaluate(model, val, 3, 16, torch.device("cpu"), max_batches=8)
    assert got == pytest.approx(sum(v * n for v, n in parts) / sum(n for _, n in parts), rel=1e-6)


def test_schedule():
    lrs = [T.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == lrs[9] == lrs[10] == 1.0                     # the peak, once warm-up ends
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    for s in (10, 55, 99):                                          # cosine from the peak at 10 to 0.1 at 100
        assert lrs[s] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 90)), abs=1e-12)


def test_weight_decay_on_matrices_only():
    """AdamW decays the 2-D weights; embeddings (token and position), norms and biases are not decayed."""
    model = Transformer(Config.from_name("gpt2-tiny"))
    groups = T.make_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n}
    assert "tok_emb.weight" not in decayed and "pos_emb.weight" not in decayed and decayed


def test_gradients_are_clipped_to_grad_clip(monkeypatch):
    """The global gradient norm is clipped to grad_clip before each optimizer step (and not at grad_clip 0)."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: (
        seen.append(max_norm), real(params, max_norm, **kw))[1])
    _train(steps=2, grad_clip=0.5)
    assert seen == [0.5, 0.5]
    seen.clear()
    _train(steps=2, grad_clip=0.0)
    assert seen == []


def test_grad_accum_matches_bigger_batch(monkeypatch):
    # 2 micro-batches of 4 sequences == one batch of the same 8 sequences. With AdamW's eps at 1e-8 a parameter whose
    # gradient is a sum that cancels to ~1e-9 moves by lr * g / (|g| + eps): by an amount set by the rounding of the
    # sum, which the two orders of summation round differently. eps = 1e-3 bounds that amplification by lr / eps.
    real = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda *a, **k: _with_eps(real(*a, **k), 1e-3))
    a = _train(steps=2, batch_size=8, grad_accum=1, warmup=1)
    b = _train(steps=2, batch_size=4, grad_accum=2, warmup=1)
    torch.testing.assert_close(torch.tensor(b["history"]["loss"]), torch.tensor(a["history"]["loss"]),
                               rtol=1e-5, atol=1e-6)
    for p, q in zip(a["model"].parameters(), b["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def _with_eps(opt, eps):
    for group in opt.param_groups:
        group["eps"] = eps
    return opt


def test_train_and_generate_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = T.cli(["--steps", "6", "--batch-size", "4", "--seqlen", "32", "--eval-every", "3", "--out", out,
                "--config", "d_model=32,n_layer=1,n_head=2,n_kv_head=1", "--backend", "torch", "--no-progress"])
    assert rc == 0
    assert os.path.exists(os.path.join(out, T.CHECKPOINT)) and os.path.exists(os.path.join(out, "loss.png"))
    assert "held-out loss" in capsys.readouterr().out
    assert summary_cli([out, "--device", "cpu", "--seqlen", "32"]) == 0        # a checkpoint's config
    assert "Params: total" in capsys.readouterr().out
    rc = generate_cli(["--checkpoint", out, "--max-new-tokens", "12", "--backend", "torch", "The river", "--seed", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("The river") and len(text.encode()) >= len("The river") + 1
    assert generate_cli(["--checkpoint", str(tmp_path / "nope"), "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert generate_cli(["--checkpoint", out, "--backend", "torch", "x" * 200]) == 2
    assert "longer than the model's context" in capsys.readouterr().err
    assert T.cli(["--preset", "gpt5", "--out", out]) == 2
    assert "unknown model preset 'gpt5'" in capsys.readouterr().err
    # export: the checkpoint as a transformers model directory, same logits
    transformers = pytest.importorskip("transformers")
    from fastlm.__main__ import main
    assert main(["export", "--checkpoint", out, str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model, _ = T.load_checkpoint(out, backend="torch")
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), rtol=1e-5, atol=1e-5)
    # the exported directory and its config.json read back as the run's model (summary takes them)
    for path in (tmp_path / "hf", tmp_path / "hf" / "config.json", str(tmp_path / "hf")):
        # (multiple_of only derives an intermediate size when none is given: transformers gives one)
        loaded = dataclasses.replace(T.load_config(path), name=model.config.name,        # (a Path too)
                                     multiple_of=model.config.multiple_of)
        assert loaded == model.config
        assert summary_cli([str(path), "--device", "cpu", "--seqlen", "32"]) == 0
        assert "Params: total" in capsys.readouterr().out
    (tmp_path / "bert.json").write_text('{"model_type": "bert"}')
    assert summary_cli([str(tmp_path / "bert.json")]) == 2
    assert "transformers configurations of model_type gpt2, llama, mistral, qwen2; got 'bert'" in \
        capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), str(tmp_path / "hf2")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "--checkpoint", out, out]) == 2                         # the run's config.json stays
    assert "holds a training checkpoint" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["export", "--checkpoint", out, str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    # a non-empty directory (here: the export above, plus a stale shard index) needs --overwrite, which replaces
    # the earlier export's model files
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    assert main(["export", "--checkpoint", out, str(tmp_path / "hf")]) == 2
    assert "is not empty (config.json, generation_config.json, model.safetensors" in capsys.readouterr().err
    assert main(["export", "--checkpoint", out, str(tmp_path / "hf"), "--overwrite"]) == 0
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():                                        # the overwritten export is the same model
        torch.testing.assert_close(again(x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_torchrun_trains_with_ddp(tmp_path):
    """Two processes under torchrun (gloo, on the CPU even where there is a GPU: two nccl ranks need two GPUs): DDP
    keeps the ranks' weights identical, and they differ from a single-process run on rank 0's batches alone (rank
    1's gradients were averaged in); rank 0 writes the checkpoint."""
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
           str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["loss"] == ranks[1]["loss"] and len(ranks[0]["loss"]) == 4      # the logged loss is all-reduced
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    spec = importlib.util.spec_from_file_location("ddp_worker", worker)
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)
    alone = T.train(w.TINY, text=TEXT, device="cpu", **w.ARGS)["model"].state_dict()
    assert any(not torch.allclose(alone[n], v) for n, v in ranks[0]["state"].items())
    assert os.path.exists(tmp_path / T.CHECKPOINT)


def test_checkpoint_path_that_is_a_file_or_missing(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad.pt is a file, not a checkpoint: expected a training output directory "
                                         r"\(holding checkpoint.safetensors.*or a .safetensors file"):
        T.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: no checkpoint.safetensors in directory"):
        T.load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        T.load_checkpoint(str(tmp_path / "nope"))
    assert generate_cli(["--checkpoint", str(tmp_path / "bad.pt"), "x"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a checkpoint" in err and "bad.pt/checkpoint.safetensors" not in err


@pytest.mark.parametrize("kw, match", [
    (dict(warmup=-1), "warmup must be an integer >= 0, got -1"),
    (dict(weight_decay=-1.0), r"weight_decay must be a number in \[0, 3.403e\+38\] \(float32's range\), got -1.0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a number in"),
    (dict(weight_decay=1e300), "weight_decay must be a number in .*, got 1e[+]?300"),
    (dict(lr=float("nan")), r"lr must be a positive number at most 3.403e\+38 \(float32's largest\), got nan"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(lr=1e40), "lr must be a positive number at most .*, got 1e[+]?40"),
    (dict(grad_clip=float("nan")), r"grad_clip must be a number in .* \(0 = no clipping\)"),
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(eval_batches_max=0), "eval_batches_max must be a positive integer"),
    (dict(stop_after=-1), "stop_after must be an integer >= 0"),
    (dict(device="foo"), "device must be cpu, cuda or cuda:N, got 'foo'"),
    (dict(seed="1"), "seed must be an integer, got '1'"),
    (dict(dtype="float16"), r"dtype must be one of \[.*\], got 'float16'"),
    (dict(backend="gpu"), r"backend must be one of \('auto', 'torch', 'triton', 'cpu', 'cuda'\), got 'gpu'"),
    (dict(config=_cfg(vocab_size=100)), r"config.vocab_size=100 is smaller than the tokenizer's vocab_size=256 "
                                        r"\(byte\)"),
])
def test_bad_numbers_are_rejected_before_training(kw, match):
    with pytest.raises(ValueError, match=match):
        _train(**kw)


def test_a_diverged_update_is_not_saved(tmp_path, monkeypatch):
    """An update that leaves the weights non-finite (here lr=1e30: finite weights of ~1e30, infinite logits) stops
    the run at its evaluation, before the checkpoint: the last good one stays, and resume stays possible."""
    out = tmp_path / "run"
    _train(steps=2, warmup=0, eval_every=1, out=str(out))
    good = T.load_checkpoint(str(out))[0].state_dict()
    with pytest.raises(FloatingPointError, match=r"step 1: the update left .*lower --lr or --weight-decay.*"
                                                 r"the last checkpoint is kept"):
        _train(steps=1, warmup=0, lr=1e30, out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoint.safetensors").exists()
    # with no evaluation between: the next step's training loss stops it
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is (nan|inf) \(the run diverged: lower --lr"):
        _train(steps=3, warmup=0, eval_every=3, lr=1e30, out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoint.safetensors").exists()
    # a resumed run whose held-out loss comes out NaN at its first evaluation: the checkpoint before it stays
    monkeypatch.setattr(T, "evaluate", lambda *a, **kw: float("nan"))
    with pytest.raises(FloatingPointError, match="step 3: the update left a held-out loss of nan"):
        _train(steps=4, warmup=0, eval_every=1, out=str(out), resume=True)
    kept = T.load_checkpoint(str(out))[0].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in good.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        _train(device="cuda")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "--threads must be an integer in [1, "),
    (["--threads", "0"], "--threads must be an integer in [1, "),
    (["--threads", "100000"], "(at most 4 per logical CPU), got 100000"),
    (["--warmup", "-1"], "warmup must be an integer >= 0, got -1"),
    (["--weight-decay", "-1"], "weight_decay must be a number in [0, 3.403e+38] (float32's range), got -1.0"),
])
def test_train_cli_rejects_bad_numbers(tmp_path, capsys, argv, message):
    threads = torch.get_num_threads()
    assert T.cli(argv + ["--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert torch.get_num_threads() == threads and not (tmp_path / "run").exists()


def test_load_config_json_errors(tmp_path, capsys):
    cases = {"list.json": ("[1, 2]", "must hold a JSON object of Config fields, got a JSON list"),
             "corrupt.json": ("{bad", "is not valid JSON"),
             "unknown.json": ('{"n_layers": 3}', r"unknown Config field\(s\) \['n_layers'\]")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            T.load_config(str(tmp_path / name))
        assert summary_cli([str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.startswith(f"error: config file {tmp_path / name}")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        T.load_config(str(tmp_path / "missing.json"))
    (tmp_path / "ok.json").write_text('{"family": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2}')
    assert T.load_config(str(tmp_path / "ok.json")).n_layer == 1


@pytest.mark.parametrize("kw, match", [
    (dict(config="llama-tiny"), "config must be a fastlm.Config or None .*got str 'llama-tiny'; build one with "
                                r"fastlm.Config.from_name\(preset, \*\*overrides\)"),
    (dict(config={"d_model": 16}), "config must be a fastlm.Config or None .*got dict"),
    (dict(tokenizer="byte"), "tokenizer must be a tokenizer object .* or None, got str 'byte'"),
    (dict(text=123), r"text must be a str \(the training text\) or None .*got int"),
    (dict(text=b"bytes"), "text must be a str .*got bytes"),
])
def test_mistyped_arguments_are_rejected_before_training(kw, match):
    with pytest.raises(TypeError, match=match):
        _train(**kw)


def test_padded_vocabulary_trains():
    """A vocab_size above the tokenizer's (padded for GEMM-friendly shapes) is accepted, and said so."""
    lines = []
    out = _train(steps=2, warmup=1, config=_cfg(vocab_size=320), log=lines.append)
    assert len(out["history"]["loss"]) > 0 and all(math.isfinite(x) for x in out["history"]["loss"])
    assert lines[0].startswith("vocab_size 320 > the tokenizer's 256: the embedding and LM head are padded")


def test_seed_is_any_integer():
    """A seed past 64 bits trains (it is taken modulo 2**64): the same run as its residue."""
    a, b = _train(steps=2, seed=5), _train(steps=2, seed=5 + 2 ** 64)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert _train(steps=1, seed=10 ** 9)["history"]["loss"] != a["history"]["loss"][:1]


def test_out_that_is_a_file_is_rejected_up_front(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(ValueError, match=f"out {tmp_path / 'afile'} is a file; expected a directory"):
        _train(out=str(tmp_path / "afile"))
    with pytest.raises(ValueError, match=r"out .*x.safetensors names a .safetensors file; expected a directory"):
        _train(out=str(tmp_path / "x.safetensors"))
    with pytest.raises(TypeError, match="out must be a directory path"):
        _train(out=3)
    for out, message in ((tmp_path / "afile", f"error: --out {tmp_path / 'afile'} is a file; expected a directory"),
                         (tmp_path / "x.safetensors", "names a .safetensors file; expected a directory")):
        assert T.cli(["--out", str(out), "--steps", "1", "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep" and not (tmp_path / "x.safetensors").exists()


def test_cli_keeps_an_earlier_run_unless_told(tmp_path, capsys, monkeypatch):
    """A new run into a directory holding a checkpoint is an error naming --resume and --overwrite; --overwrite
    replaces it. The CLI's model is named after its preset and overrides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--out", str(tmp_path), "--steps", "2", "--eval-every", "2", "--seqlen", "16", "--batch-size", "2",
            "--backend", "torch", "--no-progress"]
    assert T.cli(base + ["--config", "d_model=32,n_layer=1,n_head=2,n_kv_head=1"]) == 0
    first = (tmp_path / T.CHECKPOINT).read_bytes()
    assert T.load_checkpoint(str(tmp_path), backend="torch")[1]["config"].name == \
        "llama-tiny(d_model=32,n_layer=1,n_head=2,n_kv_head=1)"
    capsys.readouterr()
    other = base + ["--config", "d_model=64,n_layer=1,n_head=2,n_kv_head=1"]
    assert T.cli(other) == 2
    assert f"--out {tmp_path} holds the checkpoint of an earlier run" in capsys.readouterr().err
    assert (tmp_path / T.CHECKPOINT).read_bytes() == first
    assert T.cli(other + ["--resume"]) == 2
    assert T.cli(other + ["--overwrite", "--resume"]) == 2
    assert "--resume and --overwrite are exclusive" in capsys.readouterr().err
    assert T.cli(other + ["--overwrite"]) == 0
    assert T.load_checkpoint(str(tmp_path), backend="torch")[1]["config"].d_model == 64


def test_resume_at_or_past_steps_is_an_error(tmp_path, capsys):
    _train(steps=4, eval_every=2, out=str(tmp_path), plot=False)
    for steps in (4, 3):
        with pytest.raises(ValueError, match=f"checkpoint .* is already at step 4 >= steps={steps}: nothing to train"):
            _train(steps=steps, out=str(tmp_path), resume=True)
    assert T.cli(["--out", str(tmp_path), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "is already at step 4 >= steps=2" in capsys.readouterr().err
    assert _train(steps=5, out=str(tmp_path), resume=True, plot=False)["history"]["step"] == [1, 2, 3, 4, 5]


def test_resume_spans_the_runs_own_schedule(tmp_path, capsys):
    """The checkpoint records the run's length: an interrupted run resumes to it (steps left out, or given equal),
    another length is an error (the LR schedule spans the run), and a finished run may be extended, which is said."""
    _train(steps=8, eval_every=2, out=str(tmp_path), stop_after=4, plot=False)
    with pytest.raises(ValueError, match=r"is step 4 of a 8-step run, and its LR schedule spans 8 steps: resume "
                                         r"with steps=8 \(or leave it out\), not 20"):
        _train(steps=20, out=str(tmp_path), resume=True)
    lines = []
    res = _train(steps=None, out=str(tmp_path), resume=True, plot=False, log=lines.append)
    assert res["history"]["step"] == list(range(1, 9)) and not any("extending" in line for line in lines)
    full = _train(steps=8, eval_every=2)
    assert res["history"]["lr"] == full["history"]["lr"]
    assert T.cli(["--out", str(tmp_path), "--resume", "--no-progress", "--backend", "torch"]) == 2  # finished
    assert "already at step 8 >= steps=8" in capsys.readouterr().err
    res = _train(steps=10, out=str(tmp_path), resume=True, plot=False, log=lines.append)
    assert res["history"]["step"] == list(range(1, 11))
    assert "extending a finished 8-step run to 10 steps: the LR schedule is re-spanned over 10" in lines


def test_resume_refuses_another_corpus(tmp_path, monkeypatch):
    """A resumed run must see the run's corpus: other text, or a relative --data path that now names another file,
    is an error; the path is recorded absolute, so the same file resumes from any directory."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "corpus.txt").write_text(TEXT[:20000])
    (tmp_path / "b" / "corpus.txt").write_text(TEXT[20000:40000])
    monkeypatch.chdir(tmp_path / "a")
    args = dict(text=None, data="corpus.txt", steps=4, eval_every=2, out=str(tmp_path / "run"), plot=False)
    _train(stop_after=2, **args)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=r"resume: the training text differs from the checkpoint's run \(now 20000 "
                                         r"characters.*pass the run's data or text"):
        _train(resume=True, **{**args, "data": "corpus.txt"})
    with pytest.raises(ValueError, match=r"the training text differs"):
        _train(resume=True, **{**args, "data": None, "text": TEXT[:1000]})
    assert _train(resume=True, **{**args, "data": None})["history"]["step"] == [1, 2, 3, 4]   # the recorded path


def test_resume_refuses_another_world_size(tmp_path):
    _train(steps=4, eval_every=2, out=str(tmp_path / "run"), stop_after=2, plot=False)
    src = tmp_path / "run" / T.CHECKPOINT
    extra = json.loads(T._read_checkpoint(str(src), tensors=False)[1]["extra"])
    assert extra["world_size"] == 1
    _rewrite_metadata(src, src, extra=json.dumps({**extra, "world_size": 2}))
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) and this run has 1 \(WORLD_SIZE\)"):
        _train(steps=4, out=str(tmp_path / "run"), resume=True)


def _edit_json(meta, key, change):
    """meta[key] (a JSON string) with change(value) applied to its decoded value."""
    value = json.loads(meta[key])
    change(value)
    meta[key] = json.dumps(value)


def _rewrite_tensors(src, dst, change):
    """A copy of checkpoint file ``src`` at ``dst`` with change(tensors, meta) applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("change, message", [
    (lambda t, m: m.update(optim_groups="[1, 2]"), "optim_groups must be a list of 2 parameter groups"),
    (lambda t, m: m.update(optim_groups=json.dumps([{"lr": 1}, {"lr": 1}])), "optim_groups must be a list"),
    (lambda t, m: t.pop("optim.0.step"), r"parameter 0 has state \['exp_avg', 'exp_avg_sq'\], expected"),
    (lambda t, m: t.update({"optim.0.exp_avg": torch.zeros(3)}), r"tensor optim.0.exp_avg must hold finite floats"),
    (lambda t, m: t["optim.1.exp_avg_sq"].view(-1)[0].fill_(float("nan")), "optim.1.exp_avg_sq must hold finite"),
    (lambda t, m: t.update({"optim.x.exp_avg": torch.zeros(3)}), "tensor optim.x.exp_avg: no parameter x"),
    (lambda t, m: t.update({"optim.99.exp_avg": torch.zeros(3)}), "tensor optim.99.exp_avg: no parameter 99"),
    (lambda t, m: m.update(history='{"loss": 3}'), "its history must map names to lists of finite numbers"),
    (lambda t, m: _edit_json(m, "history", lambda h: h["loss"].pop()),
     r"its history's step, loss, lr must have one length, got \{'step': 2, 'loss': 1, 'lr': 2\}"),
    (lambda t, m: _edit_json(m, "optim_groups", lambda g: g[0].update(betas="x")),
     r"optim_groups\[0\]\['betas'\] must be like \(0.9, 0.95\), got 'x'"),
    (lambda t, m: _edit_json(m, "optim_groups", lambda g: g[1].update(lr=None)), r"optim_groups\[1\]\['lr'\]"),
    (lambda t, m: [t.pop(f"optim.3.{k}") for k in ("step", "exp_avg", "exp_avg_sq")],
     r"no state \(optim.<i>.\*\) for parameters \[3\]"),
    (lambda t, m: _edit_json(m, "extra", lambda e: e["run"].update(steps="4")),
     "is corrupt: its run's steps must be a positive int, got '4'"),
])
def test_corrupt_optimizer_state_or_history_is_named(tmp_path, capsys, change, message):
    """Damaged optimizer tensors or loss history in a checkpoint: an error naming the file before training starts,
    from the API and the CLI, never a traceback mid-step."""
    _train(steps=4, eval_every=2, out=str(tmp_path / "run"), stop_after=2, plot=False)
    src = tmp_path / "run" / T.CHECKPOINT
    _rewrite_tensors(src, src, change)
    with pytest.raises(ValueError, match=f"checkpoint {src}.*{message}"):
        _train(steps=4, out=str(tmp_path / "run"), resume=True)
    assert T.cli(["--out", str(tmp_path / "run"), "--resume", "--no-progress", "--backend", "torch"]) == 2
    assert f"error: checkpoint {src}" in capsys.readouterr().err


def test_warmup_past_the_run_is_said():
    lines = []
    _train(steps=3, warmup=5, log=lines.append)
    assert lines[0] == "warmup=5 >= steps=3: the LR rises for the whole run and never decays (pass a smaller warmup)"


def _rewrite_metadata(src, dst, **changes):
    """A copy of checkpoint file ``src`` at ``dst`` with metadata entries replaced (None: removed)."""
    def change(tensors, meta):
        for key, value in changes.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value
    _rewrite_tensors(src, dst, change)


@pytest.mark.parametrize("changes, message", [
    (dict(config=None), "metadata 'config' is missing"),
    (dict(config="[1, 2]"), "metadata 'config' must be a JSON object, got '[1, 2]'"),
    (dict(config="{bad"), "metadata 'config' must be a JSON object, got '{bad'"),
    (dict(tokenizer="[]"), "metadata 'tokenizer' must be a JSON object, got '[]'"),
    (dict(step="abc"), "metadata 'step' must be an integer >= 0, got 'abc'"),
    (dict(step="-3"), "metadata 'step' must be an integer >= 0, got '-3'"),
    (dict(step="true"), "metadata 'step' must be an integer >= 0"),
    (dict(history="{bad"), "metadata 'history' must be a JSON object, got '{bad'"),
    (dict(extra="3"), "metadata 'extra' must be a JSON object"),
    (dict(optim_groups="{}"), "metadata 'optim_groups' must be a JSON list"),
])
def test_corrupt_checkpoint_metadata_is_named(tmp_path, capsys, changes, message):
    _train(steps=1, eval_every=1, out=str(tmp_path / "run"), plot=False)
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(tmp_path / "run" / T.CHECKPOINT, bad, **changes)
    for load in (T.load_checkpoint, T.load_model, T.load_config):
        with pytest.raises(ValueError, match=f"checkpoint {bad} is corrupt: " + message.replace("[", r"\[")):
            load(str(bad))
    assert generate_cli(["--checkpoint", str(bad), "--backend", "torch", "x"]) == 2
    assert summary_cli([str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count(f"error: checkpoint {bad} is corrupt: metadata") == 2


def test_checkpoint_config_and_tokenizer_errors_name_the_file(tmp_path):
    _train(steps=1, eval_every=1, out=str(tmp_path / "run"), plot=False)
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(tmp_path / "run" / T.CHECKPOINT, bad, config='{"d_modle": 3}')
    with pytest.raises(ValueError, match=rf"checkpoint {bad} metadata 'config': unknown Config field\(s\) "
                                         r"\['d_modle'\]"):
        T.load_model(str(bad))
    _rewrite_metadata(tmp_path / "run" / T.CHECKPOINT, bad, tokenizer='{"kind": "bpe"}')
    with pytest.raises(ValueError, match=f"checkpoint {bad}: its tokenizer .* cannot be built: tokenizer must be one "
                                         "of byte, tiktoken, sentencepiece; got 'bpe'"):
        T.load_checkpoint(str(bad))
