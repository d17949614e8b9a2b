import itertools
from pathlib import Path

import pytest
import torch
from conftest import perturbed
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sift import MergedDelta, TaskVector
from hf_sift.errors import (
    AccumulatorOverflowError,
    BaseModelMismatchError,
    DuplicateTaskError,
    InvalidTaskIdError,
    ParameterMismatchError,
    SignSeedMismatchError,
    TaskDigestMismatchError,
    UnknownTaskError,
)
from hf_sift.fixed_point import SCALE_BITS
from hf_sift.masks import unpack_bits
from hf_sift.served_weights import served_tensor


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 11
# Odd sizes on purpose: masks that do not fill their last byte, a scalar-like vector, an fp16 and a bf16 tensor.
BASE = {
    "layer.a.weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(0)),
    "layer.b.bias": torch.randn(13, generator=torch.Generator().manual_seed(1)).to(torch.float16),
    "layer.c.weight": torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
    "steps": torch.tensor([3]),  # integer buffer: never tuned
}
TASKS = {f"task-{i}": TaskVector.from_state_dicts(BASE, perturbed(BASE, i, scale=0.5), SEED) for i in range(6)}


def merge(task_ids) -> MergedDelta:
    delta = MergedDelta(BASE, sign_seed=SEED)
    for task_id in task_ids:
        delta.add(task_id, TASKS[task_id])
    return delta


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name


@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_any_adds_then_any_removals_equal_a_fresh_merge(data, tmp_path_factory):
    added = data.draw(st.permutations(sorted(TASKS)).map(lambda p: p[: data.draw(st.integers(1, len(p)))]))
    removed = data.draw(st.lists(st.sampled_from(added), unique=True, max_size=len(added)))
    delta = merge(added)
    for task_id in removed:
        delta.remove(task_id, TASKS[task_id])
    survivors = [t for t in sorted(TASKS) if t in added and t not in removed]
    fresh = merge(survivors)

    assert delta.task_ids == fresh.task_ids == survivors
    assert delta.digest == fresh.digest
    for name in delta.names:
        assert torch.equal(delta.sum[name], fresh.sum[name])
    for task in [None, *survivors[:2]]:
        assert_same_state(delta.materialize(BASE, task=task), fresh.materialize(BASE, task=task))

    tmp = tmp_path_factory.mktemp("artifact")
    delta.save_pretrained(tmp / "unlearned")
    fresh.save_pretrained(tmp / "fresh")
    assert folder_files(tmp / "unlearned") == folder_files(tmp / "fresh")


def test_history_through_disk_equals_fresh_merge(tmp_path):
    delta = merge(["task-0", "task-1", "task-2"])
    delta.save_pretrained(tmp_path / "a")
    loaded = MergedDelta.from_pretrained(tmp_path / "a")
    loaded.remove("task-1", TASKS["task-1"])
    loaded.add("task-4", TASKS["task-4"])
    loaded.save_pretrained(tmp_path / "a")  # same folder: masks of kept tasks are re-linked
    merge(["task-0", "task-2", "task-4"]).save_pretrained(tmp_path / "b")
    assert folder_files(tmp_path / "a") == folder_files(tmp_path / "b")
    assert not (tmp_path / "a" / "masks" / "task-1.safetensors").exists()


def test_served_weights_formula():
    delta = merge(["task-0", "task-3"])
    served = delta.materialize(BASE, task="task-3")
    plain = delta.materialize(BASE)
    mask = delta.load_mask("task-3")
    for name in delta.names:
        base = BASE[name]
        total = delta.sum[name].double() * 2.0**-SCALE_BITS
        keep = unpack_bits(mask[name], base.numel(), base.shape)
        expected_task = (base.double() + torch.where(keep, total, 0.0) * 0.5).to(base.dtype)
        expected_plain = (base.double() + total * 0.5).to(base.dtype)
        assert torch.equal(served[name], expected_task)
        assert torch.equal(plain[name], expected_plain)
    assert served["steps"] is BASE["steps"]
    custom = delta.materialize(BASE, task="task-3", scale=1.0)
    name = "layer.a.weight"
    keep = unpack_bits(mask[name], 35, (7, 5))
    expected = (BASE[name].double() + torch.where(keep, delta.sum[name].double() * 2.0**-SCALE_BITS, 0.0)).float()
    assert torch.equal(custom[name], expected)


def test_masked_out_entries_keep_the_exact_bits_of_theta0():
    base = {"w": torch.tensor([-0.0, 0.0, -0.0, 1.5])}
    tuned = {"w": torch.tensor([1.0, -1.0, -0.0, 1.5])}
    delta = MergedDelta(base, sign_seed=0)
    delta.add("a", TaskVector.from_state_dicts(base, tuned, 0))
    served = delta.materialize(base, task="a")["w"]
    mask = unpack_bits(delta.load_mask("a")["w"], 4)
    for i in range(4):
        expected = torch.tensor(base["w"][i].item() + delta.sum["w"][i].item() * 2.0**-SCALE_BITS)
        if not mask[i]:
            expected = base["w"][i]
        assert torch.equal(served[i].view(torch.int32), expected.float().view(torch.int32)), i
    assert served[2].view(torch.int32) == torch.tensor(-0.0).view(torch.int32)  # not +0.0
    plain = delta.materialize(base)["w"]
    selected = served_tensor(
        base["w"], delta.sum["w"], delta.load_mask("a")["w"], scale=1.0, scale_bits=delta.scale_bits, plain=plain
    )
    assert torch.equal(selected, served)
    # Where nothing moved (Q = 0), the plain merge keeps θ0's bits too.
    assert plain[2].view(torch.int32) == torch.tensor(-0.0).view(torch.int32)
    negative = delta.materialize(base, task="a", scale=-1.0)["w"]
    assert negative[2].view(torch.int32) == torch.tensor(-0.0).view(torch.int32)


def test_merged_update_approximates_float_average():
    # The integer form is exact up to 2**-41 per element; the served plain merge is the float mean of updates.
    delta = merge(["task-0", "task-1"])
    tuned = [perturbed(BASE, i, scale=0.5) for i in (0, 1)]
    served = delta.materialize(BASE)
    name = "layer.a.weight"
    mean = (tuned[0][name].double() + tuned[1][name].double()) / 2
    assert torch.allclose(served[name].double(), mean, atol=1e-6)


def test_empty_merge_serves_the_base():
    delta = MergedDelta(BASE, sign_seed=SEED)
    assert delta.num_tasks == 0
    assert_same_state(delta.materialize(BASE), dict(BASE))


def test_errors_leave_the_merge_unchanged():
    delta = merge(["task-0", "task-1"])
    digest = delta.digest
    with pytest.raises(DuplicateTaskError):
        delta.add("task-0", TASKS["task-2"])
    with pytest.raises(UnknownTaskError, match="task-0"):
        delta.remove("task-9", TASKS["task-2"])
    with pytest.raises(TaskDigestMismatchError) as err:
        delta.remove("task-0", TASKS["task-1"])
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    with pytest.raises(UnknownTaskError, match="merged tasks"):
        delta.load_mask("nope")
    for bad in ["", "..", "../x", "a/b", "a\\b", "x\x00", "tab\there", " lead", "." * 3, "x" * 129]:
        with pytest.raises(InvalidTaskIdError):
            delta.add(bad, TASKS["task-2"])
    other_seed = TaskVector.from_state_dicts(BASE, perturbed(BASE, 9), sign_seed=SEED + 1)
    with pytest.raises(SignSeedMismatchError):
        delta.add("task-9", other_seed)
    other_base = {k: v + 1 if v.is_floating_point() else v for k, v in BASE.items()}
    with pytest.raises(BaseModelMismatchError):
        delta.add("task-9", TaskVector.from_state_dicts(other_base, perturbed(other_base, 9), sign_seed=SEED))
    with pytest.raises(BaseModelMismatchError):
        delta.materialize(other_base)
    subset = TaskVector.from_state_dicts(BASE, perturbed(BASE, 9), SEED, parameters=["layer.a.weight"])
    with pytest.raises(ParameterMismatchError):
        delta.add("task-9", subset)
    wrong_shape = dict(BASE, **{"layer.a.weight": torch.zeros(5, 7)})
    with pytest.raises(ParameterMismatchError, match="shape"):
        delta.materialize(wrong_shape)
    assert delta.digest == digest and delta.task_ids == ["task-0", "task-1"]


def test_overflow_is_detected_and_nothing_changes():
    base = {"w": torch.zeros(3, dtype=torch.float64), "u": torch.zeros(2, dtype=torch.float64)}
    # q = ±3 * 2**60: two tasks sum to ±6 * 2**60, which fits; a third would reach ±9 * 2**60 > 2**63 - 1.
    big = {
        "w": torch.tensor([0.75 * 2.0**22, -0.75 * 2.0**22, 1.0], dtype=torch.float64),
        "u": torch.ones(2, dtype=torch.float64),
    }
    tv = TaskVector.from_state_dicts(base, big, 0)
    delta = MergedDelta(base, sign_seed=0)
    delta.add("a", tv)
    delta.add("b", tv)
    before = {n: t.clone() for n, t in delta.sum.items()}
    with pytest.raises(AccumulatorOverflowError, match="never wraps"):
        delta.add("c", tv)
    assert delta.task_ids == ["a", "b"]
    assert all(torch.equal(before[n], delta.sum[n]) for n in before)
    delta.remove("a", tv)
    delta.add("c", tv)  # room again after a removal
    assert delta.task_ids == ["b", "c"]


def test_pairwise_orders_are_equal():
    digests = {merge(order).digest for order in itertools.permutations(["task-0", "task-1", "task-2"])}
    assert len(digests) == 1


def test_sharded_save_round_trip(tmp_path):
    delta = merge(["task-0", "task-1"])
    delta.save_pretrained(tmp_path, max_shard_size=200)
    assert (tmp_path / "sift_delta.safetensors.index.json").exists()
    loaded = MergedDelta.from_pretrained(tmp_path)
    assert loaded.digest == delta.digest and loaded.task_ids == delta.task_ids
    assert_same_state(loaded.materialize(BASE, task="task-1"), delta.materialize(BASE, task="task-1"))
    # Sharding splits the sum only: the masks are the task vectors' own, with the bytes of an unsharded save.
    delta.save_pretrained(tmp_path / "single")
    for task_id in ("task-0", "task-1"):
        relative = Path("masks") / f"{task_id}.safetensors"
        assert (tmp_path / relative).read_bytes() == (tmp_path / "single" / relative).read_bytes()
        mask = loaded.load_mask(task_id)
        assert all(torch.equal(mask[n], TASKS[task_id].packed_masks[n]) for n in loaded.names)
    single = MergedDelta.from_pretrained(tmp_path / "single")
    assert all(torch.equal(single.sum[n], loaded.sum[n]) for n in loaded.names)
