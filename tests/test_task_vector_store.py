"""TaskVectorStore: exact, losslessly compressed task vectors, rebuilt bit for bit and digest-checked."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed
from safetensors import safe_open

from hf_sift import MergedDelta, SignVector, TaskVector
from hf_sift.errors import (
    CorruptArtifactError,
    DuplicateTaskError,
    TaskDigestMismatchError,
    TaskVectorStoreError,
    UnknownTaskError,
)
from hf_sift.masks import pack_bits
from hf_sift.task_vector_store import TaskVectorStore


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 3
BASE = {
    "a.weight": torch.randn(40, 30, generator=torch.Generator().manual_seed(0)),
    "b.bias": torch.randn(13, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "c.weight": torch.randn(0, 4),
    "d.weight": torch.zeros(5, 7),  # moves by tiny amounts: q fits in int8 or int16
}


def sift_tuned(seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A fake SIFT fine-tune: each entry moves only in the direction of the sign vector (or not at all)."""
    tuned = perturbed(BASE, seed, scale)
    signs = SignVector(SEED)
    out = {}
    for name, base in BASE.items():
        v = signs.for_parameter(name, base.shape, dtype=base.dtype)
        out[name] = base + v * torch.relu(v * (tuned[name] - base))
    return out


def expected_dtype(values: list[int]) -> torch.dtype:
    """The first of int8, int16, bfloat16, int32, float32, int64 holding every value exactly (no outliers)."""
    largest = max((abs(v) for v in values), default=0)
    significant = max(((abs(v) >> ((v & -v).bit_length() - 1)).bit_length() for v in values), default=0)
    for dtype, fits in [
        (torch.int8, largest < 2**7),
        (torch.int16, largest < 2**15),
        (torch.bfloat16, significant <= 8),
        (torch.int32, largest < 2**31),
        (torch.float32, significant <= 24),
    ]:
        if fits:
            return dtype
    return torch.int64


def assert_same_vector(a: TaskVector, b: TaskVector) -> None:
    assert a.q.keys() == b.q.keys() and a.packed_masks.keys() == b.packed_masks.keys()
    for name in a.q:
        assert a.q[name].dtype == b.q[name].dtype == torch.int64
        assert torch.equal(a.q[name], b.q[name]), name
        assert torch.equal(a.packed_masks[name], b.packed_masks[name]), name
    assert (a.sign_seed, a.scale_bits, a.base_digest, a.metadata) == (
        b.sign_seed,
        b.scale_bits,
        b.base_digest,
        b.metadata,
    )
    assert a.digest == b.digest


def stored_dtype(store: TaskVectorStore, task_id: str, name: str) -> torch.dtype:
    with safe_open(store.path(task_id), framework="pt") as f:
        return f.get_tensor(name).dtype


def has_tensor(store: TaskVectorStore, task_id: str, name: str) -> bool:
    with safe_open(store.path(task_id), framework="pt") as f:
        return name in f.keys()  # noqa: SIM118


@pytest.mark.parametrize("scale", [1e-11, 1e-8, 1e-4, 10.0])
def test_sift_task_vectors_round_trip_in_the_narrowest_width_with_the_mask_as_support(tmp_path, scale):
    vector = TaskVector.from_state_dicts(BASE, sift_tuned(1, scale), SEED, metadata={"lr": 0.1, "rows": [1, 2]})
    store = TaskVectorStore(tmp_path / "store")
    written = store.put("alice", vector, record={"digest": vector.digest})
    assert written == store.nbytes("alice") == store.path("alice").stat().st_size
    assert_same_vector(store.get("alice", expected_digest=vector.digest), vector)
    assert store.record("alice") == {"digest": vector.digest}

    # q is zero outside the SIFT mask: only masked entries are stored, and the mask is their bitmap.
    widths = {n: stored_dtype(store, "alice", f"values/{n}") for n in vector.q}
    for name, q in vector.q.items():
        nonzero = [v for v in q.flatten().tolist() if v]
        shift = min(((v & -v).bit_length() - 1 for v in nonzero), default=0)  # low bits every entry has at zero
        stored = [v >> shift for v in nonzero]
        assert widths[name].itemsize <= expected_dtype(stored).itemsize, name  # narrower with a few outliers
        assert not has_tensor(store, "alice", f"mask/{name}"), name
    dense_bytes = sum(t.numel() for t in vector.q.values()) * 8
    packed = sum(vector.q[n].numel() * widths[n].itemsize for n in vector.q) * vector.density + dense_bytes / 64
    assert written < packed + 4096  # the masked entries, one bit per element, and the header


def test_any_task_vector_round_trips_dense_with_its_mask(tmp_path):
    vector = TaskVector.from_state_dicts(BASE, perturbed(BASE, 2, scale=0.5), SEED)  # q nonzero outside its mask
    store = TaskVectorStore(tmp_path)
    store.put("bob", vector)
    assert_same_vector(store.get("bob"), vector)
    assert has_tensor(store, "bob", "mask/a.weight") and not has_tensor(store, "bob", "support/a.weight")


def test_store_contents_and_refusals(tmp_path):
    alice = TaskVector.from_state_dicts(BASE, sift_tuned(1, 1e-3), SEED)
    bob = TaskVector.from_state_dicts(BASE, sift_tuned(2, 1e-3), SEED)
    store = TaskVectorStore(tmp_path / "store")
    assert store.task_ids == [] and "alice" not in store
    store.put("bob", bob)
    store.put("alice", alice)
    assert store.task_ids == ["alice", "bob"] and "alice" in store and len(store) == 2
    assert store.directory.stat().st_mode & 0o777 == 0o700  # created private
    before = store.path("alice").read_bytes()
    assert store.put("alice", alice) == len(before)  # the same vector again: nothing written
    with pytest.raises(DuplicateTaskError, match="already holds another task vector"):
        store.put("alice", bob)
    assert store.path("alice").read_bytes() == before
    with pytest.raises(TaskDigestMismatchError, match="not the expected"):
        store.get("alice", expected_digest=bob.digest)
    with pytest.raises(UnknownTaskError):
        store.get("carol")
    store.discard("bob")
    assert store.task_ids == ["alice"]


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    vector = TaskVector.from_state_dicts(BASE, sift_tuned(1, 1e-3), SEED)
    store = TaskVectorStore(tmp_path)
    store.put("alice", vector)
    path = store.path("alice")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=f"stored task vector {path}"):
        store.get("alice")
    data[-1] ^= 0x01
    data[20] ^= 0x20  # in the header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=str(path)):
        store.get("alice")


def test_a_store_inside_an_artifact_is_refused(tmp_path):
    delta = MergedDelta(BASE, SEED)
    delta.save_pretrained(tmp_path / "artifact")
    with pytest.raises(TaskVectorStoreError, match="must never be published"):
        TaskVectorStore(tmp_path / "artifact" / "private")


def test_unlearning_through_the_store_equals_a_fresh_merge(tmp_path):
    vectors = {t: TaskVector.from_state_dicts(BASE, sift_tuned(i, 1e-3), SEED) for i, t in enumerate("abc")}
    store = TaskVectorStore(tmp_path / "store")
    delta, fresh = MergedDelta(BASE, SEED), MergedDelta(BASE, SEED)
    for task_id, vector in vectors.items():
        delta.add(task_id, vector)
        store.put(task_id, vector, record=delta.record(task_id))
        if task_id != "b":
            fresh.add(task_id, vector)
    delta.remove("b", store.get("b", expected_digest=delta.record("b")["digest"]))
    assert delta.digest == fresh.digest and delta.task_ids == ["a", "c"]


def test_updates_of_16_bit_weights_are_stored_in_two_bytes(tmp_path):
    gen = torch.Generator().manual_seed(4)
    # bfloat16 weights of very different magnitudes, each moved by a few ulps along v: q has few significant bits
    # but no low zero bits in common, so as an integer it would need 4 bytes.
    base = {"w": (torch.randn(64, 64, generator=gen) * 2.0 ** torch.randint(-12, 4, (64, 64), generator=gen))}
    base["w"] = base["w"].to(torch.bfloat16)
    v = SignVector(SEED).for_parameter("w", (64, 64), dtype=torch.float32)
    step = torch.rand(64, 64, generator=gen) * 0.05 * base["w"].float().abs()
    tuned = {"w": (base["w"].float() + v * step).to(torch.bfloat16)}
    vector = TaskVector.from_state_dicts(base, tuned, SEED)
    nonzero = [x for x in vector.q["w"].flatten().tolist() if x]
    shift = min((x & -x).bit_length() - 1 for x in nonzero)
    assert (
        max(abs(x) >> shift for x in nonzero) >= 2**15
        and expected_dtype([x >> shift for x in nonzero]) == torch.bfloat16
    )

    store = TaskVectorStore(tmp_path)
    written = store.put("w", vector)
    assert stored_dtype(store, "w", "values/w") == torch.bfloat16
    assert_same_vector(store.get("w"), vector)
    assert written < 2 * len(nonzero) + 64 * 64 // 8 + 1024


@pytest.mark.parametrize("sparse", [False, True])
def test_a_few_large_entries_are_kept_aside_as_outliers(tmp_path, sparse):
    q = torch.randint(-(2**15), 2**15, (50, 40), generator=torch.Generator().manual_seed(5))
    q[q == 0] = 1
    if sparse:
        q.view(-1)[::2] = 0
    big = torch.tensor([7, 123, 1999])
    q.view(-1)[big] = torch.tensor([2**40 + 1, -(2**35) - 3, 2**62 + 5])  # odd: no common low zero bits
    if sparse:  # outliers are counted among the stored (nonzero) entries
        big = torch.tensor([(q.view(-1)[:i] != 0).sum().item() for i in big.tolist()])
    vector = TaskVector(q={"w": q}, packed_masks={"w": pack_bits(q > 0)}, sign_seed=SEED)
    store = TaskVectorStore(tmp_path)
    written = store.put("t", vector)
    assert stored_dtype(store, "t", "values/w") == torch.int16
    with safe_open(store.path("t"), framework="pt") as f:
        assert torch.equal(f.get_tensor("outlier_index/w"), big)
    assert_same_vector(store.get("t"), vector)
    assert written < 2 * q.numel() + 3 * 16 + 50 * 40 // 8 + 1024


@pytest.mark.parametrize(
    "values",
    [[-(2**63), 0, 2**63 - 1, 1], [-(2**63), 0, -(2**63), 0], [-(2**63), 2**62, 0, 0], [2**62, -(2**62), 0, 0]],
)
def test_the_int64_extremes_round_trip(tmp_path, values):
    q = torch.tensor(values, dtype=torch.int64)
    vector = TaskVector(q={"w": q}, packed_masks={"w": pack_bits(q > 0)}, sign_seed=SEED)
    store = TaskVectorStore(tmp_path)
    store.put("t", vector)
    assert_same_vector(store.get("t"), vector)
