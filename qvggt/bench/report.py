"""Markdown tables of a ``qvggt bench`` JSON document (pure formatting, no measurement)."""

from __future__ import annotations

__all__ = ["graph_mode", "render_markdown"]


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def graph_mode(graphs: dict | None) -> str:
    """How a measurement launched its kernels: "graph" (replays, no eager call), "eager" (any eager call: see the
    fallback reasons), or "-" (no engine, or nothing ran)."""
    if not graphs:
        return "-"
    if graphs.get("eager"):
        return "eager"
    return "graph" if graphs.get("replays") else "-"


def _graph_cell(graphs: dict | None) -> str:
    """The CUDA-graph column: ``graph_mode`` with its counts (eager: see the fallback notes under the table)."""
    mode = graph_mode(graphs)
    if mode == "eager":
        return f"eager ({graphs['eager']} calls)"  # type: ignore[index]
    if mode == "graph":
        return f"graph ({graphs.get('captures', 0)} captured, {graphs['replays']} replays)"  # type: ignore[union-attr,index]
    return mode


def _model_table(doc: dict) -> list[str]:
    models = doc.get("models") or []
    if not models:
        return []
    base = {(r["frames"]): r for r in models if r["config"] == "published" and r.get("median_ms")}
    # Rows are measured in priority order (qvggt.bench.run); shown config by config, frames ascending.
    first_seen: dict[str, int] = {}
    for r in models:
        first_seen.setdefault(r["config"], len(first_seen))
    rows = sorted(models, key=lambda r: (first_seen[r["config"]], r["frames"]))
    lines = [
        (
            "| config | frames | median ms | frames/s | speedup vs published | peak GB | peak vs published | weights GB "
            "| rel L2 depth | rel L2 points | rel L2 pose | CUDA graphs |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fallbacks: dict[str, dict[str, str]] = {}
    for r in rows:
        graphs = r.get("graphs")
        if graphs and graphs.get("fallbacks"):
            fallbacks.setdefault(r["config"], {}).update(graphs["fallbacks"])
        if r.get("error"):
            lines.append(
                f"| {r['config']} | {r['frames']} | failed: {r['error'][:80]} | | | | | | | | | {_graph_cell(graphs)} |"
            )
            continue
        b = base.get(r["frames"])
        speed = b["median_ms"] / r["median_ms"] if b else None
        mem = r["peak_gb"] / b["peak_gb"] if b and b.get("peak_gb") and r.get("peak_gb") else None
        fid = r.get("fidelity") or {}
        speed_cell = "-" if speed is None else f"{speed:.2f}x"
        lines.append(
            f"| {r['config']} | {r['frames']} | {_f(r['median_ms'])} | {_f(r['frames_per_s'])} | "
            f"{speed_cell} | {_f(r.get('peak_gb'), '.2f')} | {_f(mem, '.2f')} | {_f(r.get('weight_gb'), '.2f')} "
            f"| {_f(fid.get('rel_l2_depth'), '.2e')} | {_f(fid.get('rel_l2_world_points'), '.2e')} "
            f"| {_f(fid.get('rel_l2_pose_enc'), '.2e')} | {_graph_cell(graphs)} |"
        )
    if fallbacks:
        lines += ["", "CUDA graphs not used (the engine ran these input shapes eagerly):", ""]
        for config, reasons in fallbacks.items():
            for key, reason in reasons.items():
                lines.append(f"- {config}, inputs {key}: {reason[:300]}")
    return lines


def _gemm_table(doc: dict) -> list[str]:
    rows = doc.get("gemm") or []
    if not rows:
        return []
    peak = (doc.get("ceilings") or {}).get("bf16_tflops")
    lines = [
        "| shape (M x K -> N) | variant | ms | TFLOP/s | % of measured bf16 peak | speedup vs torch bf16+epilogue |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r['shape']} {r['M']}x{r['K']}->{r['N']}"
        if r.get("error"):
            lines.append(f"| {shape} | {r['variant']} | failed: {r['error'][:80]} | | | |")
            continue
        pct = 100 * r["tflops"] / peak if peak else None
        lines.append(
            f"| {shape} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {_f(pct, '.0f')} "
            f"| {_f(r.get('speedup_vs_torch_bf16'), '.2f')} |"
        )
    return lines


def _retention_table(ret: dict) -> list[str]:
    metrics = list(next(iter(ret["metrics"].values())))
    lines = [
        (
            f"## Accuracy retention on {ret['checkpoint']} ({ret['scenes']} held-out synthetic scenes, "
            f"{ret['frames']} frames; reference fp32)"
        ),
        "",
        "| config | " + " | ".join(metrics) + " | pose AUC@30 retention (paired 95% CI of the difference) |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for name, values in ret["metrics"].items():
        cmp = ret["vs_fp32"].get(name, {}).get("pose_auc@30", {})
        rtn = _f(cmp.get("retention"), ".1f") + "%" if cmp.get("retention") is not None else "-"
        if "low" in cmp:
            rtn += f" ({cmp['low']:+.2f}..{cmp['high']:+.2f})"
        cells = " | ".join(_f(values.get(k), ".4g") for k in metrics)
        lines.append(f"| {name} | {cells} | {rtn} |")
    return lines


def render_markdown(doc: dict) -> str:
    """The benchmark document as markdown: environment, ceilings, kernel tables, model table."""
    env = doc.get("env", {})
    out = [
        f"# qvggt bench: {doc.get('preset')} at {doc.get('height')}x{doc.get('width')}",
        "",
        (
            f"- date: {doc.get('date')}; device: {env.get('gpu', env.get('device'))}; torch {env.get('torch')}; "
            f"triton {env.get('triton', '-')}"
        ),
        f"- command: `{doc.get('command', '')}`",
    ]
    if doc.get("notice"):
        out.append(f"- **{doc['notice']}**")
    if doc.get("ceilings"):
        c = doc["ceilings"]
        out.append(f"- measured ceilings: bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    for title, lines in (("Models", _model_table(doc)), ("GEMMs", _gemm_table(doc))):
        if lines:
            out += ["", f"## {title}", "", *lines]
    if doc.get("fidelity_error"):
        out += ["", f"Fidelity not measured (the fp32 reference failed): {doc['fidelity_error']}"]
    if doc.get("kernel_error"):
        out += ["", f"Kernel section failed: {doc['kernel_error']}"]
    if doc.get("retention"):
        out += ["", *_retention_table(doc["retention"])]
    if doc.get("retention_error"):
        out += ["", f"Accuracy retention section not measured: {doc['retention_error']}"]
    if doc.get("layernorm"):
        bw = (doc.get("ceilings") or {}).get("copy_gbps")
        out += ["", "## LayerNorm -> quantization", "", "| kernel | M x K | ms | GB/s | % of copy bandwidth |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in doc["layernorm"]:
            if "error" in r:  # a variant that failed on the GPU: say so in the row
                out.append(f"| {r['kernel']} | {r['M']}x{r['K']} | failed: {r['error'][:80]} | - | - |")
                continue
            pct = 100 * r["gbps"] / bw if bw else None
            out.append(f"| {r['kernel']} | {r['M']}x{r['K']} | {r['ms']:.3f} | {r['gbps']:.0f} | {_f(pct, '.0f')} |")
    if doc.get("attention"):
        out += ["", "## Attention", "", "```", *[str(r) for r in doc["attention"]], "```"]
    if doc.get("attention_error"):
        out += ["", f"Attention kernel section not run: {doc['attention_error']}"]
    return "\n".join(out) + "\n"
