"""Training data available offline: text/code files and folders, and responses the base model
generates itself (with this engine) for a prompt file. Everything becomes one packed token stream
with a mask of the positions worth predicting (a generated sample's response, all of a text file).
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from orthrus_engines.errors import OrthrusInputError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".html", ".css", ".toml", ".yaml", ".yml"}


def packaged_prompts(name: str) -> Path:
    """`prompts_train.txt` (used to generate training data) or `prompts_eval.txt` (held out)."""
    return Path(str(resources.files("orthrus_engines") / "data" / name))


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise OrthrusInputError("prompts", f"{str(path)!r} is not a file")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise OrthrusInputError("prompts", f"{str(path)!r} holds no prompts")
    return prompts


def generate_samples(llm, prompts: list[str], samples_per_prompt: int, temperature: float, max_tokens: int,
                     seed: int) -> list[dict]:
    """The model's own chat responses to `prompts` (greedy when temperature is 0)."""
    from orthrus_engines.sampling_params import SamplingParams

    if samples_per_prompt < 1 or (samples_per_prompt > 1 and temperature == 0):
        raise OrthrusInputError("samples_per_prompt", "must be 1 for greedy responses, or >= 1 with a temperature > 0")
    prompt_ids = [llm.core.inputs.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    jobs, params = [], []
    for s in range(samples_per_prompt):
        for i, ids in enumerate(prompt_ids):
            jobs.append(ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + s * len(prompts) + i))
    outs = llm.generate(jobs, params)
    return [{"prompt_ids": ids, "output_ids": o.token_ids} for ids, o in zip(jobs, outs)]


def write_samples(samples: list[dict], path: str | Path, append: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


@dataclass
class TokenStream:
    """All documents concatenated; `trainable[i]` says whether token i may be a training target."""

    ids: torch.Tensor  # [N] long
    trainable: torch.Tensor  # [N] bool

    def __len__(self) -> int:
        return self.ids.numel()


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def load_stream(sources: list[str | Path], tokenizer, eos_id: int, max_text_tokens: int | None = None) -> TokenStream:
    """Pack `*.jsonl` sample files (token ids; only responses train) and text/code files or folders
    (every token trains, up to `max_text_tokens` in all) into one stream, documents split by EOS."""
    ids: list[int] = []
    mask: list[bool] = []
    text_tokens = 0
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise OrthrusInputError("data", f"{str(src)!r} does not exist")
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                s = json.loads(line)
                ids += s["prompt_ids"] + s["output_ids"] + [eos_id]
                mask += [False] * len(s["prompt_ids"]) + [True] * len(s["output_ids"]) + [False]
            continue
        for f in _text_files(path):
            if max_text_tokens is not None and text_tokens >= max_text_tokens:
                break
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            doc = tokenizer(text)["input_ids"] + [eos_id]
            ids += doc
            mask += [True] * (len(doc) - 1) + [False]
            text_tokens += len(doc)
    if not ids:
        raise OrthrusInputError("data", "the training sources hold no tokens")
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def sample_batch(stream: TokenStream, batch_size: int, seq_len: int, num_anchors: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random windows [B, L], their trainable masks [B, L], and anchor positions [B, A] (sorted) whose
    first target is trainable.

    An anchor p covers block positions p..p+K-1; its targets are tokens p+1..p+K-1, all inside the window.
    """
    L, K = seq_len, block_size
    if len(stream) < L + 1:
        raise OrthrusInputError("seq_len", f"{L} is longer than the training data ({len(stream)} tokens)")
    windows, masks, anchors = [], [], []
    for _ in range(batch_size):
        for _attempt in range(100):
            start = int(torch.randint(0, len(stream) - L + 1, (1,), generator=generator))
            ok = stream.trainable[start + 1 : start + L - K + 2].nonzero().flatten()  # target p+1 trainable
            if ok.numel() >= num_anchors:
                break
        else:
            raise OrthrusInputError("data", "too few trainable positions for the requested anchors per sequence")
        pick = ok[torch.randperm(ok.numel(), generator=generator)[:num_anchors]].sort().values
        windows.append(stream.ids[start : start + L])
        masks.append(stream.trainable[start : start + L])
        anchors.append(pick)
    return torch.stack(windows), torch.stack(anchors), torch.stack(masks)
