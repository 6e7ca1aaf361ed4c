"""Soak run: train for a long time on a memory-mapped generated-data file larger than RAM / 4 and record the
trainer's resident memory (RSS) and throughput over time. Passes when RSS stays flat (the pipeline reads
images with positional reads, so pages of the file never count in the process's RSS) and img/s is steady.

  python bench/soak.py --minutes 20                     # writes the file once (6.8 GB), then trains
  python bench/soak.py --minutes 20 --side 64           # 64 x 64 (issue 25): a 6.5 GB file of 64 x 64 rows

The file is a generated-format .npz (`image` uint8 [N, 32, 32, 3], `label` [N], stored uncompressed as
np.savez writes it), streamed to disk in chunks so that writing it needs little memory either. Its images
are the real CIFAR-10 training images cycled (a new random order each cycle, each chunk of 50,000 rolled by a
random multiple of 4 pixels); the real source is the JPEG zip: both pipelines run for real. Training is a
small l_inf-dist Net at 30 % real / 70 % generated, so the run reads millions of generated rows spread over
the whole file.

At --side 64 the images are the same real CIFAR-10 images resized to 64 x 64 (PIL's box filter), the real
data is their training and test sets written once as real-format .npz files (the layout of DM-Improves-AT's
Tiny-ImageNet repack, read in place like the generated file), and the run is the same small net on the
tiny_imagenet dataset (64 x 64, 200 classes; CIFAR's labels are 0-9 of them).

Prints a table (minute, RSS, img/s) and a summary, and writes it as JSON (atomically) to --report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
REAL = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg-{split}.zip")


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resized(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> [N, side, side, 3] with PIL's box filter (the identity at 32)."""
    if images.shape[1] == side:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BOX)) for im in images])


def real_arrays(real: str, split: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    from certjax.data import sources

    source = sources.make_real_source(real, split, "cifar10")
    images, labels = source.read(np.arange(len(source)))
    return resized(np.asarray(images, np.uint8), side), np.asarray(labels, np.int64)


def write_big_npz(
    path: str, num_images: int, real: str, seed: int = 0, chunk: int = 50_000, side: int = 32
) -> None:
    """Stream a stored .npz of num_images rows to path (via a temporary name, renamed when complete)."""
    images, labels = real_arrays(real, "train", side)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-num_images // len(images)))])
    order = order[:num_images]
    tmp = path + ".partial"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels[order], allow_pickle=False)
        with zf.open("image.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, side, side, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, num_images, chunk):
                idx = order[start : start + chunk]
                shift = rng.integers(0, 8, size=2) * 4
                f.write(np.roll(images[idx], tuple(shift), axis=(1, 2)).tobytes())
    os.replace(tmp, path)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--pool", default=os.path.join(REPO, "runs", "soak", "generated_big.npz"))
    parser.add_argument("--images", type=int, default=0, help="rows of the file (0: enough for > RAM / 4)")
    parser.add_argument("--real", default=REAL)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "soak", "run"))
    parser.add_argument("--report", default=os.path.join(REPO, "runs", "soak", "report.json"))
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--side", type=int, default=32, choices=(32, 64), help="image side (64: Tiny size)")
    parser.add_argument("--every", type=int, default=5, help="epochs between evaluations and checkpoints")
    args = parser.parse_args(argv)
    if args.side == 64:  # its own files and run, beside the 32 x 32 ones
        args.pool = args.pool.replace(".npz", "_64.npz")
        args.workdir, args.report = args.workdir + "_64", args.report.replace(".json", "_64.json")

    ram = total_ram_bytes()
    row_bytes = args.side * args.side * 3
    rows = args.images or int(ram / 4 / row_bytes * 1.1)  # 10 % above RAM / 4
    if not os.path.exists(args.pool):
        os.makedirs(os.path.dirname(args.pool), exist_ok=True)
        start = time.time()
        print(f"writing {rows:,} images ({rows * row_bytes / 2**30:.2f} GiB) to {args.pool} ...", flush=True)
        write_big_npz(args.pool, rows, args.real, side=args.side)
        print(f"  written in {time.time() - start:.0f} s", flush=True)
    size = os.path.getsize(args.pool)
    print(
        f"generated file {args.pool}: {size / 2**30:.2f} GiB = {size / ram:.2f} x RAM ({ram / 2**30:.1f} GiB)"
    )

    real, dataset = args.real, "cifar10"
    if args.side == 64:
        real, dataset = os.path.join(os.path.dirname(args.pool), "real64-{split}.npz"), "tiny_imagenet"
        for split in ("train", "test"):
            if not os.path.exists(real.format(split=split)):
                images, labels = real_arrays(args.real, split, 64)
                np.savez(real.format(split=split), image=images, label=labels)
    command = [
        sys.executable, os.path.join(REPO, "launch.py"), "--config=configs/linf_dist.py:demo",
        f"--workdir={args.workdir}", f"--config.data.real={real}", f"--config.data.dataset={dataset}",
        f"--config.data.generated={args.pool}", "--config.data.real_fraction=0.3",
        "--config.model.depth=3", "--config.model.width=32", "--config.train.batch_size=128",
        "--config.train.epochs=1000", "--config.train.log_every_steps=100",
        "--config.train.eval_subset=500", f"--config.train.eval_every_epochs={args.every}",
        f"--config.checkpoint.every_epochs={args.every}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    throughput: list[tuple[float, float, int]] = []  # (seconds, img/s, step)
    t0 = time.time()

    def read_output():
        pattern = re.compile(r"step (\d+)/\d+ .* ([\d.]+) img/s")
        for line in proc.stdout:
            match = pattern.search(line)
            if match:
                throughput.append((time.time() - t0, float(match.group(2)), int(match.group(1))))

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    deadline = t0 + args.minutes * 60
    print(f"{'minute':>7} {'RSS MiB':>9} {'img/s':>8} {'step':>7}", flush=True)
    while time.time() < deadline and proc.poll() is None:
        time.sleep(args.sample_seconds)
        samples.append((time.time() - t0, rss_bytes(proc.pid)))
        last = throughput[-1] if throughput else (0.0, float("nan"), 0)
        print(
            f"{samples[-1][0] / 60:7.1f} {samples[-1][1] / 2**20:9.0f} {last[1]:8.0f} {last[2]:7d}",
            flush=True,
        )
    finished_early = proc.poll() is not None
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    if finished_early:
        print("the training process ended before the soak did: see its output", file=sys.stderr)
        return 1

    # RSS from the first sample after the warm-up (compile, first evaluation) to the end
    warm = [s for s in samples if s[0] >= 120] or samples
    rates = [r for t, r, _ in throughput if t >= 120]
    quarter = max(len(rates) // 4, 1)
    report = {
        "file": args.pool,
        "file_gib": size / 2**30,
        "ram_gib": ram / 2**30,
        "minutes": (samples[-1][0] if samples else 0) / 60,
        "steps": throughput[-1][2] if throughput else 0,
        "rss_mib_start": warm[0][1] / 2**20,
        "rss_mib_end": warm[-1][1] / 2**20,
        "rss_mib_max": max(s[1] for s in warm) / 2**20,
        "img_per_s_median": float(np.median(rates)) if rates else float("nan"),
        "img_per_s_first_quarter": float(np.median(rates[:quarter])) if rates else float("nan"),
        "img_per_s_last_quarter": float(np.median(rates[-quarter:])) if rates else float("nan"),
        "img_per_s_min": float(np.min(rates)) if rates else float("nan"),
        "img_per_s_max": float(np.max(rates)) if rates else float("nan"),
        "samples": [{"seconds": t, "rss_mib": r / 2**20} for t, r in samples],
        "throughput": [{"seconds": t, "img_per_s": r, "step": s} for t, r, s in throughput],
        "command": command,
    }
    from certjax.evaluate import atomic_write_bytes

    atomic_write_bytes(args.report, json.dumps(report, indent=1).encode())
    r = report
    print(
        f"RSS {r['rss_mib_start']:.0f} MiB at minute {warm[0][0] / 60:.1f} -> {r['rss_mib_end']:.0f} MiB at "
        f"minute {warm[-1][0] / 60:.1f} (max {r['rss_mib_max']:.0f}); img/s median "
        f"{r['img_per_s_median']:.0f} (first quarter {r['img_per_s_first_quarter']:.0f}, last quarter "
        f"{r['img_per_s_last_quarter']:.0f}, min {r['img_per_s_min']:.0f}, max {r['img_per_s_max']:.0f}); "
        f"{r['steps']:,} steps; report: {args.report}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
