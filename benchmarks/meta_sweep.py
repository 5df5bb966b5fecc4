"""Every shipped method spec applied to a LLaMA-7B-shaped model built on the meta device: a table of apply time,
trainable parameters, bytes the adapters really allocated, and the process's peak RSS.

    python benchmarks/meta_sweep.py [--specs specs/lora.yaml ...] [--json out.json]

One fresh process, one model: it is traced once (the first row's time includes torch.export and the analysis;
every later apply reuses the analysis cached on the model), each spec is applied, measured and removed again.
Time is wall and process CPU seconds (on a machine shared with other jobs the CPU time is what the wall time
would be on an idle one). Peak RSS is the process's high-water mark (VmHWM) after the row; a 7B model in fp32
would need 27 GB, the meta model needs none. `real bytes` are adapter tensors not on the meta device: a spec
whose modules are built outside the meta device (the engine's shared modules, e.g. prefix tuning's MLP).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
os.environ.setdefault("SURGERY_CACHE", "0")   # the first row traces (not a read of the on-disk trace cache)

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def rss_mib(field: str = "VmHWM") -> float:
    """The process's resident set size (VmRSS) or its high-water mark (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def meta_llama_7b():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_7B))


def apply_row(model, spec_path: Path) -> dict:
    """Apply one spec to the meta model, measure, remove it again."""
    import surgery
    row = {"spec": spec_path.name}
    gc.collect()     # a full collection lands in no row by chance (see benchmarks/meta_apply.py)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        surgery.apply(model, spec_path)
    except surgery.SurgeryError as exc:
        row.update(error=str(exc).splitlines()[0][:160], seconds=time.perf_counter() - wall)
        return row
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
    row["trainable"] = surgery.trainable_parameters(model)[0]
    row["real_bytes"] = sum(t.numel() * t.element_size() for t in
                            list(model.surgery_adapters.parameters()) + list(model.surgery_adapters.buffers())
                            if not t.is_meta)
    row["peak_rss_mib"] = rss_mib()
    surgery.remove(model)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    specs = args.specs or sorted((ROOT / "specs").glob("*.yaml"))
    import surgery  # noqa: F401  (imported before the clock starts)
    start_rss = rss_mib("VmRSS")
    wall = time.perf_counter()
    model = meta_llama_7b()
    build_seconds = time.perf_counter() - wall
    print(f"LLaMA-7B shape on the meta device ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"parameters): built in {build_seconds:.1f} s; RSS {start_rss:.0f} MiB after imports", flush=True)
    print(f"{'spec':<20} {'seconds':>8} {'cpu s':>8} {'trainable':>13} {'real bytes':>14} {'peak RSS MiB':>13}")
    rows = []
    for path in specs:
        row = apply_row(model, path)
        rows.append(row)
        if "error" in row:
            print(f"{row['spec']:<20} {row['seconds']:>8.3f}  error: {row['error']}", flush=True)
            continue
        print(f"{row['spec']:<20} {row['seconds']:>8.3f} {row['cpu_seconds']:>8.3f} {row['trainable']:>13,} "
              f"{row['real_bytes']:>14,} {row['peak_rss_mib']:>13.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"build_seconds": build_seconds, "start_rss_mib": start_rss,
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
