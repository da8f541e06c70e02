"""fastlm.Transformer against fastlm.reference.Transformer: logits, loss and every parameter gradient by the numerics
rule; state dicts both ways; KV-cache decoding against full recomputation; torch.compile; bad input."""
import copy
import dataclasses
import functools

import pytest
import torch

from conftest import DEVICE, ON_GPU, backend_device, perturb_norms_and_biases
from fastlm import backends, reference
from fastlm.config import Config
from fastlm.model import Transformer
from fastlm.testing import ATOL, check_rule

TINY = dict(n_layer=2, d_model=64, n_head=4, vocab_size=1000, max_seqlen=64)
CONFIGS = {
    "gpt2": Config(name="gpt2-test", family="gpt2", **TINY),
    "llama": Config(name="llama-test", family="llama", n_kv_head=2, multiple_of=32, **TINY),
    "qwen2": Config(name="qwen2-test", family="llama", n_kv_head=2, multiple_of=32, qkv_bias=True, **TINY),
    # Llama 3.1's RoPE scaling on a 16-position original context: every frequency band occurs at head dim 16
    "llama-rope-scaled": Config(name="llama-rope-scaled-test", family="llama", n_kv_head=2, multiple_of=32,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                **TINY),
    # attention 4 x 24 = 96 wide on a 64-wide model (head_dim given, as Mistral NeMo's)
    "llama-head-dim": Config(name="llama-head-dim-test", family="llama", n_kv_head=2, multiple_of=32, head_dim=24,
                             **TINY),
    # each query sees itself and the 4 keys before it (Mistral's sliding window)
    "llama-window": Config(name="llama-window-test", family="llama", n_kv_head=2, multiple_of=32, sliding_window=5,
                           **TINY),
}


def make(family, backend="torch", dtype=torch.float32, device=DEVICE, **overrides):
    """A fastlm model and the reference at ``dtype``, and the reference at float64, all with the same weights.
    Overriding d_model or n_head re-derives head_dim (unless it is given too). The initialization's biases (zero) and
    norm weights (one) are perturbed, so that a dropped bias or a swapped norm weight shows."""
    if {"d_model", "n_head"} & set(overrides):
        overrides.setdefault("head_dim", None)
    config = dataclasses.replace(CONFIGS[family], **overrides)
    model = Transformer(config, backend=backend).to(device)
    perturb_norms_and_biases(model)
    ref64 = reference.Transformer(config).to(device)
    ref64.load_state_dict(model.state_dict())
    ref_low = copy.deepcopy(ref64).to(dtype)
    return model.to(dtype), ref64.double(), ref_low


def tokens_and_targets(B=2, S=13, V=1000, device=DEVICE):
    tokens = torch.randint(0, V, (B, S), device=device)
    targets = torch.randint(0, V, (B, S), device=device)
    targets[0, :3] = -100                                    # ignored positions must not count
    return tokens, targets


@pytest.mark.parametrize("family, backend", [(f, b) for b in ("torch", "triton", "cpu") for f in ("gpt2", "llama")]
                         + [("qwen2", "torch"), ("qwen2", "cpu"), ("llama-rope-scaled", "cpu"),
                            ("llama-head-dim", "torch"), ("llama-head-dim", "cpu"), ("llama-window", "torch"),
                            ("llama-window", "cpu")])
def test_logits_loss_and_every_gradient_match_reference(family, backend):
    if backend == "cpu" and not backends.extension_has("linear", "cpu"):
        pytest.skip("fastlm._C is not built")
    # the Triton interpreter runs one numpy program per row / tile: one layer (every code path of the stack runs in
    # it: plain norm, fused add-norm, MLP with residual, final norm) and fewer tokens
    interpreted = backend == "triton" and not ON_GPU
    device = "cpu" if backend == "cpu" else DEVICE
    model, ref64, ref_low = make(family, backend, device=device, n_layer=1 if interpreted else 2)
    tokens, targets = tokens_and_targets(S=5 if interpreted else 13, device=device)
    check_logits_loss_and_grads(model, ref64, ref_low, tokens, targets)


def check_logits_loss_and_grads(model, ref64, ref_low, tokens, targets):
    """The numerics rule for the logits, the loss and the gradient of every parameter. The loss is one fp32 number
    averaged from logits at the model's dtype: its atol is that dtype's (a bf16 model's mean over a few hundred
    tokens is good to about bf16 precision, and one number's error is a single random draw, where the rule's
    factor 2 needs a maximum over many)."""
    with torch.no_grad():
        check_rule("logits", model(tokens), ref64(tokens), ref_low(tokens))
    losses = [m(tokens, targets) for m in (model, ref64, ref_low)]
    dtype = next(model.parameters()).dtype
    check_rule("loss", *losses, atol=ATOL[dtype] * max(losses[1].detach().abs().item(), 1.0))
    for loss in losses:
        loss.backward()
    params = [dict(m.named_parameters()) for m in (model, ref64, ref_low)]
    assert params[0].keys() == params[1].keys()
    for name, p in params[0].items():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
        atol = None
        if name.endswith("attn.wk.bias"):
            # zero in exact arithmetic (q . b_k shifts a query's whole row of scores, and softmax ignores a shift): the
            # computed values are rounding noise, judged on the scale of the key projection's weight gradient
            atol = ATOL[dtype] * params[1][name[:-len("bias")] + "weight"].grad.abs().max().item()
        check_rule(f"grad {name}", p.grad, params[1][name].grad, params[2][name].grad, atol=atol)


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=pytest.mark.gpu), "cpu"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_model_matches_reference(family, backend):
    """bf16 through the GPU kernels (or the C++ CPU ones): head_dim 64, GQA for llama, an odd number of tokens past
    several tiles (257 on the GPU, 131 on the CPU)."""
    if backend == "cpu" and not backends.extension_has("linear", "cpu"):
        pytest.skip("fastlm._C is not built")
    device = "cpu" if backend == "cpu" else DEVICE
    heads = dict(n_head=2, n_kv_head=1 if family == "llama" else 2)
    model, ref64, ref_low = make(family, backend, dtype=torch.bfloat16, device=device, d_model=128, max_seqlen=512,
                                 **heads)
    check_logits_loss_and_grads(model, ref64, ref_low, *tokens_and_targets(S=257 if device != "cpu" else 131,
                                                                           device=device))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meta_device_model_gives_shapes(family):
    """A model on the meta device (shape inference, deferred initialization): logits, loss, selected logits and a
    decode step have their shapes (the id and position checks, which read values, are skipped there)."""
    with torch.device("meta"):
        model = Transformer(CONFIGS[family], backend="auto")
    tokens = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert model(tokens).shape == (2, 5, 1000) and model(tokens, tokens).shape == ()
    assert model(tokens, logits_at=torch.zeros(2, 1, dtype=torch.long, device="meta")).shape == (2, 1, 1000)
    model.setup_cache(2, 8)
    assert model(tokens[:, :1], input_pos=torch.zeros(2, dtype=torch.long, device="meta")).shape == (2, 1, 1000)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_state_dict_round_trips_both_ways(family):
    config = CONFIGS[family]
    fast, ref = Transformer(config, backend="torch"), reference.Transformer(config)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(fast.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fast.state_dict()[k]), k
    other = reference.Transformer(config)
    fast.load_state_dict(other.state_dict(), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ref64 = copy.deepcopy(other).double()
        check_rule("logits after loading", fast(tokens), ref64(tokens), other(tokens))
    assert (config.family == "gpt2") == ("lm_head.weight" not in fast.state_dict())   # tied head: one tensor


@pytest.mark.parametrize("family, backend", [("gpt2", "torch"), ("gpt2", "cpu"), ("llama", "torch"),
                                             ("llama", "triton"), ("llama-rope-scaled", "torch"),
                                             ("llama-rope-scaled", "cpu"), ("llama-head-dim", "cpu"),
                                             ("llama-window", "torch"), ("llama-window", "triton"),
                                             ("llama-window", "cpu")])
def test_kv_cache_decode_equals_full_recompute(family, backend):
    interpreted = backend == "triton" and not ON_GPU
    device = backend_device(backend)
    model = Transformer(dataclasses.replace(CONFIGS[family], n_layer=1 if interpreted else 2), backend=backend)
    model.to(device)
    prefill, chunks = (3, (2, 1)) if interpreted else (5, (2, 1, 1, 3))
    tokens = torch.randint(0, 1000, (2, prefill + sum(chunks)), device=device)
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 32)
        steps = [model(tokens[:, :prefill])]
        pos = torch.tensor([prefill, prefill], device=device)
        for chunk in chunks:                                                   # multi-token and one-token steps
            steps.append(model(tokens[:, pos[0]:pos[0] + chunk], input_pos=pos))
            pos = pos + chunk
    out = torch.cat(steps, dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_sequences_at_different_positions(family):
    """Each sequence of a batch sits at its own position: tables and cache writes are gathered per sequence."""
    model = Transformer(CONFIGS[family], backend="torch")
    a, b = torch.randint(0, 1000, (1, 8)), torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model.setup_cache(2, 16)
        model(torch.cat([a[:, :4], b[:, :4]]))                                  # prefill 4 tokens each
        model(a[:, 4:6].expand(2, 2), input_pos=torch.tensor([4, 12]))         # only sequence 0 matters here
        last = model(torch.cat([a[:, 6:8], b[:, 4:6]]), input_pos=torch.tensor([6, 4]))
    torch.testing.assert_close(last[0], full_a[0, 6:8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[1], full_b[0, 4:6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_logits_at_selects_positions(backend):
    if backend == "cpu" and not backends.extension_has("decode_step", "cpu"):
        pytest.skip("fastlm._C is not built")
    model = Transformer(CONFIGS["llama"], backend=backend).eval()
    tokens, at = torch.randint(0, 1000, (2, 9)), torch.tensor([[8, 0, 3], [2, 2, 5]])
    with torch.no_grad():
        full = model(tokens)
        want = torch.stack([full[b, at[b]] for b in range(2)])
        torch.testing.assert_close(model(tokens, logits_at=at), want, atol=1e-5, rtol=1e-5)
        model.setup_cache(2, 16)
        model(tokens[:, :6])
        step = model(tokens[:, 6:], input_pos=torch.tensor([6, 6]), logits_at=torch.tensor([[2], [0]]))
    torch.testing.assert_close(step, torch.stack([full[0, 8:9], full[1, 6:7]]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"positions in \[0, 9\) of tokens, got values in \[0, 9\]"):
        Transformer(CONFIGS["llama"])(tokens, logits_at=torch.tensor([[0], [9]]))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, logits_at=at.int()), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"logits_at must be an integer \(int64 or int32\) tensor of shape "
                                        r"\(batch, k\) = \(2, k\)"):
        Transformer(CONFIGS["llama"])(tokens, logits_at=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"logits_at must be an integer .* got shape \(2, 1\) dtype torch.float32"):
        Transformer(CONFIGS["llama"])(tokens, logits_at=torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        Transformer(CONFIGS["llama"])(tokens, tokens, logits_at=torch.tensor([[1], [2]]))


def test_cache_lifecycle():
    model = Transformer(CONFIGS["llama"], backend="torch")
    assert model.cache_shape is None
    model.setup_cache(3, 20, dtype=torch.float64)
    k = model.layers[1].attn.k_cache
    assert model.cache_shape == (3, 20) and k.shape == (3, 20, 2, 16) and k.dtype == torch.float64
    assert "layers.0.attn.k_cache" not in model.state_dict()                   # never saved with the weights
    model.clear_cache()
    assert model.cache_shape is None and model.layers[1].attn.k_cache is None


def test_cache_holds_no_autograd_graph():
    """The KV cache keeps detached keys and values: training forwards with a cache set up give the gradients they
    give without one, step after step, and the cache never joins a graph (it would outlive its backward)."""
    model = Transformer(CONFIGS["llama"], backend="torch")
    tokens, targets = tokens_and_targets(device="cpu")
    model(tokens, targets).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.setup_cache(tokens.shape[0], 32)
    for _ in range(2):
        model(tokens, targets).backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want))
        model.zero_grad()
    caches = [t for layer in model.layers for t in (layer.attn.k_cache, layer.attn.v_cache)]
    assert not any(t.requires_grad for t in caches)


def test_decode_step_gradient_treats_cached_rows_as_constants():
    """A decode step with autograd on (backend="torch"): gradients reach the step's own keys and values, which it
    writes into the cache and attends, and the rows cached by earlier calls are constants. Checked against central
    differences in float64 along a random direction of the last layer's key weights (a step that lost its own keys'
    gradient would give 0 there)."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS["llama"], backend="torch").double()
    tokens = torch.randint(0, 1000, (2, 7))
    model.setup_cache(2, 16, dtype=torch.float64)
    with torch.no_grad():
        model(tokens[:, :5])
    pos = torch.tensor([5, 5])

    def step():
        return model(tokens[:, 5:], input_pos=pos).square().mean()

    w = model.layers[-1].attn.wk.weight
    step().backward()
    direction = torch.randn_like(w)
    with torch.no_grad():
        eps = 1e-6
        w += eps * direction
        up = step()
        w -= 2 * eps * direction
        down = step()
        w += eps * direction
    slope = (up - down) / (2 * eps)
    assert slope.abs() > 1e-6
    torch.testing.assert_close((w.grad * direction).sum(), slope, rtol=1e-6, atol=0)
    assert not model.layers[-1].attn.k_cache.requires_grad


def test_cache_device_must_be_the_models():
    model = Transformer(CONFIGS["llama"], backend="torch").to(DEVICE)
    own = model.tok_emb.weight.device
    for device in (own, str(own), own.type):
        model.setup_cache(1, 8, device=device)
        assert model.layers[0].attn.k_cache.device == own and model.rope_cos.device == own
    model.clear_cache()
    other = "cpu" if ON_GPU else "cuda"
    for device in ("meta", "bogus", other, 3.5):
        with pytest.raises(ValueError, match=f"setup_cache: device must be the model's device {own}.*got"):
            model.setup_cache(1, 8, device=device)
        assert model.cache_shape is None


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends.extension_has("attention_fwd", "cpu"), reason="the C++ extension is not built")),
    pytest.param("triton", marks=pytest.mark.gpu)])
def test_autocast_runs_the_model_in_the_autocast_dtype(family, backend):
    """Under torch.autocast (bf16, what training uses on a GPU) the model computes as its bf16 copy does, the loss
    and logits included, while the fp32 parameters get fp32 gradients."""
    device = backend_device(backend)
    model = Transformer(CONFIGS[family], backend=backend).to(device)
    tokens, targets = tokens_and_targets(device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = model(tokens, targets)
        logits = model(tokens)
    loss.backward()
    low = copy.deepcopy(model).to(torch.bfloat16)  # (with autograd on, as above: the C++ MLP splits its GEMMs then)
    assert torch.equal(loss.detach().float(), low(tokens, targets).detach().float())
    assert logits.dtype == torch.bfloat16 and torch.equal(logits.detach(), low(tokens).detach())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends.extension_has("attention_fwd", "cpu"), reason="the C++ extension is not built")),
    pytest.param("triton", marks=pytest.mark.gpu)])
def test_autocast_decodes_with_a_cache_in_the_autocast_dtype(family, backend):
    """Under torch.autocast the KV cache (setup_cache's default, generate's own) is in the autocast dtype and the
    cached steps compute as the model's bf16 copy does (with autograd recording or not); a cache in another dtype than
    the forward computes in is an error that says so."""
    device = backend_device(backend)
    model = Transformer(CONFIGS[family], backend=backend).to(device)
    low = copy.deepcopy(model).to(torch.bfloat16)
    prompts = [[5, 3, 9, 1], [7, 2]]
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16):
        assert model.generate(prompts, 6) == low.generate(prompts, 6)
        model.setup_cache(2, 16)
        assert model.layers[0].attn.k_cache.dtype == torch.bfloat16
        tokens = torch.tensor([[5, 3, 9], [7, 2, 4]], device=device)
        model(tokens)
        low.setup_cache(2, 16)
        low(tokens)
        pos = torch.tensor([3, 3], device=device)
        for grad in (False, True):              # (with autograd recording the C++ MLP splits its GEMMs)
            with torch.set_grad_enabled(grad):
                step, want = model(tokens[:, :1], input_pos=pos), low(tokens[:, :1], input_pos=pos)
            assert step.dtype == torch.bfloat16 and torch.equal(step.detach(), want.detach())
    model.setup_cache(2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"the KV cache holds torch.bfloat16 but the forward computes in "
                                         r"torch.float32"):
        model(tokens)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends.extension_has("attention_bwd", "cpu"), reason="the C++ extension is not built")), "triton"])
def test_activation_checkpointing(backend, family, use_reentrant):
    """torch.utils.checkpoint around every block (what gradient checkpointing does) gives the gradients of the plain
    backward: every op's backward survives recomputation, and non-reentrant checkpointing's rule that each saved
    tensor is unpacked once (RoPE's backward broke it)."""
    import torch.utils.checkpoint as ckpt
    device = backend_device(backend)
    model = Transformer(CONFIGS[family], backend=backend).to(device)
    tokens, targets = tokens_and_targets(S=9, device=device)
    def grads():  # (.backward(): reentrant checkpointing refuses autograd.grad)
        model.zero_grad()
        model(tokens, targets).backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads()
    for layer in model.layers:
        layer.forward = functools.partial(ckpt.checkpoint, layer.forward, use_reentrant=use_reentrant)
    checkpointed = grads()
    for (name, _), a, b in zip(model.named_parameters(), plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends.extension_has("attention_bwd", "cpu"), reason="the C++ extension is not built"))])
def test_compile_fullgraph_forward_backward(backend):
    """One graph for forward + backward (llama: RoPE, GQA, every fused op), with the reference ops and with the C++
    kernels; aot_eager traces through dynamo and AOTAutograd with fake tensors like inductor does, without the C++
    code generation."""
    torch._dynamo.reset()
    model = Transformer(dataclasses.replace(CONFIGS["llama"], n_layer=1), backend=backend)
    tokens, targets = tokens_and_targets(S=8, device="cpu")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(tokens, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(tokens, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_bad_input():
    model = Transformer(CONFIGS["llama"], backend="torch")
    with pytest.raises(ValueError, match="backend"):
        Transformer(CONFIGS["llama"], backend="tpu")
    with pytest.raises(ValueError, match="backend"):
        model.backend = "tpu"
    with pytest.raises(TypeError, match="fastlm.Config"):
        Transformer({"family": "llama"})
    with pytest.raises(TypeError, match="tokens"):
        model(torch.rand(2, 5))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.randint(0, 10, (5,)))
    with pytest.raises(ValueError, match="seqlen 65"):
        model(torch.randint(0, 10, (1, 65)))
    with pytest.raises(ValueError, match="seqlen >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 1000\), got values in \[3, 1000\]"):
        model(torch.tensor([[3, 1000]]))
    with pytest.raises(ValueError, match="tokens must be ids"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(TypeError, match="dtype"):
        model.setup_cache(1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="tokens are on meta"):
        model(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="targets"):
        model(torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (2, 4)))
    with pytest.raises(ValueError, match="setup_cache"):
        model(torch.randint(0, 10, (2, 1)), input_pos=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="max_seqlen"):
        model.setup_cache(1, 65)
    with pytest.raises(ValueError, match="batch_size"):
        model.setup_cache(0, 8)
    for batch in (2 ** 70, 2 ** 40):        # past int64 bytes; petabytes (the allocator refuses them)
        with pytest.raises(RuntimeError, match=f"setup_cache: the KV cache for batch_size {batch} x max_seqlen 8 "
                                               "needs 2 x 2 layers x [0-9]+ bytes on cpu, which could not be "
                                               "allocated"):
            model.setup_cache(batch, 8)
        assert model.cache_shape is None                           # no half-made cache left behind
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match="batch 2"):
        model(torch.randint(0, 10, (3, 4)))
    with pytest.raises(ValueError, match="cache"):
        model(torch.randint(0, 10, (2, 9)))
    with pytest.raises(TypeError, match="input_pos"):
        model(torch.randint(0, 10, (2, 1)), input_pos=torch.tensor([3.0, 3.0]))
    with pytest.raises(TypeError, match="input_pos"):
        model(torch.randint(0, 10, (2, 1)), input_pos=torch.tensor([3]))


def _extension_serves_model(ops=("attention_fwd", "decode_attention", "mlp_swiglu")):
    from fastlm import backends
    return all(backends.extension_has(op, "cpu") for op in ops)


@pytest.mark.skipif(not _extension_serves_model(), reason="the C++ extension fastlm._C is not built")
def test_cpu_backend_logits_and_decode():
    """backend="cpu": C++ attention, decode and MLP kernels, "auto" for the ops the extension lacks."""
    model, ref64, ref_low = make("llama", "cpu")
    tokens = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        full = model(tokens)
        check_rule("logits", full, ref64(tokens), ref_low(tokens))
        model.setup_cache(2, 16)
        steps = [model(tokens[:, :4]), model(tokens[:, 4:6], input_pos=torch.tensor([4, 4])),
                 model(tokens[:, 6:], input_pos=torch.tensor([6, 6]))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def _profiled_decode_step(model, grad=False):
    """The names of the ops one decode step of ``model`` (llama family, cache set up for batch 1) runs."""
    with torch.no_grad():
        model.setup_cache(1, 16)
        model(torch.randint(0, 1000, (1, 5)))
    with torch.set_grad_enabled(grad), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        model(torch.randint(0, 1000, (1, 1)), input_pos=torch.tensor([5]))
    return [e.name for e in p.events()]


@pytest.mark.skipif(not _extension_serves_model(("attention_fwd", "decode_attention", "mlp_swiglu", "norm_fwd",
                                                  "rope_fwd")),
                    reason="the C++ extension fastlm._C with the CPU norm and RoPE is not built")
def test_cpu_backend_decode_step_is_native():
    """Op by op (fused_decode off), a decoding step with backend="cpu" runs every norm (2 per layer and the final
    one) and RoPE (q and k per layer) in the C++ kernels, called directly (no autograd wrapper under no_grad)."""
    model, _, _ = make("llama", "cpu")
    model.fused_decode = False
    names = _profiled_decode_step(model)
    L = model.config.n_layer
    assert names.count("fastlm::norm_fwd") == 2 * L + 1 and names.count("fastlm::rope_fwd") == 2 * L
    assert not any(n.startswith("fastlm_native_py::") for n in names)


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
def test_cpu_decode_step_is_one_call_without_autograd():
    model, _, _ = make("llama", "cpu")
    names = [n for n in _profiled_decode_step(model) if n.startswith("fastlm")]
    assert names == ["fastlm::decode_step"]
    # with autograd recording (parameters require grad) the step goes op by op, so that it can be differentiated
    assert "fastlm::decode_step" not in _profiled_decode_step(model, grad=True)


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "bf16 with fp32 norms"], ids=str)
def test_cpu_fused_decode_step_equals_op_by_op(family, dtype):
    """ops.decode_step runs the op-by-op step's kernels in the same order: the same logits and caches, bit for bit,
    for one- and multi-token steps of sequences at different positions (and the GELU / SwiGLU MLPs, LayerNorm /
    RMSNorm, learned positions / RoPE, q/k/v biases; norms kept in fp32 in a bf16 model, which the norms take)."""
    fp32_norms = dtype == "bf16 with fp32 norms"
    dtype = torch.bfloat16 if fp32_norms else dtype
    fused, _, _ = make(family, "cpu", dtype=dtype)
    if fp32_norms:
        for name, module in fused.named_modules():
            if name.endswith("norm"):
                module.float()
    split = copy.deepcopy(fused)
    split.fused_decode = False
    prompt = torch.randint(0, 1000, (2, 6))
    steps = [(torch.randint(0, 1000, (2, 1)), torch.tensor([6, 3])),
             (torch.randint(0, 1000, (2, 3)), torch.tensor([7, 4])),
             (torch.randint(0, 1000, (2, 1)), torch.tensor([10, 15]))]
    with torch.no_grad():
        for m in (fused, split):
            m.setup_cache(2, 16)
            m(prompt)
        assert fused._fused_decode_here(steps[0][0], fused._linears())
        for tokens, pos in steps:
            out, want = fused(tokens, input_pos=pos), split(tokens, input_pos=pos)
            assert out.dtype == dtype and out.shape == (2, tokens.shape[1], 1000)
            assert torch.equal(out, want)
    for a, b in zip(fused.layers, split.layers):
        assert torch.equal(a.attn.k_cache, b.attn.k_cache) and torch.equal(a.attn.v_cache, b.attn.v_cache)


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
def test_cpu_fused_decode_step_sees_replaced_parameters():
    """The step looks its tensors up every call: a parameter replaced after setup_cache takes effect."""
    fused, _, _ = make("llama", "cpu")
    split = copy.deepcopy(fused)
    split.fused_decode = False
    new = torch.randn_like(fused.layers[1].mlp.w_up.weight)
    with torch.no_grad():
        for m in (fused, split):
            m.setup_cache(1, 8)
            m(torch.tensor([[1, 2, 3]]))
            m.layers[1].mlp.w_up.weight = torch.nn.Parameter(new.clone())
        tok, pos = torch.tensor([[4]]), torch.tensor([3])
        assert torch.equal(fused(tok, input_pos=pos), split(tok, input_pos=pos))


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
def test_cpu_fused_decode_step_runs_hooks_and_each_norms_eps():
    """A hook on a module the op-by-op step calls (a block: activation steering) and a norm whose eps was changed
    after construction act in every decoding step: the step is then not fused (it would skip the hook and take one
    eps). Before, the fused steps ignored both (logits off by 34 and 1.5)."""
    fused, _, _ = make("llama", "cpu")
    split = copy.deepcopy(fused)
    split.fused_decode = False
    tok, pos = torch.tensor([[4]]), torch.tensor([3])

    def step(m):
        m.setup_cache(1, 8)
        m(torch.tensor([[1, 2, 3]]))
        return m(tok, input_pos=pos)
    with torch.no_grad():
        for change in ("hook", "eps"):
            for m in (fused, split):
                if change == "hook":
                    m.layers[0].register_forward_hook(lambda mod, args, out: out * 2)
                else:
                    m.layers[1].mlp_norm.eps = 0.5
            assert fused._fused_decode_here(tok, fused._linears()) is False
            assert torch.equal(step(fused), step(split)), change


def test_linear_layers_that_compute_something_else_are_refused():
    """The model reads its Linear layers' weights and never calls them: a hook, an adapter subclass or a forward set
    on one would be silently left out (a LoRA delta trained nothing). Forward refuses, naming it."""
    class LoRALinear(torch.nn.Linear):
        pass

    for change in ("hook", "subclass", "instance forward"):
        model, _, _ = make("llama", "torch")
        wq = model.layers[1].attn.wq
        if change == "hook":
            wq.register_forward_hook(lambda mod, args, out: out)
        elif change == "subclass":
            model.layers[1].attn.wq = LoRALinear(wq.in_features, wq.out_features, bias=False)
        else:
            wq.forward = lambda x: x
        with pytest.raises(ValueError, match="layers.1.attn.wq is a .* fastlm.Transformer reads its Linear layers"):
            model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built"))])
def test_what_the_linear_check_lets_through(backend):
    """A parametrized Linear (weight norm, a scaling) computes with its parametrized weight, which the ops read (the
    fused decode step, which reads the parameters, steps aside); a global hook (a FLOP counter's) and wrapped blocks
    (activation checkpointing) are fine; each gives the model with the equivalent plain weights."""
    import torch.nn.utils.parametrize as parametrize
    from torch.utils.flop_counter import FlopCounterMode

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    class Wrapped(torch.nn.Module):  # as torch's checkpoint_wrapper: attributes reach the wrapped block
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args):
            return self.block(*args)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.block, name)
    model, _, _ = make("llama", backend)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.layers[1].attn.wq.weight *= 2
    parametrize.register_parametrization(model.layers[1].attn.wq, "weight", Double())
    tokens, pos = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    with torch.no_grad():
        for m in (model, plain):
            m.setup_cache(1, 8)
        assert torch.equal(model(tokens), plain(tokens))
        assert not model._fused_decode_here(tokens, model._linears())
        assert plain._fused_decode_here(tokens, plain._linears()) == (backend == "cpu")
        torch.testing.assert_close(model(tokens[:, :1], input_pos=pos), plain(tokens[:, :1], input_pos=pos))
        with FlopCounterMode(display=False):
            assert torch.equal(plain(tokens), model(tokens))
            assert not plain._fused_decode_here(tokens, plain._linears())
        plain.clear_cache()
        want = plain(tokens)
        plain.layers = torch.nn.ModuleList(Wrapped(b) for b in plain.layers)
        assert torch.equal(plain(tokens), want)


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
def test_cpu_fused_decode_step_errors(monkeypatch):
    from fastlm import ops
    model, _, _ = make("llama", "cpu")
    with torch.no_grad():
        model.setup_cache(2, 8)
        # the arguments the model passes, one changed at a time: each mistake named
        real, calls = ops.decode_step, []
        monkeypatch.setattr(ops, "decode_step", lambda *a, **kw: calls.append((a, kw)))
        model._fused_decode_step(torch.tensor([[1], [2]]), torch.tensor([0, 0]))
        monkeypatch.undo()
        (good, kw), = calls
        wq = good[3][2]
        for slot, value, message in (
                (2, wq.half(), "block 0's wq must have tok_emb's dtype Float, got Half"),
                (2, wq[:48], r"block 0's wq must have shape \(n_head \* 16, 64\), n_head a multiple of the caches' "
                             "n_kv_head 2"),
                (2 + 17, None, "block 1 has no wq"),
                (12, good[3][12].double(), "block 0's w1 \\(w_fc / w_gate\\) must have tok_emb's dtype Float"),
                ("head", good[7].half(), "head must have tok_emb's dtype Float, got Half")):
            args, blocks = list(good), list(good[3])
            if slot == "head":
                args[7] = value
            else:
                blocks[slot] = value
                args[3] = blocks
            with pytest.raises(RuntimeError, match=message):
                real(*args, **kw)
        with pytest.raises(TypeError, match="decode_step: is_rms must be a bool"):
            real(*good, **dict(kw, is_rms="no"))
        with pytest.raises(TypeError, match="decode_step: input_pos must be a tensor, got NoneType"):
            real(good[0], None, *good[2:], **kw)
        with pytest.raises(TypeError, match=r"decode_step: blocks\[4\] \(wk\) must be a tensor or None, got list"):
            real(*good[:3], good[3][:4] + [[1.0]] + good[3][5:], *good[4:], **kw)
        with pytest.raises(TypeError, match=r"decode_step: v_caches\[1\] must be a tensor, got NoneType"):
            real(*good[:5], [good[5][0], None], *good[6:], **kw)
        # the op's own checks, which the model relies on (test_cpu_decode_step_checks_positions_and_ids)
        with pytest.raises(ValueError, match=r"input_pos\[1\] \+ seqlen = 7 \+ 2 must lie in \[2, 8\]"):
            model._fused_decode_step(torch.randint(0, 1000, (2, 2)), torch.tensor([1, 7]))
        with pytest.raises(ValueError, match=r"input_pos\[0\] \+ seqlen = -1 \+ 1"):
            model._fused_decode_step(torch.randint(0, 1000, (2, 1)), torch.tensor([-1, 0]))
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 1000\), got values in \[3, 1000\]"):
            model._fused_decode_step(torch.tensor([[3], [1000]]), torch.tensor([1, 1]))
        args = (torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]), model.tok_emb.weight)
        caches = [layer.attn.k_cache for layer in model.layers]
        vcaches = [layer.attn.v_cache for layer in model.layers]
        with pytest.raises(ValueError, match="blocks must hold 17 entries per block"):
            ops.decode_step(*args, [None] * 3, caches, vcaches, model.norm.weight, model.head_weight, eps=1e-5,
                            is_rms=True)
        with pytest.raises(TypeError, match="decode_step: blocks must be a list of tensors, got NoneType"):
            ops.decode_step(*args, None, caches, vcaches, model.norm.weight, model.head_weight, eps=1e-5,
                            is_rms=True)
        with pytest.raises(ValueError, match="decode_step: eps must be a finite non-negative number, got 'x'"):
            ops.decode_step(*args, [None] * 34, caches, vcaches, model.norm.weight, model.head_weight, eps="x",
                            is_rms=True)
        with pytest.raises(RuntimeError, match="only the C\\+\\+ CPU backend"):
            ops.decode_step(*args, [None] * 34, caches, vcaches, model.norm.weight, model.head_weight, eps=1e-5,
                            is_rms=True, backend="torch")
        with pytest.raises(RuntimeError, match=r"rope_cos must be a \(positions >= 8 \(the caches' max_seqlen\), 16\)"):
            ops.decode_step(*args, [None] * 34, caches, vcaches, model.norm.weight, model.head_weight, eps=1e-5,
                            is_rms=True, rope_cos=model.rope_cos[:4], rope_sin=model.rope_sin[:4])
        with pytest.raises(RuntimeError, match="block 0 has no norm1 weight"):
            ops.decode_step(*args, [None] * 34, caches, vcaches, model.norm.weight, model.head_weight, eps=1e-5,
                            is_rms=True)


@pytest.mark.skipif(not _extension_serves_model(("decode_step",)), reason="fastlm._C with decode_step is not built")
@pytest.mark.parametrize("window", [16, 2 ** 64])
def test_window_past_the_cache_is_no_window(window):
    """A sliding window that reaches every cache position (even past int64) decodes as no window, fused or not."""
    def model(**kw):
        torch.manual_seed(0)
        return Transformer(Config.from_name("llama-tiny", vocab_size=50, max_seqlen=16, n_layer=1, **kw),
                           backend="cpu").eval()
    want = model().generate([1, 2, 3], 6)
    windowed = model(sliding_window=window)
    assert windowed.generate([1, 2, 3], 6) == want
    windowed.fused_decode = False
    assert windowed.generate([1, 2, 3], 6) == want


@pytest.mark.parametrize("path", ["torch", "cpu-op-by-op", "cpu-fused"])
def test_cpu_decode_step_checks_positions_and_ids(path):
    """On a CPU every decode step checks its positions and ids (reading them costs no sync there), fused or not, with
    the same ValueError: a negative position would otherwise wrap around to the cache's last row."""
    if path != "torch" and not _extension_serves_model(("decode_attention", "decode_step")):
        pytest.skip("fastlm._C is not built")
    torch.manual_seed(0)
    model = Transformer(Config.from_name("llama-tiny", vocab_size=50, max_seqlen=16, n_layer=1),
                        backend="torch" if path == "torch" else "cpu").eval()
    model.fused_decode = path == "cpu-fused"
    model.setup_cache(2, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        for pos, message in (([3, -1], r"input_pos\[1\] \+ seqlen = -1 \+ 1 must lie in \[1, 8\]"),
                             ([8, 3], r"input_pos\[0\] \+ seqlen = 8 \+ 1 must lie in \[1, 8\]"),
                             ([2 ** 63 - 1, 3], r"input_pos\[0\] \+ seqlen = 9223372036854775807 \+ 1")):
            with pytest.raises(ValueError, match=message):
                model(torch.tensor([[7], [8]]), input_pos=torch.tensor(pos))
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 50\), got values in \[7, 50\]"):
            model(torch.tensor([[7], [50]]), input_pos=torch.tensor([3, 3]))
        assert model(torch.tensor([[7], [8]]), input_pos=torch.tensor([3, 7])).shape == (2, 1, 50)
        assert model._fused_decode_here(torch.tensor([[7], [8]]), model._linears()) == (path == "cpu-fused")
        with pytest.raises(ValueError, match="input_pos is on meta but tokens are on cpu"):
            model(torch.tensor([[7], [8]]), input_pos=torch.tensor([3, 7], device="meta"))
        with pytest.raises(ValueError, match="logits_at is on meta but tokens are on cpu"):
            at = torch.zeros(2, 1, dtype=torch.long, device="meta")
            model(torch.tensor([[7], [8]]), input_pos=torch.tensor([3, 7]), logits_at=at)
