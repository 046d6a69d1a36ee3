"""Accepted drafts per cycle, seeded (coupled draws) against unseeded (rejection sampling), on the
built-in model with its shipped head: 16 held-out chat prompts x 64 tokens at T = 0.7.

  PYTHONPATH=kernels:engines:. .venv/bin/python scripts/seeded_acceptance.py
"""

import json

from orthrus_engines import LLM
from orthrus_engines.training.data import packaged_prompts, read_prompts
from orthrus_engines.training.evaluate import evaluate

CONFIGS = [("fused", 3, True), ("two-pass", 4, False), ("two-pass", 8, False)]

prompts = read_prompts(packaged_prompts("prompts_eval.txt"))[:16]
for cycle, k, fused in CONFIGS:
    llm = LLM(block_size=k, fused_cycle=fused)
    for seeded in (True, False):
        r = evaluate(llm, prompts, max_tokens=64, temperature=0.7, seed=0, seeded=seeded)
        print(json.dumps({"cycle": cycle, "K": k, "sampling": r["sampling"], "cycles": r["cycles"],
                          "accepted_per_cycle": round(r["accepted_per_cycle"], 3), "tpf": round(r["tpf"], 3)}))
