"""``gpu_check.md``: the GPU check's sections as Markdown (status first, then each section's numbers)."""

from __future__ import annotations

from atspeed.bench.cost_model import cost_table
from atspeed.bench.report import table
from atspeed.tables import markdown_table

SECTIONS = ("gpu_tests", "smoke_bf16", "decode", "forward_costs", "memory")


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def status_table(report: dict) -> str:
    rows = []
    for name in SECTIONS:
        s = report["sections"].get(name)
        if s is None:
            rows.append([name, "not run", "-", "-", ""])
            continue
        note = (s.get("error") or s.get("reason") or "-").splitlines()[0][:160]
        rows.append([name, s["status"], f"{s['seconds']:.1f}", _gib(s.get("peak_memory_bytes")), note])
    return markdown_table(["section", "status", "seconds", "peak GiB", "note"], rows)


def _section_body(name: str, s: dict) -> list[str]:
    out = []
    if name == "gpu_tests" and "output_tail" in s:
        out += [f"`{s['command']}`: {s.get('counts')}", "```", s["output_tail"][-1500:].strip(), "```"]
    if name in ("smoke_bf16", "decode") and s.get("rows"):
        if name == "decode":
            out.append(f"models: `{ {k: v for k, v in s['models'].items() if k != 'prompt_tokens'} }`")
        out += ["```", table(s["rows"]), "```"]
    if s.get("skipped_for_time"):
        out.append(f"not run (time budget): {s['skipped_for_time']}")
    if name == "forward_costs" and s.get("ms"):
        out += [f"ms per forward after a {s['prompt_tokens']}-token prompt (batch 1):", "", cost_table(s["ms"])]
    if name == "memory" and "peak_bytes" in s:
        out.append(f"peak allocated {s['peak_gib']:.2f} GiB of {s['total_gib']:.1f} GiB")
    if s.get("traceback"):
        out += ["```", s["traceback"][-2000:].strip(), "```"]
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    where = m["device_name"] or f"{m['device']} ({m['cpu']})"
    lines = [f"# GPU check{' (--tiny)' if report['tiny'] else ''}: {where}", "",
             f"{report['date']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"{report.get('total_seconds', 0):.0f} s", "", status_table(report)]  # fmt: skip
    for name in SECTIONS:
        if name in report["sections"]:
            body = _section_body(name, report["sections"][name])
            if body:
                lines += ["", f"## {name}", "", *body]
    return "\n".join(lines) + "\n"
