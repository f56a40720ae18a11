"""Human-readable reports of a compiled artifact's manifest."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

__all__ = ["format_report", "format_table", "bit_assignment", "plot_bits"]


def format_table(rows: Sequence[Mapping], columns: Iterable[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given column order."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e3 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in cols]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if num else v.ljust(w)
                      for v, w, num in zip(row, widths, numeric)) for row in cells]
    return "\n".join([line, sep, *body])


def format_report(manifest: Mapping) -> str:
    m = manifest
    out = [f"model    {m['model']['name']} ({m['model']['kind']}, "
           f"{m['model'].get('architecture') or 'nn.Module'})",
           f"recipe   {m['recipe']['name']}: {m['recipe'].get('description', '')}",
           f"backend  {m['backend']} {m.get('backend_options') or ''}", ""]
    figs = m.get("figures", {})
    if figs:
        out += ["figures", *(f"  {k:<34} {v}" for k, v in figs.items()), ""]
    rows = []
    for p in m.get("passes", []):
        ver = p.get("verification") or {}
        check = (f"max rel err {ver['max_rel_error']:.1e}" if "max_rel_error" in ver else
                 f"out SQNR {ver['output_sqnr_db']:.1f} dB" if "output_sqnr_db" in ver else "")
        rows.append({"pass": p["name"], "plugin": p["plugin"], "numerics": p["numerics"],
                     "seconds": p["seconds"], "transformed": p["transformed"],
                     "skipped": len(p["skipped"]), "check": check})
    out += ["passes", format_table(rows), ""]
    skipped = [(p["name"], s) for p in m.get("passes", []) for s in p["skipped"]]
    if skipped:
        out += ["skipped (with reasons)",
                *(f"  {name}: {s['target']}: {s['reason']}" for name, s in skipped), ""]
    layers = m.get("layers", {})
    if layers:
        kinds = Counter(f"W{v['bits']}A{v['act_bits'] or 16} g{v['group_size']} "
                        f"{'sym' if v['symmetric'] else 'asym'}"
                        + ("" if v.get("act_symmetric", True) or not v["act_bits"]
                           else ", activations asym")
                        for v in layers.values())
        out += ["layers", *(f"  {n:>4} x {k}" for k, n in sorted(kinds.items()))]
    assigned = bit_assignment(m)
    if assigned:
        metrics = next(p["metrics"] for p in m["passes"] if p["name"] == "mixed")
        out += ["", f"bits per layer (mixed: {metrics['bits_per_weight']} bits/weight, "
                    f"{metrics['packed_bytes']:,} of {metrics['budget_bytes']:,} budget bytes)",
                *(f"  {name:<40} {fmt}" for name, fmt in assigned.items())]
    return "\n".join(out)


def bit_assignment(manifest: Mapping) -> dict[str, str]:
    """Layer -> ``"<bits>g<group>"`` chosen by a ``mixed`` pass, if one ran."""
    for p in manifest.get("passes", []):
        if p["name"] == "mixed":
            return dict(p["metrics"].get("bits", {}))
    return {}


def plot_bits(manifest: Mapping, path) -> bool:
    """Bar chart of bits per layer with the Hessian trace on a second axis (PNG)."""
    assigned = bit_assignment(manifest)
    if not assigned:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = next(p["metrics"] for p in manifest["passes"] if p["name"] == "mixed")
    names = list(assigned)
    bits = [int(assigned[n].split("g")[0]) for n in names]
    traces = [metrics.get("hessian_trace", {}).get(n, 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.08), 4))
    ax.bar(range(len(names)), bits, color="tab:blue", width=0.9)
    ax.set_ylabel("bits")
    ax.set_xlabel("layer (graph order)")
    ax.set_title(f"{manifest['model']['name'].split('/')[-1]}: "
                 f"{metrics['bits_per_weight']} bits/weight")
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), traces, color="tab:red", lw=0.8)
    ax2.set_yscale("symlog")
    ax2.set_ylabel("Hessian trace", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
