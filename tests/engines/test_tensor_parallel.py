"""Tensor parallelism: the model split over 2 ranks (gloo, CPU) computes the same logits as 1 rank.

Column-parallel QKV / gate-up, row-parallel o / down with all-reduce, vocab-parallel embedding and
LM head: each rank loads only its slice of the full checkpoint tensors.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from support.net import free_port
from support.tiny_models import write_orthrus


# The kinds of pass: AR, diffusion, diffusion whose anchor rows use the AR projections, and verify+draft
# (3 AR rows written, then a transient block of 2 diffusion rows after each).
MODES = {"ar": (False, None), "diffusion": (True, None), "anchor_ar": (True, [0, 5]), "verify_draft": (True, [0, 1, 2])}


def _forward(model_dir: Path, mode: str) -> torch.Tensor:
    from orthrus_kernels import PassKind, build_attention_metadata, build_verify_draft_metadata

    from orthrus_engines.models.loader import build_model, model_dir as resolve_dir, resolve_model

    src = resolve_model(resolve_dir(str(model_dir)))
    model = build_model(src, torch.float32, torch.device("cpu"), 256)
    attn = model.layers[0].self_attn
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    assert attn.num_heads == src.shape.num_heads // world  # really split
    kv = [(torch.zeros(64, attn.num_kv_heads, attn.head_dim), torch.zeros(64, attn.num_kv_heads, attn.head_dim))
          for _ in model.layers]
    diffusion, ar_rows = MODES[mode]
    ids = torch.arange(3, 3 + 20) % src.shape.vocab_size
    # prefill 12 tokens, then a block of 8 through the chosen view on top of the cached prefix
    meta = build_attention_metadata(PassKind.CAUSAL, [12], [0], [[0, 1, 2, 3]], 16, torch.device("cpu"))
    model(ids[:12], torch.arange(12), meta, kv, diffusion=False)
    new, positions = ids[12:], torch.arange(12, 20)
    kind = PassKind.BLOCK if diffusion else PassKind.CAUSAL
    meta = build_attention_metadata(kind, [8], [12], [[0, 1, 2, 3]], 16, torch.device("cpu"))
    if mode == "verify_draft":  # 9 rows: [anchor, 2 drafts], then 3 blocks of 2
        new, positions = torch.cat([ids[12:15], ids[14:20]]), torch.tensor([12, 13, 14, 13, 14, 14, 15, 15, 16])
        meta = build_verify_draft_metadata([3], [2], [12], [[0, 1, 2, 3]], 16, torch.device("cpu"))
    with torch.no_grad():
        rows = torch.tensor(ar_rows) if ar_rows is not None else None
        return model.logits(model(new, positions, meta, kv, diffusion=diffusion, ar_rows=rows))


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mode in MODES:
        torch.save(_forward(Path(model_dir), mode), f"{out_dir}/rank{rank}_{mode}.pt")
    dist.barrier()  # both ranks done before gloo tears down (its threads can abort a racing exit)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_ranks_match_one(tmp_path, family):
    model_dir = write_orthrus(tmp_path / "m", family, vocab_size=96)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(model_dir), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    # Judge by the results each rank wrote; exit codes only explain a missing one.
    missing = [f.name for f in (tmp_path / f"rank{r}_{d}.pt" for r in range(2) for d in MODES) if not f.exists()]
    assert not missing, f"ranks did not finish: {missing}, exit codes {[p.exitcode for p in procs]}"
    for mode in MODES:
        single = _forward(model_dir, mode)
        for rank in range(2):
            split = torch.load(tmp_path / f"rank{rank}_{mode}.pt")
            torch.testing.assert_close(split, single, atol=1e-4, rtol=1e-4)
