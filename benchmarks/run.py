"""Run every benchmark, each library x model x depth in a fresh process, and write RESULTS.md and the plot.

    python benchmarks/run.py            # the full run (about 20 minutes on 2 cores)
    python benchmarks/run.py --quick    # depths 8 and 64, one repeat: a smoke run while developing

Ratios are to hand-written pure JAX measured in the same run, so machine load moves numerator and
denominator alike; libraries are interleaved within each model, in a rotating order per repeat. A
shared machine still drifts by more than the bar between processes minutes apart, so effax's verdicts
come from an interleaved same-process A/B (`benchmarks/trace_ab.py`) run at the end: effax, effax.nn
and pure JAX take turns sample by sample, so drift hits all three alike.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.libs import LIBRARIES, missing_packages  # noqa: E402

BASELINE = "pure JAX"
TIMED = {
    "trace_train": "Trace time, train step (`jax.jit(step).lower(...)`, value_and_grad + SGD)",
    "trace_apply": "Trace time, apply (`jax.jit(apply).lower(...)`, eval mode)",
    "compile_train": "Compile time, train step (`lowered.compile()`)",
    "step": "Steady-state jitted train step, per call",
    "eager_apply": "Eager (unjitted) apply, depth 8, per call",
    "init": "Init, first call (concrete arrays)",
    "abstract_init": "Abstract init (`jax.eval_shape` of init)",
    "abstract_apply": "Abstract apply (`jax.eval_shape` of apply, eval mode)",
}
# DESIGN: init runs the model, so its abstract init may cost at most this share of pure JAX's abstract init plus
# one abstract forward pass (`eval_shape(t.init) <= 0.9x (eval_shape(pure_init) + eval_shape(pure_apply))`)
ABSTRACT_INIT_BAR = 0.9
COUNTS = {"hlo_train": "Compiled HLO ops, train step", "hlo_apply": "Compiled HLO ops, apply"}
HEADLINE_MODEL = ("mlp", 256)
EAGER_DEPTH = 8


def configs(models: list[str], depths: list[int], transformer_depth: int) -> list[tuple[str, int]]:
    out = [(m, d) for m in models if m != "transformer" for d in depths]
    if "transformer" in models:
        out.append(("transformer", transformer_depth))
    return out


def run_one(label: str, model: str, depth: int, reps: int, timeout: float) -> dict | str:
    cmd = [sys.executable, "-m", "benchmarks.worker", label, model, str(depth), "--reps", str(reps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed: {tail[:200]}"


def collect(args: argparse.Namespace) -> dict:
    labels = [lab for lab in LIBRARIES if not args.libs or lab in args.libs]
    skipped = {lab: missing_packages(lab) for lab in labels}
    labels = [lab for lab in labels if not skipped[lab]]
    skipped = {lab: why for lab, why in skipped.items() if why}
    results: dict = {}
    errors: dict = {}
    todo = configs(args.models, args.depths, args.transformer_depth)
    start = time.perf_counter()
    for r in range(args.repeats):
        for model, depth in todo:
            runnable = [lab for lab in labels if model in LIBRARIES[lab][2]]
            shift = r % len(runnable)
            for label in runnable[shift:] + runnable[:shift]:
                out = run_one(label, model, depth, args.reps, args.timeout)
                key = f"{model}/{depth}"
                took = time.perf_counter() - start
                if isinstance(out, str):
                    errors.setdefault(label, {})[key] = out
                    print(f"[{took:6.0f}s] repeat {r + 1}: {label:20s} {key:16s} {out}", flush=True)
                    continue
                cell = results.setdefault(label, {}).setdefault(key, {})
                for name, value in out.items():
                    if name in COUNTS:
                        cell[name] = value
                    else:
                        cell.setdefault(name, []).extend(value)
                print(f"[{took:6.0f}s] repeat {r + 1}: {label:20s} {key:16s} "
                      f"trace_train {statistics.median(out['trace_train']) * 1e3:8.1f} ms", flush=True)
    return {"machine": machine(), "results": results, "errors": errors, "skipped": skipped,
            "configs": [f"{m}/{d}" for m, d in todo], "labels": labels,
            "wall_s": time.perf_counter() - start, "argv": sys.argv[1:]}


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("jax", "jaxlib", "flax", "dm-haiku", "equinox", "penzai", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "effax"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        versions["effax"] = f"{rev}{' + uncommitted changes' if dirty else ''}"
    except OSError:
        versions["effax"] = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "versions": versions,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def timed_table(data: dict, name: str) -> list[str]:
    results = data["results"]
    cols = [c for c in data["configs"] if any(name in results.get(lab, {}).get(c, {}) for lab in data["labels"])]
    if not cols:
        return []
    lines = ["| library | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for lab in data["labels"]:
        cells = []
        for c in cols:
            xs = data["results"].get(lab, {}).get(c, {}).get(name)
            base = data["results"].get(BASELINE, {}).get(c, {}).get(name)
            if not xs:
                cells.append(data["errors"].get(lab, {}).get(c, "n/a")[:40] if lab in data["errors"] else "n/a")
                continue
            med = statistics.median(xs)
            ratio = f"**{med / statistics.median(base):.2f}x** " if base else ""
            cells.append(f"{ratio}{fmt_time(med)} ({fmt_time(min(xs))}–{fmt_time(max(xs))})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def count_table(data: dict, name: str) -> list[str]:
    cols = data["configs"]
    lines = ["| library | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for lab in data["labels"]:
        cells = []
        for c in cols:
            n = data["results"].get(lab, {}).get(c, {}).get(name)
            base = data["results"].get(BASELINE, {}).get(c, {}).get(name)
            if n is None:
                cells.append("n/a")
            elif base is None:
                cells.append(str(n))
            else:
                cells.append(f"{n}" + (" (=)" if n == base else f" ({n - base:+d})"))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def ratio(data: dict, lab: str, config: str, name: str) -> float | None:
    xs = data["results"].get(lab, {}).get(config, {}).get(name)
    base = data["results"].get(BASELINE, {}).get(config, {}).get(name)
    if not xs or not base:
        return None
    return statistics.median(xs) / statistics.median(base)


def headline(data: dict) -> list[str]:
    config = "/".join(map(str, HEADLINE_MODEL))
    names = ["trace_train", "trace_apply", "compile_train", "step", "abstract_init", "init"]
    lines = [f"## Headline: MLP width 256, depth {HEADLINE_MODEL[1]}, ratios to pure JAX (median)", "",
             "| library | " + " | ".join(names) + " | HLO ops train | eager apply (depth 8) |",
             "| --- |" + " --- |" * (len(names) + 2)]
    for lab in data["labels"]:
        cells = []
        for name in names:
            r = ratio(data, lab, config, name)
            cells.append("n/a" if r is None else f"{r:.2f}x")
        n = data["results"].get(lab, {}).get(config, {}).get("hlo_train")
        base = data["results"].get(BASELINE, {}).get(config, {}).get("hlo_train")
        cells.append("n/a" if n is None or base is None else ("equal" if n == base else f"{n - base:+d}"))
        eager = ratio(data, lab, "mlp/8", "eager_apply")
        cells.append("n/a" if eager is None else f"{eager:.2f}x")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def abstract_init_check(what: str, mine: dict, base: dict) -> tuple[str, str, str]:
    """DESIGN's abstract-init line from median seconds: `mine`'s abstract init against pure JAX's (`base`)
    abstract init plus one abstract forward pass."""
    r = mine["abstract_init"] / (base["abstract_init"] + base["abstract_apply"])
    return (f"{what} <= {ABSTRACT_INIT_BAR}x (pure abstract init + abstract apply)", f"{r:.2f}x",
            "pass" if r <= ABSTRACT_INIT_BAR else "FAIL")


def bar_check(data: dict) -> list[str]:
    """effax against docs/design.md's Performance bar, line by line."""
    lines = ["## effax against the bar (docs/design.md, Performance)", "",
             "The trace and eager rows marked A/B come from the interleaved A/B below (one process, the "
             "libraries taking turns); the others from the per-process runs of the tables further down.", ""]
    for lab in [lab for lab in ("effax", "effax.nn") if lab in data["labels"]]:
        checks = []
        for model, cell in data.get("ab", {}).items():
            base, ms = cell["medians"][BASELINE], cell["medians"].get(lab)
            if ms is None:
                continue
            r = ms["trace_train"] / base["trace_train"]
            checks.append((f"A/B: trace of the {model}/{cell['depth']} train step <= 1.05x", f"{r:.2f}x",
                           "pass" if r <= 1.05 else "FAIL"))
            r = ms["eager_apply"] / base["eager_apply"]
            checks.append((f"A/B: eager apply of {model}/{EAGER_DEPTH} <= 1.2x", f"{r:.2f}x",
                           "pass" if r <= 1.2 else "FAIL"))
            if "abstract_apply" in base:
                checks.append(abstract_init_check(f"A/B: abstract init of {model}/{cell['depth']}", ms, base))
        for config in [c for c in data["configs"] if c.startswith("mlp/") and c.split("/")[1] in ("64", "256")]:
            r = ratio(data, lab, config, "trace_train")
            if r is not None:
                checks.append((f"trace of the {config} train step <= 1.05x (issue: <= 1.15x)", f"{r:.2f}x",
                               "pass" if r <= 1.05 else ("within 1.15x" if r <= 1.15 else "FAIL")))
        for config in data["configs"]:
            if config.startswith("mlp_stateful"):
                continue  # dropout draws add key folds by design
            for name in ("hlo_apply", "hlo_train"):
                n = data["results"].get(lab, {}).get(config, {}).get(name)
                base = data["results"].get(BASELINE, {}).get(config, {}).get(name)
                if n is not None and base is not None:
                    checks.append((f"{name} of {config} equals pure JAX", f"{n} vs {base}",
                                   "pass" if n == base else "FAIL"))
        for config in data["configs"]:
            r = ratio(data, lab, config, "step")
            if r is not None:
                checks.append((f"steady-state step of {config} <= 1.05x", f"{r:.2f}x",
                               "pass" if r <= 1.05 else "FAIL (noise? see min/max)"))
        for config in ("mlp/8", "mlp_stateful/8"):
            r = ratio(data, lab, config, "eager_apply")
            if r is not None:
                checks.append((f"eager apply of {config} <= 1.2x", f"{r:.2f}x", "pass" if r <= 1.2 else "FAIL"))
        config = "/".join(map(str, HEADLINE_MODEL))
        mine, base = data["results"].get(lab, {}).get(config, {}), data["results"].get(BASELINE, {}).get(config, {})
        if mine.get("abstract_init") and base.get("abstract_init") and base.get("abstract_apply"):
            medians = lambda d: {m: statistics.median(d[m]) for m in ("abstract_init", "abstract_apply") if m in d}
            checks.append(abstract_init_check(f"abstract init of {config}", medians(mine), medians(base)))
        lines += [f"**{lab}**", "", "| check | measured | verdict |", "| --- | --- | --- |"]
        lines += [f"| {c} | {m} | {v} |" for c, m, v in checks] + [""]
    return lines


def run_ab(args: argparse.Namespace) -> dict:
    """The interleaved A/B of every model at the deepest MLP depth (and the transformer's), eager at depth 8."""
    from benchmarks import trace_ab

    ab = {}
    for model in args.models:
        depth = args.transformer_depth if model == "transformer" else max(args.depths)
        samples = 2 if args.quick else 5
        ab[model] = {"depth": depth, "samples": samples, "medians": trace_ab.main(depth, samples, model, EAGER_DEPTH)}
    return ab


def ab_table(data: dict) -> list[str]:
    ab = data.get("ab")
    if not ab:
        return []
    samples = next(iter(ab.values()))["samples"]
    lines = ["## Interleaved A/B against pure JAX (the bar's verdicts)", "",
             "`benchmarks/trace_ab.py` in one process: each sample lowers a fresh function, the three take "
             f"turns sample by sample ({samples} samples after a warm-up round; eager: 10 calls per round). Median "
             f"seconds and ratio to pure JAX; eager apply at depth {EAGER_DEPTH}. The MLP models' floor row is "
             "`benchmarks/speed_of_light.py`'s 60-line module system without effects, timed eager only: each "
             "microsecond of Python between eager ops costs several here, so its ratio is the line below which no "
             "module system that names layers and reads variables in Python goes on this machine.", "",
             "| model | library | trace_train | abstract_init | abstract_apply | eager_apply |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model, cell in ab.items():
        base = cell["medians"][BASELINE]
        for lab, ms in cell["medians"].items():
            metrics = ("trace_train", "abstract_init", "abstract_apply", "eager_apply")
            cells = [f"**{ms[m] / base[m]:.2f}x** {fmt_time(ms[m])}" if m in ms and m in base else "–" for m in metrics]
            lab = f"{lab} (eager reference)" if lab == "floor" else lab
            lines.append(f"| {model}/{cell['depth']} | {lab} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(data: dict, path: Path, plot_name: str | None) -> None:
    m = data["machine"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    lines = [
        "# effax benchmarks", "",
        f"Generated by `python benchmarks/run.py {' '.join(data['argv'])}` on {m['date']} "
        f"in {data['wall_s'] / 60:.1f} minutes; do not edit by hand.", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}"
        + (f", load average at start {m['load_average'][0]:.2f}" if m["load_average"] else ""),
        f"- versions: {v}",
        "- method: each library x model x depth runs in a fresh process, repeated "
        f"{data['argv_repeats']} times; traced measurements take a fresh function object per sample and "
        "drop one warm-up sample; cells read **ratio to pure JAX** median (min–max) over all samples. "
        "Models: MLP width 256 (`mlp`), the same with dropout and a batch-norm-like running state "
        "(`mlp_stateful`: train step in train mode, apply in eval mode), a pre-LN transformer block "
        "stack (`transformer`, d_model 128, 4 heads, seq 32, batch 8). Model code: `benchmarks/libs/`.",
    ]
    if data["skipped"]:
        lines.append("- not measured (not installed here): " + ", ".join(
            f"{lab} ({', '.join(why)})" for lab, why in data["skipped"].items()))
    if data["errors"]:
        for lab, errs in data["errors"].items():
            for c, e in errs.items():
                lines.append(f"- {lab} {c}: {e}")
    lines.append("")
    lines += headline(data) + [""] + bar_check(data) + ab_table(data)
    if plot_name:
        lines += [f"![trace time vs depth]({plot_name})", ""]
    for name, title in TIMED.items():
        table = timed_table(data, name)
        if table:
            lines += [f"## {title}", ""] + table + [""]
    for name, title in COUNTS.items():
        lines += [f"## {title}", "", "Difference to pure JAX in parentheses.", ""] + count_table(data, name) + [""]
    from benchmarks.decode import section  # the decoding rows, measured apart by benchmarks/decode.py

    lines += section(path.parent)
    path.write_text("\n".join(lines))


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for lab in data["labels"]:
        pts = []
        for c in data["configs"]:
            model, depth = c.split("/")
            xs = data["results"].get(lab, {}).get(c, {}).get("trace_train")
            if model == "mlp" and xs:
                pts.append((int(depth), statistics.median(xs)))
        if not pts:
            continue
        d, t = zip(*pts, strict=True)
        style = {"linewidth": 2.5, "color": "black"} if lab == BASELINE else {}
        if lab.startswith("effax"):
            style = {"linewidth": 2.5}
        axes[0].plot(d, [s * 1e3 for s in t], marker="o", label=lab, **style)
        base = [statistics.median(data["results"][BASELINE][f"mlp/{x}"]["trace_train"]) for x in d]
        axes[1].plot(d, [s / b for s, b in zip(t, base, strict=True)], marker="o", label=lab, **style)
    axes[0].set(xscale="log", yscale="log", xlabel="MLP depth", ylabel="trace time, train step (ms)",
                title="Trace time vs depth")
    axes[1].axhline(1.05, color="grey", linestyle="--", linewidth=1)
    axes[1].set(xscale="log", yscale="log", xlabel="MLP depth", ylabel="ratio to pure JAX",
                title="Trace time / pure JAX (dashed: 1.05x bar)")
    for ax in axes:
        ax.set_xticks([int(c.split("/")[1]) for c in data["configs"] if c.startswith("mlp/")])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 8 and 64, one repeat, 2 samples each")
    parser.add_argument("--repeats", type=int, help="fresh processes per library x model x depth (default 2)")
    parser.add_argument("--reps", type=int, help="samples per process for traced measurements (default 2)")
    parser.add_argument("--depths", type=int, nargs="+", help="MLP depths (default 8 64 256)")
    parser.add_argument("--transformer-depth", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp_stateful", "transformer"])
    parser.add_argument("--libs", nargs="+", help="row labels to run, e.g. 'pure JAX' effax Haiku")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/; benchmarks/quick/ with --quick)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.reps = args.reps or 2
    args.depths = args.depths or ([8, 64] if args.quick else [8, 64, 256])
    if args.libs and BASELINE not in args.libs:
        args.libs.insert(0, BASELINE)
    out = args.out or (ROOT / "benchmarks" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)

    data = collect(args)
    data["argv_repeats"] = args.repeats
    if {"effax", "effax.nn"} & set(data["labels"]):
        data["ab"] = run_ab(args)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    plot_name = "trace_vs_depth.png"
    has_plot = plot(data, out / plot_name)
    write_markdown(data, out / "RESULTS.md", plot_name if has_plot else None)
    print(f"wrote {out / 'RESULTS.md'} in {data['wall_s'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
