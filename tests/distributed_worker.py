"""One rank of the distributed tests (tests/test_distributed.py): rewrite a model, train it a few steps under
DistributedDataParallel or FSDP2 (`fully_shard`) on gloo, and save every parameter (gathered) and the losses as
`<arch>_<wrapper>_rank<r>.safetensors` for the parent to compare across ranks.

Run by torch.multiprocessing.spawn (each rank its own process), or by torchrun (see docs/reliability.md):

    torchrun --nproc-per-node 2 tests/distributed_worker.py --out /tmp/ranks
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = 3


def build(arch: str):
    """The same rewritten model on every rank and every call: the base from a fixed seed, the adapters from
    another, drawn after tracing (torch.export draws random numbers the first time it runs in a process)."""
    import surgery
    from models import make_llama, make_minigpt
    if arch == "llama":
        model = make_llama()
        surgery.plan(model, "specs/lora.yaml")             # traces once; the analysis is cached on the model
        torch.manual_seed(1)
        surgery.apply(model, "specs/lora.yaml", name="lora")
    else:
        model = make_minigpt()
        surgery.plan(model, "specs/lora.yaml", example_inputs=model.example_inputs())
        torch.manual_seed(1)
        # MultiheadAttention's packed q/v and its out_proj are wrapped on the weight (parametrizations)
        surgery.apply(model, {"rules": [{"name": "lora", "match": {"role": ["attention.q", "attention.v",
                                                                             "attention.output"]},
                                         "action": "wrap", "module": {"kind": "lora", "r": 4}}]}, name="lora")
    surgery.apply(model, "specs/houlsby.yaml", name="houlsby")
    return model


def loss_of(module, arch: str, ids):
    """Next-token loss through `module` (the DDP wrapper, whose forward triggers the gradient all-reduce)."""
    if arch == "llama":
        return module(input_ids=ids, labels=ids).loss
    logits = module(ids)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def train(rank: int, arch: str, wrapper: str, out: Path) -> None:
    from safetensors.torch import save_file
    from models import token_ids
    torch.set_num_threads(1)
    model = build(arch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(model)
    elif wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard
        runner = fully_shard(model)          # shards in place and returns the model
    else:                                    # "single": the reference, one process on every rank's batch
        runner = model
    params = [p for p in runner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = token_ids(2, 8, seed=100 * step + rank)        # each rank its own batch
        if wrapper == "single":
            ids = torch.cat([token_ids(2, 8, seed=100 * step + r) for r in range(dist.get_world_size())])
        loss = loss_of(runner, arch, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if wrapper == "fsdp":
        from torch.distributed.tensor import DTensor
        final = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in model.named_parameters()}
    else:
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    tensors = {f"final/{n}": t.contiguous() for n, t in final.items()}
    tensors.update({f"start/{n}": t.contiguous() for n, t in start.items()})
    tensors["losses"] = torch.tensor(losses)
    save_file(tensors, str(out / f"{arch}_{wrapper}_rank{rank}.safetensors"), metadata={"trainable": ",".join(trainable)})


def spawned(rank: int, world: int, port: int, configs: list[tuple[str, str]], out: str) -> None:
    """Entry point for torch.multiprocessing.spawn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    run(configs, Path(out))


def run(configs: list[tuple[str, str]], out: Path) -> None:
    """Train each (arch, wrapper) in turn in one process group (one start-up for all of them)."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for arch, wrapper in configs:
            train(dist.get_rank(), arch, wrapper, out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":          # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama", choices=["llama", "minigpt"])
    parser.add_argument("--wrapper", default="ddp", choices=["ddp", "fsdp", "single"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run([(args.arch, args.wrapper)], Path(args.out))
