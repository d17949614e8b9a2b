"""`hf-sift verify` and `hf-sift info` on tiny artifacts, in process and through the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector, TaskVectorStore
from hf_sift.artifact import DELTA_NAME, mask_filename
from hf_sift.cli import main


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 4
BASE = {
    "a.weight": torch.randn(8, 6, generator=torch.Generator().manual_seed(0)),
    "b.bias": torch.randn(5, generator=torch.Generator().manual_seed(1)),
}
TASK_IDS = [f"client-{i}" for i in range(7)]


@pytest.fixture
def artifact(tmp_path):
    delta = MergedDelta(BASE, SEED, base_model="tiny/base", base_revision="abc123")
    vectors = {t: TaskVector.from_state_dicts(BASE, perturbed(BASE, i, 0.1), SEED) for i, t in enumerate(TASK_IDS)}
    for task_id, vector in vectors.items():
        delta.add(task_id, vector)
    before = delta.digest
    delta.remove("client-6", vectors["client-6"])
    delta.log.append("client-6", digest_before=before, digest_after=delta.digest, cost={"steps": 5}, redact=True)
    delta.save_pretrained(tmp_path / "artifact", base=None)  # "tiny/base" names no real model: format 1
    return tmp_path / "artifact"


def test_verify_exits_0_when_every_check_holds_and_1_with_the_list(artifact, capsys):
    assert main(["verify", str(artifact)]) == 0
    assert capsys.readouterr().out == f"{artifact}: every check holds\n"
    data = bytearray((artifact / mask_filename("client-3")).read_bytes())
    data[-1] ^= 0x80
    (artifact / mask_filename("client-3")).write_bytes(bytes(data))
    assert main(["verify", str(artifact)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{artifact}: 1 check(s) failed:",
        "  - masks/client-3.safetensors: does not match the mask_digest recorded in sift_manifest.json",
    ]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"hf-sift: error: {tmp_path / 'nowhere'} is not a folder\n"
    assert main(["info", str(tmp_path)]) == 1  # an artifact file missing: a failed check
    err = capsys.readouterr().err
    assert err.startswith("hf-sift: error: ") and "sift_config.json is missing" in err and err.count("\n") == 1


def test_info_text_and_json(artifact, capsys):
    assert main(["info", str(artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    delta = MergedDelta.from_pretrained(artifact)
    assert info["base_model"] == "tiny/base" and info["base_revision"] == "abc123"
    assert (info["sign_seed"], info["scale_bits"], info["num_tasks"]) == (SEED, 40, 6)
    assert info["tasks"] == TASK_IDS[:6] and info["delta_digest"] == delta.digest
    assert info["tuned_elements"] == 8 * 6 + 5 and info["tuned_parameters"] == 2
    assert info["sizes"]["sum"] == (artifact / DELTA_NAME).stat().st_size
    assert info["sizes"]["masks"] == sum(p.stat().st_size for p in (artifact / "masks").iterdir())
    assert info["log"] == delta.log.entries and "task_id" not in info["log"][0]

    assert main(["info", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "tasks T:         6 (client-0, client-1, client-2, client-3, client-4, ...)" in text
    assert "sign seed:       4" in text and "tiny/base (revision abc123)" in text
    assert "unlearning log:  1 entry" in text and "removed (redacted) hmac-sha256:" in text


def test_info_and_verify_do_not_import_transformers(artifact):
    code = (
        "import sys; from hf_sift.cli import main\n"
        f"assert main(['info', {str(artifact)!r}]) == 0 and main(['verify', {str(artifact)!r}]) == 0\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_verify_against_a_task_vector_store(artifact, tmp_path, capsys):
    store = TaskVectorStore(tmp_path / "store")
    store.put("client-0", TaskVector.from_state_dicts(BASE, perturbed(BASE, 0, 0.1), SEED))
    assert main(["verify", str(artifact), "--task-vector-store", str(store.directory)]) == 0
    store.discard("client-0")
    store.put("client-0", TaskVector.from_state_dicts(BASE, perturbed(BASE, 1, 0.1), SEED))
    capsys.readouterr()
    assert main(["verify", str(artifact), "--task-vector-store", str(store.directory)]) == 1
    assert "holds a task vector with digest" in capsys.readouterr().out
    assert main(["verify", str(artifact), "--task-vector-store", str(artifact / "store")]) == 2
    assert capsys.readouterr().err == f"hf-sift: error: {artifact / 'store'} is not a folder\n"
