"""Markdown tables for benchmarks/RESULTS.md from the pytest-benchmark JSON of `pytest benchmarks/`.

    python benchmarks/report.py bench-*.json [--env env.json] [--junit bench-*.xml] [-o results.md]
    python benchmarks/report.py --write-env env.json     # on the GPU machine: device and versions

Several JSON files (one per benchmark file, or per device call) merge into one report. Each case
is placed by its test ("bench_file.py::test_function", from the JSON's `fullname`) and its
parametrize values (the JSON's `params`; never parsed out of the id, since provider names contain
'-') as TABLES below says; a case found in two files takes the later file's numbers. Cells hold
the metric the benchmark wrote into `extra_info`; a provider absent from the JSON (skipped, failed
or not run: pytest-benchmark leaves out cases whose timing raised) shows as "—". A case no table
claims is listed under "Cases no table claims" rather than dropped. The targets of design.md's
"Numbers to beat" live in TARGETS and nowhere else; our cells carry ✅ (meets) or ❌ (misses) where
a target exists.
--junit adds the skip / failure reasons of the cases that were not measured.
"""
from __future__ import annotations

import argparse
import json
import operator
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

MISSING = "—"
MEETS, MISSES = "✅", "❌"


# ------------------------------------------------------------------------------------------------
# Cells: extra_info -> text ("—" where the benchmark did not write the key)
# ------------------------------------------------------------------------------------------------
def number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def metric(key: str) -> Callable[[dict], str]:
    return lambda info: number(info[key]) if key in info else MISSING


def train_step_cell(info: dict) -> str:
    if not {"tokens_per_s", "mfu", "peak_mem_gib"} <= info.keys():
        return MISSING
    return f"{info['tokens_per_s'] / 1e3:.1f}k tok/s, {info['mfu'] * 100:.1f}% MFU, {info['peak_mem_gib']:.1f} GiB"


def loss_cell(info: dict) -> str:
    if not {"TFLOP/s", "peak_extra_mib"} <= info.keys():
        return MISSING
    return f"{number(info['TFLOP/s'])} TFLOP/s, {info['peak_extra_mib']:.0f} MiB"


def peak_memory_cell(info: dict) -> str:
    if not {"peak_extra_mib", "activation_mib", "TFLOP/s"} <= info.keys():
        return MISSING
    ratio = info["peak_extra_mib"] / info["activation_mib"]
    return (f"{info['peak_extra_mib']:.0f} MiB extra = {ratio:.1f}x one q tensor "
            f"({info['activation_mib']:.0f} MiB); {number(info['TFLOP/s'])} TFLOP/s fwd+bwd")


# ------------------------------------------------------------------------------------------------
# Where each benchmark goes. Names mirror benchmarks/bench_*.py: test functions, the "provider"
# parametrize values, and the attention "shape" ids ("B{}_H{}_S{}_D{}", as the bench file formats them).
# ------------------------------------------------------------------------------------------------
ELEMENTWISE_COLUMNS = {"ours": "llama_fast", "torch_eager": "eager reference", "torch_compile": "torch.compile",
                       "liger": "Liger"}
SDPA_COLUMNS = {"sdpa-flash": "SDPA flash", "sdpa-cudnn": "SDPA cuDNN", "sdpa-efficient": "SDPA efficient"}
SHAPE_ROWS = None  # Table.tests value: one row per params["shape"]
MIX_ROWS = "<mix>"  # Table.tests value: one row per params["mix"] (packed-document mixtures)
VARLEN_COLUMNS = {"llama_fast": "llama_fast packed (Triton)", "sdpa-blockdiag": "SDPA block-diagonal mask",
                  "flex": "FlexAttention document mask", "flash-varlen": "flash_attn_varlen_func"}


@dataclass(frozen=True)
class Table:
    title: str
    tests: dict[str, str | None]        # "bench_file.py::test_function" -> row label, or SHAPE_ROWS
    columns: dict[str | None, str]      # params["provider"] -> column header (None: no provider param)
    ours: tuple[str | None, ...]        # the providers that are llama_fast (targets apply to these)
    cell: Callable[[dict], str]


TABLES = [
    Table("RMSNorm 16384x4096 bf16, GB/s",
          {"bench_rms_norm.py::test_forward": "forward", "bench_rms_norm.py::test_backward": "backward"},
          ELEMENTWISE_COLUMNS, ("ours",), metric("GB/s")),
    Table("SwiGLU 16384x11008 bf16, GB/s",
          {"bench_swiglu.py::test_forward": "forward", "bench_swiglu.py::test_backward": "backward"},
          ELEMENTWISE_COLUMNS, ("ours",), metric("GB/s")),
    Table("RoPE q+k 4x32x4096x128 bf16, GB/s",
          {"bench_rope.py::test_forward": "forward", "bench_rope.py::test_backward": "backward"},
          ELEMENTWISE_COLUMNS, ("ours",), metric("GB/s")),
    Table("Attention forward, causal, RoPE included, bf16, TFLOP/s",
          {"bench_attention.py::test_attention_forward": SHAPE_ROWS},
          {"llama_fast": "llama_fast (Triton)", "reference": "eager reference", **SDPA_COLUMNS},
          ("llama_fast",), metric("TFLOP/s")),
    Table("Attention backward, causal, RoPE included, bf16, TFLOP/s",
          {"bench_attention.py::test_attention_backward": SHAPE_ROWS},
          {"llama_fast-cuda": "llama_fast CUDA", "llama_fast-cuda-deterministic": "llama_fast CUDA deterministic",
           "llama_fast-cuda-sm90": "llama_fast CUDA sm_90a",
           "llama_fast-cuda-sm90-deterministic": "llama_fast CUDA sm_90a deterministic",
           "llama_fast-triton": "llama_fast Triton", "reference": "eager reference", **SDPA_COLUMNS},
          ("llama_fast-cuda", "llama_fast-cuda-deterministic", "llama_fast-cuda-sm90",
           "llama_fast-cuda-sm90-deterministic", "llama_fast-triton"), metric("TFLOP/s")),
    Table("Packed documents (varlen) attention forward, 16k tokens, H32 D128, RoPE included, bf16, TFLOP/s over "
          "each document's causal half",
          {"bench_attention_varlen.py::test_varlen_forward": MIX_ROWS,
           "bench_attention_varlen.py::test_uniform_yardstick_forward": "8x2048"},
          {**VARLEN_COLUMNS, None: "uniform B8 S2048, batched op (95% target)"}, ("llama_fast",), metric("TFLOP/s")),
    Table("Packed documents (varlen) attention backward, 16k tokens, H32 D128, RoPE included, bf16, TFLOP/s",
          {"bench_attention_varlen.py::test_varlen_backward": MIX_ROWS},
          VARLEN_COLUMNS, ("llama_fast",), metric("TFLOP/s")),
    Table("Attention peak memory, forward + backward, B1 H32 S16384 D128 bf16",
          {"bench_attention.py::test_attention_peak_memory_16k": "B1_H32_S16384_D128"},
          {None: "llama_fast"}, (None,), peak_memory_cell),
    Table("lm_head + cross-entropy, forward + backward, 8192 x 2048 -> vocab 32000 bf16: TFLOP/s, peak memory "
          "above the inputs",
          {"bench_cross_entropy.py::test_forward_backward": "1B loss"},
          ELEMENTWISE_COLUMNS, ("ours",), loss_cell),
    Table("Train step, 1B flavor, B4 S2048 bf16, fused AdamW: tokens/s, MFU, peak memory",
          {"bench_train_step.py::test_train_step": "1B B4 S2048"},
          {"llama_fast": "llama_fast fused", "llama_fast-recompute-cheap": "llama_fast fused, recompute=cheap",
           "llama_fast-reference": "llama_fast reference",
           "llama_fast-reference-compile": "reference + torch.compile", "hf": "HF", "hf-compile": "HF + torch.compile",
           "hf+llama_fast": "HF + replace_modules", "hf+liger": "HF + Liger"},
          ("llama_fast", "llama_fast-recompute-cheap", "hf+llama_fast"), train_step_cell),
]


# ------------------------------------------------------------------------------------------------
# design.md "Numbers to beat" (H100 80GB HBM3, 2026-11-22): the only copy of the targets.
# (test, row label) -> Target; each check is (extra_info key, comparison, value).
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    text: str
    checks: tuple[tuple[str, str, float], ...]


COMPARE = {">=": operator.ge, "<=": operator.le}

TARGETS = {
    ("bench_rms_norm.py::test_forward", "forward"): Target(">= 2850 GB/s", (("GB/s", ">=", 2850),)),
    ("bench_rms_norm.py::test_backward", "backward"): Target(">= 2500 GB/s", (("GB/s", ">=", 2500),)),
    ("bench_swiglu.py::test_forward", "forward"): Target(">= 2900 GB/s", (("GB/s", ">=", 2900),)),
    ("bench_swiglu.py::test_backward", "backward"): Target(">= 2900 GB/s", (("GB/s", ">=", 2900),)),
    ("bench_rope.py::test_forward", "forward"): Target(">= 2900 GB/s", (("GB/s", ">=", 2900),)),
    ("bench_attention.py::test_attention_forward", "B8_H32_S2048_D128"):
        Target(">= 500 TFLOP/s", (("TFLOP/s", ">=", 500),)),
    ("bench_attention.py::test_attention_backward", "B8_H32_S2048_D128"):
        Target(">= 390 TFLOP/s", (("TFLOP/s", ">=", 390),)),
    ("bench_attention.py::test_attention_forward", "B2_H32_S8192_D128"):
        Target(">= 560 TFLOP/s", (("TFLOP/s", ">=", 560),)),
    ("bench_train_step.py::test_train_step", "1B B4 S2048"):
        Target(">= 65k tok/s (44% MFU), <= 24 GiB", (("tokens_per_s", ">=", 65000), ("peak_mem_gib", "<=", 24))),
}


def meets(target: Target, info: dict) -> bool | None:
    """True / False, or None where a checked key is missing (no judgement without the number)."""
    if any(key not in info for key, _, _ in target.checks):
        return None
    return all(COMPARE[op](info[key], value) for key, op, value in target.checks)


# ------------------------------------------------------------------------------------------------
# Reading the JSON
# ------------------------------------------------------------------------------------------------
def case_key(fullname: str) -> str:
    """'benchmarks/bench_rms_norm.py::test_forward[ours]' -> 'bench_rms_norm.py::test_forward'."""
    path, _, name = fullname.partition("::")
    return f"{path.rsplit('/', 1)[-1]}::{name.split('[', 1)[0]}"


def shape_id(shape) -> str:
    return "B{}_H{}_S{}_D{}".format(*shape)


def place(bench: dict) -> tuple[Table, str, str | None] | None:
    """(table, row label, provider) of one JSON benchmark entry, or None if no table claims it."""
    key, params = case_key(bench["fullname"]), bench.get("params") or {}
    for table in TABLES:
        if key not in table.tests:
            continue
        provider = params.get("provider")
        if provider not in table.columns:
            return None
        row = table.tests[key]
        if row is SHAPE_ROWS:
            if "shape" not in params:
                return None
            row = shape_id(params["shape"])
        elif row == MIX_ROWS:
            if "mix" not in params:
                return None
            row = params["mix"]
        return table, row, provider
    return None


@dataclass
class Report:
    files: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)            # the JSON documents, without "benchmarks"
    cells: dict = field(default_factory=dict)                 # (table title, row, provider) -> extra_info
    rows: dict = field(default_factory=dict)                  # table title -> [(test key, row label)] in run order
    unplaced: list[str] = field(default_factory=list)

    def add(self, path: str, doc: dict) -> None:
        self.files.append(path)
        self.runs.append({k: v for k, v in doc.items() if k != "benchmarks"})
        for bench in doc.get("benchmarks", []):
            placed = place(bench)
            if placed is None:
                self.unplaced.append(bench["fullname"])
                continue
            table, row, provider = placed
            key = case_key(bench["fullname"])
            if (key, row) not in self.rows.setdefault(table.title, []):
                self.rows[table.title].append((key, row))
            self.cells[table.title, row, provider] = bench.get("extra_info") or {}


def render_table(report: Report, table: Table) -> list[str]:
    rows = report.rows.get(table.title)
    if not rows:
        return []
    has_targets = any((key, row) in TARGETS for key, row in rows)
    header = ["case", *table.columns.values(), *(["design.md target"] if has_targets else [])]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows:
        target = TARGETS.get((key, row))
        cells = [row]
        for provider in table.columns:
            info = report.cells.get((table.title, row, provider))
            if info is None:
                cells.append(MISSING)
                continue
            text = table.cell(info)
            verdict = meets(target, info) if target and provider in table.ours else None
            cells.append(text if verdict is None else f"{text} {MEETS if verdict else MISSES}")
        if has_targets:
            cells.append(target.text if target else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------
# Header: device and versions (env JSON) and the run (pytest-benchmark's machine_info / commit_info)
# ------------------------------------------------------------------------------------------------
def header(report: Report, env: dict | None) -> list[str]:
    dates = sorted(run.get("datetime", "") for run in report.runs if run.get("datetime"))
    date = (dates[0] if dates else (env or {}).get("written_at", "date not recorded"))[:10]
    lines = []
    if env:
        device = env.get("device") or "no CUDA device"
        if env.get("capability"):
            device += f" (sm_{env['capability'].replace('.', '')}, {env['sm_count']} SMs, {env['memory_gib']} GiB)"
        lines += [f"## {date} · {env.get('device') or 'no CUDA device'}", "",
                  f"- Device: {device}, driver {env.get('driver') or 'not recorded'}",
                  f"- Versions: torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
                  f"triton {env.get('triton')}, Liger-Kernel {env.get('liger_kernel') or 'not installed'}, "
                  f"Python {env.get('python')}",
                  f"- Extension: {env.get('extension', 'not recorded')}"]
    else:
        lines += [f"## {date}", "", "- Device and versions: not recorded (no --env JSON given)"]
    first = report.runs[0] if report.runs else {}
    machine = first.get("machine_info") or {}
    commits = sorted({f"{c.get('id', '?')[:12]}{' (dirty)' if c.get('dirty') else ''} on {c.get('branch', '?')}"
                      for c in (run.get("commit_info") or {} for run in report.runs)})
    when = " to ".join(sorted({dates[0], dates[-1]})) if dates else "not recorded"
    lines.append(f"- Run: {when}, host {machine.get('node', '?')}, "
                 f"pytest-benchmark {first.get('version', '?')}, commit {', '.join(commits) or 'not recorded'}")
    lines.append(f"- From: {', '.join(report.files) or 'no pytest-benchmark JSON'}")
    lines.append(f"- Cells: rates from the median of CUDA-event timings (train step: pytest-benchmark's median "
                 f"synchronized step); {MEETS} / {MISSES}: llama_fast meets / misses the design.md target; "
                 f"{MISSING}: not measured (skipped, failed or not run)")
    return lines + [""]


def not_measured(junit_paths: list[str]) -> list[str]:
    """The skipped / failed / errored cases of pytest --junitxml files, with their reasons."""
    lines = []
    for path in junit_paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            for outcome in ("skipped", "failure", "error"):
                found = case.find(outcome)
                if found is not None:
                    module = case.get("classname", "").rsplit(".", 1)[-1]
                    reason = (found.get("message") or "").strip().splitlines()
                    lines.append(f"- `{module}.py::{case.get('name')}` {outcome}: {reason[0][:200] if reason else ''}")
    return ["### Not measured", "", *lines, ""] if lines else []


def render(report: Report, env: dict | None, junit_paths: list[str] = ()) -> str:
    lines = header(report, env)
    for table in TABLES:
        lines += render_table(report, table)
    if report.unplaced:
        lines += ["### Cases no table claims (add them to TABLES in benchmarks/report.py)", "",
                  *(f"- `{name}`" for name in report.unplaced), ""]
    lines += not_measured(list(junit_paths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# --write-env: run on the GPU machine
# ------------------------------------------------------------------------------------------------
def version_of(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def extension_status() -> str:
    try:
        import llama_fast._extension as ext
    except Exception as exc:  # a failed build: report it rather than fail
        return f"llama_fast not importable: {exc}"
    if not ext.AVAILABLE:
        return f"llama_fast._C not loaded: {ext.LOAD_ERROR}"
    return "llama_fast._C with CUDA kernels" if ext.WITH_CUDA else "llama_fast._C without CUDA kernels"


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "triton": version_of("triton"), "liger_kernel": version_of("liger-kernel"),
           "extension": extension_status(), "device": None,
           "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True)
        drivers = result.stdout.split() if result.returncode == 0 else []  # one line per GPU
        env["driver"] = drivers[0] if drivers else None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="*", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--env", help="env JSON written by --write-env on the machine that ran the benchmarks")
    parser.add_argument("--junit", nargs="*", default=[], help="pytest --junitxml files: reasons for missing cases")
    parser.add_argument("-o", "--output", help="write the Markdown here instead of stdout")
    parser.add_argument("--write-env", metavar="PATH", help="write this machine's device and versions as JSON")
    args = parser.parse_args(argv)
    if args.write_env:
        with open(args.write_env, "w") as f:
            json.dump(environment(), f, indent=2)
        return 0
    if not args.bench_json and not args.junit:  # junit alone: every case skipped or failed, no JSON written
        parser.error("bench_json: expected at least one pytest-benchmark JSON file (or --junit files), got none")
    report = Report()
    for path in args.bench_json:
        with open(path) as f:
            report.add(path, json.load(f))
    env = None
    if args.env:
        with open(args.env) as f:
            env = json.load(f)
    text = render(report, env, args.junit)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
