"""The Markdown report of bench_gateway.py: throughput and ratios to the model alone and the baseline, latencies, the
p50 gap to the model alone, CPU per image by role and the stack's CPU over the model."""

from __future__ import annotations

import os

import numpy as np


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["rps"]:
        return "—"
    return f"{a['rps'] / b['rps']:.2f}x"


def _rps(r: dict | None) -> str:
    return "—" if r is None else f"{r['rps']:.1f}"


def _lat(r: dict | None) -> str:
    return "—" if r is None else f"{r['p50']:.0f} / {r['p99']:.0f}"


def _gap(r: dict | None, model: dict) -> str:
    """How much later than the model alone the median answer comes (ms): the p50 goal's measure."""
    return "—" if r is None else f"{r['p50'] - model['p50']:+.0f}"


def _cpu(c: dict | None, role: str) -> str:
    return "—" if not c or c.get(role) is None or np.isnan(c[role]) else f"{c[role]:.1f}"


def _overhead(c: dict | None, role: str, model: dict) -> str:
    """CPU per image the serving stack spends beyond the model itself: the front door plus Triton (whichever of the
    two runs the model) minus the model-alone line's CPU per image in the same run."""
    if not c or c.get(role) is None or np.isnan(c[role]) or "cpu_ms" not in model:
        return "—"
    return f"{c[role] + (c.get('triton') or 0.0) + (c.get('nginx') or 0.0) - model['cpu_ms']:.1f}"


def _triton_table(rows: list[dict]) -> list[str]:
    """The Triton-direct line: serving with no front door, the floor under any front end on this host, and how much
    of each door's CPU per image is the door itself (front door + nginx) against Triton's."""
    if not any(r.get("triton") for r in rows):
        return []
    lines = ["", "Triton direct: Triton's own gRPC inference fed preprocessed tensors, one image a call (no front door, "
             "no decoding, no answer): the floor under any front end on this host.", "",
             "| concurrency | Triton direct img/s | Triton / model | HTTP / Triton | gRPC / Triton "
             "| p50 over the model alone, ms | CPU ms/img: Triton | Triton over the model | load generator "
             "| front door + nginx CPU ms/img (HTTP / gRPC) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t, cpu = r.get("triton"), r.get("triton_cpu") or {}
        if not t:
            continue
        over = (f"{cpu['triton'] - r['model']['cpu_ms']:.1f}"
                if cpu.get("triton") is not None and "cpu_ms" in r["model"] else "—")
        door = " / ".join(_door(r.get(f"{k}_cpu"), role) for k, role in (("http", "gateway"), ("grpc", "grpc")))
        lines.append(f"| {r['c']} | {t['rps']:.1f} | {_ratio(t, r['model'])} | {_ratio(r.get('http'), t)} "
                     f"| {_ratio(r.get('grpc'), t)} | {_gap(t, r['model'])} | {_cpu(cpu, 'triton')} | {over} "
                     f"| {_cpu(cpu, 'client')} | {door} |")
    return lines


def _door(c: dict | None, role: str) -> str:
    if not c or c.get(role) is None or np.isnan(c[role]):
        return "—"
    return f"{c[role] + (c.get('nginx') or 0.0):.1f}"


def report(rows: list[dict], args, model_label: str, images: int) -> str:
    per_cell = f"{args.seconds:g} s per cell" + (f" in {args.rounds} alternating rounds" if args.rounds > 1 else "")
    lines = [f"/analyze, {images} real images, {per_cell}, {os.cpu_count()} CPUs, model {model_label}, "
             f"heatmap {'asked' if args.heatmap else 'not asked'}, mask {args.mask_format}, "
             f"layout {args.layout if not args.gateway else 'of the running server'}, "
             + ("HTTP and gRPC through nginx (its CPU counted with the stack's), " if getattr(args, "nginx", False)
                else "")
             + ("HTTP: BentoML's own I/O descriptors (bench_bento_io.py), " if getattr(args, "bento_io", False)
                else "")
             + 
             f"backend {args.backend if not args.gateway else 'of the running server'}"
             + (" (the model runs in the front doors: their CPU includes it)" if args.backend == "onnxruntime"
                else ""), ""]
    lines += ["| concurrency | model alone img/s (batch) | HTTP img/s | gRPC img/s | baseline img/s "
              "| HTTP / model | gRPC / model | HTTP / baseline | gRPC / baseline |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["model"]
        lines.append(f"| {r['c']} | {m['rps']:.1f} ({m['batch']}) | {_rps(r['http'])} | {_rps(r['grpc'])} "
                     f"| {_rps(r['base'])} | {_ratio(r['http'], m)} | {_ratio(r['grpc'], m)} "
                     f"| {_ratio(r['http'], r['base'])} | {_ratio(r['grpc'], r['base'])} |")
    lines += ["", "| concurrency | p50 / p99 ms: model alone (per batch) | HTTP | gRPC | baseline "
              "| p50 over the model alone, ms (HTTP / gRPC) "
              "| CPU ms/img: model alone | HTTP cell: gateway / Triton | gRPC cell: gRPC server / Triton "
              "| stack over the model (HTTP / gRPC) | baseline | load generator (HTTP / gRPC) "
              "| failures (HTTP/gRPC/base) |",
              "|---:|---|---|---|---|---|---:|---|---|---|---:|---|---|"]
    for r in rows:
        fails = "/".join("—" if r[k] is None else str(r[k]["failures"]) for k in ("http", "grpc", "base"))
        lines.append(f"| {r['c']} | {_lat(r['model'])} | {_lat(r['http'])} | {_lat(r['grpc'])} | {_lat(r['base'])} "
                     f"| {_gap(r['http'], r['model'])} / {_gap(r['grpc'], r['model'])} "
                     f"| {r['model'].get('cpu_ms', float('nan')):.1f} "
                     f"| {_cpu(r['http_cpu'], 'gateway')} / {_cpu(r['http_cpu'], 'triton')} "
                     f"| {_cpu(r['grpc_cpu'], 'grpc')} / {_cpu(r['grpc_cpu'], 'triton')} "
                     f"| {_overhead(r['http_cpu'], 'gateway', r['model'])} "
                     f"/ {_overhead(r['grpc_cpu'], 'grpc', r['model'])} "
                     f"| {_cpu(r['base_cpu'], 'gateway')} "
                     f"| {_cpu(r['http_cpu'], 'client')} / {_cpu(r['grpc_cpu'], 'client')} | {fails} |")
    return "\n".join(lines + _triton_table(rows))
