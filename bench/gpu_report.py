"""The GPU check's report for people (gpu_report.md): machine, versions, steps, benchmark table, the speed goals."""
from __future__ import annotations

TAIL_CHARS = 1500
"""Of a failed step's log, this much goes into the report (the whole log stays in the work directory)."""

GOALS = {"images_per_sec": 7000.0, "jpeg_vs_synthetic": 0.90, "step_time_vs_plain": 1.03}
"""From the speed issue: ResNet-50 bf16 from JPEG files on one H100; JPEG-fed / synthetic-fed images/s; dist_train /
plain loop step time."""


def goals(bench: dict, compiled: dict) -> list[dict] | None:
    """The speed issue's goals against the measured figures: each as (what, value, goal, met)."""
    eager = {r["runner"]: r for r in bench.get("rows", [])}
    jit = {r["runner"]: r for r in compiled.get("rows", [])}
    if not eager and not jit:
        return None
    found = []

    def goal(what: str, value: float | None, target: float, at_least: bool = True) -> None:
        if value is not None:
            found.append({"what": what, "value": value, "goal": f"{'>=' if at_least else '<='} {target:g}",
                          "met": value >= target if at_least else value <= target})

    for label, rows in (("eager", eager), ("torch.compile", jit)):
        ours, synthetic = rows.get("dist_train"), rows.get("synthetic")
        goal(f"dist_train images/s from JPEG files (decode=device, {label})", ours and ours["images_per_sec"],
             GOALS["images_per_sec"])
        goal(f"JPEG-fed / synthetic-fed images/s ({label})",
             ours and synthetic and ours["images_per_sec"] / synthetic["images_per_sec"], GOALS["jpeg_vs_synthetic"])
    # the same input pipeline on both sides (Pillow in loader workers): what dist_train's loop costs
    workers, plain = eager.get("dist_train+data.decode=workers"), eager.get("plain")
    goal("dist_train (decode=workers) / plain loop step time", workers and plain and workers["step_ms"] / plain["step_ms"],
         GOALS["step_time_vs_plain"], at_least=False)
    return found


def markdown(report: dict, with_logs: bool = True) -> str:
    """The report for people: machine, versions, steps, benchmark, goals, and (with_logs) the failed steps' log tails."""
    env = report["environment"]
    pk = env.get("packages", {})
    lines = [f"# GPU check: {report['result'].upper()} (mode {report['mode']})", "",
             f"{report['started']}, `{report['command']}`, {report['wall_seconds']:.0f} s of a {report['budget_seconds']:.0f} s budget"]
    if env:
        gpus = env.get("gpus") or []
        device = (f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB, sm {gpus[0]['capability']})" if gpus
                  else "no CUDA device")
        lines += [
            f"- device: {device}; host {env.get('host')}, {env.get('cpu_count')} cores; nvidia-smi: {env.get('nvidia_smi')}",
            f"- CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}, bf16 {env.get('bf16')}; "
            f"for torch.compile: C compiler {env.get('c_compiler')}, Python.h {'found' if env.get('python_h') else 'MISSING'}",
            f"- Python {env.get('python')} ({env.get('executable')}); "
            + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
            f"- not installed: {', '.join(env.get('missing', [])) or 'nothing'}"
            + (f"; unpacked from wheels/: {', '.join(env['wheels_unpacked'])}" if env.get("wheels_unpacked") else ""),
            f"- environment variables (NCCL_, TORCH_, PYTORCH_, CUDA_, OMP_NUM_THREADS, PYTHONPATH): {env.get('env') or 'none set'}",
        ]
    lines += ["", "| step | status | s | what | result |", "|---|---|---:|---|---|"]
    for s in report["steps"]:
        seconds = f"{s['seconds']:.0f}" if s["seconds"] is not None else ""
        lines.append(f"| {s['name']} | {s['status'].upper() if s['status'] in ('failed', 'timeout') else s['status']} "
                     f"| {seconds} | {s['title']} | {s['reason'].replace('|', '/')} |")
    for s in report["steps"]:  # what a pytest step did not pass, with the reason
        for t in s["details"].get("tests", []) if isinstance(s["details"], dict) else []:
            if t["outcome"] != "passed":
                lines.append(f"- {s['name']}: {t['outcome']} {t['name']}: {t['message'].splitlines()[0][:300] if t['message'] else ''}")
    steps = {s["name"]: s for s in report["steps"]}
    tables = [(n, steps[n]["details"]) for n in ("bench", "bench-compile") if steps[n]["details"].get("runs")]
    if tables:
        settings = tables[0][1]["settings"]
        lines += ["", f"## Benchmark: {settings['model']}, {settings['image_size']} px, batch {settings['batch_size']}, "
                      f"precision {settings['mixed_precision']}, {settings['steps']} steps timed (2nd epoch), {settings['count']} "
                      f"JPEGs around {'x'.join(map(str, settings['size']))}, loader workers {settings['workers']}, "
                      f"on {tables[0][1]['device']}",
                  "", "| runner | compile | img/s | step ms | data wait | MFU |", "|---|---|---:|---:|---:|---:|"]
        for name, figures in tables:
            mfu = figures.get("mfu", {})
            for r in figures.get("rows", []):
                lines.append(f"| {r['runner']} | {'yes' if name == 'bench-compile' else 'no'} | {r['images_per_sec']:.0f} "
                             f"| {r['step_ms']:.1f} | {r['data_wait']:.0%} | "
                             + (f"{mfu[r['runner']]:.1%}" if r["runner"] in mfu else "") + " |")
            for f in figures.get("failed", []):
                lines.append(f"| {f['runner']} | {'yes' if name == 'bench-compile' else 'no'} | {f['error']} | | | |")
    if report.get("goals"):
        lines += ["", "Goals (speed issue):"]
        for g in report["goals"]:
            value = f"{g['value']:.0f}" if g["value"] > 10 else f"{g['value']:.3f}"
            lines.append(f"- {g['what']}: {value} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    if with_logs:
        failed = [s for s in report["steps"] if s["status"] in ("failed", "timeout") and s["log_tail"]]
        for s in failed:
            lines += ["", f"## {s['name']}: {s['status']}", "```", s["log_tail"].strip()[-TAIL_CHARS * 2:], "```"]
    return "\n".join(lines) + "\n"
