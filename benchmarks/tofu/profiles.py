"""The benchmark's profiles: what each one trains, and what it scales down from the paper's recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .data import PERTURBED_AUTHORS


@dataclass(frozen=True)
class Profile:
    """One size of the TOFU reproduction.

    Args:
        name (`str`): `smoke`, `cpu` or `full`.
        model (`str`): `tiny` (a Llama built from a config, with a tokenizer trained on the data) or `smollm2`.
        authors (`tuple[int, ...]`): The TOFU authors, in the order they are merged (T = 1, 2, 4, ... takes a prefix).
        steps (`int`): Optimizer steps per author (the paper: 20).
        batch_size (`int`): Examples per step (the paper: 20, one author's whole set).
        learning_rate (`float`): AdamW learning rate (the paper: 1e-4).
        max_new_tokens (`int`): Greedy tokens generated for ROUGE-L (TOFU: 200, cut at EOS).
        table_questions (`int`, *optional*): Questions per author (the first ones) for ROUGE-L and the truth ratio
            at the largest T; all 20 when None. Answer probability and forget quality always use all 20.
        central (`bool`): Train the central model (one model on every author, T x `steps` steps).
        forget (`int`): Authors unlearned, one request at a time, from the merge of all (the last ones first); 0
            skips the unlearning study.
        utility_questions (`int`, *optional*): Questions of real authors and world facts (the first ones) in the
            model utility; all of them when None.
        merges (`tuple[str, ...]`, *optional*): The baselines merged from the local FT models (labels of
            `experiment.MERGES`); all of them when None.
        sign_seed (`int`), seed (`int`): The sign vector's seed and the training seed.
        threads (`int`, *optional*): torch threads for the whole run (the replay of an author must use the thread
            count its training used: a different count changes the bits); torch's default when None.
    """

    name: str
    model: str
    authors: tuple[int, ...]
    steps: int
    batch_size: int = 20
    learning_rate: float = 1e-4
    max_new_tokens: int = 200
    table_questions: int | None = None
    central: bool = True
    forget: int = 2
    utility_questions: int | None = None
    merges: tuple[str, ...] | None = None
    sign_seed: int = 0
    seed: int = 0
    threads: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def merge_counts(self) -> list[int]:
        """T = 1, 2, 4, ... up to the number of authors (always ending at it)."""
        counts, t = [], 1
        while t < len(self.authors):
            counts.append(t)
            t *= 2
        return counts + [len(self.authors)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["authors"] = list(self.authors)
        data["notes"] = list(self.notes)
        data["merges"] = None if self.merges is None else list(self.merges)
        data["merge_counts"] = self.merge_counts
        return data


_SMALL_TABLE = (
    "ROUGE-L and truth ratio on the first 3 questions of each author; greedy answers of at most 40 new tokens instead "
    "of 200"
)

_CPU = Profile(
    name="cpu",
    model="smollm2",
    authors=tuple(PERTURBED_AUTHORS)[:8],
    steps=5,
    max_new_tokens=40,
    table_questions=3,
    utility_questions=10,
    threads=1,
    notes=(
        "SmolLM2-135M-Instruct instead of GPT2-XL",
        "8 authors (T up to 8) instead of 200",
        "5 steps per author instead of 20 (batch 20, lr 1e-4 as in the paper)",
        _SMALL_TABLE,
        "unlearning: 2 authors forgotten; model utility on the first 10 real-author and world-fact questions",
        "one torch thread, so that the run leaves the second core of a 2-core machine free",
    ),
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        model="tiny",
        authors=(198, 199),
        steps=1,
        batch_size=4,
        learning_rate=1e-3,
        max_new_tokens=8,
        table_questions=3,
        forget=1,
        utility_questions=4,
        notes=(
            "a tiny Llama from a config and a 512-token BPE trained on the data: checks the pipeline, not the paper",
        ),
    ),
    "cpu": _CPU,
    # The cpu profile at the paper's step count, without what it does not need.
    "cpu-steps": replace(
        _CPU,
        name="cpu-steps",
        authors=_CPU.authors,
        steps=20,
        central=False,
        forget=0,
        utility_questions=None,
        merges=("FT+Merge",),
        threads=None,
        notes=(
            "the cpu profile's question at the paper's 20 steps per author: does SIFT-Masks approach local FT with "
            "the paper's step count?",
            "SmolLM2-135M-Instruct instead of GPT2-XL; 8 authors (T up to 8) instead of 200",
            "20 steps per author, batch 20, lr 1e-4 (the paper's recipe)",
            "only FT+Merge among the merged baselines; no Central FT and no unlearning study (the cpu profile has them)",
            _SMALL_TABLE,
            "torch's default thread count (every core): nothing is replayed, so no count needs pinning",
        ),
    ),
    "full": Profile(
        name="full",
        model="smollm2",
        authors=tuple(range(200)),
        steps=20,
        forget=20,
        notes=("the paper's recipe (200 authors, 20 steps, batch 20, lr 1e-4) on SmolLM2-135M-Instruct",),
    ),
}
