"""fastlm.Config: presets, derived fields, validation, and parameter counts against published figures."""
import pytest
import torch

from fastlm.config import PRESETS, Config
from fastlm.model import Transformer


def _assert_param_counts_match_built_model(config):
    with torch.device("meta"):                       # shapes only: no memory, no init cost
        model = Transformer(config, backend="torch")
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    embedding = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    if model.lm_head is not None:
        embedding += model.lm_head.weight.numel()
    assert config.num_params(embeddings=False) == config.num_params() - embedding


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_matches_built_model(name):
    _assert_param_counts_match_built_model(Config.from_name(name))


@pytest.mark.parametrize("overrides", [
    dict(family="llama", qkv_bias=True),                         # Qwen2: q/k/v biases, no others
    dict(family="llama", qkv_bias=True, n_kv_head=1, head_dim=24, tie_embeddings=True),
    dict(family="llama", tie_embeddings=True, intermediate_size=100),
    dict(family="gpt2", n_kv_head=None, tie_embeddings=False, head_dim=24),
    dict(family="gpt2", n_kv_head=None, intermediate_size=100),
])
def test_param_count_matches_built_model_for_every_flag(overrides):
    _assert_param_counts_match_built_model(Config(**{"vocab_size": 100, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                                     "d_model": 32, "max_seqlen": 16, **overrides}))


def test_published_param_counts():
    assert Config.from_name("gpt2").num_params() == 124_439_808
    assert round(Config.from_name("llama-2-7b").num_params() / 1e9, 2) == 6.74
    assert round(Config.from_name("llama-3-8b").num_params() / 1e9, 2) == 8.03
    assert round(Config.from_name("gpt2-xl").num_params() / 1e9, 2) == 1.56
    assert round(Config.from_name("llama-56m").num_params() / 1e6) == 56
    assert round(Config.from_name("mistral-nemo-12b").num_params() / 1e9, 1) == 12.2
    assert round(Config.from_name("mistral-7b-v0.1").num_params() / 1e9, 2) == 7.24
    assert round(Config.from_name("llama-3.1-8b").num_params() / 1e9, 2) == 8.03
    assert round(Config.from_name("llama-3.2-1b").num_params() / 1e9, 2) == 1.24


def test_family_defaults_and_derived_fields():
    g = Config.from_name("gpt2")
    assert (g.n_kv_head, g.intermediate_size, g.head_dim, g.tie_embeddings, g.bias) == (12, 3072, 64, True, True)
    ll = Config(family="llama", d_model=4096, n_head=32)
    assert ll.intermediate_size == 11008                # 2/3 * 4 * 4096 rounded up to a multiple of 256
    assert (ll.n_kv_head, ll.head_dim, ll.tie_embeddings, ll.bias) == (32, 128, False, False)
    small = Config.from_name("llama-56m")
    assert (small.d_model, small.n_layer, small.n_head, small.n_kv_head, small.intermediate_size,
            small.vocab_size) == (512, 8, 8, 4, 1408, 32000)
    assert (g.qkv_bias, ll.qkv_bias, Config(family="llama", qkv_bias=True).qkv_bias) == (True, False, True)
    tiny = Config.from_name("llama-tiny")
    assert tiny.n_kv_head < tiny.n_head                 # the tiny preset exercises grouped-query attention


def test_from_name_overrides():
    c = Config.from_name("gpt2-tiny", n_layer=3, vocab_size=77)
    assert (c.name, c.n_layer, c.vocab_size, c.family) == ("gpt2-tiny", 3, 77, "gpt2")
    with pytest.raises(TypeError, match="n_layers"):
        Config.from_name("gpt2-tiny", n_layers=3)


def test_from_name_argument_errors():
    with pytest.raises(TypeError, match=r"preset name must be a str .*got list \['gpt2'\]"):
        Config.from_name(["gpt2"])
    with pytest.raises(TypeError, match="preset name must be a str"):
        Config.from_name(None)
    # name is a field like any other: it may be overridden (it defaults to the preset's name)
    c = Config.from_name("gpt2-tiny", name="mine")
    assert (c.name, c.n_layer) == ("mine", Config.from_name("gpt2-tiny").n_layer)
    with pytest.raises(TypeError, match="name must be a str, got int 5"):
        Config.from_name("gpt2-tiny", name=5)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as e:
        Config.from_name("gpt5")
    assert "gpt5" in str(e.value) and "llama-3-8b" in str(e.value) and "gpt2-tiny" in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=65, n_head=4), "divisible by n_head"),
    (dict(family="llama", n_head=6, n_kv_head=4, d_model=96), "divisible by n_kv_head"),
    (dict(family="bert"), "family"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(d_model=0), "d_model"),
    (dict(n_head=0), "n_head"),
    (dict(max_seqlen=0), "max_seqlen"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(norm_eps="1e-5"), "norm_eps"),
    (dict(rope_base=float("inf")), "rope_base"),
    (dict(intermediate_size=True), "intermediate_size"),
    (dict(family="llama", d_model=60, n_head=4), "even head_dim"),
    (dict(family="llama", d_model=64, n_head=4, head_dim=15), "even head_dim"),
    (dict(d_model=64, n_head=4, head_dim=0), "head_dim must be a positive integer"),
    (dict(d_model=64, n_head=4, head_dim=16.0), "head_dim must be a positive integer"),
    (dict(family="gpt2", n_head=4, n_kv_head=2), "grouped-query"),
    (dict(family="llama", bias=True), "bias"),
    (dict(family="gpt2", qkv_bias=False), "qkv_bias"),
    (dict(family="llama", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type.*linear"),
    (dict(family="llama", rope_scaling={"rope_type": "linear"}), r"missing \['factor'\]"),
    (dict(family="llama", rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), r"unknown \['beta'\]"),
    (dict(family="llama", rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor.*positive"),
    (dict(family="llama", rope_scaling={"rope_type": "linear", "factor": 0.5}), r"factor'\] must be >= 1"),
    (dict(family="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16.5}),
     r"original_max_position_embeddings'\] must be an integer, got 16.5"),
    (dict(family="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                        "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
     "high_freq_factor"),
    (dict(family="gpt2", rope_scaling={"rope_type": "linear", "factor": 2.0}), "learned positions"),
    (dict(family="llama", sliding_window=0), "sliding_window must be a positive integer"),
    (dict(family="llama", sliding_window=4.0), "sliding_window must be a positive integer"),
    (dict(family="gpt2", sliding_window=16), "sliding_window applies to the llama family"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config(**kwargs)


def test_head_dim_given_or_derived():
    assert Config(family="llama", d_model=64, n_head=4).head_dim == 16
    c = Config(family="llama", d_model=60, n_head=4, n_kv_head=2, head_dim=24, vocab_size=100)   # 60 % 4 != 0: fine
    with torch.device("meta"):
        model = Transformer(c, backend="torch")
    assert model.layers[0].attn.wq.weight.shape == (4 * 24, 60) and model.layers[0].attn.wo.weight.shape == (60, 96)
    assert sum(p.numel() for p in model.parameters()) == c.num_params()


def test_rope_scaling_is_checked_and_copied():
    given = {"rope_type": "linear", "factor": 2}
    c = Config(family="llama", rope_scaling=given)
    assert c.rope_scaling == given and c.rope_scaling is not given
    with pytest.raises(TypeError, match="rope_scaling must be None or a dict"):
        Config(family="llama", rope_scaling="linear")


def test_flags_must_be_bool():
    with pytest.raises(TypeError, match="tie_embeddings"):
        Config(tie_embeddings="yes")


def test_numpy_scalars_are_numbers_everywhere():
    # sizes and hyper-parameters computed with numpy (a sweep over np.arange, a value read from an array) are taken
    # like Python numbers and kept as Python numbers, so configs and run settings still serialize to JSON
    import dataclasses
    import json

    import numpy as np

    from fastlm import ops, summary
    from fastlm.backends import available
    c = Config(family="llama", vocab_size=np.int64(96), d_model=np.int32(32), n_head=np.int64(4),
               n_kv_head=np.int16(2), n_layer=np.uint8(1), norm_eps=np.float64(1e-5), rope_base=np.float64(500.0),
               rope_scaling={"rope_type": "linear", "factor": np.float32(2.0)}, sliding_window=np.int64(8))
    kept = dataclasses.asdict(c)
    assert json.loads(json.dumps(kept)) == kept
    assert {type(c.vocab_size), type(c.n_layer), type(c.norm_eps), type(c.rope_base)} == {int, float}
    assert Config(family="llama", vocab_size=96, d_model=32, n_head=4, n_kv_head=2, n_layer=1, norm_eps=1e-5,
                  rope_base=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_window=8) == c

    model = Transformer(c, backend="torch")
    model.setup_cache(np.int64(2), np.int32(16))
    assert model.layers[0].attn.k_cache.shape == (2, 16, 2, 8)
    x = torch.randn(3, 5, 32)
    assert torch.equal(ops.rms_norm(x, torch.ones(32), eps=np.float32(1e-5), backend="torch"),
                       ops.rms_norm(x, torch.ones(32), eps=float(np.float32(1e-5)), backend="torch"))
    logits, targets = torch.randn(6, 96), torch.tensor([1, 2, -1, 3, -1, 5])
    for backend in ["torch"] + ["cpu"] * available()["cpu"]:
        assert torch.equal(ops.cross_entropy(logits, targets, ignore_index=np.int64(-1), backend=backend),
                           ops.cross_entropy(logits, targets, ignore_index=-1, backend=backend))
    table = summary(c, batch=np.int64(2), seqlen=np.int32(16), print_table=False)
    assert table == summary(c, batch=2, seqlen=16, print_table=False)
    with pytest.raises(ValueError, match=r"n_layer must be a positive integer, got np.float64\(2.0\)"):
        Config(n_layer=np.float64(2.0))
    with pytest.raises(ValueError, match=r"norm_eps must be a positive finite number, got np.True_"):
        Config(norm_eps=np.bool_(True))
