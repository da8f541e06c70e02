"""Run by tests/test_train.py under torchrun: trains a tiny model with fastlm.train.train (which wraps it in
DistributedDataParallel when WORLD_SIZE > 1) and saves this rank's final weights and loss history to
OUT/rank<R>.pt."""
import os
import sys

import torch

from fastlm import train as T
from fastlm.config import Config

TINY = Config(name="ddp-tiny", family="llama", vocab_size=256, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
              max_seqlen=64, multiple_of=16)
ARGS = dict(steps=4, batch_size=2, seqlen=32, lr=3e-3, warmup=1, eval_every=2, eval_batches_max=1, backend="torch",
            progress=False, log=None)

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    result = T.train(TINY, text=T.load_corpus(), out=out, **ARGS)
    state = {k: v.detach().clone() for k, v in result["model"].state_dict().items()}
    torch.save({"state": state, "loss": result["history"]["loss"]}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
