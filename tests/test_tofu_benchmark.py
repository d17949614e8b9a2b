"""The TOFU reproduction (benchmarks/tofu): its metrics, and the smoke profile end to end (a tiny model, 2 authors,
1 step)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from benchmarks.tofu import metrics
from benchmarks.tofu.data import collate, default_data_dir, encode_pair, load_authors


pytest.importorskip("rouge_score")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")
DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "full.json").is_file(), reason="TOFU data (../shared/data/tofu) absent")


def test_probability_and_truth_ratio_formulas():
    assert metrics.probability([0.0, math.log(2)]) == pytest.approx(0.75)
    # R = exp(mean perturbed loss - reference loss): exp(2 - 1) and exp(1 - 1)
    ratios = metrics.truth_ratios([1.0, 1.0], [[1.5, 2.5], [1.0, 1.0]])
    assert ratios == pytest.approx([math.e, 1.0])
    assert metrics.truth_ratio_score(ratios) == pytest.approx((1 - 1 / math.e) / 2)
    assert metrics.truth_ratio_score(ratios, forget=True) == pytest.approx((1 / math.e + 1) / 2)
    # P_true / (P_true + sum P_perturbed) with P = exp(-loss): 1 / (1 + 1 + 1)
    assert metrics.normalised_probability([0.0], [[0.0, 0.0]]) == pytest.approx(1 / 3)
    assert metrics.model_utility([0.5, 0.5, 1.0]) == pytest.approx(3 / (2 + 2 + 1))
    assert metrics.model_utility([0.5, 0.0]) == 0.0


def test_forget_quality_is_the_ks_p_value():
    assert metrics.forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 1.0
    assert metrics.forget_quality([0.1 * i for i in range(20)], [10 + i for i in range(20)]) < 1e-6


@needs_data
def test_answer_loss_covers_the_answer_tokens_only(tmp_path):
    from benchmarks.tofu.models import load_model, load_tokenizer, tiny_base

    authors = load_authors(DATA, [199])
    folder = tiny_base(tmp_path / "base", authors)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    author = authors[0]
    encoded = encode_pair(tokenizer, author.questions[0], author.answers[0])
    head = tokenizer(f"Question: {author.questions[0]}\nAnswer:", add_special_tokens=False)["input_ids"]
    assert encoded["labels"][: len(head)] == [-100] * len(head)
    assert encoded["labels"][len(head) :] == encoded["input_ids"][len(head) :]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    losses = metrics.answer_losses(model, tokenizer, author.questions[:3], author.answers[:3])
    for i in range(3):
        batch = collate([encode_pair(tokenizer, author.questions[i], author.answers[i])], tokenizer.pad_token_id)
        with torch.no_grad():
            expected = model(**batch).loss.item()  # transformers' mean over the labelled (answer) tokens
        assert losses[i] == pytest.approx(expected, rel=1e-5)


@needs_data
def test_smoke_profile_end_to_end(tmp_path, hub):
    from benchmarks.tofu.__main__ import main
    from benchmarks.tofu.profiles import PROFILES
    from benchmarks.tofu.publish import publish_study

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two contended ones
    try:
        code = main(
            [
                "--profile",
                "smoke",
                "--work-dir",
                str(tmp_path / "work"),
                "--results",
                str(tmp_path / "r.json"),
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        # The publisher's story on the artifact the run left, through the session's local Hub: push, pull one author,
        # unlearn author-199 on the Hub by replay (with the run's thread count), compare with a fresh push.
        published = publish_study(PROFILES["smoke"], DATA, tmp_path / "work", tmp_path / "hf-cache", namespace="smoke")
    finally:
        torch.set_num_threads(threads)
    assert published["forgotten"] == "author-199" and published["tasks"] == ["author-198", "author-199"]
    assert published["checks"] == {
        "files_of_a_fresh_push_plus_the_log": True,
        "weights_and_masks_equal": True,
        "card_equal_up_to_the_log": True,
        "commits_after_squash": 1,
        "remaining_author_served_as_the_fresh_merge": True,
        "forgotten_author_refused": "UnknownTaskError",
    }
    phases = published["phases"]
    assert phases["pull one author (from_pretrained)"]["equal_to_local"] is True
    unlearned = phases["unlearn one author on the Hub (replay)"]
    assert unlearned["replay_steps"] == 1 and unlearned["squashed"] is True
    assert unlearned["deleted"] == ["masks/author-199.safetensors"]
    assert not [p for p in unlearned["uploaded"] if p.startswith("tokenizer")]  # the repo's own files stay
    assert code == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p-unlearning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the cost per request
    records = {(r["method"], r["T"]): r for r in payload["records"]}
    methods = {
        "zero-shot",
        "local FT",
        "FT+Merge",
        "SIFT local",
        "SIFT+Merge",
        "SIFT-Masks",
        "TALL-masks",
        "TIES",
        "EMR-merging",
    }
    assert set(records) == {(m, t) for m in methods for t in (1, 2)} | {("Central FT", 2)}
    for (_method, count), record in records.items():
        assert 0 < record["answer_probability"] <= 1
        assert len(record["authors"]) == count
        if count == 2:  # the table at the largest T has every metric
            assert 0 <= record["rouge_l_recall"] <= 1 and 0 <= record["truth_ratio"] <= 1
        else:
            assert record["rouge_l_recall"] is None and record["truth_ratio"] is None
    # One merged author is that author's own model: SIFT-Masks at T=1 serves θ0 + τ (rounded to 2**-40), and
    # FT+Merge / TALL-masks at T=1 rebuild the local FT weights (float32 rounding of θ0 + (θ1 - θ0)).
    first = "author-198"
    sift_local = records[("SIFT local", 1)]["authors"][first]["answer_probability"]
    assert records[("SIFT-Masks", 1)]["authors"][first]["answer_probability"] == pytest.approx(sift_local, rel=1e-5)
    local = records[("local FT", 1)]["authors"][first]["answer_probability"]
    for method in ("FT+Merge", "TALL-masks"):
        assert records[(method, 1)]["authors"][first]["answer_probability"] == pytest.approx(local, rel=1e-4)
    # Training steps as configured: 1 per author, and T x 1 for the central model.
    assert [c["steps"] for c in payload["training"]["SIFT training"].values()] == [1, 1]
    assert payload["training"]["Central FT training"]["steps"] == 2
    assert payload["complete"] is True
    # Unlearning author-199 from the merge of 2 with hf_sift.unlearn: one author's replay (1 step), and the artifact
    # is the one train_tasks wrote before author-199 was ever trained (same sum digest, same files).
    unlearning = payload["unlearning"]
    assert unlearning["forgotten"] == ["author-199"] and unlearning["remaining"] == ["author-198"]
    same = unlearning["sift_masks_identical_to_retain_only"]
    assert same["files_equal"] is True and same["digest_after_unlearning"] == same["digest_never_trained"]
    assert [(r["steps"], r["measured"]) for r in unlearning["requests"]["SIFT-Masks"]] == [(1, True)]
    assert [r["steps"] for r in unlearning["requests"]["TIES"]] == [1]  # every remaining author: 1 x 1 step
    models = unlearning["models"]
    assert models["SIFT-Masks after unlearning"]["forget_quality"] == 1.0
    # The KS test sees every question of the forgotten author, not only the table's first 3.
    assert {m["forget_questions"] for m in models.values()} == {20}
    assert models["SIFT-Masks after unlearning"]["model_utility"] == models["SIFT-Masks retain-only"]["model_utility"]
    assert set(models) == {
        "SIFT-Masks retain-only",
        "SIFT-Masks after unlearning",
        "FT+Merge retain-only",
        "FT+Merge (not unlearned)",
        "NegMerge",
    }
    # --report-only rebuilds the same records from the score cache, training nothing.
    args = ["--profile", "smoke", "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "again.json")]
    assert main([*args, "--plot", str(tmp_path / "again.png"), "--report-only"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["records"] == payload["records"] and again["wall_seconds"] is None
    # The served-scale diagnostic, on the artifact the run left: at 1/T it gives the study's SIFT-Masks figure, at
    # 1 (each author's own entries at full size) another one.
    from benchmarks.tofu.serving_scale import main as scale_main

    scale_json = tmp_path / "scale.json"
    assert scale_main(["--profile", "smoke", "--work-dir", str(tmp_path / "work"), "--results", str(scale_json)]) == 0
    scale = json.loads(scale_json.read_text())
    assert list(scale["scales"]) == ["0.5", "1.0"]
    # Every entry of an author's mask is in its own mask and at most in the other one's: a share in [1/2, 1].
    assert 0.5 <= scale["masks"]["share"] <= 1.0 and 0.0 < scale["masks"]["density"] < 1.0
    assert set(scale["count_normalised"]["authors"]) == {"author-198", "author-199"}
    study = {t: a["answer_probability"] for t, a in records[("SIFT-Masks", 2)]["authors"].items()}
    assert scale["scales"]["0.5"]["authors"] == pytest.approx(study, rel=1e-5)
    assert scale["scales"]["1.0"]["authors"] != pytest.approx(study, rel=1e-3)
    assert scale_main(["--profile", "smoke", "--work-dir", str(tmp_path / "none")]) == 2  # no run there
    # Each of the 2 authors is served at the scale that did best for the other one.
    held_out = scale["held_out"]
    for author, other in (("author-198", "author-199"), ("author-199", "author-198")):
        best = max(scale["scales"], key=lambda s: scale["scales"][s]["authors"][other])
        assert held_out["chosen_scale"][author] == best
        assert held_out["authors"][author] == scale["scales"][best]["authors"][author]


def test_the_served_scale_is_chosen_on_the_other_half_of_the_authors():
    from benchmarks.tofu.serving_scale import held_out_choice

    # Scale 1.0 is best for the first two authors, 0.25 for the last two: each half gets the other half's choice.
    per_scale = {
        "0.25": {"a": 0.1, "b": 0.1, "c": 0.9, "d": 0.9},
        "1.0": {"a": 0.8, "b": 0.8, "c": 0.2, "d": 0.2},
    }
    assert held_out_choice(per_scale, ["a", "b", "c", "d"]) == {"a": "0.25", "b": "0.25", "c": "1.0", "d": "1.0"}
    # A tie goes to the smaller scale.
    tie = {"0.5": {"a": 0.3, "b": 0.3}, "1.0": {"a": 0.3, "b": 0.3}}
    assert held_out_choice(tie, ["a", "b"]) == {"a": "0.5", "b": "0.5"}


@pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")
def test_the_count_normalised_diagnostic_divides_each_masked_entry_by_its_mask_count():
    from conftest import perturbed

    from benchmarks.tofu.serving_scale import (
        count_normalised_merge,
        count_normalised_weights,
        mask_counts,
        mask_statistics,
    )
    from hf_sift import MergedDelta, TaskVector
    from hf_sift.masks import unpack_bits

    base = {
        "a.weight": torch.randn(9, 7, generator=torch.Generator().manual_seed(0)),
        "b.bias": torch.randn(11, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    }
    vectors = {f"t{i}": TaskVector.from_state_dicts(base, perturbed(base, i, scale=0.5), 5) for i in range(3)}
    delta = MergedDelta(base, sign_seed=5)
    delta.add("t0", vectors["t0"])
    # One task: every masked entry is in one mask, so the rule is the library's masked serving at scale 1.
    alone = count_normalised_weights(delta, base, count_normalised_merge(delta, base, mask_counts(delta)), "t0")
    served = delta.materialize(base, task="t0", scale=1.0)
    for name in base:
        assert torch.equal(alone[name], served[name]), name
    delta.add("t1", vectors["t1"])
    delta.add("t2", vectors["t2"])
    counts = mask_counts(delta)
    masks = {t: {n: unpack_bits(delta.load_mask(t)[n], v.numel(), v.shape) for n, v in base.items()} for t in vectors}
    for name in base:
        assert torch.equal(counts[name], sum(masks[t][name].to(torch.int16) for t in vectors))
    weights = count_normalised_weights(delta, base, count_normalised_merge(delta, base, counts), "t1")
    at_one = delta.materialize(base, task="t1", scale=1.0)
    at_mean = delta.materialize(base, task="t1", scale=1 / 3)
    for name, value in base.items():
        mask = masks["t1"][name]
        assert torch.equal(weights[name][~mask], value[~mask])  # outside t1's mask: θ0, bit for bit
        single, everyone = mask & (counts[name] == 1), mask & (counts[name] == 3)
        assert single.any() and everyone.any()
        assert torch.equal(weights[name][single], at_one[name][single])  # moved by t1 alone: its own update
        torch.testing.assert_close(weights[name][everyone], at_mean[name][everyone])  # moved by all 3: their mean
    statistics = mask_statistics(delta, counts)
    total = sum(v.numel() for v in base.values())
    held = sum(int(masks["t1"][n].sum()) for n in base)
    covered = sum(int(counts[n][masks["t1"][n]].sum()) for n in base)
    assert statistics["t1"] == {"density": held / total, "share": covered / (held * 3)}


@needs_data
def test_a_profile_without_unlearning_and_with_fewer_baselines(tmp_path, monkeypatch):
    """`forget=0` skips the unlearning study and `merges` limits the baselines; the run still counts as complete."""
    from benchmarks.tofu import __main__ as cli
    from benchmarks.tofu.profiles import PROFILES

    profile = dataclasses.replace(PROFILES["smoke"], name="subset", merges=("FT+Merge",), forget=0, central=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["--profile", "subset", "--work-dir", str(tmp_path / "w"), "--results", str(tmp_path / "r.json")]
    try:
        # First one author, then the profile grown to two in the same work folder: the second run trains and
        # scores the new author only, and resumes the artifact.
        monkeypatch.setitem(cli.PROFILES, "subset", dataclasses.replace(profile, authors=profile.authors[:1]))
        assert cli.main([*args, "--plot", str(tmp_path / "p.png")]) == 0
        monkeypatch.setitem(cli.PROFILES, "subset", profile)
        code = cli.main([*args, "--plot", str(tmp_path / "p.png")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    methods = {r["method"] for r in payload["records"]}
    assert methods == {"zero-shot", "local FT", "FT+Merge", "SIFT local", "SIFT+Merge", "SIFT-Masks"}
    assert payload["unlearning"] is None and payload["complete"] is True
    assert payload["profile"]["merges"] == ["FT+Merge"]
    zero_shot = {r["T"]: r for r in payload["records"] if r["method"] == "zero-shot"}
    assert set(zero_shot[2]["authors"]) == {"author-198", "author-199"}
    assert not (tmp_path / "p-unlearning.png").exists()
    # With nothing to unlearn, no copy of the artifact is kept for an unlearning study.
    assert sorted(p.name for p in (tmp_path / "w").glob("sift-merged*")) == ["sift-merged"]
