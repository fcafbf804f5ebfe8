"""Static sm_90 performance model of nmgraph's N:M kernels: compiled code, no GPU. ESTIMATES ONLY.

For every kernel/config below this script

1. compiles the Triton kernel for ``GPUTarget("cuda", 90, 32)`` with the specialisation Triton's JIT
   would give a real launch (16-byte aligned pointers, ints that are multiples of 16 marked
   divisible, ints equal to 1 turned into constants), with Triton's bundled ``ptxas``, and
   disassembles the cubin with its bundled ``cuobjdump``;
2. finds the main K loop in the SASS (the backward branch whose body holds the MMA, else the largest
   loop holding a global load) and counts one iteration: instructions by class, global/shared bytes
   and load widths, MMA kind (``wgmma`` = HGMMA, ``mma.sync`` = HMMA), registers, spills;
3. normalises per *dense weight element* of the tile one iteration covers;
4. runs a roofline / issue / latency model of H100 SXM and H200 (assumptions in ``CORNERS``/``HW``
   and below) and prints predicted ``dense / nmgraph`` time ratios for the path the Triton backend
   takes at each M (``nmgraph.backends.triton_nm.kernel_path``: GEMV at M <= 2, tensor-core kernel at
   3..64 for 2:4 / 1:4 in fp16, declined otherwise), and what ``backend="auto"`` would then run (the
   kernel where it is estimated >= 1.02x dense, else dense: 1.00x).

The kernel this replaced (``nm_gemm_kernel``, removed from ``nmgraph/backends/triton_nm.py``) was
modelled by this script up to commit 5832f44 (``git show 5832f44:benchmarks/kernel_static.py``);
its figures are kept in docs/benchmarks.md.

Nothing here runs a kernel: every time and ratio it prints is an estimate from compiled code
(about +-35 %, see the corners); only a GPU measures (``benchmarks/gpu_check.py``).

    python benchmarks/kernel_static.py                 # all configs, markdown tables
    python benchmarks/kernel_static.py --json out.json --sass-dir sass/   # also keep SASS/PTX
    python benchmarks/kernel_static.py --only gemv     # a subset (substring of the case name)

Model (per kernel call, one GPU, one corner):

* a CTA's loop iteration covers ``tile`` dense weight elements and moves ``tile * (n/m) * (s +
  bits/8)`` bytes of weight from DRAM (``s`` bytes per value); ``x`` is read from L2/L1 and not
  charged to DRAM;
* per iteration the SM's resources cost ``issue = W * instr / 4 / eta`` cycles (4 schedulers),
  ``alu = W * alu / 2 / eta`` (integer/logic pipe: 64 lanes/SM), ``fma = W * (imad / 2 + fp / 4) /
  eta``, ``smem = W * 32 * shared bytes / 128`` (128 B/clk, conflict-free), ``mma = 2 * tile * BM /
  F`` (``F`` = 4096 FLOP/clk/SM for wgmma, 2048 for mma.sync); ``W`` warps per CTA, counts per warp;
* latency: a CTA with plain loads waits one loaded DRAM latency ``L`` per iteration (the loads of an
  iteration are issued together, then consumed); with ``S >= 3`` pipeline stages it waits
  ``L / (S - 1)``; an SM holds ``c`` CTAs (registers, shared memory, 64 warps) and overlaps them;
* time = ``max(weight bytes / (BW * eta_mem), busiest SM: tiles * max(compute period, (L_wait +
  compute period) / c))`` + ``rounds * L`` (the CTAs that start together in one round of ``c`` per SM
  find the memory pipe empty: one latency per round) + drain (one tile computed by its CTA alone, then
  ``L / 2`` for the result store) + split-K epilogue (``L`` + partial reads) + one
  launch ``t0`` per kernel (one per call for every path of the backend's op);
* dense (cuBLAS at decode sizes, memory-bound): ``t0 + N * K * 2 / (BW * eta_dense)``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------------------------------------
# Hardware and model assumptions (documented; every output depends on them)
# ------------------------------------------------------------------------------------------------

#: DRAM bandwidth (spec sheets); both parts have 132 SMs and sm_90 SMs.
HW = {"H100-SXM": {"bw": 3.35e12}, "H200": {"bw": 4.8e12}}
SMS = 132
#: Parameter corners: SM clock under load, loaded DRAM latency (cycles), issue efficiency, fraction
#: of peak DRAM bandwidth reached by the N:M kernels and by dense, launch cost of one kernel and of
#: a small extra kernel (fill / cast). "opt" favours the N:M kernels, "pess" favours dense.
CORNERS = {
    "opt": dict(clk=1.98e9, L=500, eta=0.85, eta_mem=0.88, eta_dense=0.88, t0=1.0e-6, t_small=1.2e-6),
    "mid": dict(clk=1.755e9, L=700, eta=0.70, eta_mem=0.85, eta_dense=0.85, t0=1.5e-6, t_small=2.0e-6),
    "pess": dict(clk=1.6e9, L=900, eta=0.55, eta_mem=0.75, eta_dense=0.90, t0=2.0e-6, t_small=3.0e-6),
}
MMA_FLOPS_PER_CLK = {"wgmma": 4096.0, "mma.sync": 2048.0, "none": float("inf")}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
REG_FILE = 65536
MAX_WARPS_PER_SM = 64
SMEM_PER_SM = 228 * 1024

# ------------------------------------------------------------------------------------------------
# SASS analysis
# ------------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
#: Integer / logic pipe (16 lanes per SM sub-partition on sm_90). IMAD* runs on the FMA pipe.
ALU_OPS = re.compile(
    r"^(LOP3|LOP|SHF|SHL|SHR|IADD3|IADD|ISETP|ICMP|PRMT|SEL|FSEL|LEA|VIADD|VIMNMX|IMNMX|PLOP3|P2R|R2P|MOV|"
    r"SGXT|BMSK|IABS|POPC|FLO|BREV|FSETP|FMNMX|HSETP2|CS2R)(\.|$)")
IMAD_OPS = re.compile(r"^IMAD")
FP_OPS = re.compile(r"^(FFMA|FMUL|FADD|HADD2|HFMA2|HMUL2|F2F|I2F|F2I|FMNMX)")
MMA_OPS = re.compile(r"^(HGMMA|HMMA|IMMA)")
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _width(op: str) -> int:
    for part in op.split(".")[1:]:
        if part in WIDTH:
            return WIDTH[part]
    return 4


@dataclass
class LoopStats:
    """One iteration of the main loop, counted per warp (see module docstring)."""

    instr: int
    alu: int
    imad: int
    fp: int
    uniform: int
    mma_kind: str
    mma_instr: int
    ldg: dict = field(default_factory=dict)       # width (bytes) -> loads per warp-iteration
    ldg_bytes: int = 0                            # per thread
    ldgsts_bytes: int = 0                         # per thread (cp.async)
    smem_bytes: int = 0                           # per thread: LDS/LDSM/STS + cp.async writes
    barriers: int = 0
    opcodes: dict = field(default_factory=dict)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        body = m.group(2).strip()
        if body.startswith("@"):
            body = body.split(None, 1)[1] if " " in body else ""
        if not body:
            continue
        out.append((int(m.group(1), 16), body.split()[0], body))
    return out


def main_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Body of the main loop: prefer a loop holding an MMA, else the largest holding a global load."""
    best, best_key = [], None
    for addr, op, text in ins:
        if op != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", text[3:])
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [x for x in ins if target <= x[0] <= addr]
        has_mma = any(MMA_OPS.match(x[1]) for x in body)
        has_ldg = any(x[1].startswith(("LDG", "LDGSTS")) for x in body)
        key = (has_mma, has_ldg, len(body))
        if best_key is None or key > best_key:
            best, best_key = body, key
    return best


def loop_stats(body: list[tuple[int, str, str]]) -> LoopStats:
    ops = Counter(op for _a, op, _t in body)
    mma = [op for op in ops.elements() if MMA_OPS.match(op)]
    kind = "none"
    if any(op.startswith("HGMMA") for op in mma):
        kind = "wgmma"
    elif mma:
        kind = "mma.sync"
    ldg, ldg_b, ldgsts_b, smem_b = Counter(), 0, 0, 0
    for op in ops.elements():
        if op.startswith("LDGSTS"):
            w = _width(op)
            ldgsts_b += w
            smem_b += w
        elif op.startswith("LDGDEPBAR"):
            continue
        elif op.startswith("LDG"):
            w = _width(op)
            ldg[w] += 1
            ldg_b += w
        elif op.startswith("LDSM"):
            smem_b += 16 if ".4" in op else 8 if ".2" in op else 4
        elif op.startswith(("LDS", "STS")):
            smem_b += _width(op)
    return LoopStats(
        instr=sum(ops.values()),
        alu=sum(v for k, v in ops.items() if ALU_OPS.match(k)),
        imad=sum(v for k, v in ops.items() if IMAD_OPS.match(k)),
        fp=sum(v for k, v in ops.items() if FP_OPS.match(k)),
        uniform=sum(v for k, v in ops.items() if k.startswith("U")),
        mma_kind=kind, mma_instr=len(mma), ldg=dict(sorted(ldg.items())), ldg_bytes=ldg_b,
        ldgsts_bytes=ldgsts_b, smem_bytes=smem_b,
        barriers=sum(v for k, v in ops.items() if k.startswith(("BAR", "DEPBAR", "WARPGROUP.DEPBAR"))),
        opcodes=dict(ops.most_common()),
    )


# ------------------------------------------------------------------------------------------------
# Compiling for sm_90 without a GPU
# ------------------------------------------------------------------------------------------------


def tool_dir() -> Path | None:
    """Triton's bundled CUDA tools (ptxas, cuobjdump), or None when Triton is not installed."""
    try:
        import triton
    except ImportError:
        return None
    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return d if (d / "ptxas").exists() and (d / "cuobjdump").exists() else None


def compile_sm90(fn, args: dict, consts: dict, *, num_warps: int, num_stages: int):
    """``triton.compile`` for sm_90 with the JIT's specialisation of ``args`` (see module docstring).

    ``args``: name -> ``("ptr", dtype)`` or an int value; ``consts``: constexpr name -> value.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
            continue
        a = args[name]
        if isinstance(a, tuple):
            signature[name] = "*" + a[1]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def disassemble(cubin: bytes, tools: Path, workdir: Path) -> tuple[str, int, int]:
    """SASS text, registers per thread and spill (local memory) bytes of a cubin."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    res = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    return sass, regs, stack + local


# ------------------------------------------------------------------------------------------------
# The cases: which kernel, which specialisation
# ------------------------------------------------------------------------------------------------

_DT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class Case:
    """One compiled kernel configuration and what one loop iteration covers."""

    name: str
    kind: str                 # "gemv" or "mma"
    n: int
    m: int
    dtype: str
    m_rows: int               # rows of x the specialisation is for (1, 2, 16, 32, 64)
    num_warps: int
    num_stages: int
    tile_rows: int            # weight rows per CTA
    tile_k: int               # dense K per loop iteration
    block_m: int = 1          # rows of x per CTA
    split_k: int = 1
    kernels_per_call: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def tile_dense(self) -> int:
        return self.tile_rows * self.tile_k

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))


def _sig_common(n_out: int, k: int, n: int, m: int):
    kept = k // m * n
    kept_pad = (kept + 31) // 32 * 32
    return kept, kept_pad


def build_gemv(case: Case, n_out: int, k: int):
    from nmgraph.backends.kernels import _gemv_jit

    kept, kept_pad = _sig_common(n_out, k, case.n, case.m)
    dt = case.dtype
    args = {"x_ptr": ("ptr", dt), "values_ptr": ("ptr", dt), "words_ptr": ("ptr", "i32"),
            "bias_ptr": ("ptr", dt), "out_ptr": ("ptr", dt), "M": case.m_rows, "N": n_out, "K": k,
            "KEPT": kept, "KEPT_PAD": kept_pad, "stride_xm": k, "stride_om": n_out}
    import torch

    from nmgraph.backends.kernels.nm_gemv import gemv_fast_path

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    consts = {"NM_N": case.n, "NM_M": case.m, "BITS": case.bits, "VEC": 16 // _DT_BYTES[dt],
              "M_ROWS": 1 if case.m_rows == 1 else 2, "FAST": gemv_fast_path(case.n, case.m, tdt),
              "HAS_BIAS": True, "BLOCK_N": case.tile_rows, "BLOCK_E": case.meta["block_e"],
              "NUM_WARPS": case.num_warps}
    return compile_sm90(_gemv_jit.nm_gemv_kernel, args, consts, num_warps=case.num_warps,
                        num_stages=case.num_stages)


def build_mma(case: Case, n_out: int, k: int):
    import torch

    from nmgraph.backends.kernels import _mma_jit
    from nmgraph.backends.kernels.nm_mma import mma_fast_path

    _kept, kept_pad = _sig_common(n_out, k, case.n, case.m)
    dt = case.dtype
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    fast = mma_fast_path(case.n, case.m, tdt)
    mp2 = 1 << (case.m - 1).bit_length()
    args = {"x_ptr": ("ptr", dt), "values_ptr": ("ptr", "i32" if fast and case.n == 2 else dt),
            "words_ptr": ("ptr", "i32"), "bias_ptr": ("ptr", dt), "out_ptr": ("ptr", dt),
            "ws_ptr": ("ptr", "fp32"), "sem_ptr": ("ptr", "i32"), "M": case.m_rows, "N": n_out, "K": k,
            "KEPT_PAD": kept_pad, "stride_xm": k, "stride_om": n_out}
    consts = {"NM_N": case.n, "NM_M": case.m, "BITS": case.bits, "MP2": mp2, "FAST": fast, "HAS_BIAS": True,
              "UPCAST": False, "DOT_PRECISION": "tf32" if dt != "fp32" else "ieee",
              "BLOCK_N": case.tile_rows, "BLOCK_M": case.block_m, "BLOCK_K": case.tile_k,
              "SPLIT_K": case.split_k}
    return compile_sm90(_mma_jit.nm_mma_kernel, args, consts, num_warps=case.num_warps,
                        num_stages=case.num_stages)


BUILDERS = {"gemv": build_gemv, "mma": build_mma}


def cases(quick: bool = False) -> list[Case]:
    """Every configuration the model compares (``quick``: the ones the done-when targets name)."""
    out: list[Case] = []
    pats = [(2, 4), (1, 4)] if quick else [(2, 4), (1, 4), (2, 8), (1, 8)]
    gemv_tiles = ([(4, 256, 2), (8, 256, 2), (16, 256, 4), (32, 128, 4)] if quick else
                  [(4, 256, 2), (8, 256, 2), (8, 512, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4)])
    for n, m in pats:
        for rows in (1,) if quick else (1, 2):
            for bn, be, w in gemv_tiles:
                out.append(Case(f"gemv_{n}of{m}_M{rows}_bn{bn}_be{be}_w{w}", "gemv", n, m, "fp16", rows, w, 1,
                                tile_rows=bn, tile_k=be * m // n, meta={"block_e": be}))
    for n, m in [(2, 4), (1, 4)]:
        for bm in (16,) if quick else (16, 32, 64):
            bk = 64 if n == 2 else 128
            out.append(Case(f"mma_{n}of{m}_BM{bm}_bn64_bk{bk}", "mma", n, m, "fp16", bm, 4, 4,
                            tile_rows=64, tile_k=bk, block_m=bm))
    if not quick:
        for n, m in [(2, 8), (1, 8)]:
            out.append(Case(f"mma_{n}of{m}_BM16_bn64_bk64_generic", "mma", n, m, "fp16", 16, 4, 4,
                            tile_rows=64, tile_k=64, block_m=16))
    return out


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REG_FILE // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + 1024) if shared else 32
    return max(1, min(by_regs, by_smem, 32, MAX_WARPS_PER_SM // warps))


def weight_bytes_per_dense(n: int, m: int, dtype_bytes: int = 2) -> float:
    bits = max(1, math.ceil(math.log2(m)))
    return n / m * (dtype_bytes + bits / 8)


def predict(rec: dict, n_out: int, k: int, m_rows: int, hw: dict, p: dict, *, split_k: int | None = None
            ) -> dict:
    """Estimated seconds of one call of the kernel described by ``rec`` (a compiled case)."""
    c = rec["case"]
    st = rec["loop"]
    w = c["num_warps"]
    clk, eta, lat = p["clk"], p["eta"], p["L"]
    tile_dense = c["tile_rows"] * c["tile_k"]
    issue = w * st["instr"] / 4 / eta
    alu = w * st["alu"] / 2 / eta
    fma = w * (st["imad"] / 2 + st["fp"] / 4) / eta
    smem = w * 32 * st["smem_bytes"] / 128
    flops = 2.0 * tile_dense * (c["block_m"] if c["kind"] != "gemv" else (1 if m_rows == 1 else 2))
    mma = flops / MMA_FLOPS_PER_CLK[st["mma_kind"]] if st["mma_kind"] != "none" else 0.0
    compute = max(issue, alu, fma, smem, mma)
    parts = {"issue": issue, "alu": alu, "fma": fma, "smem": smem, "mma": mma}
    split = split_k if split_k is not None else c["split_k"]
    n_tiles = math.ceil(n_out / c["tile_rows"])
    m_tiles = 1 if c["kind"] == "gemv" else math.ceil(m_rows / c["block_m"])
    gemv_pairs = math.ceil(m_rows / 2) if c["kind"] == "gemv" and m_rows > 1 else 1
    ctas = n_tiles * m_tiles * split * gemv_pairs
    iters = math.ceil(math.ceil(k / c["tile_k"]) / split)
    res = ctas_per_sm(rec["regs"], w, rec["shared"])
    pipelined = st["ldgsts_bytes"] > 0 and c["num_stages"] >= 3
    wait = lat / (c["num_stages"] - 1) if pipelined else lat
    per_sm_ctas = math.ceil(ctas / SMS)
    conc = min(res, per_sm_ctas)
    rounds = math.ceil(per_sm_ctas / res)   # CTAs of a round start together: each round refills the pipe
    tiles_busiest = per_sm_ctas * iters
    sm_cycles = tiles_busiest * max(compute, (wait + compute) / conc)
    wbytes = n_out * k * weight_bytes_per_dense(c["n"], c["m"], _DT_BYTES[c["dtype"]]) * m_tiles * gemv_pairs
    dram_s = wbytes / (hw["bw"] * p["eta_mem"])
    epi = 0.0
    if split > 1 and c["kind"] == "mma":
        epi = lat + split * c["tile_rows"] * c["block_m"] * 4 / 64  # semaphore round trip + partial reads
    # Drain: the last tile of the last CTA is computed by that CTA alone, then its result is stored.
    drain = w * st["instr"] / min(w, 4) / eta + lat / 2
    kernel_s = max(dram_s, sm_cycles / clk) + (rounds * lat + drain + epi) / clk
    if dram_s * clk >= sm_cycles:
        bound = "dram"
    elif (wait + compute) / conc > compute:
        bound = "latency"
    else:
        bound = max(parts, key=parts.get)
    extra = (c["kernels_per_call"] - 1) * p["t_small"] if m_rows <= 64 else 0.0
    return {"t": p["t0"] + kernel_s + extra, "kernel": kernel_s, "bound": bound, "ctas": ctas,
            "ctas_per_sm": res, "rounds": rounds, "iters": iters, "split_k": split}


def dense_time(n_out: int, k: int, hw: dict, p: dict) -> float:
    return p["t0"] + n_out * k * 2 / (hw["bw"] * p["eta_dense"])


def ideal_time(n_out: int, k: int, n: int, m: int, hw: dict, p: dict) -> float:
    return p["t0"] + n_out * k * weight_bytes_per_dense(n, m) / (hw["bw"] * p["eta_mem"])


def best_prediction(records: dict, kind: str, n: int, m: int, n_out: int, k: int, m_rows: int, hw: dict,
                    p: dict) -> tuple[str, dict] | None:
    """The best compiled config of ``kind`` for this call (what autotuning would pick), with its time."""
    best = None
    for name, rec in records.items():
        c = rec["case"]
        if c["kind"] != kind or (c["n"], c["m"]) != (n, m) or "error" in rec:
            continue
        if kind == "gemv" and c["m_rows"] != (1 if m_rows == 1 else 2):
            continue
        if kind == "mma" and c["block_m"] != _bucket(m_rows):
            continue
        splits = (1,)
        if kind == "mma":
            splits = tuple(s for s in (1, 2, 4, 8, 16) if math.ceil(k / c["tile_k"]) >= 4 * s)
        for s in splits:
            pr = predict(rec, n_out, k, m_rows, hw, p, split_k=s)
            if best is None or pr["t"] < best[1]["t"]:
                best = (name, pr)
    return best


#: The dispatcher's default: a sparse kernel is chosen when at least this much faster than dense.
AUTO_MIN_SPEEDUP = 1.02


def backend_path(n: int, m: int, m_rows: int) -> str:
    """The path the Triton backend's op takes for fp16 (``"gemv"``, ``"mma"`` or ``"dense"``: declined)."""
    import torch

    from nmgraph.backends.triton_nm import kernel_path

    return kernel_path(m_rows, n, m, torch.float16)


def _bucket(m_rows: int) -> int:
    return 16 if m_rows <= 16 else 32 if m_rows <= 32 else 64


def per_dense(rec: dict) -> dict:
    c, st = rec["case"], rec["loop"]
    scale = c["num_warps"] * 32 / (c["tile_rows"] * c["tile_k"])
    return {"instr": st["instr"] * scale, "alu": st["alu"] * scale, "imad": st["imad"] * scale,
            "fp": st["fp"] * scale, "ldg_bytes": st["ldg_bytes"] * scale, "ldgsts_bytes": st["ldgsts_bytes"] * scale,
            "smem_bytes": st["smem_bytes"] * scale}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def analyze_case(case: Case, tools: Path, workdir: Path, n_out: int = 4096, k: int = 4096) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    ck = BUILDERS[case.kind](case, n_out, k)
    sass, regs, spill = disassemble(ck.asm["cubin"], tools, workdir)
    (workdir / "kernel.sass").write_text(sass)
    (workdir / "kernel.ptx").write_text(ck.asm["ptx"])
    (workdir / "kernel.ttgir").write_text(ck.asm["ttgir"])
    body = main_loop(parse_sass(sass))
    st = loop_stats(body)
    return {"case": {**asdict(case)}, "loop": asdict(st), "regs": regs, "spill_bytes": spill,
            "shared": int(ck.metadata.shared), "total_sass_instr": len(parse_sass(sass))}


def run(selected: list[Case], workroot: Path) -> dict:
    tools = tool_dir()
    if tools is None:
        raise SystemExit("Triton with its bundled ptxas/cuobjdump is needed (pip install triton).")
    records = {}
    for case in selected:
        try:
            records[case.name] = analyze_case(case, tools, workroot / case.name)
        except Exception as e:  # noqa: BLE001 - report the failing config and go on
            records[case.name] = {"case": asdict(case), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{case.name}: ERROR {records[case.name]['error']}", file=sys.stderr, flush=True)
    return records


def tables(records: dict) -> str:
    lines = ["### Main loop, per dense weight element (from sm_90 SASS; estimates of cost, exact counts)", "",
             "| kernel / config | thread instr | int/logic ops | IMAD | FP | global B (LDG + cp.async) | load widths "
             "(B x per warp-iter) | shared B | MMA | regs | spill B | kernels/call |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for name, rec in records.items():
        if "error" in rec:
            lines.append(f"| {name} | error: {rec['error'][:80]} |" + " |" * 11)
            continue
        d = per_dense(rec)
        st = rec["loop"]
        widths = " ".join(f"{w}x{cnt}" for w, cnt in st["ldg"].items())
        if st["ldgsts_bytes"]:
            widths += " cp.async"
        lines.append(
            f"| {name} | {d['instr']:.2f} | {d['alu']:.2f} | {d['imad']:.2f} | {d['fp']:.2f} | "
            f"{d['ldg_bytes'] + d['ldgsts_bytes']:.3f} | {widths} | {d['smem_bytes']:.3f} | {st['mma_kind']} | "
            f"{rec['regs']} | {rec['spill_bytes']} | {rec['case']['kernels_per_call']} |")
    lines += ["", "### Estimated dense / nmgraph time ratio (opt / **mid** / pess corner), best compiled config", "",
              "| pattern | GPU | N x K | M | dense us (mid) | backend path: kernel | path us (mid) | path ratio | "
              "bound (mid) | auto (est.) | ideal (byte limit, mid) |",
              "|---|---|---|---:|---:|---|---:|---|---|---|---:|"]
    for (n, m) in [(2, 4), (1, 4)] + ([(1, 8)] if any(r["case"]["m"] == 8 for r in records.values()) else []):
        for gpu, hw in HW.items():
            for n_out, k in SHAPES:
                for m_rows in (1, 2, 4, 16, 64):
                    kind = backend_path(n, m, m_rows)
                    if kind == "dense":
                        lines.append(f"| {n}:{m} | {gpu} | {n_out}x{k} | {m_rows} | "
                                     f"{dense_time(n_out, k, hw, CORNERS['mid']) * 1e6:.2f} | declined: dense | - | - | "
                                     f"- | 1.00 / **1.00** / 1.00 | - |")
                        continue
                    row = {}
                    for cname, p in CORNERS.items():
                        row[cname] = (best_prediction(records, kind, n, m, n_out, k, m_rows, hw, p),
                                      dense_time(n_out, k, hw, p), ideal_time(n_out, k, n, m, hw, p))
                    if row["mid"][0] is None:
                        continue
                    new = {cn: r[1] / r[0][1]["t"] for cn, r in row.items()}
                    auto = {cn: (v if v >= AUTO_MIN_SPEEDUP else 1.0) for cn, v in new.items()}
                    mid = row["mid"]
                    lines.append(
                        f"| {n}:{m} | {gpu} | {n_out}x{k} | {m_rows} | {mid[1] * 1e6:.2f} | {mid[0][0]} | "
                        f"{mid[0][1]['t'] * 1e6:.2f} | {new['opt']:.2f} / **{new['mid']:.2f}** / {new['pess']:.2f} | "
                        f"{mid[0][1]['bound']} | {auto['opt']:.2f} / **{auto['mid']:.2f}** / {auto['pess']:.2f} | "
                        f"{mid[1] / mid[2]:.2f} |")
    return "\n".join(lines)


def targets(records: dict) -> list[tuple[str, float, float, bool]]:
    """The issue's done-when checks that this model can evaluate: (what, value, limit, met)."""
    out = []

    for (n, m), (ilim, alim) in {(2, 4): (5.0, 3.0), (1, 4): (3.5, 2.0)}.items():
        recs = [r for name, r in records.items()
                if name.startswith(f"gemv_{n}of{m}_M1_") and "error" not in r]
        if recs:  # the worst compiled M = 1 config
            instr = max(per_dense(r)["instr"] for r in recs)
            alu = max(per_dense(r)["alu"] for r in recs)
            out.append((f"{n}:{m} GEMV thread instr / dense element (worst config)", instr, ilim, instr <= ilim))
            out.append((f"{n}:{m} GEMV int/logic ops / dense element (worst config)", alu, alim, alu <= alim))
    p, hw = CORNERS["mid"], HW["H100-SXM"]
    for n, m, m_rows, lim in ((2, 4, 1, 1.5), (1, 4, 1, 2.3), (2, 4, 16, 1.3)):
        for n_out, k in SHAPES[:2]:
            kind = backend_path(n, m, m_rows)
            b = best_prediction(records, kind, n, m, n_out, k, m_rows, hw, p)
            if b:
                r = dense_time(n_out, k, hw, p) / b[1]["t"]
                out.append((f"{n}:{m} M={m_rows} {n_out}x{k} H100 mid dense/nmgraph (estimate)", r, lim, r >= lim))
    return out


def versions() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    ptxas = subprocess.run([str(tool_dir() / "ptxas"), "--version"], capture_output=True, text=True).stdout
    ptxas_v = re.search(r"release ([\d.]+)", ptxas)
    return {"date": datetime.date.today().isoformat(), "commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__,
            "ptxas": ptxas_v.group(1) if ptxas_v else "?", "target": "sm_90 (GPUTarget('cuda', 90, 32))"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="compile only cases whose name contains one of these "
                    "comma-separated substrings")
    ap.add_argument("--quick", action="store_true", help="only the configs the done-when targets name")
    ap.add_argument("--json", type=Path, help="write every count and prediction here")
    ap.add_argument("--sass-dir", type=Path, help="keep SASS / PTX / TTGIR per case here")
    a = ap.parse_args(argv)
    import tempfile

    from nmgraph.backends.kernels._common import interpreting

    if interpreting():
        raise SystemExit("kernel_static.py compiles for sm_90: unset TRITON_INTERPRET (the interpreter replaces "
                         "the kernels it would compile).")
    wanted = [w for w in a.only.split(",") if w] or [""]
    selected = [c for c in cases(a.quick) if any(w in c.name for w in wanted)]
    with tempfile.TemporaryDirectory() as tmp:
        records = run(selected, a.sass_dir or Path(tmp))
    v = versions()
    print(f"Estimates from compiled code (no GPU): {v}\n")
    print(tables(records))
    print("\n### Done-when checks (estimates)\n")
    print("| check | value | limit | met |\n|---|---:|---:|---|")
    for what, val, lim, ok in targets(records):
        print(f"| {what} | {val:.2f} | {lim} | {'yes' if ok else 'NO'} |")
    if a.json:
        a.json.write_text(json.dumps({"versions": v, "records": records,
                                      "targets": targets(records)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
