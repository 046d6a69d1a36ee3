"""`orthrus generate`: generate from the command line with the built-in model or a local one."""

import argparse
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orthrus", description="Orthrus engine command line")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt or a file of prompts")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    g.add_argument("--prompt-file", help="a file with one prompt per line")
    g.add_argument("--model", help="local model directory (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--head", help="an Orthrus head file to apply to the model")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--block-size", type=int, help="draft block length K (1 = plain AR)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first passes)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (on CUDA they are on by default)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks to split the model over "
                                                                        "(processes; one GPU each on CUDA)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    d = sub.add_parser("gen-data", help="generate training data: the model's own responses to a prompt file")
    d.add_argument("--prompts", help="one prompt per line (default: the packaged prompts_train.txt)")
    d.add_argument("--out", required=True, help="output .jsonl (prompt and response token ids)")
    d.add_argument("--model", help="local base model directory (default: the built-in model)")
    d.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (needs a temperature > 0)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-num-seqs", type=int, default=64)

    from orthrus_engines.training.trainer import TrainArgs

    t = sub.add_parser("train", help="train the twins (diffusion view) of a base model; the AR view stays frozen")
    defaults = TrainArgs(out="")
    t.add_argument("--out", required=True, help="run directory (checkpoint.pt, head.safetensors, train_log.jsonl); "
                                                "an existing run there resumes")
    t.add_argument("--data", action="append", required=True, help="*.jsonl from gen-data, or a text/code file or "
                                                                  "folder (repeatable)")
    t.add_argument("--model", help="base or Orthrus checkpoint directory (default: the built-in model)")
    t.add_argument("--head", help="continue from this head (full-rank twins: use --rank 0)")
    for name, typ, help_ in (
        ("block_size", int, "K: block length drafted in one pass"),
        ("anchors", int, "blocks per training window"),
        ("seq_len", int, "training window length"),
        ("batch_size", int, "windows per step"),
        ("lr", float, "peak learning rate (AdamW)"),
        ("steps", int, "total optimizer steps"),
        ("warmup", float, "warm-up fraction of the steps"),
        ("clip", float, "gradient-norm clip"),
        ("weight_decay", float, "AdamW weight decay"),
        ("rank", int, "rank of the twins' low-rank deltas; 0 = full-rank twins (a --head of lower rank grows)"),
        ("head_dtype", str, "dtype of the saved low-rank factors: float32 or bfloat16 (half the size)"),
        ("slot_decay", float, "loss weight of draft slot j is slot_decay**j (1 = uniform)"),
        ("anchor_view", str, "how each block's anchor row is computed: diffusion (the twins, the paper's), ar "
                             "(the AR view's projections, so the first draft is almost always the AR's own "
                             "prediction) or causal (exactly as the AR view computes it: the first draft is "
                             "the AR's prediction); default: as the "
                             "run, --head or checkpoint was trained (diffusion if it does not say), causal for "
                             "a fresh head"),
        ("seed", int, "makes a run repeatable"),
        ("save_every", int, "checkpoint every N steps"),
        ("max_minutes", float, "stop and save after this much wall time"),
        ("max_text_tokens", int, "cap on tokens read from text/code sources"),
    ):
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(defaults, name), help=help_)
    t.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="TPF, accepted drafts per cycle and acceptance by position on held-out prompts")
    e.add_argument("--model", help="local model directory (default: the built-in model)")
    e.add_argument("--head", help="head to evaluate (default: the built-in model's shipped head; 'none' = untrained)")
    e.add_argument("--prompts", help="one prompt per line (default: the packaged held-out prompts_eval.txt)")
    e.add_argument("--out", help="write the report here (JSON)")
    e.add_argument("--plot", help="write the acceptance-by-position plot here (PNG)")
    e.add_argument("--temperature", type=float, action="append", help="repeatable (default: 0)")
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--block-size", type=int, help="K to draft (default: the head's)")
    e.add_argument("--two-pass", action="store_true",
                   help="causal-anchor heads: a draft pass and a verify pass per cycle, not one verify+draft pass")
    e.add_argument("--plot-with", action="append", help="also plot this earlier report (JSON; repeatable)")
    e.add_argument("--label", help="this head's name in the report and plot")
    e.add_argument("--record-prior", action="store_true",
                   help="store the first temperature's acceptance by position in the head file: the auto "
                        "policy's starting estimate")
    return p


def gen_data(args) -> int:
    from orthrus_engines import LLM
    from orthrus_engines.training.data import generate_samples, packaged_prompts, read_prompts, write_samples

    prompts = read_prompts(args.prompts or packaged_prompts("prompts_train.txt"))
    llm = LLM(model=args.model, block_size=1, max_num_seqs=args.max_num_seqs)
    start, n, chunk = time.perf_counter(), 0, 2 * args.max_num_seqs
    write_samples([], args.out)  # a fresh file (and its folder)
    for i in range(0, len(prompts), chunk):  # written as it goes: progress shows, an interruption keeps the rest
        samples = generate_samples(llm, prompts[i : i + chunk], args.samples_per_prompt, args.temperature,
                                   args.max_tokens, args.seed + i * args.samples_per_prompt)
        write_samples(samples, args.out, append=True)
        n += sum(len(s["output_ids"]) for s in samples)
        print(f"{min(i + chunk, len(prompts))}/{len(prompts)} prompts, {n} tokens, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return 0


def train(args) -> int:
    from orthrus_engines.training.trainer import Trainer, TrainArgs

    fields = {k: v for k, v in vars(args).items() if k in TrainArgs.__dataclass_fields__}
    result = Trainer(TrainArgs(**fields, progress=not args.no_progress)).run()
    print(json.dumps(result), file=sys.stderr)
    return 0


def evaluate(args) -> int:
    from orthrus_engines.training.evaluate import run_eval

    result = run_eval(args.model, args.head, args.prompts, args.out, args.plot, args.temperature or [0.0],
                      args.max_tokens, args.block_size, plot_with=args.plot_with, label=args.label,
                      fused_cycle=not args.two_pass)
    if args.record_prior:
        from orthrus_engines.models.builtin import default_head
        from orthrus_engines.models.heads import update_head_metadata

        first = next(iter(result["reports"].values()))
        update_head_metadata(default_head(args.model, args.head),
                             acceptance_by_position=[round(x or 0.0, 4) for x in first["acceptance_by_position"]])
    for label, r in result["reports"].items():
        rates = " ".join(f"{x:.2f}" for x in r["acceptance_by_position"] if x is not None)
        print(f"{label}: TPF {r['tpf']:.3f}, accepted/cycle {r['accepted_per_cycle']:.3f}, "
              f"{r['output_tokens']} tokens, acceptance by position: {rates}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "generate":
        from orthrus_engines.errors import OrthrusInputError

        try:
            return {"gen-data": gen_data, "train": train, "eval": evaluate}[args.command](args)
        except OrthrusInputError as e:
            print(f"orthrus {args.command}: {e}", file=sys.stderr)
            return 2
    if (args.prompt is None) == (args.prompt_file is None):
        print("orthrus generate: give a prompt or --prompt-file (one of them)", file=sys.stderr)
        return 2
    from orthrus_engines import LLM, OrthrusInputError, SamplingParams

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = [args.prompt]
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        )
        llm = LLM(model=args.model, head=args.head, block_size=args.block_size, compile=args.compile,
                  tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager)
        start = time.perf_counter()
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        llm.close()  # the tensor-parallel workers, if any
    except OrthrusInputError as e:
        print(f"orthrus generate: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, **out.counters()}))
        else:
            print(out.text)
    if not args.json:
        n = sum(o.completion_tokens for o in outputs)
        passes = sum(o.forward_passes for o in outputs)
        print(f"\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, "
              f"{n / max(passes, 1):.2f} tokens per forward pass]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
