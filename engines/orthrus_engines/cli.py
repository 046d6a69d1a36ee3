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
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        llm = LLM(model=args.model, head=args.head, block_size=args.block_size)
        start = time.perf_counter()
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    except OrthrusInputError as e:
        print(f"orthrus generate: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({
                "prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                "prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                "forward_passes": out.num_forward_passes, "drafted_tokens": out.num_drafted_tokens,
                "accepted_tokens": out.num_accepted_tokens,
            }))
        else:
            print(out.text)
    if not args.json:
        n = sum(o.num_output_tokens for o in outputs)
        passes = sum(o.num_forward_passes for o in outputs)
        print(f"\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, "
              f"{n / max(passes, 1):.2f} tokens per forward pass]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
