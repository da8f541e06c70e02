"""fastlm.summary: parameter counts against built models and published numbers, FLOPs against a FLOP counter,
KV-cache bytes against the allocated cache, roofline arithmetic, bad input and the CLI."""
import importlib
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastlm
from fastlm import reference
from fastlm.config import PRESETS, Config
from fastlm.summary import DEVICES, cli, forward_flops_per_token, kv_cache_bytes_per_token, param_counts, summary


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_model(cfg):
    with torch.device("meta"):
        return fastlm.Transformer(cfg, backend="torch")


def _config(name):
    """A preset, or "qwen2-like": the llama-tiny preset with q/k/v biases."""
    return Config.from_name("llama-tiny", qkv_bias=True) if name == "qwen2-like" else Config.from_name(name)


@pytest.mark.parametrize("name", [*PRESETS, "qwen2-like"])
def test_params_equal_built_model(name):
    cfg = _config(name)
    model = _meta_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("tok_emb", "pos_emb", "lm_head")))
    assert counts["embedding"] == emb
    assert counts["non_embedding"] == counts["total"] - emb


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "llama-56m", "qwen2-like"])
def test_layer_rows_match_modules(name):
    cfg = _config(name)
    model = _meta_model(cfg)
    rows = summary(cfg, print_table=False)["layers"]
    for r in rows:
        name_ = r["name"].split(" ")[0]
        if r["per_block"]:
            prefix = name_.replace("layers.*.", "")
            got = sum(p.numel() for n, p in model.named_parameters()
                      if n.startswith("layers.") and n.split(".", 2)[2].startswith(prefix + ".")) // cfg.n_layer
        else:
            got = sum(p.numel() for n, p in model.named_parameters() if n.startswith(name_ + "."))
        assert r["params"] == got, r["name"]


@pytest.mark.parametrize("name,published", [("gpt2", 124_439_808), ("llama-2-7b", 6_738_415_616),
                                            ("llama-3-8b", 8_030_261_248)])
def test_published_counts(name, published):
    s = summary(name, print_table=False)
    assert s["params"]["total"] == published
    assert round(s["params"]["total"] / 1e9, 2) == round(published / 1e9, 2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_flops_match_flop_counter(family):
    # the reference model computes full (non-causal-skipping) S x S scores: context = S for every token
    cfg = Config(family=family, vocab_size=97, n_layer=2, n_head=4, n_kv_head=4 if family == "gpt2" else 2,
                 d_model=48, max_seqlen=64, multiple_of=16)
    model = reference.Transformer(cfg)
    B, S = 2, 24
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 97, (B, S)))
    assert counter.get_total_flops() == forward_flops_per_token(cfg, S) * B * S


def test_kv_cache_bytes_match_allocation():
    cfg = Config.from_name("llama-tiny")
    model = fastlm.Transformer(cfg, backend="torch")
    model.setup_cache(3, 40, dtype=torch.float16)
    allocated = sum(t.numel() * t.element_size() for layer in model.layers for t in (layer.attn.k_cache,
                                                                                       layer.attn.v_cache))
    assert kv_cache_bytes_per_token(cfg, "fp16") * 3 * 40 == allocated


def test_memory_and_roofline_arithmetic():
    s = summary("llama-2-7b", seqlen=4096, dtype="bf16", device="h200", print_table=False)
    n = s["params"]["total"]
    m = s["memory"]
    assert m["inference"]["weights"] == 2 * n
    assert m["inference"]["kv_cache"] == 4096 * 2 * 32 * 4096 * 2
    assert m["training"]["weights"] + m["training"]["grads"] + m["training"]["adamw_states"] == 16 * n
    for part in ("inference", "training"):
        assert m[part]["total"] == sum(v for k, v in m[part].items() if k != "total")
    # batch-1 decode of a 7B model is bandwidth-bound: one step reads the weights (the LM head, not the token
    # embedding table: 32000 x 4096 of the 6.74B) and the cache
    sp = s["speed"]
    assert sp["decode_bound"] == "memory"
    streamed = 2 * (n - 32000 * 4096)
    expected = DEVICES["h200"]["bandwidth"] / (streamed + m["inference"]["kv_cache"])
    assert sp["decode_tokens_per_s"] == pytest.approx(expected)
    assert sp["train_bound"] == "compute"
    assert sp["train_tokens_per_s"] == pytest.approx(DEVICES["h200"]["flops"]["bf16"]
                                                     / s["flops"]["training_per_token"])
    assert s["flops"]["training_per_token"] == 3 * s["flops"]["forward_per_token"]


def test_activation_elements_per_token_by_hand():
    """Per token and layer, what a training step keeps for its backward (elements): llama-tiny d 64, I 192, 4 heads
    of 16, 2 kv heads."""
    from fastlm.summary import activation_elements_per_token
    c = Config.from_name("llama-tiny")
    assert (c.d_model, c.intermediate_size, c.n_head, c.n_kv_head, c.head_dim) == (64, 192, 4, 2, 16)
    attn = 64 + 64 + 64 + 2 * 32 + 64 + 4      # norm in and out, q, k and v, attention out, an LSE per head
    assert activation_elements_per_token(c) == c.n_layer * (attn + 64 + 64 + 3 * 192) + 2 * 64


def test_sliding_window_bounds_the_attended_keys():
    full = Config.from_name("llama-2-7b", name="full")
    windowed = Config.from_name("llama-2-7b", name="windowed", sliding_window=1024)
    S, W = 4096, 1024
    a, b = (summary(c, seqlen=S, dtype="bf16", device="h200", print_table=False) for c in (full, windowed))
    per_key = 4 * full.n_layer * full.n_head * full.head_dim            # attention FLOPs per attended key
    dense = forward_flops_per_token(full, 0)
    assert a["flops"]["attention_context_train"] == (S + 1) / 2
    # positions 0..W-1 attend p + 1 keys, the others W: mean (W (W + 1) / 2 + (S - W) W) / S
    assert b["flops"]["attention_context_train"] == pytest.approx((W * (W + 1) / 2 + (S - W) * W) / S)
    assert b["flops"]["forward_per_token_at_context"] == pytest.approx(dense + per_key * W)
    kv_step = kv_cache_bytes_per_token(windowed, "bf16") * W             # a decode step reads the window's keys
    streamed = b["memory"]["inference"]["weights"] - 2 * windowed.vocab_size * windowed.d_model  # no embedding table
    assert b["speed"]["decode_tokens_per_s"] == pytest.approx(DEVICES["h200"]["bandwidth"] / (streamed + kv_step))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*h200, a100, cpu"):
        summary("gpt2", device="tpu", print_table=False)
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        summary("gpt5", print_table=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        summary("gpt2", dtype="int3", print_table=False)
    with pytest.raises(ValueError, match="seqlen must be a positive int"):
        summary("gpt2", seqlen=0, print_table=False)
    with pytest.raises(ValueError, match="seqlen must be at most the model's context max_seqlen=1024, got 1025"):
        summary("gpt2", seqlen=1025, print_table=False)
    with pytest.raises(TypeError, match="model_or_config"):
        summary(42, print_table=False)


@pytest.mark.parametrize("kw, match", [(dict(batch=True), "batch must be a positive int, got True"),
                                       (dict(seqlen=True), "seqlen must be a positive int, got True"),
                                       (dict(batch=2.0), "batch must be a positive int, got 2.0"),
                                       (dict(device=["h200"]), r"unknown device \['h200'\]")])
def test_bool_float_and_unhashable_arguments_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        summary("gpt2", print_table=False, **kw)


def test_model_input_and_print(capsys):
    model = fastlm.Transformer(Config.from_name("gpt2-tiny"), backend="torch")
    s = summary(model, batch=2, seqlen=16, device="cpu")
    out = capsys.readouterr().out
    assert s["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert "Param #" in out and "roofline estimates" in out and f"{s['params']['total']:,}" in out
    # "cpu" is this machine's CPU, its ceilings timed on first use (bf16 at least at the fp32 rate)
    assert "this machine's CPU" in out and "measured now" in out
    cpu = importlib.import_module("fastlm.summary")._measure_cpu()
    assert cpu["flops"]["bf16"] >= cpu["flops"]["fp32"] > 1e9 and cpu["bandwidth"] > 1e8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformers_model_and_config(family):
    """A transformers model (or its configuration) is summarized as fastlm's conversion of it: the same parameters."""
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        hf_config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=32)
        hf = transformers.GPT2LMHeadModel(hf_config)
    else:
        hf_config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                             max_position_embeddings=32)
        hf = transformers.LlamaForCausalLM(hf_config)
    s = summary(hf, batch=1, seqlen=16, print_table=False)
    assert s["params"]["total"] == sum(p.numel() for p in hf.parameters())
    assert summary(hf_config, batch=1, seqlen=16, print_table=False)["params"] == s["params"]


def test_cli(tmp_path, capsys):
    assert cli(["llama-3-8b", "--seqlen", "8192", "--batch", "2", "--dtype", "fp16", "--device", "a100"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "A100" in out
    assert cli(["nope"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")      # an existing file is not taken for a preset name
    assert cli([str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file but not a checkpoint (.safetensors) or a config (.json)" in capsys.readouterr().err
    assert cli(["gpt2", "--device", "tpu"]) == 2
    assert "known devices: h200, a100, cpu" in capsys.readouterr().err
    assert cli(["llama-3-8b", "--seqlen", "8193"]) == 2
    assert "error: seqlen must be at most the model's context max_seqlen=8192, got 8193" in capsys.readouterr().err


def test_cli_config_json_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cli([str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and "must hold a JSON object of Config fields" in err
    (tmp_path / "flags.json").write_text('{"tie_embeddings": "yes"}')
    assert cli([str(tmp_path / "flags.json")]) == 2              # Config's own TypeError is reported too
    assert "error: tie_embeddings must be a bool" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),                      # transformers' own validation, whatever it raises
    ({"hidden_size": "64"}, "hidden_size"),
    ({"head_dim": 7}, "head_dim"),
    ({"num_key_value_heads": 3}, "3"),
    ({"rope_theta": "abc"}, "llama rope_theta must be a positive finite number, got 'abc'"),
])
def test_cli_bad_transformers_config_is_named(tmp_path, capsys, change, message):
    pytest.importorskip("transformers")
    fields = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **change}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert cli([str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {tmp_path / 'config.json'}: ") and message in err, err


def test_fastlm_summary_is_callable_whatever_was_imported_first():
    # `from fastlm.summary import ...` (as this file does) makes fastlm.summary the submodule: it stays callable,
    # and gives what the function gives
    import subprocess
    import sys
    code = ("import fastlm.summary, fastlm; from fastlm.summary import param_counts; "
            "out = fastlm.summary('llama-tiny'); assert out == fastlm.summary.summary('llama-tiny'), out; "
            "print(type(fastlm.summary).__name__, 'ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert fastlm.summary("llama-tiny") == summary("llama-tiny")
