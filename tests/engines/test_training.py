"""`orthrus train` on tiny random models: the loss falls, only the twins move, a resumed run equals
an uninterrupted one, a saved head reproduces the trained logits, and training raises acceptance."""

import json

import pytest
import torch
from support.tiny_models import write_base, write_orthrus

from orthrus_engines import LLM, OrthrusInputError, SamplingParams
from orthrus_engines.models.heads import read_head_metadata
from orthrus_engines.training.data import write_samples
from orthrus_engines.training.dense import block_attention_mask, block_inputs, student_forward, teacher_forward
from orthrus_engines.training.evaluate import evaluate
from orthrus_engines.training.trainer import HEAD, LOG, Trainer, TrainArgs

VOCAB = 96
K = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model and training data it generated itself (greedy responses to random prompts)."""
    root = tmp_path_factory.mktemp("train")
    path = write_base(root / "base", "llama", seed=11)
    llm = LLM(str(path), block_size=1, num_pages=256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB - 1, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(72)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    samples = [{"prompt_ids": p, "output_ids": o.token_ids} for p, o in zip(prompts, outs)]
    write_samples(samples[:60], root / "train.jsonl")
    held_out = prompts[60:]
    return path, root / "train.jsonl", held_out


def _args(base, out, **kw) -> TrainArgs:
    path, data, _ = base
    defaults = dict(out=str(out), data=[str(data)], model=str(path), block_size=K, anchors=8, seq_len=48,
                    batch_size=2, lr=3e-3, steps=6, rank=8, seed=1, save_every=3, log_every=1, progress=False,
                    device="cpu")
    return TrainArgs(**{**defaults, **kw})


@pytest.mark.parametrize("anchor_view", ["diffusion", "ar", "causal"])
def test_step_lowers_loss_on_a_fixed_batch(base, tmp_path, anchor_view):
    t = Trainer(_args(base, tmp_path, steps=40, warmup=0.0, anchor_view=anchor_view))
    losses = [t.train_step(0)["loss"] for _ in range(15)]  # step 0's batch every time
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("rank", [0, 8])
def test_only_twins_change(base, tmp_path, rank):
    t = Trainer(_args(base, tmp_path, rank=rank))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with torch.no_grad():
        from torch.nn.utils import parametrize

        with parametrize.cached():
            twins_before = {n: p.clone() for n, p in t.model.state_dict().items() if ".diff." in n}
    t.run()
    for n, p in t.model.named_parameters():
        if ".diff." not in n:
            assert torch.equal(p, before[n]), f"{n} is not a twin but changed"
    with parametrize.cached():
        after = {n: p for n, p in t.model.state_dict().items() if ".diff." in n}
    changed = [n for n in after if n in twins_before and not torch.equal(after[n], twins_before[n])]
    assert changed, "no twin changed"


def test_resume_continues_exactly(base, tmp_path):
    straight = Trainer(_args(base, tmp_path / "a", steps=6))
    straight.run()
    first = Trainer(_args(base, tmp_path / "b", steps=6, max_minutes=0.0))  # stops (and saves) after one step
    first.run()
    assert first.step == 1
    resumed = Trainer(_args(base, tmp_path / "b", steps=6))
    assert resumed.step == 1
    resumed.run()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    log = [json.loads(x) for x in (tmp_path / "b" / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("rank", [0, 8])
def test_saved_head_gives_identical_logits(base, tmp_path, rank):
    path, _, held_out = base
    t = Trainer(_args(base, tmp_path, rank=rank))
    t.run()
    meta = read_head_metadata(tmp_path / HEAD)
    assert meta["block_size"] == K and meta["rank"] == rank and meta["steps"] == 6
    # Plain weights on both sides: the same kernels, so the logits must match bit for bit.
    llm = LLM(str(path), head=str(tmp_path / HEAD), block_size=K, cpu_packed_weights=False)
    ids = torch.tensor([(held_out[0] * 30)[:30]])
    anchors = torch.tensor([[2, 9, 20]])
    def draft_logits(model):
        _, kvs = teacher_forward(model, ids)
        tokens, positions = block_inputs(ids, anchors, K, t.src.mask_token_id)
        with torch.no_grad():
            return model.logits(student_forward(model, tokens, positions, block_attention_mask(anchors, 30, K), kvs))
    assert torch.equal(draft_logits(t.model), draft_logits(llm.core.runner.model))


def test_training_raises_acceptance(base, tmp_path):
    path, _, held_out = base
    untrained = evaluate(LLM(str(path), block_size=K), held_out, max_tokens=40)
    Trainer(_args(base, tmp_path, steps=300, save_every=300, lr=1e-2, rank=16)).run()
    trained = evaluate(LLM(str(path), head=str(tmp_path / HEAD), block_size=K), held_out, max_tokens=40)
    assert trained["accepted_per_cycle"] > untrained["accepted_per_cycle"] + 0.5, (untrained, trained)
    assert trained["tpf"] > untrained["tpf"]


def test_continue_from_a_lowrank_head(base, tmp_path):
    t = Trainer(_args(base, tmp_path / "a"))
    t.run()
    cont = Trainer(_args(base, tmp_path / "b", head=str(tmp_path / "a" / HEAD)))
    for (n, p), (_, q) in zip(t.model.named_parameters(), cont.model.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(OrthrusInputError, match="rank"):
        Trainer(_args(base, tmp_path / "c", head=str(tmp_path / "a" / HEAD), rank=4))


def test_anchor_view_is_stored_loaded_and_kept_on_resume(base, tmp_path):
    """An `anchor_view="ar"` run records it in its head, the engine drafts with it, a resume or a run
    continued from its head keeps it unless told otherwise, a fresh head defaults to "causal" while trained
    twins keep their own view, and a head naming an unknown view is refused."""
    from orthrus_engines.models.heads import update_head_metadata

    path, _, _ = base
    Trainer(_args(base, tmp_path / "a", anchor_view="ar")).run()
    head = tmp_path / "a" / HEAD
    assert read_head_metadata(head)["anchor_view"] == "ar"
    assert LLM(str(path), head=str(head), block_size=K).core.runner.anchor_ar
    with pytest.raises(OrthrusInputError, match="anchor_view"):
        Trainer(_args(base, tmp_path / "a", anchor_view="diffusion", steps=8))
    assert Trainer(_args(base, tmp_path / "a", steps=8)).args.anchor_view == "ar"  # resumed as it was
    assert Trainer(_args(base, tmp_path / "b", head=str(head))).args.anchor_view == "ar"  # continued from its head
    switched = Trainer(_args(base, tmp_path / "c", head=str(head), anchor_view="diffusion"))  # an explicit switch
    assert switched.args.anchor_view == "diffusion"
    assert Trainer(_args(base, tmp_path / "e")).args.anchor_view == "causal"  # a fresh head: causal by default
    official = write_orthrus(tmp_path / "official", "llama", seed=11)  # twins trained as the paper's diffusion
    assert Trainer(_args(base, tmp_path / "f", model=str(official), rank=0)).args.anchor_view == "diffusion"
    # a run from before the option resumes as diffusion
    Trainer(_args(base, tmp_path / "d", max_minutes=0.0)).run()
    ck = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)
    del ck["args"]["anchor_view"]
    torch.save(ck, tmp_path / "d" / "checkpoint.pt")
    assert Trainer(_args(base, tmp_path / "d")).args.anchor_view == "diffusion"
    update_head_metadata(head, anchor_view="sideways")
    with pytest.raises(OrthrusInputError, match="head.*anchor_view"):
        LLM(str(path), head=str(head), block_size=K)


def _view_weights(model, view: str = "diff") -> dict[str, torch.Tensor]:
    """The effective projection weights of one view ("diff": the twins, low-rank deltas folded in)."""
    with torch.no_grad():
        return {f"layer {i} {name}": getattr(getattr(layer.self_attn, view), name).weight.clone()
                for i, layer in enumerate(model.layers) for name in ("qkv", "o")}


def test_continue_at_a_higher_rank_keeps_the_twins(base, tmp_path):
    """A rank-8 head continued at rank 16: the same twins at the start, and the new components train."""
    t = Trainer(_args(base, tmp_path / "a"))
    t.run()
    grown = Trainer(_args(base, tmp_path / "b", head=str(tmp_path / "a" / HEAD), rank=16))
    before = _view_weights(t.model)
    for n, w in _view_weights(grown.model).items():
        torch.testing.assert_close(w, before[n], rtol=0, atol=1e-6, msg=n)
    grown.run()
    meta = read_head_metadata(tmp_path / "b" / HEAD)
    assert meta["rank"] == 16
    delta = grown.model.layers[0].self_attn.diff.qkv.parametrizations.weight[0]
    assert delta.lora_B[:, 8:].abs().sum() > 0  # the added components learnt something
    # Resuming the grown run: its checkpoint, not the starting head, decides where it continues.
    first = Trainer(_args(base, tmp_path / "c", head=str(tmp_path / "a" / HEAD), rank=16, max_minutes=0.0))
    first.run()
    resumed = Trainer(_args(base, tmp_path / "c", head=str(tmp_path / "a" / HEAD), rank=16))
    assert resumed.step == 1
    resumed.run()
    for (n, p), (_, q) in zip(grown.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"


def test_bfloat16_head_is_half_the_size_and_loads(base, tmp_path):
    path, _, held_out = base
    full = Trainer(_args(base, tmp_path / "a"))
    full.run()
    half = Trainer(_args(base, tmp_path / "b", head_dtype="bfloat16"))
    half.run()
    with pytest.raises(OrthrusInputError, match="head_dtype"):  # full twins are saved as they are
        Trainer(_args(base, tmp_path / "c", rank=0, head_dtype="bfloat16"))
    size = lambda d: sum(t.numel() * t.element_size() for t in _lora_tensors(d / HEAD).values())
    assert size(tmp_path / "b") * 2 == size(tmp_path / "a")
    want = _view_weights(half.model)
    got = _view_weights(LLM(str(path), head=str(tmp_path / "b" / HEAD), block_size=K).core.runner.model)
    ar = _view_weights(half.model, "ar")
    assert max((w - ar[n]).abs().max() for n, w in want.items()) > 2e-3  # the deltas are far above the tolerance
    for n, w in want.items():  # the deltas are rounded to bf16, the AR weights under them are not
        torch.testing.assert_close(got[n], w, rtol=0, atol=2e-4, msg=n)


def _lora_tensors(head) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t for n, t in load_file(str(head)).items() if ".lora_" in n}


@pytest.mark.parametrize("field, value", [("block_size", 1), ("anchors", 0), ("lr", 0.0), ("warmup", 1.0),
                                          ("data", []), ("seq_len", 2), ("slot_decay", 0.0),
                                          ("head_dtype", "float16"), ("anchor_view", "mask")])
def test_bad_settings_name_the_field(base, tmp_path, field, value):
    with pytest.raises(OrthrusInputError, match=field):
        Trainer(_args(base, tmp_path, **{field: value}))


def test_missing_data_names_the_field(base, tmp_path):
    with pytest.raises(OrthrusInputError, match="data"):
        Trainer(_args(base, tmp_path, data=[str(tmp_path / "nope.jsonl")]))
