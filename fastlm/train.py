"""Training: corpus and tokenizers, the training loop, checkpoints.

``python -m fastlm train`` trains a small byte-level model on the corpus shipped in fastlm/data (original English
essays, letters and stories written for fastlm, about 65 KB) in about a minute on a CPU, offline. The loop: AdamW
(no weight decay on norms, biases and embeddings), linear warm-up then cosine decay to lr/10, gradient accumulation
and clipping, bf16/fp16 autocast on GPU, the model's fused linear cross-entropy, periodic held-out loss and
perplexity, a tqdm progress bar, safetensors checkpoints and a loss-curve PNG.

Determinism: the batch of step s is drawn from a generator seeded with (seed, s, rank), so a resumed run sees the same
batches as an uninterrupted one and continues the same loss curve.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (nccl on GPU, gloo on CPU); each rank
draws its own batches and rank 0 logs and writes checkpoints.

Checkpoint: ``<out>/checkpoint.safetensors`` holds the model ("model.<name>") and the AdamW state
("optim.<param index>.<exp_avg|exp_avg_sq|step>") tensors, and a SentencePiece tokenizer's model bytes
("tokenizer.sentencepiece_model"); its metadata holds the config, step, tokenizer, optimizer hyper-parameters and
loss history as JSON, and in "extra" what a resume checks: the run settings and length ("run"), the corpus
("data", and "corpus": its length and sha256) and the number of processes ("world_size"). It is written to a
temporary file and renamed over the old one, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import inspect
import json
import math
import os
import sys
import sysconfig
import time

import torch

from fastlm.backends import BACKENDS
from fastlm.config import is_int, is_real, plain

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "fastlm-checkpoint-1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A small default model: trains in about a minute on a 2-core CPU (with train()'s default run settings).
DEFAULTS = dict(preset="llama-tiny", overrides="d_model=128,n_layer=4,n_head=4,n_kv_head=2", steps=300)


# ----------------------------------------------------------------------------------------------------------------------
# Corpus and tokenizers
# ----------------------------------------------------------------------------------------------------------------------

def default_corpus_files() -> list[str]:
    return sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "*.txt")))


def stdlib_corpus_files(max_bytes: int = 8 << 20) -> list[str]:
    """The Python standard library's .py sources (sorted, up to ``max_bytes``): a corpus on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))):
        if "site-packages" in path or "test" in os.path.relpath(path, root).split(os.sep)[0]:
            continue
        files.append(path)
        total += os.path.getsize(path)
        if total >= max_bytes:
            break
    return files


def load_corpus(data: str | None = None) -> str:
    """The training text: None = the corpus shipped in fastlm/data; "stdlib" = the Python standard library's sources;
    a file; or a directory (every .txt/.md/.py/.rst file below it, sorted)."""
    if data is None:
        files = default_corpus_files()
        if not files:
            raise FileNotFoundError("the default corpus (fastlm/data/*.txt) is missing from the installation; "
                                    "pass --data FILE|DIR or --data stdlib")
    elif data == "stdlib":
        files = stdlib_corpus_files()
    elif os.path.isdir(data):
        files = sorted(p for ext in ("txt", "md", "py", "rst")
                       for p in glob.glob(os.path.join(data, "**", f"*.{ext}"), recursive=True))
        if not files:
            raise ValueError(f"corpus directory {data!r} has no .txt/.md/.py/.rst files")
    elif os.path.isfile(data):
        files = [data]
    elif os.path.exists(data):
        raise ValueError(f"corpus {data!r} is neither a regular file nor a directory (expected a text file, a "
                         f"directory or 'stdlib')")
    else:
        raise FileNotFoundError(f"corpus {data!r} does not exist (expected a text file, a directory or 'stdlib')")
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    text = "\n\n".join(p for p in parts if p.strip())
    if not text.strip():
        raise ValueError(f"corpus {data or 'fastlm/data'!r} is empty")
    return text


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 symbols, nothing to download."""
    name = "byte"
    vocab_size = 256
    byte_level = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte"}


class TiktokenTokenizer:
    byte_level = False

    def __init__(self, encoding: str = "gpt2"):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError("--tokenizer tiktoken needs the tiktoken package (pip install tiktoken)") from e
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # the BPE ranks are downloaded on first use
            raise RuntimeError(f"tiktoken could not load encoding {encoding!r} (its files are downloaded on first "
                               f"use; offline, use --tokenizer byte): {e}") from e
        self.encoding = encoding
        self.name = f"tiktoken:{encoding}"
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def spec(self):
        return {"kind": "tiktoken", "encoding": self.encoding}


class SentencePieceTokenizer:
    """A SentencePiece model from its .model file, or from the model itself (``proto``, the file's bytes: a
    checkpoint carries them, so that it does not depend on the file staying where it was)."""
    byte_level = False

    def __init__(self, model_file: str | None, proto: bytes | None = None):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("--tokenizer sentencepiece needs the sentencepiece package (pip install "
                              "sentencepiece)") from e
        if proto is None:
            if not model_file or not os.path.isfile(model_file):
                raise FileNotFoundError(f"--tokenizer sentencepiece needs --tokenizer-model PATH to a .model file, "
                                        f"got {model_file!r}")
            with open(model_file, "rb") as f:
                proto = f.read()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece model {model_file!r} cannot be read: {e}") from e
        self.proto, self.sha256 = proto, hashlib.sha256(proto).hexdigest()
        self.model_file = None if model_file is None else os.path.abspath(model_file)
        self.name = "sentencepiece"
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def spec(self):
        return {"kind": "sentencepiece", "model_file": self.model_file, "sha256": self.sha256}


def make_tokenizer(kind: str = "byte", model_file: str | None = None, encoding: str = "gpt2"):
    if model_file is not None and kind != "sentencepiece":
        raise ValueError(f"a tokenizer model file (--tokenizer-model {model_file}) is read by the sentencepiece "
                         f"tokenizer only; got tokenizer {kind!r}")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(encoding)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(model_file)
    raise ValueError(f"tokenizer must be one of byte, tiktoken, sentencepiece; got {kind!r}")


def tokenizer_from_spec(spec: dict, proto: bytes | None = None):
    """The tokenizer a checkpoint's spec names; a SentencePiece model from ``proto`` (the bytes the checkpoint
    carries, checked against the spec's sha256) when given, else from its model_file."""
    if proto is not None and spec.get("kind") == "sentencepiece":
        digest = hashlib.sha256(proto).hexdigest()
        if digest != spec.get("sha256"):
            raise ValueError(f"the sentencepiece model it carries has sha256 {digest[:12]}, its spec says "
                             f"{str(spec.get('sha256'))[:12]}")
        return SentencePieceTokenizer(spec.get("model_file"), proto=proto)
    return make_tokenizer(spec.get("kind", "byte"), spec.get("model_file"), spec.get("encoding", "gpt2"))


def encode_tensor(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` as a LongTensor (bytes go straight through a buffer: megabytes in milliseconds)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text must be encodable as UTF-8, but it holds a lone surrogate at character {e.start}: "
                         f"{text[e.start:e.end]!r}") from e
    if getattr(tokenizer, "byte_level", False):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def split_tokens(ids: torch.Tensor, seqlen: int, val_fraction: float = 0.1):
    """(train, val): the last ``val_fraction`` of the corpus is held out (at least one window of seqlen + 1)."""
    n_val = max(int(len(ids) * val_fraction), seqlen + 1)
    if len(ids) - n_val < seqlen + 1:
        raise ValueError(f"the corpus has {len(ids)} tokens: too few for seqlen={seqlen} with a held-out split "
                         f"(need at least {2 * (seqlen + 1)}); use a bigger corpus or a smaller --seqlen")
    return ids[:-n_val], ids[-n_val:]


def get_batch(ids: torch.Tensor, batch_size: int, seqlen: int, generator: torch.Generator):
    """Random windows: inputs (B, S) and next-token targets (B, S)."""
    starts = torch.randint(0, len(ids) - seqlen, (batch_size,), generator=generator)
    window = torch.stack([ids[s:s + seqlen + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def eval_batches(ids: torch.Tensor, batch_size: int, seqlen: int, max_batches: int):
    """A fixed set of evenly spaced held-out windows, so every evaluation measures the same tokens."""
    n_windows = min(max_batches * batch_size, (len(ids) - 1) // seqlen)
    stride = max((len(ids) - 1 - seqlen) // max(n_windows - 1, 1), 1)
    starts = [min(i * stride, len(ids) - 1 - seqlen) for i in range(n_windows)]
    for i in range(0, len(starts), batch_size):
        window = torch.stack([ids[s:s + seqlen + 1] for s in starts[i:i + batch_size]])
        yield window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, evaluation
# ----------------------------------------------------------------------------------------------------------------------

def make_optimizer(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95)):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to min_ratio * lr at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32 or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def evaluate(model, val_ids, batch_size: int, seqlen: int, device, dtype=torch.float32, max_batches: int = 8):
    """Mean held-out loss (per token) over a fixed set of windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(val_ids, batch_size, seqlen, max_batches):
        with _autocast(device, dtype):
            loss = model(x.to(device), y.to(device))
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------

def _checkpoint_file(path: str) -> str:
    """A path ending in .safetensors is the file itself; anything else is a directory holding CHECKPOINT."""
    return path if path.endswith(".safetensors") else os.path.join(path, CHECKPOINT)


def save_checkpoint(path: str, model, optimizer=None, *, step: int = 0, tokenizer=None, history=None,
                    extra: dict | None = None) -> str:
    """Write model (+ optimizer) tensors and metadata to ``path`` (a directory or a .safetensors file) atomically."""
    from safetensors.torch import save_file
    from fastlm.model import effective_state_dict, unwrapped
    model = unwrapped(model)
    file = _checkpoint_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    # (a parametrized Linear saved as the weight it computes: the checkpoint loads into a plain model)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in effective_state_dict(model).items()}
    proto = getattr(tokenizer, "proto", None)
    if proto is not None:                                    # a SentencePiece model travels with the checkpoint
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    meta = {"format": FORMAT, "config": json.dumps(_config_dict(model.config)), "step": str(step),
            "tokenizer": json.dumps((tokenizer or ByteTokenizer()).spec()), "history": json.dumps(history or {}),
            "extra": json.dumps(extra or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{idx}.{key}"] = t.detach().contiguous().cpu()
        meta["optim_groups"] = json.dumps(state["param_groups"])
    _atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata=meta))
    config_file = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
    _atomic_write(config_file, lambda tmp: _dump_json(_config_dict(model.config), tmp))
    return file


def _atomic_write(path: str, write):
    """write(tmp) then rename over ``path``: readers see the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _config_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _read_checkpoint(path: str, tensors: bool = True):
    """(file, metadata, tensors) of a checkpoint (a directory or a .safetensors file), the metadata checked;
    tensors=False reads the metadata alone (tensors comes back empty)."""
    from safetensors import safe_open
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    file = _checkpoint_file(path)
    if os.path.isfile(path) and file != path:
        raise ValueError(f"checkpoint {path} is a file, not a checkpoint: expected a training output directory "
                         f"(holding {CHECKPOINT}, as `python -m fastlm train --out DIR` writes) or a .safetensors "
                         f"file")
    if not os.path.exists(file):
        if os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint not found: no {CHECKPOINT} in directory {path}")
        raise FileNotFoundError(f"checkpoint not found: {path} does not exist (expected a training output directory "
                                f"holding {CHECKPOINT} or a .safetensors file)")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"checkpoint {file} is corrupt or not a safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {file} is not a fastlm checkpoint (metadata format={meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    _check_metadata(file, meta)
    return file, meta, tensors


# The metadata entries that hold JSON: what each must hold, and as which Python type. "config" is required; a
# checkpoint written without an optimizer has no "optim_groups".
_METADATA = {"config": ("a JSON object", dict), "step": ("an integer >= 0", int),
             "tokenizer": ("a JSON object", dict), "history": ("a JSON object", dict),
             "extra": ("a JSON object", dict), "optim_groups": ("a JSON list", list)}


def _check_metadata(file: str, meta: dict):
    """Every JSON entry of a checkpoint's metadata parses to what it must hold; ValueError naming the file and the
    entry otherwise."""
    if "config" not in meta:
        raise ValueError(f"checkpoint {file} is corrupt: metadata 'config' is missing")
    for key, (what, kind) in _METADATA.items():
        if key not in meta:
            continue
        try:
            value = json.loads(meta[key])
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ValueError(f"checkpoint {file} is corrupt: metadata {key!r} must be {what}, got {meta[key][:80]!r}")


def _config_from(fields_: dict, where: str):
    """Config(**fields_) for the fields read from ``where``, unknown fields reported by name."""
    from fastlm.config import Config
    known = {f.name for f in dataclasses.fields(Config) if f.init}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise ValueError(f"{where}: unknown Config field(s) {unknown}; fields: {sorted(known)}")
    return Config(**fields_)


def _checkpoint_config(file: str, meta: dict):
    return _config_from(json.loads(meta["config"]), f"checkpoint {file} metadata 'config'")


def load_config(path: str):
    """The Config stored in a checkpoint (file or directory), in a config.json of Config fields, or in a transformers
    config.json (a GPT-2, Llama, Mistral or Qwen2 one; also a model directory holding it, as `export` writes)."""
    path = os.fspath(path)
    hf_dir_config = os.path.join(path, "config.json")
    if os.path.isdir(path) and not os.path.exists(_checkpoint_file(path)) and os.path.isfile(hf_dir_config):
        path = hf_dir_config
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path) as f:
                fields_ = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(fields_, dict):
            raise ValueError(f"config file {path} must hold a JSON object of Config fields, got a JSON "
                             f"{type(fields_).__name__}")
        if "model_type" in fields_:  # a transformers configuration
            from fastlm.hf import config_from_hf
            try:
                return config_from_hf(fields_)
            except (NotImplementedError, ValueError, TypeError) as e:
                raise ValueError(f"config file {path}: {e}") from None
        return _config_from(fields_, f"config file {path}")
    file, meta, _ = _read_checkpoint(path)
    return _checkpoint_config(file, meta)


TOKENIZER_TENSOR = "tokenizer.sentencepiece_model"  # checkpoint tensor: the SentencePiece model's bytes (uint8)

# The settings of a training run that shape its loss curve: a resumed run must keep them (checkpoint extra "run").
RUN_SETTINGS = ("seqlen", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "grad_clip", "seed", "dtype")


def run_settings(path: str) -> dict:
    """The RUN_SETTINGS a checkpoint's run was trained with (those it records: checkpoints of older versions hold
    seqlen and batch_size only), read from its metadata without loading its tensors."""
    file, meta, _ = _read_checkpoint(path, tensors=False)
    return _saved_run(json.loads(meta.get("extra", "{}")))


def _resume_steps(file, step: int, extra: dict, steps, log) -> int:
    """The length of a resumed run: the run's own (``steps`` None or equal), or a longer one for a finished run."""
    run = extra.get("run")
    own = run.get("steps") if isinstance(run, dict) else None    # (checkpoints of older versions do not record it)
    if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
        raise ValueError(f"checkpoint {file} is corrupt: its run's steps must be a positive int, got {own!r}")
    if steps is None:
        if own is None:
            raise ValueError(f"resume: checkpoint {file} does not record its run's length: pass steps")
        steps = own
    if step >= steps:
        raise ValueError(f"checkpoint {file} is already at step {step} >= steps={steps}: nothing to train; pass a "
                         f"larger steps to continue")
    if own is not None and steps != own:
        if step < own:
            raise ValueError(f"resume: checkpoint {file} is step {step} of a {own}-step run, and its LR schedule "
                             f"spans {own} steps: resume with steps={own} (or leave it out), not {steps}")
        if log is not None:
            log(f"extending a finished {own}-step run to {steps} steps: the LR schedule is re-spanned over {steps}")
    return steps


def _checked_history(file, history) -> dict:
    """A checkpoint's loss history, which the resumed run appends to: lists of finite numbers, one entry per step in
    step, loss and lr, one per evaluation in eval_step and eval_loss."""
    if not isinstance(history, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
            for v in history.values()):
        raise ValueError(f"checkpoint {file} is corrupt: its history must map names to lists of finite numbers, got "
                         f"{str(history)[:120]}")
    for names in (("step", "loss", "lr"), ("eval_step", "eval_loss")):
        lengths = {name: len(history[name]) for name in names if name in history}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"checkpoint {file} is corrupt: its history's {', '.join(lengths)} must have one "
                             f"length, got {lengths}")
    return history


def _saved_run(extra: dict) -> dict:
    run = extra.get("run", {k: extra[k] for k in ("seqlen", "batch_size") if k in extra})
    return {k: run[k] for k in RUN_SETTINGS if k in run} if isinstance(run, dict) else {}


def load_checkpoint(path: str, *, backend: str = "auto", device=None):
    """(model, info) from a checkpoint; info has step, tokenizer, history, config, extra. (train(resume=True) restores
    the optimizer's state too.)"""
    file, meta, tensors = _read_checkpoint(path)
    return _model_from(file, meta, tensors, backend, device)


def load_model(path: str, *, backend: str = "auto", device=None):
    """(model, meta) from a checkpoint without building its tokenizer or optimizer; meta holds the checkpoint's
    JSON strings (step, tokenizer spec, config, ...)."""
    file, meta, tensors = _read_checkpoint(path)
    return _model_only(file, meta, tensors, backend, device), meta


def _model_from(file, meta, tensors, backend, device):
    model = _model_only(file, meta, tensors, backend, device)
    spec = json.loads(meta.get("tokenizer", "{}"))
    proto = tensors.get(TOKENIZER_TENSOR)
    try:
        tokenizer = tokenizer_from_spec(spec, None if proto is None else proto.numpy().tobytes())
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"checkpoint {file}: its tokenizer {spec} cannot be built: {e}") from e
    info = {"step": int(meta.get("step", 0)), "config": model.config, "file": file, "tokenizer": tokenizer,
            "history": json.loads(meta.get("history", "{}")), "extra": json.loads(meta.get("extra", "{}"))}
    return model, info


def _model_only(file, meta, tensors, backend, device):
    from fastlm.model import Transformer
    config = _checkpoint_config(file, meta)
    model = Transformer(config, backend=backend)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    # load_state_dict would cast integer, boolean or complex tensors into the floating-point parameters silently
    kinds = [f"{k}: {state[k].dtype} (a floating-point tensor expected)" for k, v in expected.items()
             if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    if missing or unexpected or wrong or kinds:
        raise ValueError(f"checkpoint {file} does not match its config ({config.name}): "
                         + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                                   f"unexpected {unexpected[:5]}" if unexpected else "",
                                                   "shape mismatch " + ", ".join(wrong[:5]) if wrong else "",
                                                   "dtype mismatch " + ", ".join(kinds[:5]) if kinds else ""])))
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # (training stops at a non-finite loss before it saves: this is a damaged file)
        raise ValueError(f"checkpoint {file} is corrupt: non-finite values (NaN or inf) in {broken[:5]}")
    model.load_state_dict(state)
    return model if device is None else model.to(device)


def _same_kind(saved, own) -> bool:
    """Whether a setting read back from JSON has the type of the optimizer's own (tuples come back as lists)."""
    if isinstance(own, bool) or own is None:                 # (foreach, fused: None or a bool)
        return saved is None or isinstance(saved, bool)
    if isinstance(own, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(own, (tuple, list)):
        return isinstance(saved, list) and len(saved) == len(own) and all(map(_same_kind, saved, own))
    return isinstance(saved, type(own))


def _load_optimizer(optimizer, meta, tensors, file):
    if "optim_groups" not in meta:
        raise ValueError(f"checkpoint {file} has no optimizer state to resume from")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        groups = json.loads(meta["optim_groups"])
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise ValueError(f"optim_groups must be a list of {len(optimizer.param_groups)} parameter groups, each "
                             f"with its params, got {meta['optim_groups'][:120]}")
        for i, (saved, own) in enumerate(zip(groups, optimizer.param_groups)):
            for name, value in own.items():
                if name != "params" and name in saved and not _same_kind(saved[name], value):
                    raise ValueError(f"optim_groups[{i}][{name!r}] must be like {value!r}, got {saved[name]!r}")
        state = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                if not idx.isdigit() or int(idx) >= len(params):
                    raise ValueError(f"tensor {key}: no parameter {idx} (the model has {len(params)})")
                state.setdefault(int(idx), {})[name] = value
        # every trained parameter has its moments once a step was taken (a checkpoint is saved after steps)
        missing = [i for i, p in enumerate(params) if p.requires_grad and i not in state]
        if missing:
            raise ValueError(f"no state (optim.<i>.*) for parameters {missing[:8]} of {len(params)}")
        for idx, entry in state.items():
            if set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
                raise ValueError(f"parameter {idx} has state {sorted(entry)}, expected exp_avg, exp_avg_sq and step")
            for name, value in entry.items():
                want = () if name == "step" else tuple(params[idx].shape)
                if tuple(value.shape) != want or not value.is_floating_point() or not torch.isfinite(value).all():
                    raise ValueError(f"tensor optim.{idx}.{name} must hold finite floats of shape {want}, got "
                                     f"shape {tuple(value.shape)} {value.dtype}")
                entry[name] = value if name == "step" else value.to(params[idx].device)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {file}: corrupt optimizer state or one that does not match the model: {e}") \
            from e


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------------

def resolve_device(device=None, *, what: str = "device") -> torch.device:
    """``device`` (None: cuda when available, else cpu) as a torch.device, checked to exist on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {str(device)!r}: no CUDA device is available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_out_dir(out, what: str = "out"):
    """``out``, an output directory (its writer creates it when missing), checked before any work: not empty, not a
    file, not under a file, and writable where it would be created; TypeError/ValueError naming ``what``
    otherwise."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path (str or os.PathLike), got {type(out).__name__} {out!r}")
    path = os.fspath(out)
    if not path:
        raise ValueError(f"{what} must be a directory path, got an empty string")
    if os.path.isfile(path):
        raise ValueError(f"{what} {path} is a file; expected a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {existing} is not writable")


def check_run_dir(out, what: str = "out"):
    """``out``, a training run's directory, checked: not a file, nor a .safetensors path (a run writes
    checkpoint.safetensors, config.json and loss.png into the directory)."""
    check_out_dir(out, what)
    if os.fspath(out).endswith(".safetensors"):
        raise ValueError(f"{what} {os.fspath(out)} names a .safetensors file; expected a directory (a run writes "
                         f"{CHECKPOINT}, config.json and loss.png into it)")


def seed64(seed: int) -> int:
    """``seed`` modulo 2**64, a value torch's manual_seed takes for any int; the seeds it takes as they are
    (-2**63 .. 2**64 - 1, a negative one as its two's complement) keep their random stream."""
    return seed % 2 ** 64


def check_threads(threads):
    """--threads (None: torch's default) set for torch, or a ValueError. At most 4 per logical CPU: more only
    oversubscribes the cores, and far more fails to create the threads (or crashes the OpenMP runtime)."""
    if threads is None:
        return
    limit = 4 * (os.cpu_count() or 1)
    if not is_int(threads) or not 1 <= threads <= limit:
        raise ValueError(f"--threads must be an integer in [1, {limit}] (at most 4 per logical CPU), got {threads!r}")
    torch.set_num_threads(threads)


def _dist_setup():
    """(rank, world_size, local_rank); initializes the process group under torchrun. With CUDA each rank makes its
    GPU (LOCAL_RANK) the current device: kernels launch on the current device (Triton's do), and nccl needs one GPU
    per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank with LOCAL_RANK={local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()} (run at most that many processes per node)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local_rank


def train(config=None, *, data: str | None = None, tokenizer=None, text: str | None = None, steps: int | None = None,
          batch_size: int = 12, seqlen: int = 128, lr: float = 3e-3, warmup: int = 30, grad_clip: float = 1.0,
          grad_accum: int = 1, weight_decay: float = 0.1, dtype: str = "fp32", eval_every: int = 100,
          eval_batches_max: int = 8, out: str | None = None, resume: bool = False, backend: str = "auto",
          device=None, seed: int = 0, stop_after: int | None = None, progress: bool = True, log=print,
          plot: bool = True) -> dict:
    """Train ``config`` (a fastlm.Config; default the small CLI model) and return a dict with the model, the loss
    history, the final held-out loss and perplexity, tokens seen, the tokenizer and the checkpoint path.

    ``tokenizer`` is a tokenizer object (make_tokenizer(...); default ByteTokenizer()); ``config.vocab_size`` must
    be at least its vocab_size (the default model takes it; a larger one pads the embedding and LM head, and is
    logged). ``text`` (a str) replaces the corpus of ``data``.
    ``steps`` (default 300; with ``resume`` the run's own) is the length of the run, over which the LR schedule
    spans. With ``out`` (a directory) a checkpoint is written at every evaluation and at the end; with ``resume``
    training continues from ``out``'s checkpoint (config, weights, optimizer, step and history come from it) on the
    same corpus, with the same run settings and number of processes; ``steps`` must be the run's own for an
    interrupted run, and may extend a finished one (the schedule is then re-spanned over the new length).
    ``stop_after`` ends the run after that many steps of this call (the schedule still spans ``steps``), as an
    interruption would.
    """
    from fastlm.model import Transformer
    rank, world, local_rank = _dist_setup()
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = resolve_device(device)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    amp_dtype = DTYPES[dtype]
    for name, value in (("steps", 1 if steps is None else steps), ("batch_size", batch_size), ("seqlen", seqlen),
                        ("grad_accum", grad_accum), ("eval_every", eval_every), ("eval_batches_max", eval_batches_max)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("warmup", warmup), ("stop_after", 0 if stop_after is None else stop_after)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    top = torch.finfo(torch.float32).max  # the optimizer computes with these in float32
    if not is_real(lr) or not 0 < lr <= top:
        raise ValueError(f"lr must be a positive number at most {top:.4g} (float32's largest), got {lr!r}")
    for name, value, what in (("weight_decay", weight_decay, ""), ("grad_clip", grad_clip, " (0 = no clipping)")):
        if not is_real(value) or not 0 <= value <= top:
            raise ValueError(f"{name} must be a number in [0, {top:.4g}] (float32's range){what}, got {value!r}")
    steps, batch_size, seqlen, grad_accum, eval_every, eval_batches_max, warmup, stop_after, seed, lr, weight_decay, \
        grad_clip = map(plain, (steps, batch_size, seqlen, grad_accum, eval_every, eval_batches_max, warmup,
                                stop_after, seed, lr, weight_decay, grad_clip))  # (numpy scalars: JSON in checkpoints)
    if resume and not out:
        raise ValueError("resume needs out= (the directory holding the checkpoint)")
    if out is not None:
        check_run_dir(out)
    from fastlm.config import Config
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a fastlm.Config or None (the default model), got {type(config).__name__} "
                        f"{config!r:.80}; build one with fastlm.Config.from_name(preset, **overrides)")
    if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "vocab_size", "spec")):
        raise TypeError(f"tokenizer must be a tokenizer object (with encode, vocab_size and spec, as "
                        f"make_tokenizer('byte') returns) or None, got {type(tokenizer).__name__} {tokenizer!r:.80}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"text must be a str (the training text) or None (the corpus of data), got "
                        f"{type(text).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    start, history = 0, {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_loss": []}
    run = {"seqlen": seqlen, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "warmup": warmup,
           "weight_decay": weight_decay, "grad_clip": grad_clip, "seed": seed, "dtype": dtype}
    model = optimizer = saved_corpus = None
    if resume:
        file, meta, tensors = _read_checkpoint(out)
        model, info = _model_from(file, meta, tensors, backend, device)
        extra = info["extra"]
        steps = _resume_steps(file, info["step"], extra, steps, log if rank == 0 else None)
        saved_world = extra.get("world_size")            # (checkpoints of older versions do not record it)
        if saved_world is not None and saved_world != world:
            raise ValueError(f"resume: checkpoint {file} was trained by {saved_world} process(es) and this run has "
                             f"{world} (WORLD_SIZE): the global batch and the data each step sees depend on it; "
                             f"resume with {saved_world}")
        saved = _saved_run(extra)
        differ = [f"{k}={run[k]!r} (the checkpoint's: {saved[k]!r})" for k in RUN_SETTINGS
                  if k in saved and saved[k] != run[k]]
        if differ:
            raise ValueError(f"resume: checkpoint {file} was trained with other settings: {', '.join(differ)}; "
                             f"resume with the checkpoint's settings (the CLI's --resume takes every one not given "
                             f"from the checkpoint), or train a new run into another out directory")
        config, tokenizer = info["config"], info["tokenizer"]
        optimizer = make_optimizer(model, lr, weight_decay)
        _load_optimizer(optimizer, meta, tensors, file)
        start, history = info["step"], {**history, **_checked_history(file, info["history"])}
        data = extra.get("data") if data is None else data
        saved_corpus = extra.get("corpus")
    steps = DEFAULTS["steps"] if steps is None else steps
    if log is not None and rank == 0 and not resume and warmup >= steps:
        log(f"warmup={warmup} >= steps={steps}: the LR rises for the whole run and never decays (pass a smaller "
            f"warmup)")
    tokenizer = tokenizer or ByteTokenizer()
    if config is None:
        config = config_from_spec(DEFAULTS["preset"], DEFAULTS["overrides"], tokenizer.vocab_size)
    elif config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer's vocab_size="
                         f"{tokenizer.vocab_size} ({getattr(tokenizer, 'name', type(tokenizer).__name__)})")
    elif config.vocab_size > tokenizer.vocab_size and log is not None and rank == 0 and not resume:
        log(f"vocab_size {config.vocab_size} > the tokenizer's {tokenizer.vocab_size}: the embedding and LM head are "
            f"padded (ids past {tokenizer.vocab_size - 1} never occur)")
    if seqlen > config.max_seqlen:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context max_seqlen={config.max_seqlen}")
    if data is not None and data != "stdlib" and os.path.exists(data):
        data = os.path.abspath(data)      # what a resumed run reads, from whatever directory it starts in
    text = load_corpus(data) if text is None else text
    if not text.strip():
        raise ValueError("the training text is empty")
    corpus = {"chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}
    if saved_corpus is not None and saved_corpus != corpus:
        theirs = saved_corpus if isinstance(saved_corpus, dict) else {}
        raise ValueError(f"resume: the training text differs from the checkpoint's run (now {corpus['chars']} "
                         f"characters, sha256 {corpus['sha256'][:12]}; the run's: {theirs.get('chars')} characters, "
                         f"sha256 {str(theirs.get('sha256'))[:12]}): pass the run's data or text (it recorded "
                         f"data={extra.get('data')!r}; None is the default corpus, or text given to train())")
    ids = encode_tensor(tokenizer, text)
    train_ids, val_ids = split_tokens(ids, seqlen)

    if model is None:
        torch.manual_seed(seed64(seed))
        model = Transformer(config, backend=backend).to(device)
        optimizer = make_optimizer(model, lr, weight_decay)
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"token id {int(ids.max())} does not fit the model's vocab_size={config.vocab_size}")

    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and device.type == "cuda")
    tokens_per_step = batch_size * seqlen * grad_accum * world
    file = None
    main = rank == 0
    bar = None
    if progress and main and start < steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    t0, last_eval = time.perf_counter(), None
    end = steps if stop_after is None else min(steps, start + stop_after)
    for step in range(start, end):
        lr_now = lr_at(step, lr, warmup, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        gen = torch.Generator().manual_seed(seed64((seed * 1_000_003 + step) * 65_537 + rank))
        loss_sum = 0.0
        xs, ys = get_batch(train_ids, batch_size * grad_accum, seqlen, gen)
        for micro in range(grad_accum):
            x = xs[micro * batch_size:(micro + 1) * batch_size].to(device)
            y = ys[micro * batch_size:(micro + 1) * batch_size].to(device)
            sync = micro == grad_accum - 1 or world == 1
            ctx = ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with _autocast(device, amp_dtype):
                    loss = ddp_model(x, y) / grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"step {step + 1}: the loss is {float(loss_sum)} (the run diverged: lower --lr "
                                     f"or --weight-decay, or check the data); the last checkpoint is kept")
        scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                loss_sum = loss_sum / world
        loss_value = float(loss_sum)
        history["step"].append(step + 1)
        history["loss"].append(loss_value)
        history["lr"].append(lr_now)
        done = step + 1
        if done % eval_every == 0 or done == end:
            last_eval = evaluate(model, val_ids, batch_size, seqlen, device, amp_dtype, eval_batches_max)
            broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if broken or not math.isfinite(last_eval):
                raise FloatingPointError(
                    f"step {done}: the update left " + (f"non-finite weights in {broken[:3]}" if broken else
                                                        f"a held-out loss of {last_eval}")
                    + " (the run diverged: lower --lr or --weight-decay); not saved, the last checkpoint is kept")
            history["eval_step"].append(done)
            history["eval_loss"].append(last_eval)
            if main and out:
                file = save_checkpoint(out, model, optimizer, step=done, tokenizer=tokenizer, history=history,
                                       extra={"data": data, "corpus": corpus, "world_size": world,
                                              "run": {**run, "steps": steps}})
        if bar is not None:
            elapsed = time.perf_counter() - t0
            evals = {} if last_eval is None else {"eval": f"{last_eval:.3f}",
                                                  "ppl": f"{math.exp(min(last_eval, 50)):.2f}"}
            bar.set_postfix(loss=f"{loss_value:.3f}", **evals,
                            tok_s=f"{(done - start) * tokens_per_step / elapsed:,.0f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if last_eval is None:
        last_eval = evaluate(model, val_ids, batch_size, seqlen, device, amp_dtype, eval_batches_max)
    result = {"model": model, "config": config, "tokenizer": tokenizer, "history": history,
              "eval_loss": last_eval, "perplexity": math.exp(min(last_eval, 50.0)), "steps": end,
              "tokens": (end - start) * tokens_per_step, "seconds": elapsed, "checkpoint": file,
              "tokens_per_s": (end - start) * tokens_per_step / max(elapsed, 1e-9)}
    if main and out and plot and history["step"]:
        result["plot"] = plot_loss(history, os.path.join(out, "loss.png"), title=config.name)
    if main and log is not None and end > start:
        log(f"step {end}: train loss {history['loss'][-1]:.4f}, held-out loss {last_eval:.4f} "
            f"(perplexity {result['perplexity']:.2f}), {result['tokens_per_s']:,.0f} tokens/s"
            + (f"; checkpoint {file}" if file else ""))
    return result


def plot_loss(history: dict, path: str, title: str = "") -> str | None:
    """The loss curve as a PNG at ``path`` (None without matplotlib)."""
    from fastlm._plots import pyplot
    plt = pyplot("the loss-curve plot")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.8, label="train loss")
    if history.get("eval_step"):
        ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"fastlm training {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def config_from_spec(preset: str, spec: str | None, vocab_size: int):
    """Config.from_name(preset) with the --config overrides ``spec`` and the tokenizer's vocab_size; a preset whose
    shape the overrides change is named after both ("llama-tiny(d_model=128,...)"), unless they name it."""
    from fastlm.config import Config
    overrides = parse_overrides(spec)
    if overrides and "name" not in overrides:
        overrides["name"] = f"{preset}({','.join(f'{k}={v}' for k, v in overrides.items())})"
    return Config.from_name(preset, **{"vocab_size": vocab_size, **overrides})


def parse_overrides(spec: str | None) -> dict:
    """"d_model=128,n_layer=4,tie_embeddings=true" -> typed dict of Config fields."""
    from fastlm.config import Config
    if not spec:
        return {}
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.init}
    result = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--config expects key=value pairs separated by commas, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in types:
            raise ValueError(f"--config: unknown Config field {key!r}; fields: {', '.join(sorted(types))}")
        kind = str(types[key])
        if "dict" in kind:
            raise ValueError(f"--config: {key} takes a dict, which key=value overrides cannot express")
        try:
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                result[key] = value.lower() in ("true", "1")
            elif "int" in kind:
                result[key] = int(value)
            elif "float" in kind:
                result[key] = float(value)
            else:
                result[key] = value
        except ValueError:
            raise ValueError(f"--config: {key}={value!r} is not a valid {kind}") from None
    return result


def _run_default(name: str):
    """The default of a run setting: train()'s (autocast in bf16 on a GPU)."""
    if name == "dtype":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return inspect.signature(train).parameters[name].default


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm train",
                                description="Train a model on a text corpus (default: the corpus shipped with fastlm, "
                                            "a small byte-level model, about a minute on a CPU).")
    # the model and run settings default to None here: with --resume, what is not given comes from the checkpoint
    p.add_argument("--data", default=None, help="text file, directory, or 'stdlib' (default: fastlm/data)")
    p.add_argument("--tokenizer", default=None, choices=["byte", "tiktoken", "sentencepiece"],
                   help="(default: byte)")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    p.add_argument("--preset", default=None, help=f"(default: {DEFAULTS['preset']})")
    p.add_argument("--config", default=None,
                   help=f"Config overrides key=value,... (default with the default preset: {DEFAULTS['overrides']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"length of the run (default: {DEFAULTS['steps']}; with --resume the run's own)")
    for flag, kind in (("--batch-size", int), ("--seqlen", int), ("--lr", float), ("--warmup", int),
                       ("--grad-clip", float), ("--grad-accum", int), ("--weight-decay", float), ("--seed", int)):
        p.add_argument(flag, type=kind, default=None, help=f"(default: {_run_default(flag[2:].replace('-', '_'))})")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="autocast dtype on GPU (weights stay fp32; default bf16); CPU runs in fp32")
    p.add_argument("--eval-every", type=int, default=100, help="(default: 100)")
    p.add_argument("--out", default="fastlm-run",
                   help="output directory (checkpoint, config.json, loss.png; default: fastlm-run)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out: its model, tokenizer and run settings")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint of an earlier run in --out (without it, that is an error)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        check_threads(args.threads)
        check_run_dir(args.out, "--out")
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite are exclusive (--resume continues the checkpoint in --out)")
        settings = {k: getattr(args, k) for k in RUN_SETTINGS}
        config = tokenizer = None
        if not args.resume:
            preset = args.preset or DEFAULTS["preset"]
            spec = args.config if args.config is not None else (
                DEFAULTS["overrides"] if preset == DEFAULTS["preset"] else None)
            tokenizer = make_tokenizer(args.tokenizer or "byte", args.tokenizer_model)
            config = config_from_spec(preset, spec, tokenizer.vocab_size)
            existing = _checkpoint_file(args.out)
            if not args.overwrite and os.path.exists(existing):
                raise ValueError(f"--out {args.out} holds the checkpoint of an earlier run ({existing}): continue it "
                                 f"with --resume, train into another --out, or replace it with --overwrite")
        else:
            given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                              ("--tokenizer", args.tokenizer),
                                              ("--tokenizer-model", args.tokenizer_model)) if value is not None]
            if given:
                raise ValueError(f"--resume continues the checkpoint's model and tokenizer: drop {', '.join(given)}")
            saved = run_settings(args.out)
            settings = {k: saved.get(k) if v is None else v for k, v in settings.items()}
        settings = {k: _run_default(k) if v is None else v for k, v in settings.items()}
        train(config, data=args.data, tokenizer=tokenizer, steps=args.steps, eval_every=args.eval_every,
              out=args.out, resume=args.resume, backend=args.backend, progress=not args.no_progress, **settings)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0
