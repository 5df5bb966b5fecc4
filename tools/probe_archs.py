"""Run the architecture matrix's cell checks on the probe families of tests/probe_archs.py (not in the matrix).

    python tools/probe_archs.py swin                # every spec, one JSON line per cell
    python tools/probe_archs.py flux lora,houlsby   # some specs
"""
import sys, json, time, traceback
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests")); sys.path.insert(0, str(ROOT))
import torch; torch.set_num_threads(1)
import architectures as A, probe_archs as P
import test_architectures as M
arch = sys.argv[1]; specs = sys.argv[2].split(",") if len(sys.argv) > 2 else M.SPECS
t=time.time()
try:
    m, i, f = P.PROBES[arch]()
except Exception as e:
    print(json.dumps([arch, "BUILD", "build", repr(e)[:300]])); sys.exit()
A.ARCHITECTURES[arch] = P.PROBES[arch]; A.KINDS[arch] = f["kind"]; M.ARCHITECTURES[arch]=P.PROBES[arch]
try:
    M.base(arch)
except Exception as e:
    print(json.dumps([arch, "BASE", "build", repr(e)[:300]])); sys.exit()
for s in specs:
    r = M.run_cell(arch, s)
    print(json.dumps([arch, s, r.outcome, r.message[:400]]), flush=True)
print(json.dumps([arch, "TIME", time.time()-t]))
