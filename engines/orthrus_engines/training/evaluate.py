"""`orthrus eval`: how well a head drafts, on held-out chat prompts.

Reports TPF (generated tokens / all forward passes: prefill, draft and verify), mean accepted drafts
per cycle (one cycle = a draft pass and a verify pass, or one verify+draft pass with a causal-anchor
head, where draft position 1 is the AR's own next token), and the acceptance rate by draft position
(the fraction of cycles whose draft at position i was accepted, i.e. positions 1..i all were), as
JSON and as a PNG plot.
"""

import json
import time
from pathlib import Path

from orthrus_engines.training.data import packaged_prompts, read_prompts


def evaluate(llm, prompts: list[str] | list[list[int]], max_tokens: int = 256, temperature: float = 0.0,
             seed: int = 0, seeded: bool = False) -> dict:
    """Chat prompts (strings, templated) or raw token-id prompts. At temperature > 0, requests are
    unseeded (speculative rejection sampling; `seed` seeds torch's global generator, from which their
    generators are seeded) unless `seeded` (request seeds seed + i: the coupled seeded path)."""
    import torch

    from orthrus_engines.sampling_params import SamplingParams

    eng = llm.core
    ids = [p if isinstance(p, list) else llm.core.inputs.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    if not seeded:
        torch.manual_seed(seed)
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i if seeded else None)
              for i in range(len(ids))]
    stats = eng.fused_acceptance if eng.fused else eng.acceptance  # a fixed K runs the fused cycle where it can
    c0, d0, a0 = stats.snapshot()
    start = time.perf_counter()
    outs = llm.generate(ids, params)
    seconds = time.perf_counter() - start
    c1, d1, a1 = stats.snapshot()
    tokens = sum(o.completion_tokens for o in outs)
    passes = sum(o.forward_passes for o in outs)
    cycles = c1 - c0
    pad = lambda xs: xs + [0] * (len(d1) - len(xs))  # noqa: E731
    drafted_by_pos = [x - y for x, y in zip(d1, pad(d0))]
    accepted_by_pos = [x - y for x, y in zip(a1, pad(a0))]
    accepted = sum(accepted_by_pos)
    return {
        "prompts": len(prompts),
        "block_size": eng.block_size,
        "cycle": "verify+draft" if eng.fused else "draft, verify",
        "temperature": temperature,
        "sampling": "greedy" if temperature == 0 else "seeded (coupled)" if seeded else "rejection",
        "max_tokens": max_tokens,
        "output_tokens": tokens,
        "forward_passes": passes,
        "tpf": tokens / max(passes, 1),
        "cycles": cycles,
        "accepted_per_cycle": accepted / max(cycles, 1),
        "acceptance_by_position": [a / d if d else None for a, d in zip(accepted_by_pos, drafted_by_pos)],
        "seconds": round(seconds, 2),
    }


def plot_acceptance(reports: dict[str, dict], path: str | Path) -> None:
    """One line per report: acceptance rate against draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in reports.items():
        rates = [x for x in r["acceptance_by_position"] if x is not None]
        ax.plot(range(1, len(rates) + 1), rates, marker="o",
                label=f"{label}: TPF {r['tpf']:.2f}, {r['accepted_per_cycle']:.2f} acc/cycle")
    ax.set_xlabel("draft position i")
    ax.set_ylabel("fraction of cycles accepting drafts 1..i")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _default_label(head: str | None) -> str:
    if head is None:
        return "shipped head"
    return "untrained" if head == "none" else Path(head).stem


def run_eval(model: str | None, head: str | None, prompts_file: str | None, out: str | None, plot: str | None,
             temperatures: list[float], max_tokens: int, block_size: int | None, max_num_seqs: int = 32,
             plot_with: list[str] | None = None, label: str | None = None, fused_cycle: bool = True) -> dict:
    """Evaluate one head; `plot_with` adds the lines of earlier reports (JSON files) to the plot."""
    from orthrus_engines import LLM

    prompts = read_prompts(prompts_file or packaged_prompts("prompts_eval.txt"))
    llm = LLM(model=model, head=head, block_size=block_size or llm_block_size(model, head), max_num_seqs=max_num_seqs,
              fused_cycle=fused_cycle)
    reports = {f"T={t:g}": evaluate(llm, prompts, max_tokens, t) for t in temperatures}
    label = label or _default_label(head)
    result = {"model": model or "builtin", "head": head, "label": label,
              "anchor_view": llm.core.source.anchor_view, "reports": reports}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    if plot:
        lines = {f"{label} {t}": r for t, r in reports.items()}
        for other in plot_with or []:
            o = json.loads(Path(other).read_text())
            lines.update({f"{o.get('label', Path(other).stem)} {t}": r for t, r in o["reports"].items()})
        plot_acceptance(lines, plot)
    return result


def llm_block_size(model: str | None, head: str | None) -> int:
    """The head's (or model's) trained K: evaluation drafts the full block every cycle."""
    from orthrus_engines.models.builtin import default_head
    from orthrus_engines.models.loader import model_dir, resolve_model

    return resolve_model(model_dir(model), default_head(model, head)).block_size
