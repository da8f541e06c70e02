"""The Hugging Face drop-in: from_hf against transformers' own models (logits, loss, greedy generation), and
patch / unpatch (same logits, same gradients, exact restoration). Tiny random models built from config objects."""
import copy
import dataclasses
import functools
import inspect
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastlm  # noqa: E402
from conftest import DEVICE, needs_cpu_kernel, perturb_norms_and_biases  # noqa: E402
from fastlm import ops  # noqa: E402
from fastlm.hf import from_hf, patch, to_hf, unpatch  # noqa: E402
from fastlm.testing import check_rule  # noqa: E402

V = 1000


def test_checkout_kernels_do_not_shadow_the_kernels_package(tmp_path):
    """Run from the checkout (its root first on sys.path, as `python -m` there puts it), the top-level name `kernels`
    (a PyPI package transformers imports) is still that package once fastlm is imported, not the checkout's kernels/
    (fastlm.kernels' sources); fastlm.kernels stays the Triton kernels."""
    root = os.path.dirname(os.path.dirname(fastlm.__file__))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'the kernels package'\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import fastlm, fastlm.kernels, kernels; "
            "print(kernels.WHO, fastlm.kernels.__name__)")
    run = subprocess.run([sys.executable, "-c", code, root, str(tmp_path)], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["the", "kernels", "package", "fastlm.kernels"]


def hf_gpt2(**kw):
    cfg = dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def hf_llama(**kw):
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
               attn_implementation="sdpa")
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def hf_mistral():
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                     sliding_window=None, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    return transformers.MistralForCausalLM(cfg).eval()


def hf_qwen2(**kw):
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
               tie_word_embeddings=False, attn_implementation="sdpa")
    cfg.update(kw)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # the q/k/v biases start at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.5)
    return hf


MODELS = {"gpt2": hf_gpt2, "llama-gqa": hf_llama, "mistral-mqa": hf_mistral, "qwen2-gqa": hf_qwen2}


def same_as_hf(model, hf, seqlen, prompt_len, new_tokens=16):
    """model's logits within the numerics rule of hf's (float64 hf as the reference) on (2, seqlen) random tokens,
    and its KV-cache greedy generation token-identical to hf.generate from a (2, prompt_len) prompt."""
    tokens, prompt = torch.randint(0, V, (2, seqlen)), torch.randint(1, V, (2, prompt_len))
    with torch.no_grad():
        check_rule("logits", model(tokens), copy.deepcopy(hf).double()(tokens).logits, hf(tokens).logits)
        expected = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                               attention_mask=torch.ones_like(prompt))
        assert torch.equal(model.generate(prompt, new_tokens), expected)


@pytest.mark.parametrize("kind", list(MODELS))
def test_from_hf_logits_and_loss(kind):
    hf = MODELS[kind]()
    perturb_norms_and_biases(hf)
    hf64 = copy.deepcopy(hf).double()
    model = from_hf(hf, backend="torch")
    assert model.config.n_layer == 2 and model.config.vocab_size == V
    assert model.config.n_kv_head == {"gpt2": 4, "llama-gqa": 2, "mistral-mqa": 1, "qwen2-gqa": 2}[kind]
    assert model.config.qkv_bias == (kind in ("gpt2", "qwen2-gqa"))
    tokens = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        check_rule("logits", model(tokens), hf64(tokens).logits, hf(tokens).logits)
        check_rule("loss", model(tokens[:, :-1], tokens[:, 1:]), hf64(tokens, labels=tokens).loss,
                   hf(tokens, labels=tokens).loss)


@pytest.mark.parametrize("kind", list(MODELS) + ["mistral-window"])
def test_config_from_hf_dict(kind):
    """A transformers config.json's dict (as summary reads one) gives the configuration from_hf builds."""
    hf = hf_mistral_window() if kind == "mistral-window" else MODELS[kind]()
    assert fastlm.hf.config_from_hf(hf.config.to_dict()) == fastlm.from_hf(hf).config


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "qwen2-gqa"])
def test_greedy_generation_token_identical(kind):
    hf = MODELS[kind]()
    model = from_hf(hf, backend="torch")
    prompt = torch.randint(1, V, (2, 5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                               attention_mask=torch.ones_like(prompt))
        assert torch.equal(model.generate(prompt, 16), expected)             # fastlm's KV-cache decoding


# Llama 3.1's scaling on a short original context (64 positions, head dim 16: the frequency pairs fall in all
# three bands, kept, blended and divided), and position interpolation
ROPE_SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64, "rope_theta": 10000.0},
                 "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_from_hf_rope_scaling(kind):
    from fastlm import reference
    hf = hf_llama(rope_parameters=ROPE_SCALINGS[kind], max_position_embeddings=256)
    perturb_norms_and_biases(hf)
    model = from_hf(hf, backend="torch")
    assert model.config.rope_scaling["rope_type"] == kind
    inv_freq = reference.rope_inv_freq(16, model.config.rope_base, model.config.rope_scaling)
    torch.testing.assert_close(inv_freq.float(), hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    if kind == "llama3":   # the three bands: some frequencies kept, some divided by the factor, some blended
        base = reference.rope_inv_freq(16, model.config.rope_base)
        ratio = inv_freq / base
        assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()
    same_as_hf(model, hf, seqlen=150, prompt_len=70)          # past the original context; the KV cache's tables too


@pytest.mark.parametrize("make", [hf_llama, hf_qwen2], ids=["llama", "qwen2"])
def test_from_hf_head_dim_apart_from_hidden_size(make):
    hf = make(head_dim=24)                        # 4 heads of 24 on a 64-wide model, as Mistral NeMo's 32 x 128 on 5120
    perturb_norms_and_biases(hf)
    model = from_hf(hf)
    assert model.config.head_dim == 24 and model.layers[0].attn.wq.weight.shape == (96, 64)
    same_as_hf(model, hf, seqlen=11, prompt_len=5)


def test_from_hf_reads_transformers_4_qwen2_window_layers():
    """transformers 4.x Qwen2 configs have no layer_types: layers from max_window_layers on slide."""
    import types
    from fastlm.hf import _config_llama
    hf = hf_qwen2().config.to_dict()
    for key in ("layer_types", "rope_parameters", "max_window_layers"):
        hf.pop(key, None)
    hf.update(model_type="qwen2", rope_theta=10000.0, use_sliding_window=True, sliding_window=16)
    assert _config_llama(types.SimpleNamespace(**hf, max_window_layers=0), qkv_bias=True).sliding_window == 16
    assert _config_llama(types.SimpleNamespace(**hf, max_window_layers=2), qkv_bias=True).sliding_window is None
    with pytest.raises(NotImplementedError, match="some layers only"):
        _config_llama(types.SimpleNamespace(**hf, max_window_layers=1), qkv_bias=True)


def test_from_hf_reads_transformers_4_rope_scaling():
    """transformers 4.x configs keep the scaling in rope_scaling (its type under "type" in older ones) and the base
    in rope_theta."""
    import types
    from fastlm.hf import _config_llama
    hf = hf_llama().config.to_dict()
    hf.pop("rope_parameters", None)
    hf.update(model_type="llama", rope_theta=500000.0,
              rope_scaling={"type": "linear", "factor": 4.0})
    config = _config_llama(types.SimpleNamespace(**hf))
    assert config.rope_base == 500000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def hf_mistral_window(**kw):
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, sliding_window=7, bos_token_id=0, eos_token_id=0,
               attn_implementation="sdpa")
    cfg.update(kw)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**cfg)).eval()


@pytest.mark.parametrize("make", [hf_mistral_window, lambda: hf_qwen2(use_sliding_window=True, sliding_window=7,
                                                                    max_window_layers=0, max_position_embeddings=128)],
                         ids=["mistral", "qwen2"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_from_hf_sliding_window(make, backend):
    hf = make()
    perturb_norms_and_biases(hf)
    model = from_hf(hf, backend=backend)
    assert model.config.sliding_window == 7
    same_as_hf(model, hf, seqlen=40, prompt_len=12, new_tokens=20)   # prefill and decoding past the window
    back = to_hf(model)
    assert type(back).__name__ == type(hf).__name__
    tokens = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_to_hf_round_trip(kind):
    hf = MODELS[kind]()
    perturb_norms_and_biases(hf)
    model = from_hf(hf, backend="torch")
    back = to_hf(model)
    assert type(back).__name__ == {"gpt2": "GPT2LMHeadModel", "qwen2-gqa": "Qwen2ForCausalLM"}.get(
        kind, "LlamaForCausalLM") and not back.training
    again = from_hf(back, backend="torch")
    assert dataclasses.replace(again.config, name=model.config.name) == model.config   # a Mistral comes back a Llama
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    tokens = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        check_rule("logits", back(tokens).logits, copy.deepcopy(hf).double()(tokens).logits, hf(tokens).logits)


def test_to_hf_of_a_fastlm_model_saves_and_generates_alike(tmp_path):
    config = fastlm.Config(family="llama", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=24,
                           max_seqlen=128, tie_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
                           rope_base=500000.0)
    model = fastlm.Transformer(config, backend="torch").eval()
    perturb_norms_and_biases(model)
    hf = to_hf(model)
    assert hf.lm_head.weight is hf.get_input_embeddings().weight          # tied, as in the fastlm model
    # fastlm names no special tokens: the exported model stops only at max_new_tokens unless told its tokenizer's
    assert hf.generation_config.eos_token_id is None and hf.config.bos_token_id is None
    assert to_hf(model, eos_token_id=7).generation_config.eos_token_id == 7
    hf.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(1, V, (2, 5))
    with torch.no_grad():
        logits = model(torch.cat([prompt, prompt], 1))
        torch.testing.assert_close(loaded(torch.cat([prompt, prompt], 1)).logits, logits, rtol=1e-5, atol=1e-5)
        expected = loaded.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
        assert torch.equal(model.generate(prompt, 16), expected)


def test_to_hf_of_a_compiled_or_parametrized_model():
    """to_hf takes the model inside torch.compile's wrapper, and a parametrized Linear's weight as it computes it
    (weight norm here), as fastlm's forward does."""
    torch.manual_seed(0)
    model = fastlm.Transformer(fastlm.Config.from_name("llama-tiny"), backend="torch").eval()
    torch.nn.utils.parametrizations.weight_norm(model.layers[0].attn.wq)
    tokens = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        want = model(tokens)
        for m in (model, torch.compile(model, backend="eager")):
            torch.testing.assert_close(to_hf(m)(tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_to_hf_errors():
    with pytest.raises(TypeError, match="to_hf: model must be a fastlm.Transformer"):
        to_hf(hf_llama())
    with pytest.raises(ValueError, match=r"eos_token_id must be None or a token id in \[0, 1000\)"):
        to_hf(from_hf(hf_llama()), eos_token_id=1000)
    gpt2 = fastlm.Transformer(fastlm.Config(family="gpt2", vocab_size=V, n_layer=1, n_head=4, d_model=64, head_dim=8))
    with pytest.raises(NotImplementedError, match="GPT-2 has no head_dim apart"):
        to_hf(gpt2)


def test_from_hf_keeps_dtype_and_untied_head():
    hf = hf_gpt2(tie_word_embeddings=False).to(torch.float64)
    model = from_hf(hf, backend="torch")
    assert model.tok_emb.weight.dtype == torch.float64 and not model.config.tie_embeddings
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(model.layers[1].attn.wk.weight, hf.transformer.h[1].attn.c_attn.weight[:, 64:128].t())
    tokens = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-12, atol=1e-12)


def test_from_hf_reads_the_head_from_its_tensors():
    """A head untied from the embedding after loading (the config still says tied) is converted as the untied head
    it is; a head with a bias, which fastlm's model has no place for, is refused rather than dropped."""
    hf = hf_llama(tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    tokens = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        tied = from_hf(hf, backend="torch")
        assert tied.config.tie_embeddings
        torch.testing.assert_close(tied(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight + 0.05 * torch.randn_like(hf.lm_head.weight))
        untied = from_hf(hf, backend="torch")
        assert not untied.config.tie_embeddings and torch.equal(untied.lm_head.weight, hf.lm_head.weight)
        torch.testing.assert_close(untied(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    hf.lm_head = torch.nn.Linear(64, V, bias=True)
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM with a bias on its LM head is not supported"):
        from_hf(hf)


def test_llama_ignores_a_sliding_window_entry_as_transformers_does():
    """A Llama config carrying a sliding_window entry (left by a conversion): transformers' Llama attends to every
    key, and so do from_hf's model and the patched one."""
    hf = hf_llama(sliding_window=4)
    assert hf.config.sliding_window == 4
    tokens = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        want = hf(tokens).logits
        model = from_hf(hf, backend="torch")
        assert model.config.sliding_window is None
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patch(copy.deepcopy(hf), backend="torch")(tokens).logits, want, rtol=1e-5,
                                   atol=1e-5)


def test_from_hf_unsupported():
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*Qwen2ForCausalLM; got GPT2Model"):
        from_hf(transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=V)))
    with pytest.raises(NotImplementedError, match="sliding-window attention in some layers only"):
        from_hf(hf_qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=1))
    with pytest.raises(NotImplementedError, match="GPT-2 activation 'relu' is not supported"):
        from_hf(hf_gpt2(activation_function="relu"))
    with pytest.raises(NotImplementedError, match="GPT-2 with scale_attn_weights=False"):
        from_hf(hf_gpt2(scale_attn_weights=False))
    with pytest.raises(NotImplementedError, match="llama activation 'gelu' is not supported"):
        from_hf(hf_llama(hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match="llama with attention_bias or mlp_bias is not supported"):
        from_hf(hf_llama(attention_bias=True))
    with pytest.raises(NotImplementedError, match="RoPE type 'yarn'.*'llama3'"):
        from_hf(hf_llama(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}))


class CountOps:
    """Counts calls of fastlm.ops functions (the patched model must actually use them)."""

    def __init__(self, monkeypatch, names):
        self.calls = dict.fromkeys(names, 0)
        for name in names:
            real = getattr(ops, name)

            def counted(*a, _real=real, _name=name, **k):
                self.calls[_name] += 1
                return _real(*a, **k)
            monkeypatch.setattr(ops, name, counted)


# Sliding windows of 4 keys, shorter than the sequences the patch tests run: in every layer (Mistral, Qwen2 with
# use_sliding_window), or in some (Qwen2's layer_types: layer 0 slides, layer 1 attends to every key)
WINDOWED = {"mistral-window": lambda: hf_mistral_window(sliding_window=4),
            "qwen2-window": lambda: hf_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0),
            "qwen2-mixed": lambda: hf_qwen2(use_sliding_window=True, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"])}
PATCH_MODELS = {**MODELS, **WINDOWED}

PATCH_OPS = {**dict.fromkeys(PATCH_MODELS, ["attention", "rms_norm", "apply_rope", "mlp_swiglu", "cross_entropy",
                                              "linear_cross_entropy"]),
             "gpt2": ["attention", "layer_norm", "mlp_gelu", "cross_entropy", "linear_cross_entropy"]}


@pytest.mark.parametrize("kind", list(PATCH_MODELS))
def test_patch_same_logits_and_gradients_then_unpatch(kind, monkeypatch):
    hf = PATCH_MODELS[kind]()
    perturb_norms_and_biases(hf)
    hf64 = copy.deepcopy(hf).double()
    reference = copy.deepcopy(hf)
    tokens = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        before = hf(tokens).logits

    counter = CountOps(monkeypatch, PATCH_OPS[kind])
    assert patch(hf, backend="torch") is hf
    assert patch(hf, backend="torch") is hf                                   # patching twice changes nothing
    with torch.no_grad():
        check_rule("patched logits", hf(tokens).logits, hf64(tokens).logits, before)
        # evaluation with labels: logits and the loss by ops.cross_entropy
        check_rule("patched eval loss", *(m(tokens, labels=tokens).loss for m in (hf, hf64, reference)))

    # one training step: loss and every gradient by the rule against float64 transformers; the patched model's
    # loss comes from ops.linear_cross_entropy on the hidden states, so it holds no logits
    hf.train(), hf64.train(), reference.train()                              # dropout is 0 in these configs
    outs = [m(tokens, labels=tokens) for m in (hf, hf64, reference)]
    assert outs[0].logits is None and "logits" not in outs[0] and outs[2].logits is not None
    losses = [o.loss for o in outs]
    check_rule("patched loss", *losses)
    for loss in losses:
        loss.backward()
    grads64 = dict(hf64.named_parameters())
    grads_low = dict(reference.named_parameters())
    for name, p in hf.named_parameters():
        check_rule(f"grad {name}", p.grad, grads64[name].grad, grads_low[name].grad)
    assert all(n > 0 for n in counter.calls.values()), counter.calls
    hf.eval()

    unpatch(hf)
    assert not hasattr(hf, "_fastlm_patch") and "_loss_function" not in hf.__dict__
    assert "forward" not in hf.lm_head.__dict__ and "forward" not in hf.__dict__
    assert all("forward" not in m.__dict__ for m in hf.modules())
    assert unpatch(hf) is hf and not hasattr(hf, "_fastlm_patch")         # (a model not patched: as it is)
    assert hf.config._attn_implementation == {"gpt2": "eager", "mistral-mqa": "eager"}.get(kind, "sdpa")
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, before)


def test_patched_copy_runs_its_own_weights():
    """copy.deepcopy of a patched model (an EMA copy, a DPO reference model) computes with the copy's weights, in the
    fused training forward too."""
    hf = patch(hf_llama(), backend="torch")
    clone = copy.deepcopy(hf)
    tokens = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        clone.lm_head.weight.zero_()
        assert not clone(tokens).logits.any() and hf(tokens).logits.any()
    clone.train()
    clone(tokens, labels=tokens).loss.backward()
    assert clone.lm_head.weight.grad is not None and hf.lm_head.weight.grad is None


class _Adapter(torch.nn.Module):
    """A projection wrapped as LoRA-style adapters wrap one: the base layer plus a low-rank update."""

    def __init__(self, base):
        super().__init__()
        self.base, self.a, self.b = base, torch.nn.Linear(base.in_features, 2, bias=False), \
            torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.b.weight)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def test_patch_runs_adapters_hooks_and_instance_forwards_as_transformers_does():
    """The fused MLP and LM head read their projections' weights: where a projection is wrapped (an adapter), hooked,
    or has a forward of its own on the instance (an offloading hook), the patched model runs transformers' forward
    for that module and gives its result; a module hooked so before patch() keeps its forward."""
    hf = hf_llama()
    hf.model.layers[0].mlp.gate_proj = _Adapter(hf.model.layers[0].mlp.gate_proj)
    hf.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 1.5)
    backward_calls = []
    hf.model.layers[0].mlp.down_proj.register_full_backward_hook(lambda m, gi, go: backward_calls.append(1))
    reference = copy.deepcopy(hf)
    calls = []
    for m in (hf, reference):                                     # instance forwards, as accelerate's hooks set
        head_forward, norm_forward = m.lm_head.forward, m.model.norm.forward
        m.lm_head.forward = functools.partial(lambda x, f, mine: (mine and calls.append(1), f(x))[1],
                                              f=head_forward, mine=m is hf)
        m.model.norm.forward = functools.partial(lambda x, f: f(x) * 2.0, f=norm_forward)
    patch(hf, backend="torch")
    assert hf.model.norm.__dict__["forward"] is not None and "fastlm" not in repr(hf.model.norm.forward)
    tokens = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
    hf.train(), reference.train()
    out = hf(tokens, labels=tokens)
    assert out.logits is not None                                # the hooked head: transformers' path, with logits
    torch.testing.assert_close(out.loss, reference(tokens, labels=tokens).loss, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 and "forward" in hf.lm_head.__dict__  # both calls went through the hook, which stays
    out.loss.backward()
    assert hf.model.layers[0].mlp.gate_proj.b.weight.grad is not None and backward_calls


def test_patched_loss_of_a_step_without_labelled_tokens():
    """The Trainer's num_items_in_batch (labelled tokens of the whole step) may be 0: the loss is 0, not 0 / 0."""
    from fastlm.hf import _causal_lm_loss
    logits, labels = torch.randn(2, 5, V, requires_grad=True), torch.full((2, 5), -100)
    for n in (torch.tensor(0), 0):
        loss = _causal_lm_loss(logits, labels, V, num_items_in_batch=n, backend="torch")
        assert loss.item() == 0.0
    loss.backward()
    assert not logits.grad.any()


def test_patch_keeps_a_loss_function_set_afterwards():
    hf = patch(hf_llama(), backend="torch")
    hf.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean() * 0 + 123.0
    tokens = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert hf(tokens, labels=tokens).loss.item() == 123.0
    hf.train()
    assert hf(tokens, labels=tokens).loss.item() == 123.0       # the fused head gives way to the user's loss
    unpatch(hf)
    assert hf(tokens, labels=tokens).loss.item() == 123.0


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_patched_training_step_compiles(kind):
    """torch.compile of a patched model, a training forward with labels: the same loss as without compiling."""
    hf = patch(MODELS[kind](), backend="torch").train()
    tokens = torch.randint(0, V, (2, 7))
    want = hf(tokens, labels=tokens).loss
    got = torch.compile(hf, backend="aot_eager", fullgraph=True)(tokens, labels=tokens).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert hf.lm_head.weight.grad is not None and "forward" not in hf.lm_head.__dict__


def test_patch_on_the_meta_device_and_eager_gpt2_with_upcast_attention():
    hf = patch(hf_llama().to("meta"), backend="auto").train()
    tokens = torch.randint(0, V, (2, 7), device="meta")
    assert hf(tokens, labels=tokens).loss.device.type == "meta"
    # GPT-2's reordered, upcast eager attention is not patched: the model keeps its eager attention
    gpt2 = hf_gpt2(reorder_and_upcast_attn=True, attn_implementation="eager")
    patch(gpt2, backend="torch")
    assert gpt2.config._attn_implementation == "eager"


def test_patch_without_fused_head_keeps_training_logits():
    hf = hf_llama().train()
    reference = copy.deepcopy(hf)
    patch(hf, backend="torch", fused_linear_cross_entropy=False)
    tokens = torch.randint(0, V, (2, 7))
    out, want = hf(tokens, labels=tokens), reference(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_patched_loss_per_item_normalization(fused):
    """transformers' Trainer passes num_items_in_batch (gradient accumulation): the loss is then a sum over the
    tokens divided by it, on both loss paths, with ignored labels left out."""
    hf = hf_llama().train()
    reference = copy.deepcopy(hf)
    patch(hf, backend="torch", fused_linear_cross_entropy=fused)
    tokens = torch.randint(0, V, (2, 7))
    labels = tokens.clone()
    labels[0, :3] = -100
    n = torch.tensor(5)
    torch.testing.assert_close(hf(tokens, labels=labels, num_items_in_batch=n).loss,
                               reference(tokens, labels=labels, num_items_in_batch=n).loss, atol=1e-5, rtol=1e-5)
    # return_dict=False: a tuple led by the loss (without the logits on the fused path, as to_tuple drops None)
    out = hf(tokens, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == (2 if fused else 3)
    torch.testing.assert_close(out[0], reference(tokens, labels=labels).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_patch_with_triton_kernels(kind):
    """The kernels take what transformers hands them: Conv1D weights transposed (strided), k/v as views."""
    hf = MODELS[kind](**{"n_layer" if kind == "gpt2" else "num_hidden_layers": 1}).to(DEVICE)
    perturb_norms_and_biases(hf)
    hf64, reference = copy.deepcopy(hf).double(), copy.deepcopy(hf)
    patch(hf, backend="triton")
    tokens = torch.randint(0, V, (2, 5), device=DEVICE)
    with torch.no_grad():
        check_rule("logits", *(m(tokens).logits for m in (hf, hf64, reference)))
    for m in (hf, hf64, reference):                 # training: the Triton linear cross-entropy computes the loss
        m.train()
    outs = [m(tokens, labels=tokens) for m in (hf, hf64, reference)]
    assert outs[0].logits is None
    check_rule("loss", *(o.loss for o in outs))
    for o in outs:
        o.loss.backward()
    grads64, grads_low = dict(hf64.named_parameters()), dict(reference.named_parameters())
    for name, p in hf.named_parameters():
        check_rule(f"grad {name}", p.grad, grads64[name].grad, grads_low[name].grad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel("mlp_swiglu")), "triton"])
@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_patched_training_step_under_autocast(kind, backend):
    """transformers' Trainer with bf16 on an fp32 model: the step runs under torch.autocast. The patched ops compute
    as autocast runs matmuls (fp32 weights cast to bf16, fp32 gradients). Against the float64 model: the loss within
    bf16's relative rounding (2^-8), each gradient within twice the unpatched model's error under autocast plus
    2^-7 of its largest entry (the two round to bf16 at different points; both err by ~1 % of the largest entry).
    (The Triton interpreter gets bf16 wrong: there the patched model refuses it, naming the op.)"""
    device = DEVICE if backend == "triton" else "cpu"
    hf = MODELS[kind]().to(device).train()
    perturb_norms_and_biases(hf)
    hf64, reference = copy.deepcopy(hf).double(), copy.deepcopy(hf)
    patch(hf, backend=backend)
    tokens = torch.randint(0, V, (2, 9), device=device)
    if backend == "triton" and device == "cpu":
        with pytest.raises(TypeError, match="backend='triton' on cpu tensors runs through the Triton interpreter, "
                                            "which computes bfloat16 wrongly"), torch.autocast("cpu", torch.bfloat16):
            hf(tokens, labels=tokens)
        return
    losses = []
    for m in (hf, reference):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            losses.append(m(tokens, labels=tokens).loss)
    losses.insert(1, hf64(tokens, labels=tokens).loss)
    for loss in losses:
        loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in hf.parameters())
    assert abs(losses[0].item() - losses[1].item()) <= 2 ** -8 * abs(losses[1].item()), losses
    grads64, grads_low = dict(hf64.named_parameters()), dict(reference.named_parameters())
    for name, p in hf.named_parameters():
        g64 = grads64[name].grad.to(device)
        err, err_low = ((g.double() - g64).abs().max().item() for g in (p.grad, grads_low[name].grad))
        assert err <= 2 * err_low + 2 ** -7 * g64.abs().max().item(), (name, err, err_low)


@pytest.mark.parametrize("cache", ["default", "full-history"])
@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", *WINDOWED])
def test_patched_generation_and_padding(kind, cache, monkeypatch):
    """HF's own generate through the patched model (its cache, one-token steps; 16 tokens, far past a sliding
    window) runs every attention in fastlm's op and gives what the unpatched model gives, with transformers' default
    cache (sliding-window layers keep only the window's keys) and with a DynamicCache that keeps every key. A padded
    batch (falls back to transformers' masked attention, its window included) gives the unpatched logits too, in a
    forward and through generate (which builds the position ids from the mask only for a forward whose signature
    takes them: GPT-2's learned positions are wrong otherwise)."""
    hf = PATCH_MODELS[kind]()
    prompt = torch.randint(1, V, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0                                                           # left padding in sequence 1

    def generate():
        past = {"cache": transformers.DynamicCache()} if cache == "full-history" else {}
        return hf.generate(prompt[:1], max_new_tokens=16, do_sample=False, min_new_tokens=16,
                           attention_mask=mask[:1], **past)

    def generate_padded():
        return torch.stack(hf.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True).logits)

    with torch.no_grad():
        gen, gen_padded = generate(), generate_padded()
        padded = hf(prompt, attention_mask=mask).logits
        signature = inspect.signature(hf.forward)
        counter = CountOps(monkeypatch, ["attention"])
        patch(hf, backend="torch")
        assert torch.equal(generate(), gen)
        assert counter.calls["attention"] == 16 * 2                   # prefill and 15 steps, 2 layers: no fallback
        torch.testing.assert_close(hf(prompt, attention_mask=mask).logits[:, 2:], padded[:, 2:])
        assert inspect.signature(hf.forward) == signature
        torch.testing.assert_close(generate_padded(), gen_padded)
        unpatch(hf)


@pytest.mark.parametrize("kind", list(WINDOWED))
def test_patch_gives_each_layer_its_window(kind, monkeypatch):
    """Sliding-window layers are patched too, each running ops.attention with its own window: transformers' query
    at position i sees keys i - W + 1 .. i (masking_utils.sliding_window_overlay: kv_idx > q_idx - W), i.e. the
    op's window (W - 1, 0); full-attention layers of a mixed model keep (-1, 0)."""
    hf = WINDOWED[kind]()
    layer_types = getattr(hf.config, "layer_types", None) or ["sliding_attention"] * len(hf.model.layers)
    windows = []
    real = ops.attention

    def recorded(*a, window=(-1, -1), **k):
        windows.append(window)
        return real(*a, window=window, **k)
    monkeypatch.setattr(ops, "attention", recorded)
    patch(hf, backend="torch")
    assert all("forward" in layer.self_attn.__dict__ for layer in hf.model.layers)
    with torch.no_grad():
        hf(torch.randint(0, V, (2, 9)))                     # 9 keys > W = 4: transformers materializes the mask
    assert windows == [(3, 0) if t == "sliding_attention" else (-1, 0) for t in layer_types]


@pytest.mark.parametrize("kind", ["mistral-window", "qwen2-window"])
def test_patched_window_model_under_inference_mode(kind):
    """torch.inference_mode (serving, evaluation): transformers' materialized window mask is an inference tensor,
    which has no version counter to key the cached answer by; it is read afresh, and outputs stay transformers'."""
    hf = WINDOWED[kind]()
    tokens = torch.randint(0, V, (1, 9))                     # 9 keys > W = 4: transformers materializes the mask
    with torch.inference_mode():
        want = hf(tokens).logits
        want_gen = hf.generate(tokens[:, :3], max_new_tokens=8, do_sample=False)
        patch(hf, backend="torch")
        torch.testing.assert_close(hf(tokens).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(hf.generate(tokens[:, :3], max_new_tokens=8, do_sample=False), want_gen)


def test_patch_leaves_the_loss_of_other_heads_alone():
    """GPT2DoubleHeadsModel (model_type gpt2, with an LM head) computes its losses itself from the LM head's logits:
    patch swaps its modules but neither its loss nor its head, so a training step with labels keeps transformers'
    loss and logits."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=1, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    hf = transformers.GPT2DoubleHeadsModel(cfg).train()
    ref = copy.deepcopy(hf)
    patch(hf, backend="torch")
    assert "forward" in hf.transformer.h[0].mlp.__dict__ and "forward" not in hf.__dict__
    tokens = torch.randint(0, V, (2, 10))
    got, want = hf(tokens, labels=tokens), ref(tokens, labels=tokens)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_pdrop", [0.0, 0.1])
def test_patched_gpt2_training_with_dropout(attn_pdrop, monkeypatch):
    """A GPT-2 in train mode with dropout: its MLP (dropout inside) runs transformers' own forward, its attention
    fastlm's op unless attention dropout is on (then transformers' sdpa path); with attention dropout off, the same
    seed gives the unpatched model's logits (the same dropout draws, in the same order)."""
    torch.manual_seed(0)
    hf = hf_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=attn_pdrop).train()
    ref = copy.deepcopy(hf)
    patch(hf, backend="torch")
    counter = CountOps(monkeypatch, ["attention", "mlp_gelu"])
    tokens = torch.randint(0, V, (2, 10))
    torch.manual_seed(1)
    got = hf(tokens).logits
    assert counter.calls == {"attention": 0 if attn_pdrop else 2, "mlp_gelu": 0}
    if not attn_pdrop:
        torch.manual_seed(1)
        torch.testing.assert_close(got, ref(tokens).logits, rtol=1e-5, atol=1e-5)
    hf.eval()                                                         # no dropout: fastlm's ops again
    hf(tokens)
    assert counter.calls["mlp_gelu"] == 2


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_patched_model_refuses_output_attentions(kind):
    """An eager-attention model returns the attention probabilities when asked (output_attentions); patched, its
    attention is fastlm's fused op, which never forms them: asking is an error instead of an empty answer. Unpatched,
    the model answers again."""
    hf = MODELS[kind](attn_implementation="eager")
    tokens = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        want = hf(tokens, output_attentions=True).attentions
        patch(hf, backend="torch")
        with pytest.raises(ValueError, match="output_attentions=True: the patched attention .* never forms the "
                                             "attention probabilities; unpatch"):
            hf(tokens, output_attentions=True)
        hf(tokens)                                                    # (without them: runs)
        unpatch(hf)
        assert all(torch.equal(a, b) for a, b in zip(hf(tokens, output_attentions=True).attentions, want))
        assert len(want) == 2 and not hf._forward_pre_hooks


def test_window_mask_recognition():
    """_plain_window_mask accepts exactly the op's bottom-right causal window mask in every batch row; a wider or
    narrower window, a padded row, a float mask or another shape go to transformers' sdpa path."""
    from fastlm import reference
    from fastlm.config import sliding_window_left
    from fastlm.hf import _plain_window_mask
    assert (sliding_window_left(None), sliding_window_left(1), sliding_window_left(4096)) == (-1, 0, 4095)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="sliding_window must be a positive integer or None"):
            sliding_window_left(bad)
    Sq, Sk, left = 3, 9, 3
    keep = reference.attention_mask(Sq, Sk, causal=True, window=(left, 0))
    mask = keep.expand(2, 1, Sq, Sk).clone()
    assert _plain_window_mask(mask, Sq, Sk, left)
    assert not _plain_window_mask(mask, Sq, Sk, left + 1) and not _plain_window_mask(mask, Sq, Sk, left - 1)
    padded = mask.clone()
    padded[1, :, :, :Sk - 2] = False                                 # row 1: a left-padded prompt
    assert not _plain_window_mask(padded, Sq, Sk, left)
    assert not _plain_window_mask(mask.float(), Sq, Sk, left)
    assert not _plain_window_mask(mask[..., 1:], Sq, Sk, left)


def test_window_mask_is_read_once_per_mask(monkeypatch):
    """Every windowed layer of a forward gets the same mask tensor: it is compared with the op's mask (a host sync)
    once; an in-place change of the mask is seen."""
    from fastlm import hf, reference
    built = []
    real = reference.attention_mask

    def counted(*a, **k):
        built.append(a)
        return real(*a, **k)
    monkeypatch.setattr(reference, "attention_mask", counted)
    Sq, Sk, left = 2, 7, 2
    mask = real(Sq, Sk, causal=True, window=(left, 0)).expand(1, 1, Sq, Sk).clone()
    assert all(hf._plain_window_mask(mask, Sq, Sk, left) for _ in range(4)) and len(built) == 1
    assert not hf._plain_window_mask(mask, Sq, Sk, left + 1) and len(built) == 2     # another window: asked anew
    mask[0, 0, 0, 0] = True                                                          # in place: version bumps
    assert not hf._plain_window_mask(mask, Sq, Sk, left) and len(built) == 3


def test_patch_unsupported():
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                             ffn_dim=32, num_attention_heads=2))
    with pytest.raises(NotImplementedError, match="GPT-2, Llama, Mistral and Qwen2 models.*model_type 'opt'"):
        patch(opt)
    with pytest.raises(NotImplementedError, match="GPT-2, Llama, Mistral and Qwen2 models"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        patch(hf_gpt2(), backend="jax")
    with pytest.raises(TypeError, match="fused_linear_cross_entropy must be a bool, got 'no'"):
        patch(hf_gpt2(), fused_linear_cross_entropy="no")


def test_public_names():
    assert fastlm.from_hf is from_hf and fastlm.to_hf is to_hf and fastlm.patch is patch and fastlm.unpatch is unpatch
