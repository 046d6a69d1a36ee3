"""`orthrus train`: distil the frozen AR view into its twins (the diffusion view).

Recipe (the paper's; docs/TRAINING.md): random anchors per packed window, blocks `[anchor, MASK x (K-1)]` reading the
AR prefix before the anchor, one denoising step, forward KL to the AR's teacher-forced distributions,
AdamW with warm-up and cosine decay, gradient clipping. Only the twins (or their low-rank deltas)
train. Batches are a pure function of (seed, step), so a resumed run continues exactly.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.training.data import load_stream, sample_batch
from orthrus_engines.training.dense import distillation_loss
from orthrus_engines.models.heads import read_head_metadata
from orthrus_engines.models.loader import ANCHOR_VIEWS
from orthrus_engines.training.twins import (
    load_lowrank_factors,
    load_trainable_state,
    lowrank_factors,
    make_trainable,
    trainable_state,
)

CHECKPOINT = "checkpoint.pt"
HEAD = "head.safetensors"
LOG = "train_log.jsonl"
HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainArgs:
    out: str  # run directory: checkpoint, head, log
    data: list[str] = field(default_factory=list)  # *.jsonl samples, text/code files or folders
    model: str | None = None  # base or Orthrus checkpoint; None = the built-in model
    head: str | None = None  # an existing head to continue from
    block_size: int = 8
    anchors: int = 32  # blocks per window
    seq_len: int = 256
    batch_size: int = 1  # windows per step
    lr: float = 1e-3
    steps: int = 1000
    warmup: float = 0.05  # fraction of steps
    clip: float = 1.0
    weight_decay: float = 0.0
    rank: int = 64  # low-rank deltas; 0 = full-rank twins
    head_dtype: str = "float32"  # dtype of the saved low-rank factors ("bfloat16" halves the head)
    slot_decay: float = 1.0  # loss weight of draft slot j is slot_decay**j (1 = uniform)
    anchor_view: str | None = None  # "diffusion" (twins), "ar" or "causal" (loader.ANCHOR_VIEWS); None = the run's
    # or the head's, and "causal" for a fresh head
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    max_minutes: float | None = None  # stop (and save) after this much wall time
    max_text_tokens: int | None = 2_000_000  # cap on tokens read from text/code sources
    device: str | None = None
    progress: bool = True

    def validate(self) -> None:
        for name in ("block_size", "anchors", "seq_len", "batch_size", "steps"):
            if getattr(self, name) < (2 if name == "block_size" else 1):
                raise OrthrusInputError(name, f"must be >= {2 if name == 'block_size' else 1}, got {getattr(self, name)}")
        if self.block_size > self.seq_len:
            raise OrthrusInputError("block_size", f"{self.block_size} is longer than seq_len {self.seq_len}")
        if self.lr <= 0:
            raise OrthrusInputError("lr", f"must be > 0, got {self.lr}")
        if not 0 < self.slot_decay <= 1:
            raise OrthrusInputError("slot_decay", f"must be in (0, 1], got {self.slot_decay}")
        if not 0 <= self.warmup < 1:
            raise OrthrusInputError("warmup", f"must be in [0, 1), got {self.warmup}")
        if not self.data:
            raise OrthrusInputError("data", "give at least one data source (--data)")
        if self.anchor_view is not None and self.anchor_view not in ANCHOR_VIEWS:
            raise OrthrusInputError("anchor_view", f"must be one of {list(ANCHOR_VIEWS)}, got {self.anchor_view!r}")
        if self.head_dtype not in HEAD_DTYPES:
            raise OrthrusInputError("head_dtype", f"must be one of {sorted(HEAD_DTYPES)}, got {self.head_dtype!r}")
        if self.head_dtype != "float32" and self.rank <= 0:
            raise OrthrusInputError("head_dtype", "applies to low-rank factors only (--rank > 0)")


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup * total` steps, then cosine decay to 10% at `total`."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    t = min(1.0, (step - w) / max(1, total - w))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def load_for_training(args: TrainArgs, head: str | None):
    """(model, tokenizer, source): the model in fp32 on the device, twins initialised."""
    from orthrus_engines.config import EngineArgs
    from orthrus_engines.inputs import load_tokenizer
    from orthrus_engines.models.loader import build_model, model_dir, resolve_model

    path = model_dir(args.model)
    tokenizer = load_tokenizer(path)
    src = resolve_model(path, head, tokenizer)
    device = EngineArgs(device=args.device).resolve_device()
    model = build_model(src, torch.float32, device, args.seq_len + args.block_size)
    return model, tokenizer, src


class Trainer:
    def __init__(self, args: TrainArgs):
        args.validate()
        self.args = args
        self.out = Path(args.out).expanduser()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        head_rank = int(read_head_metadata(Path(args.head)).get("rank", 0)) if args.head else 0
        if head_rank and head_rank > args.rank:
            raise OrthrusInputError("rank", f"the head {args.head} has rank {head_rank}; continue it with "
                                            f"--rank {head_rank} or more")
        # A low-rank head continues as factors on the base; a full one is loaded as the twins' start.
        self.model, self.tokenizer, self.src = load_for_training(args, None if head_rank else args.head)
        if args.anchor_view is None:  # continue as the run, or the head, was trained; an explicit value may switch
            args.anchor_view = self._inherited_anchor_view(head_rank)
        self.device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else 0
        self.stream = load_stream(args.data, self.tokenizer, eos, args.max_text_tokens)
        self.lowrank = args.rank > 0
        if self.lowrank and (self.src.has_twins or (args.head and not head_rank)):
            raise OrthrusInputError("rank", "low-rank deltas start from twins equal to the AR view; use --rank 0 "
                                            "to continue a checkpoint or head with full-rank twins")
        self.params = make_trainable(self.model, args.rank, args.seed)
        if head_rank:
            from safetensors.torch import load_file

            load_lowrank_factors(self.model, load_file(args.head, device=str(self.device)))
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.args.steps, self.args.warmup))
        self.step = 0
        self.blocks_seen = 0
        self.train_seconds = 0.0
        if (self.out / CHECKPOINT).exists():
            self._resume()

    def _inherited_anchor_view(self, head_rank: int) -> str:
        if (self.out / CHECKPOINT).exists():
            ck = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=False)
            return ck["args"].get("anchor_view") or "diffusion"  # runs from before the option: diffusion
        if head_rank:  # a low-rank head is not part of self.src
            return read_head_metadata(Path(self.args.head)).get("anchor_view", "diffusion")
        if self.src.has_twins or self.src.head_path is not None:  # trained twins continue in their view
            return self.src.anchor_view
        return "causal"  # a fresh head: the first draft is the AR's own prediction (docs/TRAINING.md)

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        ck = torch.load(self.out / CHECKPOINT, map_location=self.device, weights_only=False)
        saved = {**ck["args"], "anchor_view": ck["args"].get("anchor_view") or "diffusion"}
        for name in ("rank", "block_size", "anchor_view"):
            if saved[name] != getattr(self.args, name):
                raise OrthrusInputError(name, f"{self.out} holds a run with {name}={saved[name]!r}; this run "
                                              f"asks for {getattr(self.args, name)!r}")
        load_trainable_state(self.model, ck["trainable"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step, self.blocks_seen, self.train_seconds = ck["step"], ck["blocks_seen"], ck["train_seconds"]

    def save(self) -> None:
        ck = {"args": asdict(self.args), "step": self.step, "blocks_seen": self.blocks_seen,
              "train_seconds": self.train_seconds, "trainable": trainable_state(self.model),
              "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(ck, tmp)
        os.replace(tmp, self.out / CHECKPOINT)
        self.save_head(self.out / HEAD)

    def save_head(self, path: Path) -> None:
        from orthrus_engines.models.heads import save_head

        extra = {"rank": self.args.rank, "steps": self.step, "blocks_seen": self.blocks_seen,
                 "train_seconds": round(self.train_seconds, 1), "seq_len": self.args.seq_len,
                 "anchor_view": self.args.anchor_view}
        tensors = lowrank_factors(self.model, HEAD_DTYPES[self.args.head_dtype]) if self.lowrank else None  # None: full twins
        save_head(self.model, path, self.args.block_size, self.src.mask_token_id, tensors=tensors, extra=extra)

    # -- the loop ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        a = self.args
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        ids, anchors, trainable = sample_batch(self.stream, a.batch_size, a.seq_len, a.anchors, a.block_size, g)
        ids, anchors, trainable = ids.to(self.device), anchors.to(self.device), trainable.to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            loss, stats = distillation_loss(self.model, ids, anchors, a.block_size, self.src.mask_token_id, trainable,
                                            a.slot_decay, a.anchor_view)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, a.clip)
        self.opt.step()
        self.sched.step()
        return {"loss": loss.item(), "grad_norm": float(grad_norm), **stats}

    def run(self) -> dict:
        from tqdm import tqdm

        a = self.args
        start = time.perf_counter()
        last = None
        bar = tqdm(total=a.steps, initial=self.step, disable=not a.progress, unit="step", dynamic_ncols=True)
        with open(self.out / LOG, "a") as log:
            while self.step < a.steps:
                t0 = time.perf_counter()
                last = self.train_step(self.step)
                dt = time.perf_counter() - t0
                self.step += 1
                self.blocks_seen += a.batch_size * a.anchors
                self.train_seconds += dt
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", blocks_s=f"{a.batch_size * a.anchors / dt:.1f}",
                                agree1=f"{last['agree_by_slot'][0]:.2f}")
                if self.step % a.log_every == 0 or self.step == a.steps:
                    log.write(json.dumps({"step": self.step, "blocks": self.blocks_seen, "lr": self.sched.get_last_lr()[0],
                                          "seconds": round(self.train_seconds, 1), **last}) + "\n")
                    log.flush()
                if self.step % a.save_every == 0:
                    self.save()
                if a.max_minutes is not None and time.perf_counter() - start > a.max_minutes * 60:
                    break
        bar.close()
        self.save()
        return {"step": self.step, "blocks_seen": self.blocks_seen, "train_seconds": self.train_seconds,
                "last": last, "head": str(self.out / HEAD)}
