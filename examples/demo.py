"""End-to-end SIFT-Masks on a tiny Llama built from a config (runs in seconds, offline).

1. Fix a sign vector v, finetune a few toy tasks from the same θ0, projecting onto agreement with v after every
   optimizer step (done by hand here; `hf_sift.SIFTTrainer` does it for you).
2. Merge the exact integer task vectors, save the artifact, serve one task through its mask.
3. Unlearn one task by subtracting its (replayed) task vector and check that the result is byte-for-byte a
   fresh merge of the remaining tasks. A replay that does not match is refused.

    python examples/demo.py [--tasks 4] [--steps 20] [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sift import MergedDelta, ParameterSelection, SignVector, TaskVector
from hf_sift.errors import TaskDigestMismatchError


def toy_task(task: int, vocab: int, steps: int) -> list[torch.Tensor]:
    """Batches of a task-specific pattern: each task counts upwards with its own stride."""
    gen = torch.Generator().manual_seed(1000 + task)
    batches = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (8, 1), generator=gen)
        batches.append((start + (task + 1) * torch.arange(16)) % vocab)
    return batches


def finetune(model: LlamaForCausalLM, theta0: dict, positive: dict, batches: list[torch.Tensor]) -> dict:
    """Train from θ0 with the SIFT projection after every step; return the tuned state dict."""
    model.load_state_dict(theta0)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in positive], lr=3e-3)
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # θ <- θ0 + v * max(v * (θ - θ0), 0), written as a select
            for name, pos in positive.items():
                p, p0 = params[name], theta0[name]
                p.copy_(torch.where(torch.where(pos, p > p0, p < p0), p, p0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sign-seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to keep the artifacts (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    selection = ParameterSelection()
    signs = SignVector(args.sign_seed)
    positive = {n: signs.positive(n, theta0[n].shape) for n in selection.resolve(theta0)}
    print(
        f"tiny Llama: {sum(t.numel() for t in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in positive.values()):,} tuned"
    )

    tasks = {f"task-{t}": toy_task(t, config.vocab_size, args.steps) for t in range(args.tasks)}
    task_vectors = {}
    delta = MergedDelta(theta0, sign_seed=args.sign_seed, base_model="tiny-llama (random init, seed 0)")
    for task_id, batches in tasks.items():
        tuned = finetune(model, theta0, positive, batches)
        tv = TaskVector.from_state_dicts(theta0, tuned, args.sign_seed, base_digest=delta.base_digest)
        delta.add(task_id, tv)
        task_vectors[task_id] = tv
        print(f"  {task_id}: digest {tv.digest[:23]}…  mask density {tv.density:.3f}")

    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="hf_sift_demo_"))
    delta.save_pretrained(out / "merged")
    print(f"merged {delta.num_tasks} tasks into {out / 'merged'} (delta digest {delta.digest[:23]}…)")

    served = MergedDelta.from_pretrained(out / "merged").materialize(theta0, task="task-1")
    model.load_state_dict(served)
    batch = tasks["task-1"][0]
    print(f"served task-1: loss {model(input_ids=batch, labels=batch).loss.item():.3f} on its own data")

    forget = "task-2"
    replay = TaskVector.from_state_dicts(theta0, finetune(model, theta0, positive, tasks[forget]), args.sign_seed)
    bad = TaskVector.from_state_dicts(theta0, finetune(model, theta0, positive, tasks[forget][:-1]), args.sign_seed)
    unlearned = MergedDelta.from_pretrained(out / "merged")
    try:
        unlearned.remove(forget, bad)
    except TaskDigestMismatchError as err:
        print(f"a replay that differs is refused: {str(err)[:90]}…")
    unlearned.remove(forget, replay)
    unlearned.save_pretrained(out / "merged")

    fresh = MergedDelta(theta0, sign_seed=args.sign_seed, base_model="tiny-llama (random init, seed 0)")
    for task_id, tv in task_vectors.items():
        if task_id != forget:
            fresh.add(task_id, tv)
    fresh.save_pretrained(out / "fresh")
    files = sorted(p.relative_to(out / "fresh").as_posix() for p in (out / "fresh").rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(out / "merged", out / "fresh", files, shallow=False)
    same_files = (
        sorted(p.relative_to(out / "merged").as_posix() for p in (out / "merged").rglob("*") if p.is_file()) == files
    )
    print(f"unlearned {forget}: digest {unlearned.digest[:23]}… fresh merge {fresh.digest[:23]}…")
    print(f"byte-for-byte equal to a fresh merge of the others: {same_files and not mismatch and not errors}")
    if not (same_files and not mismatch and not errors and unlearned.digest == fresh.digest):
        raise SystemExit("exactness check failed")
    if not args.output_dir:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
