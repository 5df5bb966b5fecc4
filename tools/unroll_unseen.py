"""Compare the unrolled trace with the full export on models outside tests/test_unroll.py's matrix: graphs,
boundaries, tables, analysis sites, plans of shipped specs (also through surgery.plan and SURGERY_FULL_TRACE), and
outputs of lora/houlsby applied under each trace with the same seeded adapter values. One JSON line per stage.

    python tools/unroll_unseen.py llama 6        # a builder of tests/probe_archs.py or tools/unroll_unseen_models.py
"""
import sys, os, json, time, copy, logging
ROOT = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT + "/tools")
sys.path.insert(0, ROOT + "/tests"); sys.path.insert(0, ROOT)
os.environ["SURGERY_CACHE"] = "0"
import torch; torch.set_num_threads(1)
import architectures as A, probe_archs as P
import test_unroll as U
import surgery, surgery.api as api
from surgery.analyze import analyze
from surgery.trace import export as TE, unroll

name = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 6
A.LAYERS = N; P.LAYERS = N
A.TorchEncoder.__init__.__defaults__ = (A.VOCAB, A.HIDDEN, N)
logs = []
class H(logging.Handler):
    def emit(self, r): logs.append(r.getMessage()[:300])
lg = logging.getLogger("surgery"); lg.setLevel(logging.DEBUG); lg.addHandler(H())

def out(**kw): print(json.dumps({"model": name, **kw}, default=str), flush=True)

import unroll_unseen_models as extra
builders = {**{k: v for k, v in P.PROBES.items()}, **extra.BUILDERS}
t0 = time.time()
built = builders[name]()
model, inputs, facts = built
apply_inputs = facts.get("apply_inputs") or inputs
stacks = unroll.find_stacks(model)
out(stage="stacks", stacks=[(s.path, s.length, s.keep, s.start, s.period) for s in stacks])
# truncated export failure spy
orig_exp = TE._export_marked
def spy_exp(m, a, k, what, *rest, **kw):
    try:
        return orig_exp(m, a, k, what, *rest, **kw)
    except Exception as e:
        logs.append(f"export failed ({what}): {type(e).__name__}: {str(e)[:200]}")
        raise
TE._export_marked = spy_exp
args, kwargs = TE._split_inputs(apply_inputs) if hasattr(TE, "_split_inputs") else (None, None)
full, fast, unrolled = U._traced_both(model, apply_inputs)
out(stage="trace", unrolled=unrolled, logs=logs[:], t=round(time.time()-t0, 1))
diffs = []
gf, gu = U._graph_rows(full), U._graph_rows(fast)
if gf != gu:
    first = next((i for i, (a, b) in enumerate(zip(gf, gu)) if a != b), min(len(gf), len(gu)))
    diffs.append(("graph", len(gf), len(gu), first, gf[first] if first < len(gf) else None, gu[first] if first < len(gu) else None))
for what in ("params", "buffers"):
    if list(getattr(fast, what).items()) != list(getattr(full, what).items()):
        diffs.append((what,))
if fast.calls != full.calls: diffs.append(("calls", [k for k in set(fast.calls)|set(full.calls) if fast.calls.get(k)!=full.calls.get(k)][:5]))
if fast.module_types != full.module_types: diffs.append(("module_types",))
if fast.constants.keys() != full.constants.keys() or not all(torch.equal(fast.constants[k], full.constants[k]) for k in full.constants):
    diffs.append(("constants",))
bf = {n.name: v for n, v in full.boundaries.items() if v}; bu = {n.name: v for n, v in fast.boundaries.items() if v}
if repr(bf) != repr(bu): diffs.append(("boundaries", [k for k in set(bf)|set(bu) if repr(bf.get(k)) != repr(bu.get(k))][:5]))
af, au = analyze(full), analyze(fast)
for k in ("blocks", "stacks", "block_calls", "hidden_size"):
    if getattr(af, k) != getattr(au, k): diffs.append((k, str(getattr(af, k))[:200], str(getattr(au, k))[:200]))
sf, su = U._site_rows(af), U._site_rows(au)
if sf != su:
    first = next((i for i, (a, b) in enumerate(zip(sf, su)) if a != b), min(len(sf), len(su)))
    diffs.append(("sites", len(sf), len(su), sf[first] if first < len(sf) else None, su[first] if first < len(su) else None))
SPECS = ["lora", "houlsby", "pfeiffer", "ia3", "prefix", "prompt", "loreft", "said", "top_layers", "lora_task_head", "ln_tuning", "unipelt"]
for spec in SPECS:
    pf, pu = U._plan_rows(spec, af), U._plan_rows(spec, au)
    if pf != pu: diffs.append(("plan", spec, str(pf)[:300], str(pu)[:300]))
out(stage="compare", blocks=len(af.blocks), nodes=len(gf), diffs=diffs, t=round(time.time()-t0, 1))
# surgery.plan through env
for spec in ["lora", "houlsby", "ia3", "top_layers"]:
    res = []
    for fl in ("1", "0"):
        api._STRUCTURE_CACHE.clear(); os.environ[TE.FULL_TRACE_ENV] = fl
        try:
            p = surgery.plan(model, spec, example_inputs=apply_inputs)
            res.append(repr(p))
        except Exception as e:
            res.append("ERR " + type(e).__name__ + str(e)[:200])
    out(stage="plan", spec=spec, same=res[0] == res[1], a=res[0][:200] if res[0] != res[1] else "", b=res[1][:200] if res[0] != res[1] else "")
# applied outputs
if os.environ.get("NOAPPLY"): sys.exit()
def mo(m):
    with torch.no_grad():
        if callable(facts.get("run")): return facts["run"](m)
        return A.main_output(m, inputs) if isinstance(inputs, dict) else m(*inputs)
for spec in ["lora", "houlsby"]:
    outs = []
    try:
        for fl in ("1", "0"):
            api._STRUCTURE_CACHE.clear(); os.environ[TE.FULL_TRACE_ENV] = fl
            m = copy.deepcopy(model)
            surgery.apply(m, spec, example_inputs=apply_inputs)
            U._seeded(m)
            outs.append((sorted(n for n, _ in m.surgery_adapters.named_parameters()), mo(m)))
        base = mo(model)
        out(stage="apply", spec=spec, names_same=outs[0][0] == outs[1][0], n=len(outs[0][0]),
            equal=bool(torch.equal(outs[0][1], outs[1][1])), changed=not bool(torch.allclose(outs[1][1], base)))
    except Exception as e:
        out(stage="apply", spec=spec, error=f"{type(e).__name__}: {str(e)[:300]}")
out(stage="done", t=round(time.time()-t0, 1))
