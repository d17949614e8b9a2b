"""Serving benchmark: MergedMaskedModel on SmolLM2-135M with a synthetic merge of many tasks.

Run: ``PYTHONPATH=. python benchmarks/bench_serving.py [--tasks 500] [--repeats 5] [--compare-formats | --switch-only]``

The synthetic artifact (random int64 sum, one random mask per task) is built once under the cache folder and
reused. Figures printed:

- `set_task` time vs reloading the model for another task with `MergedMaskedModel.from_pretrained`, and vs one
  elementwise pass over the tuned parameters (an fp32 ``θ0 + Δ`` written into the parameters);
- load time vs plain `AutoModelForCausalLM.from_pretrained` of the base (alone, and followed by a forward pass,
  which is when a lazily mapped checkpoint is actually read);
- bytes read to load one task, in a fresh process after evicting every file of the base and the artifact from the
  page cache (`posix_fadvise(DONTNEED)`): the process's `read_bytes` from /proc/self/io, and the sizes of the files
  it opened (from `strace -e openat` when strace is installed);
- resident memory after loading (plain model, `keep_delta=True`, `keep_delta=False`; in all and anonymous, the rest
  being pages of mapped files, which the kernel can reclaim), and with `keep_delta=True` after the first switch,
  which adds the plain-merge weights; the first switch is also timed on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks.real_model import cache_dir, smollm2_path  # noqa: E402
from hf_sift import MergedDelta, MergedMaskedModel  # noqa: E402
from hf_sift.artifact import CONFIG_NAME, MANIFEST_NAME, mask_filename, save_mask_file  # noqa: E402
from hf_sift.digest import digest_tensors  # noqa: E402
from hf_sift.masks import packed_size, popcount  # noqa: E402


MARKER = "/nonexistent/hf-sift-bench-marker"
END_MARKER = "/nonexistent/hf-sift-bench-end"


def task_name(i: int) -> str:
    return f"task{i:04d}"


def build_synthetic(folder: Path, base_path: Path, num_tasks: int, seed: int = 0) -> None:
    """A merge of `num_tasks` synthetic tasks: random int64 sum (|Q| < 2**30) and random masks of density 1/2.

    The sum and masks are generated directly (building and hashing 500 full task vectors would take most of an
    hour on 2 cores); records carry a placeholder digest. The folder is then written by `MergedDelta.save_pretrained`.
    """
    base = load_file(base_path / "model.safetensors")
    delta = MergedDelta(base, sign_seed=seed, base_model=str(base_path))
    gen = torch.Generator().manual_seed(seed)
    for name in delta.names:
        delta._sum[name] = torch.randint(-(2**30), 2**30, delta.shapes[name], dtype=torch.int64, generator=gen)
        delta._bounds[name] = 2**30
    num_elements = sum(t.numel() for t in delta._sum.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="masks-", dir=folder.parent))
    try:
        for i in range(num_tasks):
            task = task_name(i)
            packed = {
                n: torch.randint(0, 256, (packed_size(t.numel()),), dtype=torch.uint8, generator=gen)
                for n, t in delta._sum.items()
            }
            path = scratch / mask_filename(task)
            mask_digest = save_mask_file(path, packed)
            selected = sum(popcount(m) for m in packed.values())
            delta._records[task] = {
                "digest": "sha256:" + hashlib.sha256(task.encode()).hexdigest(),  # placeholder: synthetic task
                "mask_density": selected / num_elements,
                "num_elements": num_elements,
                "num_selected": selected,
                "metadata": {"synthetic": True},
                "mask_digest": mask_digest,
            }
            delta._masks[task] = path
        delta.save_pretrained(folder, base=None)  # format 1 (sum only); `serving_formats` adds format 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def timed(fn) -> tuple[float, object]:
    gc.collect()  # free what earlier calls left in reference cycles (a model) before the clock starts
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def evict(paths: list[Path]) -> None:
    for root in paths:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def proc_io() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().split("\n")
    return {k: int(v) for k, v in (line.split(": ") for line in lines if line)}


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().split("\n"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_child(mode: str, artifact: Path, base_path: Path, task: str) -> None:
    """Child process: evict the files, load once, print bytes read and memory as JSON."""
    evict([artifact, base_path])
    with contextlib.suppress(OSError):
        open(MARKER)  # noqa: SIM115 - marks, in the strace log, where the measured load starts
    before = proc_io()
    if mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        for p in model.parameters():  # read every weight, as serving does
            p.detach().sum()
    else:
        model = MergedMaskedModel.from_pretrained(artifact, task=task, keep_delta=(mode == "keep_delta"))
    after = proc_io()
    result = {
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "rchar": after["rchar"] - before["rchar"],
        "rss": proc_status("VmRSS"),
        "rss_anon": proc_status("RssAnon"),
        "peak_rss": proc_status("VmHWM"),
    }
    with contextlib.suppress(OSError):
        open(END_MARKER)  # noqa: SIM115 - where it ends
    if mode == "keep_delta":  # the first switch adds the plain-merge weights
        model.set_task(task_name(int(task.removeprefix("task")) + 1))
        result["rss_after_switch"] = proc_status("VmRSS")
    print("RESULT " + json.dumps(result))


def run_child(mode: str, artifact: Path, base_path: Path, task: str) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", mode, str(artifact), str(base_path), task]
    trace = None
    if shutil.which("strace"):
        trace = Path(tempfile.mkstemp(suffix=".strace")[1])
        command = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace), *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    if trace is not None:
        opened, started = set(), False
        for line in trace.read_text().splitlines():
            started = started or MARKER in line
            if END_MARKER in line:
                break
            if started and "openat(" in line and " = -1" not in line:
                path = line.split('"')[1]
                resolved = Path(path).resolve()
                if any(str(resolved).startswith(str(root)) for root in (artifact, base_path)) and resolved.is_file():
                    opened.add(resolved)
        result["opened_files"] = len(opened)
        result["opened_bytes"] = sum(p.stat().st_size for p in opened)
        trace.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=cache_dir() / "bench_serving")
    parser.add_argument(
        "--compare-formats",
        action="store_true",
        help="only compare format 1 and format 2 (fp32 and bf16 rows, side by side; see serving_formats.py)",
    )
    parser.add_argument(
        "--switch-only",
        action="store_true",
        help="only `set_task` vs one elementwise pass, interleaved, both formats in fp32 and bf16",
    )
    parser.add_argument("--child", nargs=4, metavar=("MODE", "ARTIFACT", "BASE", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, artifact, base, task = args.child
        measure_child(mode, Path(artifact), Path(base), task)
        return

    torch.manual_seed(0)
    base_path = smollm2_path()
    artifact = args.workdir / f"smollm2_{args.tasks}_tasks_v1"
    if not (artifact / CONFIG_NAME).exists():
        seconds, _ = timed(lambda: build_synthetic(artifact, base_path, args.tasks))
        print(f"built the synthetic artifact in {seconds:.1f} s")
    if args.compare_formats or args.switch_only:
        import platform

        from benchmarks.serving_formats import compare, switch_only

        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        print(f"machine: {cpu}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
        if args.switch_only:
            tasks = [task_name(i) for i in range(args.tasks)]
            switch_only(args.workdir, artifact, base_path, tasks, args.repeats, timed)
            return
        compare(
            args.workdir,
            artifact,
            base_path,
            [task_name(i) for i in range(args.tasks)],
            args.repeats,
            run_child,
            timed,
        )
        return
    size = {p.name: p.stat().st_size for p in artifact.iterdir() if p.is_file()}
    mask_sizes = [p.stat().st_size for p in (artifact / "masks").iterdir()]
    base_bytes = (base_path / "model.safetensors").stat().st_size
    sum_bytes = sum(v for k, v in size.items() if k.startswith("sift_delta"))
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(f"artifact: {len(mask_sizes)} masks of {mask_sizes[0] / 1e6:.2f} MB ({sum(mask_sizes) / 1e9:.2f} GB)")
    print(f"base checkpoint {base_bytes / 1e6:.1f} MB, sum {sum_bytes / 1e6:.1f} MB")

    tasks = [task_name(i) for i in range(args.tasks)]
    # Bytes read first, while this process maps no file: a mapped page cannot be evicted from the page cache.
    expected = base_bytes + sum_bytes + mask_sizes[0] + size[CONFIG_NAME] + size[MANIFEST_NAME]
    print(f"expected bytes for one task (base + sum + one mask + config + manifest): {expected / 1e6:.1f} MB")
    print(f"all masks together: {sum(mask_sizes) / 1e6:.1f} MB")
    for mode in ("plain", "keep_delta", "drop_delta"):
        r = run_child(mode, artifact, base_path, tasks[3])
        opened = (
            f", files opened {r['opened_files']} = {r['opened_bytes'] / 1e6:.1f} MB" if "opened_bytes" in r else ""
        )
        print(
            f"{mode:>10}: read_bytes {r['read_bytes'] / 1e6:.1f} MB (rchar {r['rchar'] / 1e6:.1f} MB){opened}; "
            f"RSS after load {r['rss'] / 1e6:.0f} MB (anonymous {r['rss_anon'] / 1e6:.0f} MB), "
            f"peak {r['peak_rss'] / 1e6:.0f} MB"
            + (f", after the first switch {r['rss_after_switch'] / 1e6:.0f} MB" if "rss_after_switch" in r else "")
        )

    print()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])

    def plain_load():
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    def plain_load_forward():
        model = plain_load()
        with torch.no_grad():
            model(ids)
        return model

    def sift_load(task=tasks[1], **kwargs):
        return MergedMaskedModel.from_pretrained(artifact, task=task, **kwargs)

    def sift_load_forward():
        model = sift_load()
        with torch.no_grad():
            model(ids)
        return model

    # Warm the page cache and the allocator once; then interleave the measurements.
    plain_load(), sift_load()
    kinds = ("plain", "plain+fwd", "sift", "sift+fwd", "sift_noverify", "sift_keep_delta_false")
    loads: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        loads["plain"].append(timed(plain_load)[0])
        loads["sift"].append(timed(sift_load)[0])
        loads["plain+fwd"].append(timed(plain_load_forward)[0])
        loads["sift+fwd"].append(timed(sift_load_forward)[0])
        loads["sift_noverify"].append(timed(lambda: sift_load(verify=False))[0])
        loads["sift_keep_delta_false"].append(timed(lambda: sift_load(keep_delta=False))[0])
    load = {k: statistics.median(v) for k, v in loads.items()}
    print("load times (s), every repeat:", json.dumps({k: [round(x, 3) for x in v] for k, v in loads.items()}))

    model = sift_load()
    delta, base_weights = model.delta, model._base_weights
    params = model.model.state_dict()
    names = delta.names
    step = {n: torch.randn(base_weights[n].shape) * 1e-3 for n in names}

    def one_pass():
        for n in names:
            torch.add(base_weights[n], step[n], out=params[n])

    # The digests every verified load computes (the sum's with `verify`, θ0's always), alone: a floor for loading.
    hash_sum = median_time(lambda: digest_tensors(delta.sum), args.repeats)
    hash_base = median_time(lambda: digest_tensors(base_weights), args.repeats)

    switches = iter(tasks[2:] * 10)
    # The first switch after a load also computes the plain-merge weights that later switches select from.
    first_times = []
    for _ in range(args.repeats):
        fresh = sift_load()
        first_times.append(timed(lambda fresh=fresh: fresh.set_task(next(switches)))[0])
        del fresh
    model.set_task(next(switches))
    switch_times, plain_times, pass_times, reload_times = [], [], [], []
    for _ in range(args.repeats):
        switch_times.append(timed(lambda: model.set_task(next(switches)))[0])
        plain_times.append(timed(lambda: model.set_task(None))[0])
        pass_times.append(timed(one_pass)[0])
        reload_times.append(timed(lambda: sift_load(task=next(switches)))[0])
    model.set_task(tasks[0])
    print(
        "switch times (s), every repeat:",
        json.dumps(
            {
                k: [round(x, 3) for x in v]
                for k, v in zip(
                    ("first set_task", "set_task", "set_task(None)", "one_pass", "reload"),
                    (first_times, switch_times, plain_times, pass_times, reload_times),
                )
            }
        ),
    )
    switch, unmasked, one, reload = (
        statistics.median(v) for v in (switch_times, plain_times, pass_times, reload_times)
    )
    tuned = sum(t.numel() for t in base_weights.values())

    print()
    print(f"tuned parameters: {tuned / 1e6:.1f} M elements of {len(names)} tensors; median of {args.repeats}")
    print(f"set_task:                       {switch:.3f} s")
    first = statistics.median(first_times)
    print(f"first set_task after a load:    {first:.3f} s   -> {first / one:.2f}x a pass (adds the plain merge)")
    print(
        f"reload for another task:        {reload:.3f} s   -> set_task is {reload / switch:.1f}x faster (target >= 10x)"
    )
    print(f"one fp32 pass over tuned params:{one:.3f} s   -> set_task is {switch / one:.2f}x a pass (target <= 2x)")
    print(
        f"set_task(None) (no mask):       {unmasked:.3f} s   -> set_task is {switch / unmasked:.2f}x the unmasked pass"
    )
    print(f"plain from_pretrained:          {load['plain']:.3f} s")
    print(
        f"MergedMaskedModel.from_pretrained: {load['sift']:.3f} s  -> {load['sift'] / load['plain']:.2f}x plain (target <= 1.5x)"
    )
    print(
        f"  with verify=False:            {load['sift_noverify']:.3f} s  -> {load['sift_noverify'] / load['plain']:.2f}x plain"
    )
    print(
        f"  with keep_delta=False:        {load['sift_keep_delta_false']:.3f} s  -> "
        f"{load['sift_keep_delta_false'] / load['plain']:.2f}x plain"
    )
    print(f"plain load + 1 forward:         {load['plain+fwd']:.3f} s")
    print(
        f"sha256 alone: sum {hash_sum:.3f} s, θ0 {hash_base:.3f} s -> with the base's own load, a verified load "
        f"cannot go below ~{max(hash_sum, hash_base + load['plain']):.3f} s on two threads "
        f"({max(hash_sum, hash_base + load['plain']) / load['plain']:.1f}x plain)"
    )
    low = {k: min(v) for k, v in loads.items()}
    low_switch, low_reload, low_pass = min(switch_times), min(reload_times), min(pass_times)
    print(
        f"least contended (min of {args.repeats}): set_task {low_switch:.3f} s, reload {low_reload:.3f} s "
        f"({low_reload / low_switch:.1f}x), pass {low_pass:.3f} s ({low_switch / low_pass:.1f}x), "
        f"load {low['sift']:.3f} s vs plain {low['plain']:.3f} s ({low['sift'] / low['plain']:.1f}x) "
        f"and vs plain+forward {low['plain+fwd']:.3f} s ({low['sift+fwd'] / low['plain+fwd']:.1f}x with forward), "
        f"verify=False {low['sift_noverify']:.3f} s"
    )
    print(f"sift load + 1 forward:          {load['sift+fwd']:.3f} s  -> {load['sift+fwd'] / load['plain+fwd']:.2f}x")


if __name__ == "__main__":
    main()
