"""Architecture coverage: capture, analyze, permute and compile 98 small HF models (random weights).

Usage:

    python benchmarks/coverage.py --jobs 2                 # all 98 cases (about 8 minutes on 2 cores)
    python benchmarks/coverage.py --quick --jobs 2         # 10 representative models (under 2 minutes)
    python benchmarks/coverage.py --only llama,t5 --json coverage.json

Results, with what each column means: docs/coverage.md.

Every model is built offline from a small transformers config (``benchmarks/_coverage_cases.py``;
nothing is downloaded), with seeded random biases, norm parameters and BatchNorm statistics. Per
model, in its own subprocess (a crash or a hang costs one row; ``--timeout`` seconds each):

1. ``capture`` (which path: export or symbolic_trace), ``analyze(gm, "2:4")``: eligible layers,
   permutation groups, permutable fraction, and for each eligible layer left without a group the
   barrier reasons of its channel class (the "costly barriers" column: reason, layers it costs);
2. ``permute(gm, plan, search="random", seed=0)``, which checks the outputs itself (a
   VerificationError is a mismatch); its max relative output error;
3. ``nmgraph.compile(copy, "2:4", permute=False)`` against an untouched copy whose planned layers
   (``plan.layers``: name, axis) are pruned by ``nmgraph.nm_mask``: max abs output difference of the
   compiled module ("compile diff"; on a CPU it runs the model's own forward) and of its lowered
   graph, ``report.lowerings[sig].gm`` ("graph diff").

Exit status 1 if any model raised an exception that is not an ``NMGraphError`` (including a crash
or a timeout of its subprocess), failed permute's verification, or differs from the reference by
more than 1e-5 x max(1, largest reference output); the offending models are listed. Typed nmgraph
errors (e.g. a model that cannot be captured) are reported in the table and do not fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nmgraph  # noqa: E402

PATTERN = "2:4"
RTOL = 1e-5  # a compile/graph difference above RTOL * (largest reference output) is a mismatch
NO_OWN_BARRIER = "no barrier on its own channels (a partial or concatenated member)"


# ---------------------------------------------------------------------------------- one model


def cases():
    """The case table module, ``benchmarks/_coverage_cases.py`` (loaded by path: benchmarks/ is no package)."""
    name = "nmgraph_coverage_cases"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "_coverage_cases.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _max_diff(a, b) -> float:
    """Max abs difference over every output tensor (inf if the structure or an integer output differs)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.is_floating_point():
            worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
        elif not torch.equal(x, y):
            worst = float("inf")
    return worst


def _scale(out) -> float:
    return max((float(t.abs().max()) for t in _tensors(out) if t.is_floating_point() and t.numel()), default=0.0)


def _error(stage: str, e: BaseException) -> dict:
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)[-3:]]
    return {"stage": stage, "type": type(e).__name__, "typed": isinstance(e, nmgraph.NMGraphError),
            "msg": " ".join(str(e).split())[:600], "where": where}


def _short(reason: str, width: int = 72) -> str:
    """A barrier reason without its node name, numbered names or shapes, cut to ``width``."""
    prefix = ""
    inherited_from = (("part of a concatenation that ", "concat part: "),
                      ("its repeated heads: ", "repeated heads: "))
    for inherited, tag in inherited_from:
        if reason.startswith(inherited):  # a barrier of the whole a space belongs to
            prefix, reason = tag, reason[len(inherited):]
    r = prefix + re.sub(r"^[\w.]+: ", "", reason)  # "index_2: aten.index ..." -> "aten.index ..."
    r = re.sub(r"channels of \w+ come from ([\w.]+), which does not carry channels", r"\1 carries no channels", r)
    r = re.sub(r"\[[\d, ]*\]", "[..]", r)
    r = re.sub(r"\b([A-Za-z_][A-Za-z0-9_]*?)(_\d+)+\b", r"\1", r)
    return r if len(r) <= width else r[: width - 3].rstrip() + "..."


@contextlib.contextmanager
def _watch_analysis(seen: dict):
    """Keeps analyze's channel classes, to tell which barrier leaves which layer without a group.

    Reads nmgraph internals (``nmgraph.analysis.analyzer.collect_groups`` and its flow): the plan names
    each barrier once per channel class, not the layers it costs. If they change, the column says so.
    """
    from nmgraph.analysis import analyzer

    orig = analyzer.collect_groups

    def spy(flow, tensors, canonical, eligible_nodes, layers):
        seen.update(flow=flow, eligible=eligible_nodes)
        return orig(flow, tensors, canonical, eligible_nodes, layers)

    analyzer.collect_groups = spy
    try:
        yield
    finally:
        analyzer.collect_groups = orig


def _costly_barriers(plan, seen: dict) -> dict[str, int]:
    """Barrier reason -> number of eligible layers it leaves without a permutation group."""
    cost: Counter = Counter()
    flow, eligible = seen.get("flow"), seen.get("eligible", {})
    for info in plan.layers:
        if info.group is not None:
            continue
        reasons: set[str] = set()
        try:
            node = eligible[info.name][0]
            for s in flow.spaces_of(node):
                if s.axes == (info.axis,):
                    cls = flow.cls(s.index)  # with the classes of its parts and of the heads it repeats
                    todo = [cls] + [flow.cls(seg) for _, _, seg, _ in cls.segments]
                    todo += [flow.cls(cls.repeat_of[0])] if cls.repeat_of else []
                    reasons |= {_short(r) for c in todo for r in c.barriers}
        except (AttributeError, KeyError, TypeError, ValueError):  # nmgraph internals changed
            reasons = {"(unattributed: nmgraph.analysis internals changed)"}
        generic = {r for r in reasons if r.startswith("channels are repeated heads")}
        reasons = reasons - generic or reasons
        for r in reasons or {NO_OWN_BARRIER}:
            cost[r] += 1
    return dict(cost.most_common())


def run_case(name: str) -> dict:
    """One model through capture, analyze, permute and compile; a row of the table (plain data)."""
    torch.manual_seed(0)
    row: dict = {"name": name, "errors": []}
    t0 = time.perf_counter()
    try:
        row["family"], model, args, kwargs = cases().build(name)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is a row, not a stopped run
        row["errors"].append(_error("build", e))
        return row
    pristine = copy.deepcopy(model)
    plan = None
    try:
        seen: dict = {}
        gm = nmgraph.capture(model, args, kwargs)
        row["capture"] = getattr(nmgraph.graph_record(gm), "captured_by", "?")
        with _watch_analysis(seen):
            plan = nmgraph.analyze(gm, PATTERN)
        row.update(eligible=len(plan.layers), dense=len(plan.skipped), groups=len(plan.groups),
                   permutable=plan.permutable_fraction, costly_barriers=_costly_barriers(plan, seen))
        rep = nmgraph.permute(gm, plan, search="random", seed=0)  # verifies the outputs itself
        row["permuted_groups"] = len(rep.permuted)
        row["permute_error"] = rep.max_error
    except Exception as e:  # noqa: BLE001 - reported per model
        stage = "permute" if "eligible" in row else "analyze" if "capture" in row else "capture"
        row["errors"].append(_error(stage, e))
    try:
        fast = nmgraph.compile(copy.deepcopy(pristine), PATTERN, permute=False)
        ref = copy.deepcopy(pristine)
        with torch.no_grad():
            out = fast(*args, **kwargs)
            layers = (plan or fast.report.plan).layers
            for info in layers:
                w = ref.get_parameter(info.name)
                w.mul_(nmgraph.nm_mask(w, PATTERN, axis=info.axis).to(w.dtype))
            expected = ref(*args, **kwargs)
            row["ref_scale"] = _scale(expected)
            row["compile_diff"] = _max_diff(out, expected)
            row["compile_runs"] = next(iter(fast.report.runs.values()), "?")
            lowered = next(iter(fast.report.lowerings.values())).gm
            row["graph_diff"] = _max_diff(lowered(*args, **kwargs), expected)
        if plan is not None and [i.name for i in fast.report.plan.layers] != [i.name for i in plan.layers]:
            row["errors"].append({"stage": "compile", "type": "PlanMismatch", "typed": False, "where": [],
                                  "msg": "compile planned other layers than analyze on the same model"})
    except Exception as e:  # noqa: BLE001 - reported per model
        row["errors"].append(_error("compile", e))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the run: untyped exceptions, permute/compile mismatches (empty: it passes)."""
    out = []
    for e in row.get("errors", []):
        if not e["typed"] or e["type"] == "VerificationError":
            out.append(f"{e['stage']}: {e['type']}: {e['msg']}" + (f" ({', '.join(e['where'])})" if e.get("where")
                                                                    else ""))
    tol = RTOL * max(row.get("ref_scale", 0.0), 1.0)
    for key in ("compile_diff", "graph_diff"):
        if row.get(key) is not None and not row[key] <= tol:
            out.append(f"{key} {row[key]:.3g} > {tol:.1g} (reference pruned with nm_mask)")
    return out


# ---------------------------------------------------------------------------------- the sweep


def _isolated(name: str, timeout: float) -> dict:
    """``run_case`` in a fresh interpreter: a crash or a hang costs only this row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name], capture_output=True,
                           text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        err = {"stage": "run", "type": "Timeout", "typed": False, "msg": f"no result after {timeout:.0f} s"}
        return {"name": name, "errors": [err], "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
    err = {"stage": "run", "type": f"Crash(rc={p.returncode})", "typed": False, "msg": tail}
    return {"name": name, "errors": [err], "seconds": round(time.perf_counter() - t0, 1)}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict], top: int = 3) -> str:
    head = ("| model | family | capture | eligible | groups | permutable | permute max err | compile diff "
            "| graph diff | costly barriers (layers) |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 6 + "---|"]
    for r in rows:
        errs = [e for e in r.get("errors", []) if e["stage"] in ("build", "capture", "run")]
        capture = r.get("capture") or (f"{errs[0]['type']}" if errs else "-")
        pf = r.get("permutable")
        costs = r.get("costly_barriers", {})
        shown = "; ".join(f"{k} ({v})" for k, v in list(costs.items())[:top])
        shown += f"; +{len(costs) - top} more" if len(costs) > top else ""
        other = [f"{e['stage']}: {e['type']}" for e in r.get("errors", []) if e not in errs]
        if other:
            shown = "; ".join([*other, shown]) if shown else "; ".join(other)
        permutable = "-" if pf is None else f"{pf:.0%}" if r.get("eligible") else "n/a"
        cells = [r["name"], r.get("family", "-"), capture, str(r.get("eligible", "-")), str(r.get("groups", "-")),
                 permutable, _num(r.get("permute_error"), ".1e"), _num(r.get("compile_diff"), ".0e"),
                 _num(r.get("graph_diff"), ".0e"), shown.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _header() -> str:
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if git("status", "--porcelain", "--", "nmgraph").strip():
        commit += " + uncommitted changes to nmgraph/"
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"# nmgraph coverage | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"python {platform.python_version()} | {cpu}, {gpu} | nmgraph {nmgraph.__version__} "
            f"(git {commit}) | {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (see benchmarks/_coverage_cases.py)")
    ap.add_argument("--quick", action="store_true", help="10 representative models")
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel (one process each)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    ap.add_argument("--json", type=Path, help="write every row (with full barrier counts and errors) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case, print one RESULT line
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.worker:
        print("RESULT " + json.dumps(run_case(a.worker)))
        return 0
    known = cases().CASES
    names = list(cases().QUICK) if a.quick else list(known)
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {', '.join(known)}")
    print(_header())
    print(f"# command: python benchmarks/coverage.py {' '.join(sys.argv[1:])}", flush=True)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = {pool.submit(_isolated, n, a.timeout): n for n in names}
        for i, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            rows[r["name"]] = r
            bad = problems(r)
            print(f"[{i}/{len(names)}] {r['name']}: {r.get('seconds', '?')} s, "
                  f"{'FAIL: ' + '; '.join(bad) if bad else 'ok'}", file=sys.stderr, flush=True)
    ordered = [rows[n] for n in names]
    wall = time.perf_counter() - t0
    print()
    print(table(ordered))
    failed = {r["name"]: problems(r) for r in ordered if problems(r)}
    typed = [(r["name"], e) for r in ordered for e in r.get("errors", []) if e["typed"] and
             e["type"] != "VerificationError"]
    print(f"\n{len(ordered)} models in {wall:.0f} s wall ({a.jobs} jobs); "
          f"{sum(r.get('permutable') == 1.0 for r in ordered)} fully permutable; {len(failed)} failed")
    for name, e in typed:
        print(f"typed error (not a failure): {name}: {e['stage']}: {e['type']}: {e['msg']}")
    for name, why in failed.items():
        print(f"FAILED {name}: " + " | ".join(why))
    if a.json:
        a.json.write_text(json.dumps({"header": _header(), "argv": sys.argv[1:], "wall_s": round(wall, 1),
                                      "rows": ordered}, indent=1))
        print(f"wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
