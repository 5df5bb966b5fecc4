"""A rewritten model trains under DistributedDataParallel and FSDP2 (gloo, two processes on this machine).

Each rank builds the same LLaMA (LoRA on q/v + Houlsby adapters, hooks) and MiniGPT (LoRA on
MultiheadAttention's packed q/v and out_proj, parametrizations + Houlsby), trains three steps on its own batches
and saves its parameters. The ranks must end bit-identical, the adapters must have moved, the frozen base must
not have, FSDP2 must reach DDP's parameters, and DDP must equal one process training on both ranks' batches
(the all-reduced gradient is the gradient of the mean loss).
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

import distributed_worker

WORLD = 2
TRAINED = [("llama", "ddp"), ("llama", "fsdp"), ("minigpt", "ddp"), ("minigpt", "fsdp")]
CONFIGS = TRAINED + [("llama", "single")]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{(arch, wrapper): [rank 0 tensors, rank 1 tensors]} and the trainable names, from one spawn of two ranks."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(distributed_worker.spawned, args=(WORLD, free_port(), CONFIGS, str(out)), nprocs=WORLD, join=True)
    results = {}
    for arch, wrapper in CONFIGS:
        files = [out / f"{arch}_{wrapper}_rank{r}.safetensors" for r in range(WORLD)]
        with safe_open(str(files[0]), "pt") as f:
            trainable = set(f.metadata()["trainable"].split(","))
        results[arch, wrapper] = [load_file(str(f)) for f in files], trainable
    return results


def final(tensors):
    return {k.removeprefix("final/"): v for k, v in tensors.items() if k.startswith("final/")}


@pytest.mark.parametrize("arch, wrapper", TRAINED)
def test_ranks_stay_in_sync_and_only_adapters_train(ranks, arch, wrapper):
    (rank0, rank1), trainable = ranks[arch, wrapper]
    assert len(trainable) >= 24 and all(n.startswith("surgery_adapters.") for n in trainable)
    assert not torch.equal(rank0["losses"], rank1["losses"])          # the ranks saw different batches
    assert torch.isfinite(rank0["losses"]).all()
    for name, value in final(rank0).items():
        assert torch.equal(value, final(rank1)[name]), name            # in sync, bit for bit
        moved = not torch.equal(value, rank0[f"start/{name}"])
        assert moved == (name in trainable), name                      # adapters train, the base does not


@pytest.mark.parametrize("arch", ["llama", "minigpt"])
def test_fsdp2_trains_like_ddp(ranks, arch):
    ddp, fsdp = final(ranks[arch, "ddp"][0][0]), final(ranks[arch, "fsdp"][0][0])
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-6, rtol=1e-5)


def test_ddp_equals_one_process_on_both_batches(ranks):
    """The averaged gradient of DDP is the gradient of the mean loss over both ranks' batches."""
    ddp, single = final(ranks["llama", "ddp"][0][0]), final(ranks["llama", "single"][0][0])
    assert ddp.keys() == single.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=1e-4)
