"""fastlm.generate: KV-cache generation equals full recomputation token for token (fp32), batched prompts of
different lengths, seeded sampling, top-k / top-p, stop tokens, no host sync in the decode step, bad input."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import needs_cpu_kernel
import fastlm
from fastlm import backends
from fastlm.config import Config
from fastlm.generate import _decode_step, generate, sample


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="llama-tiny", backend="torch", **overrides):
    torch.manual_seed(0)
    cfg = Config.from_name(name, **{"vocab_size": 300, **overrides})
    # larger-than-default weights so the argmax is decided by the weights, not by rounding noise
    model = fastlm.Transformer(cfg, backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@torch.no_grad()
def _greedy_recompute(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
    return seq


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_cache_equals_recompute_batched_ragged(name):
    model = _model(name)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 1, 12)]
    out = generate(model, prompts, 12)
    for p, o in zip(prompts, out):
        assert o == _greedy_recompute(model, p, 12)


def test_cache_equals_recompute_auto_backend():
    # the kernels the "auto" backend picks here (Triton interpreter or the C++ extension) in the cache path
    model = _model("llama-tiny", backend="auto", n_layer=1)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 6)]
    out = generate(model, prompts, 6)
    ref = _model("llama-tiny", backend="torch", n_layer=1)
    ref.load_state_dict(model.state_dict())
    for p, o in zip(prompts, out):
        assert o == _greedy_recompute(ref, p, 6)


def test_generate_leaves_the_callers_cache_as_it_found_it():
    """generate decodes on a cache of its own: a cache the caller set up (and filled) comes back, the same tensors
    with the same contents, and a model without one stays without one."""
    model = _model()
    prompt = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        model.setup_cache(1, 12)
        model(prompt)
    state = model._cache_state()
    before = [t.clone() for t in (state[0][0] + (state[1],))]
    out = generate(model, torch.randint(0, 300, (3, 4)), 5)
    assert out.shape == (3, 9) and model.cache_shape == (1, 12)
    after = model._cache_state()
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(after[0], state[0]))
    assert after[1] is state[1] and after[2] is state[2]
    assert all(torch.equal(a, b) for a, b in zip(before, state[0][0] + (state[1],)))
    model.clear_cache()
    generate(model, prompt, 3)
    assert model.cache_shape is None and model.rope_cos is None


def test_tensor_prompts_and_model_method():
    model = _model()
    prompts = torch.randint(0, 300, (2, 7))
    out = model.generate(prompts, 9)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16) and out.dtype == torch.long
    assert torch.equal(out[:, :7], prompts)
    for b in range(2):
        assert out[b].tolist() == _greedy_recompute(model, prompts[b].tolist(), 9)


def test_compiled_decode_step_matches_eager():
    model = _model("llama-tiny", backend="auto", n_layer=1)
    prompts = [[1, 2, 3, 4], [5, 6]]
    # aot_eager traces the step like inductor does (graph capture, functionalization) without compiling C++
    assert generate(model, prompts, 5, compile="aot_eager") == generate(model, prompts, 5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert (generate(model, prompts, 5, temperature=0.9, top_k=10, generator=g1, compile="aot_eager")
            == generate(model, prompts, 5, temperature=0.9, top_k=10, generator=g2))


def test_sampling_reproducible_with_seed():
    model = _model()
    prompts = [[1, 2, 3], [4, 5]]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 10, temperature=1.0, generator=g, **kw)

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(3, top_k=50, top_p=0.9) == run(3, top_k=50, top_p=0.9)
    greedy = generate(model, prompts, 10)
    assert run(5, top_k=1) == greedy           # top-k 1 is greedy
    assert run(5, top_p=1e-6) == greedy        # a tiny nucleus keeps only the most likely token


def test_sample_support_and_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50).repeat(4000, 1)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(sample(logits, 1.0, top_k=5, generator=g).tolist()) <= top5
    # top-p: the smallest prefix of the sorted distribution whose mass reaches p
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    draws = sample(logits, 1.0, top_p=0.5, generator=g)
    assert set(draws.tolist()) == set(order[:keep].tolist())        # (4000 draws reach every kept token)
    # a token whose predecessors' mass reaches top_p exactly is dropped: two equal tokens at top_p 0.5, one kept
    assert len(set(sample(torch.zeros(2000, 2), 1.0, top_p=0.5, generator=g).tolist())) == 1
    # plain temperature-1 sampling follows softmax(logits): compare frequencies of the likeliest tokens
    draws = sample(logits, 1.0, generator=g)
    freq = torch.bincount(draws, minlength=50).float() / len(draws)
    assert (freq - probs).abs().max() < 0.03


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperature_samples_like_greedy(temperature):
    logits = torch.tensor([[0.3, 1.2, 5.1, 2.0], [7.0, -3.0, 6.9, 0.0]])
    for top_k, top_p in ((None, None), (2, None), (None, 0.5)):
        assert sample(logits, temperature, top_k, top_p).tolist() == [2, 0]
    model = _model()
    prompts = [[1, 2, 3], [4, 5]]
    assert generate(model, prompts, 6, temperature=temperature, generator=torch.Generator().manual_seed(0)) == \
        generate(model, prompts, 6)


@pytest.mark.parametrize("args, kw, exc, match", [
    ((torch.zeros(1, 4),), dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    ((torch.zeros(1, 4),), dict(temperature=1.0, top_k=0), ValueError, "top_k must be a positive int or None, got 0"),
    ((torch.zeros(1, 4),), dict(temperature=1.0, top_k=-2), ValueError, "top_k must be a positive int"),
    ((torch.zeros(1, 4),), dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    ((torch.zeros(1, 4),), dict(temperature=1.0, top_p=-1.0), ValueError, r"top_p must be in \(0, 1\]"),
    ((torch.zeros(1, 4),), dict(temperature="1"), TypeError, "temperature must be a number"),
    ((torch.zeros(4),), dict(temperature=1.0, top_k=2), ValueError, r"logits must have shape \(batch, vocab\)"),
    ((torch.zeros(2, 0),), {}, ValueError, r"logits must have shape \(batch, vocab\) with vocab >= 1"),
    ((torch.tensor([[1, 5, 2]]),), {}, TypeError, "logits must be a floating-point tensor"),
    (([[0.0, 1.0]],), {}, TypeError, "logits must be a floating-point tensor"),
    ((torch.zeros(2, 4),), dict(temperature=1.0, noise=torch.ones(2, 3)), ValueError,
     r"noise must be None or a tensor of the logits' shape \(2, 4\)"),
    ((torch.zeros(2, 4),), dict(temperature=1.0, noise=torch.zeros(2, 4)), ValueError,
     "noise must hold positive finite Exp"),
    ((torch.zeros(2, 4),), dict(temperature=1.0, noise=torch.full((2, 4), float("inf"))), ValueError,
     "noise must hold positive finite Exp"),
])
def test_sample_checks_its_arguments(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        sample(*args, **kw)


@pytest.mark.parametrize("row", [[float("nan"), 1.0], [float("inf"), 1.0], [float("-inf")] * 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_refuses_rows_without_a_distribution(row, temperature):
    logits = torch.tensor([[0.5, 2.0, -1.0][:len(row)], row])
    with pytest.raises(ValueError, match=r"logits rows \[1\] hold a NaN or \+inf, or are all -inf"):
        sample(logits, temperature)
    assert sample(torch.tensor([[float("-inf"), 2.0, float("-inf")]]), temperature).tolist() == [1]  # masked: fine


@pytest.mark.parametrize("kw", [{}, dict(temperature=1.0), dict(stop_tokens=[5]), dict(stream=lambda t: None)])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_generate_raises_on_non_finite_logits(kw, backend):
    """Logits that turn NaN (here: those of the second sequence, from the third new token on) stop generation with
    an error naming the sequence and the token, instead of tokens drawn from nothing."""
    model = _model(backend=backend)
    calls = []

    def poison(module, args, out):
        calls.append(1)
        if len(calls) >= 3:
            out = out.clone()
            out[1] = float("nan")
        return out
    model.register_forward_hook(poison)
    assert len(generate(model, [[1, 2, 3], [4, 5]], 2, **kw)) == 2        # two tokens: two calls, no NaN
    calls.clear()
    with pytest.raises(RuntimeError, match="logits for sequence 1 at new token 2 hold a NaN or \\+inf"):
        generate(model, [[1, 2, 3], [4, 5]], 6, **kw)


def test_stop_tokens():
    model = _model()
    prompts = [[10, 20, 30], [40]]
    free = generate(model, prompts, 15)
    stop = free[0][3 + 4]                      # the 5th new token of sequence 0
    out = generate(model, prompts, 15, stop_tokens=[stop])
    for f, o in zip(free, out):
        cut = next((i for i in range(len(o)) if i >= len(f) - 15 and f[i] == stop), None)
        assert o == (f[:cut + 1] if cut is not None else f)
    assert out[0][-1] == stop and len(out[0]) <= 3 + 5
    # tensor input: finished sequences are padded with the stop token (the default pad)
    t = generate(model, torch.tensor([[10, 20, 30]]), 15, stop_tokens=[stop], sync_every=4)
    assert t[0, :len(out[0])].tolist() == out[0]
    assert (t[0, len(out[0]):] == stop).all()
    # several stop tokens: any of them stops; the pad defaults to the first
    other = next(i for i in range(model.config.vocab_size) if i not in free[0])
    two = generate(model, torch.tensor([[10, 20, 30]]), 15, stop_tokens=[other, stop])
    assert two[0, :len(out[0])].tolist() == out[0] and (two[0, len(out[0]):] == other).all()
    # any pad id, in the vocab or not: it only fills the output (a batch whose other sequence runs on)
    streamed = []
    for pad in (-1, model.config.vocab_size, 2 ** 63 - 1):
        both = generate(model, torch.tensor([[10, 20, 30], [40, 50, 60]]), 15, stop_tokens=[stop], pad_id=pad,
                        stream=streamed.append)
        assert both.shape == (2, 18) and both[0, :len(out[0])].tolist() == out[0]
        assert (both[0, len(out[0]):] == pad).all() and (both[1] != pad).all()
        assert torch.equal(torch.stack(streamed[-15:], 1), both[:, 3:])   # streamed as returned


class _SyncDetector(TorchDispatchMode):
    """Records ops that copy a device value to the host or have data-dependent output shapes."""
    SYNCING = {"_local_scalar_dense", "nonzero", "item", "masked_select", "unique"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class _PositionalLM(torch.nn.Module):
    """A stand-in model whose decode step is pure tensor math, to isolate generate's own per-step work
    (sampling, stop masks, positions) from the backend's decode attention."""

    def __init__(self, vocab=50):
        super().__init__()
        self.config = Config(family="llama", vocab_size=vocab, n_layer=1, n_head=2, d_model=8, max_seqlen=64)
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.pos = torch.nn.Embedding(64, vocab)

    def forward(self, tokens, input_pos=None):
        positions = torch.arange(tokens.shape[1]) if input_pos is None else input_pos[:, None]
        return self.emb(tokens) + self.pos(positions)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("backend", [
    "torch", pytest.param("cpu", marks=needs_cpu_kernel("decode_attention")),
    pytest.param("triton", marks=pytest.mark.skipif(not backends.interpreter(), reason="TRITON_INTERPRET is not set"))])
def test_decode_step_compiles_as_one_graph(backend, name):
    """The whole decode step (model, sampling, stop tokens) traces as one graph on every backend (fullgraph=True
    fails on a graph break), and computes what the eager step does, greedy and sampled."""
    model = _model(name, backend=backend, n_layer=1)
    model.setup_cache(2, 16)
    torch._dynamo.reset()  # (each model and sampling mode is a recompile; the earlier ones would count)
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    tok, pos, stop = torch.tensor([3, 4]), torch.tensor([5, 2]), torch.tensor([7])
    done = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        for temperature, top_k, top_p in ((0.0, None, None), (0.8, 20, 0.9)):
            noise = torch.empty(2, 300).exponential_() if temperature > 0 else None
            args = (model, tok, pos, done, stop, temperature, top_k, top_p, noise, 300)
            assert all(map(torch.equal, compiled(*args), _decode_step(*args))), (temperature, top_k, top_p)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_decode_step_has_no_host_sync(kw):
    model = _PositionalLM()
    with torch.no_grad(), _SyncDetector() as det:
        _decode_step(model, torch.tensor([3, 4]), torch.tensor([5, 2]), torch.zeros(2, dtype=torch.bool),
                     torch.tensor([7]), kw["temperature"], kw.get("top_k"), kw.get("top_p"),
                     torch.empty(2, 50).exponential_() if kw["temperature"] > 0 else None, 50)
    assert det.seen == []
    # the detector does see a sync when there is one
    with _SyncDetector() as det:
        bool(torch.tensor([1]).any())
    assert det.seen == ["_local_scalar_dense"]


@pytest.mark.gpu
def test_decode_step_has_no_host_sync_cuda():
    model = _model(backend="auto").cuda()
    model.setup_cache(2, 32)
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 5), device="cuda"))
        args = (torch.tensor([3, 4], device="cuda"), torch.tensor([5, 2], device="cuda"),
                torch.zeros(2, dtype=torch.bool, device="cuda"), torch.tensor([7], device="cuda"), 0.8, 20, 0.9,
                torch.empty(2, 300, device="cuda").exponential_(), 300)
        _decode_step(model, *args)          # warm-up: first calls may compile or autotune
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _decode_step(model, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.clear_cache()


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(monkeypatch):
    """generate(cuda_graph=True): the decode step captured once and replayed for every later token gives the eager
    step's tokens (greedy, and sampled with the same seed), for prompts of different lengths with a dozen stop
    tokens (more than torch.isin takes without a host sync); with compile it is refused."""
    model = _model(backend="auto").cuda()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real_replay(self))
    assert generate(model, prompts, 12, cuda_graph=True) == generate(model, prompts, 12)
    assert len(replays) == 11                    # every token after the prefill's
    stop = [3] + list(range(200, 211))
    runs = []
    for graph in (True, False):
        g = torch.Generator(device="cuda").manual_seed(5)
        runs.append(generate(model, prompts, 12, temperature=0.9, top_k=20, top_p=0.9, stop_tokens=stop,
                             generator=g, cuda_graph=graph))
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="cuda_graph=True and compile are exclusive"):
        generate(model, prompts, 2, cuda_graph=True, compile=True)


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [list(range(120))], 20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="prompts is empty: need at least one prompt"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        generate(model, [[1, 300]], 2)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, [[1]], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [[1]], 2, temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="prompts must be an integer tensor"):
        generate(model, torch.zeros(2, 3), 2)
    with pytest.raises(TypeError, match="fastlm.Transformer"):
        generate(torch.nn.Linear(2, 2), [[1]], 2)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=float("nan")), "temperature must be >= 0 .* and finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be >= 0 .* and finite, got inf"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("inf")), r"top_p must be in \(0, 1\]"),
    (dict(stop_tokens=[10 ** 20]), r"stop_tokens: token ids must be in \[0, 300\)"),
    (dict(stop_tokens=[-1]), r"stop_tokens: token ids must be in \[0, 300\)"),
    (dict(compile="nonexistent"), "compile must be a bool or the name of a torch.compile backend, got 'nonexistent'"
                                  "; backends here: .*aot_eager"),
    (dict(cuda_graph=True), "cuda_graph=True needs the model on a CUDA device, got cpu"),
    (dict(sync_every=0), "sync_every must be a positive int, got 0"),
    (dict(pad_id=2 ** 63), "pad_id must fit in int64, got 9223372036854775808"),
    (dict(vocab_size=0), r"vocab_size must be in \[1, 300\] \(the model's vocab_size\), got 0"),
    (dict(vocab_size=301), r"vocab_size must be in \[1, 300\]"),
])
def test_non_finite_and_out_of_range_arguments_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(_model(), [[1, 2]], 3, **kw)


@pytest.mark.parametrize("args, kw, match", [
    (([[1.7, 2.2]], 3), {}, r"prompts\[0\] must hold token ids \(ints\), got 1.7"),
    (([[1, True]], 3), {}, r"prompts\[0\] must hold token ids"),
    (([1, 2, True], 3), {}, r"prompts \(one prompt as a flat list of token ids\) must hold token ids \(ints\), "
                            r"got True \(bool\) at index 2"),
    (([1, 2, 3.0], 3), {}, r"flat list of token ids\) must hold token ids \(ints\), got 3.0 .*at index 2"),
    (([[1, 2]], True), {}, "max_new_tokens must be an int >= 0, got True"),
    (([[1, 2]], 3.0), {}, "max_new_tokens must be an int"),
    (([[1, 2]], 3), dict(temperature=1.0, top_k=True), "top_k must be a positive int or None, got True"),
    (([[1, 2]], 3), dict(temperature=1.0, top_k=2.5), "top_k must be a positive int"),
    (([[1, 2]], 3), dict(temperature="a"), "temperature must be a number"),
    (([[1, 2]], 3), dict(temperature=None), "temperature must be a number"),
    (([[1, 2]], 3), dict(temperature=True), "temperature must be a number"),
    (([[1, 2]], 3), dict(temperature=1.0, top_p="x"), "top_p must be a number"),
    (([[1, 2]], 3), dict(stop_tokens=[1.5]), r"stop_tokens must hold token ids \(ints\), got 1.5"),
    (([[1, 2]], 3), dict(stop_tokens=[True]), "stop_tokens must hold token ids"),
    (([[1, 2]], 3), dict(stop_tokens=5), r"stop_tokens must be a list of token ids.*pass \[5\]"),
    (([[1, 2]], 3), dict(stop_tokens=torch.tensor(5)), r"stop_tokens must be a list of token ids.*pass \[5\]"),
    (([[1, 2]], 3), dict(stop_tokens={1, 2}), "stop_tokens must be an ordered list"),
    (([[1, 2]], 3), dict(stop_tokens="ab"), "stop_tokens must be a list of token ids"),
    (([[1, 2]], 3), dict(stop_tokens=torch.tensor([1.0])), "stop_tokens must be a 1-D integer tensor"),
    (("hello", 3), {}, "prompts must be token ids .* got str 'hello'; encode text"),
    ((42, 3), {}, "prompts must be a list of token lists or an integer tensor"),
    (([[1, 2], "ab"], 3), {}, r"prompts\[1\] must be a list of token ids"),
    (([[1, 2]], 3), dict(pad_id="a"), "pad_id must be an int or None, got 'a'"),
    (([[1, 2]], 3), dict(pad_id=1.0), "pad_id must be an int or None"),
    (([[1, 2]], 3), dict(sync_every=True), "sync_every must be a positive int"),
    (([[1, 2]], 3), dict(stream=5), "stream must be a callable or None"),
    (([[1, 2]], 3), dict(compile=3), r"compile must be a bool or the name of a torch.compile backend, got 3 \(int\)"),
    (([[1, 2]], 3), dict(cuda_graph=1), r"cuda_graph must be a bool, got 1 \(int\)"),
    (([[1, 2]], 3), dict(generator=5), r"generator must be a torch.Generator or None, got 5 \(int\)"),
    (([[1, 2]], 3), dict(vocab_size=2.5), r"vocab_size must be an int or None, got 2.5"),
])
def test_mistyped_arguments_raise_type_error_naming_them(args, kw, match):
    with pytest.raises(TypeError, match=match):
        _model().generate(*args, **kw)


def test_single_prompt_as_flat_list_or_1d_tensor_and_no_stop_tokens():
    model = _model()
    batched = generate(model, [[1, 2, 3]], 5)
    assert generate(model, [1, 2, 3], 5) == batched[0]
    out = generate(model, torch.tensor([1, 2, 3]), 5)
    assert out.dim() == 1 and out.tolist() == batched[0]
    import numpy as np                                                   # numpy arrays: a prompt, a batch
    assert generate(model, np.array([1, 2, 3]), 5) == batched[0]
    assert generate(model, np.array([[1, 2, 3]]), 5) == batched
    with pytest.raises(ValueError, match=r"prompts must be .* got an array of shape \(\)"):
        generate(model, np.array(5), 5)
    assert generate(model, [[1, 2, 3]], 5, stop_tokens=None) == batched
    assert generate(model, [torch.tensor([1, 2, 3])], 5, stop_tokens=torch.tensor([7])) == \
        generate(model, [[1, 2, 3]], 5, stop_tokens=[7])


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature must be >= 0 (0 = greedy) and finite, got nan"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be an int >= 0, got -1"),
    (["--top-k", "0"], "--top-k must be a positive int"),
    (["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA device, got cpu (--device)"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile are exclusive"),
])
def test_cli_rejects_bad_options_before_loading(tmp_path, capsys, argv, message):
    from fastlm.generate import cli
    assert cli(["--checkpoint", str(tmp_path / "nope")] + argv + ["x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda(tmp_path, capsys):
    from fastlm.generate import cli
    assert cli(["--checkpoint", str(tmp_path / "nope"), "--device", "cuda", "x"]) == 2
    assert "--device 'cuda': no CUDA device is available here" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained byte-level model with a 64-token context, saved as `python -m fastlm train` saves one."""
    from fastlm import train as T
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    T.save_checkpoint(str(out), fastlm.Transformer(Config.from_name("llama-tiny", vocab_size=256, max_seqlen=64)))
    return str(out)


def test_cli_checks_the_backend_against_the_device_first(tmp_path, capsys):
    from fastlm.generate import cli
    assert cli(["--checkpoint", str(tmp_path / "nope"), "--device", "cpu", "--backend", "cuda", "hello"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --backend cuda on device cpu with --dtype fp32: ")
    assert "cpu tensors" in err
    assert cli(["--checkpoint", str(tmp_path / "nope"), "--backend", "gpu", "hello"]) == 2
    assert "error: --backend gpu" in capsys.readouterr().err
    if backends.interpreter() and backends.triton_available():     # (the interpreter computes bf16 wrongly)
        assert cli(["--checkpoint", str(tmp_path / "nope"), "--device", "cpu", "--backend", "triton", "--dtype",
                    "bf16", "hello"]) == 2
        assert "computes bfloat16 wrongly" in capsys.readouterr().err


def test_cli_max_new_tokens_past_the_context_is_an_error(checkpoint, capsys):
    from fastlm.generate import cli
    base = ["--checkpoint", checkpoint, "--backend", "torch", "--device", "cpu", "--temperature", "0"]
    assert cli(base + ["--max-new-tokens", "60", "abcde"]) == 2       # 5 + 60 > 64
    out, err = capsys.readouterr()
    assert out == "" and "error: --max-new-tokens 60 does not fit: the prompt is 5 tokens of the model's context " \
                         "max_seqlen=64, which leaves 59" in err
    assert cli(base + ["--max-new-tokens", "59", "abcde"]) == 0
    filled = capsys.readouterr().out
    assert cli(base + ["abcde"]) == 0                                 # the default: what the context leaves
    assert capsys.readouterr().out == filled


def test_cli_prompt_that_is_not_utf8_is_named(checkpoint, capsys):
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates."""
    from fastlm.generate import cli
    base = ["--checkpoint", checkpoint, "--backend", "torch", "--device", "cpu"]
    assert cli(base + ["ab\udcff"]) == 2
    assert capsys.readouterr().err.startswith("error: the prompt is not valid UTF-8 text: ")
    assert cli(base + ["--stop", "\udcfe", "ab"]) == 2
    assert capsys.readouterr().err.startswith("error: --stop '\\udcfe' is not valid UTF-8 text: ")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_vocab_size_limits_the_new_tokens(temperature):
    """A model whose embedding is padded past the tokenizer's vocabulary: with vocab_size, only ids below it come out,
    and they are the tokens of the model's logits cut to those ids."""
    model = _model(vocab_size=300)
    with torch.no_grad():
        model.lm_head.weight[200:] += 5.0           # the padded rows would win every step
    gen = torch.Generator().manual_seed(0)
    free = generate(model, [[1, 2, 3]], 12, temperature=temperature, generator=gen)[0]
    assert max(free[3:]) >= 200
    gen = torch.Generator().manual_seed(0)
    limited = generate(model, [[1, 2, 3]], 12, temperature=temperature, generator=gen, vocab_size=200)[0]
    assert max(limited[3:]) < 200
    if temperature == 0:
        seq = [1, 2, 3]
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1, :200].argmax()))
        assert limited == seq


@pytest.mark.gpu
def test_generator_on_another_device():
    with pytest.raises(ValueError, match=r"generator must be on the model's device \(cuda:0\), got a generator on cpu"):
        generate(_model().cuda(), [[1, 2]], 3, temperature=1.0, generator=torch.Generator())


def test_cli_padded_vocab_samples_only_the_tokenizers_ids(tmp_path, capsys):
    from fastlm import train as T
    from fastlm.generate import cli
    torch.manual_seed(0)
    model = fastlm.Transformer(Config.from_name("llama-tiny", vocab_size=4096, max_seqlen=64))
    with torch.no_grad():
        model.lm_head.weight[256:] += 5.0
    T.save_checkpoint(str(tmp_path), model)
    assert cli(["--checkpoint", str(tmp_path), "--backend", "torch", "--device", "cpu", "--max-new-tokens", "20",
                "--temperature", "1", "hi"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hi") and err == ""


def test_cli_prompt_filling_the_context(checkpoint, capsys):
    from fastlm.generate import cli
    base = ["--checkpoint", checkpoint, "--backend", "torch", "--device", "cpu"]
    assert cli(base + ["--max-new-tokens", "0", "a" * 64]) == 0       # as generate(prompt, 0): the prompt itself
    assert capsys.readouterr().out == "a" * 64 + "\n"
    assert cli(base + ["a" * 64]) == 2
    assert "the prompt is 64 tokens, the whole of the model's context (max_seqlen=64): no room" in \
        capsys.readouterr().err
    assert cli(base + ["--max-new-tokens", "0", "a" * 65]) == 2
    assert "the prompt is 65 tokens, longer than the model's context (max_seqlen=64)" in capsys.readouterr().err


def test_cli_stop_strings(checkpoint, capsys):
    """--stop: generation ends at the first new token that is a stop string (printed); a stop string must be one
    token of the tokenizer."""
    from fastlm.generate import cli
    base = ["--checkpoint", checkpoint, "--backend", "torch", "--device", "cpu", "--temperature", "0",
            "--max-new-tokens", "40"]
    assert cli(base + ["ab"]) == 0
    free = capsys.readouterr().out[2:-1]                                # the 40 new characters (bytes) of greedy
    stop = next(c for c in free[3:] if c.isascii() and c.isprintable())  # (a byte of its own: one token)
    assert cli(base + ["--stop", stop, "--stop", "\x00", "ab"]) == 0
    assert capsys.readouterr().out == "ab" + free[:free.index(stop) + 1] + "\n"
    assert cli(base + ["--stop", "xy", "ab"]) == 2
    assert "--stop 'xy' is 2 tokens; a stop string must be exactly one token" in capsys.readouterr().err


def test_cli_seed_is_any_integer(checkpoint, capsys):
    from fastlm.generate import cli
    outs = []
    for seed in (5, 5 + 2 ** 64, -1, 2 ** 64 - 1):
        assert cli(["--checkpoint", checkpoint, "--backend", "torch", "--device", "cpu", "--max-new-tokens", "8",
                    "--seed", str(seed), "ab"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] == outs[3]


class _PieceTokenizer:
    """SentencePiece-like: pieces carry their leading space as "▁", and a decoded text never starts with a space."""
    byte_level = False
    pieces = ["▁The", "▁old", "▁house", ".", "▁it", "s"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


class _BytePairTokenizer:
    """BPE-like: tokens are byte strings, one may hold part of a UTF-8 character (decoded with replacement)."""
    byte_level = False
    tokens = [b"caf", b"\xc3", b"\xa9", b" ok"]

    def decode(self, ids):
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("tokenizer, prompt, new, want", [
    (_PieceTokenizer(), [0, 1], [2, 3, 4, 5], "The old house. its"),
    (_BytePairTokenizer(), [0], [1, 2, 3], "café ok"),
])
def test_stream_decodes_tokens_in_context(capsys, tokenizer, prompt, new, want):
    """The CLI's streamer writes the decoded prompt + tokens, spaces and split characters included: a piece's
    leading space survives and a character split across tokens is written once whole (never as U+FFFD)."""
    from fastlm.generate import _Streamer
    stream = _Streamer(tokenizer, prompt)
    sys.stdout.write(tokenizer.decode(prompt))
    for t in new:
        stream(torch.tensor([t]))
    stream.flush()
    assert capsys.readouterr().out == want
