"""The real workload at scale: streamed embedding and Stage 2 on open_clip
``RN50`` and ``ViT-B-32`` (random initialisation, seed 0, 224-px input) over
COCO-style scenes photos (non-square, 2-6 objects, the manifest's COCO boxes
as regions; :mod:`ravl_pipeline.experiments.scenes` with a 224-px short side).

Three parts (``--parts``), every figure a ratio against a baseline measured in
the same process, interleaved with it, because the CPU is shared:

* ``throughput`` — images/s over the first ``--embed-images`` validation
  photos, batch ``--batch-size``, per model:

  - ``plain``: the plain open_clip loop, ``torch.stack([lm.preprocess(
    Image.open(p).convert("RGB")) ...])`` then ``lm.model.encode_image`` under
    ``torch.inference_mode()`` (measured before each worker count's pair and
    once more at the end; the baseline is their mean, their spread the noise);
  - ``stream``: the library's loader (:func:`core.loader.stream` with
    ``ImageItem``) feeding ``encode_image`` with ``--workers`` processes — the
    loader's efficiency, ``stream / plain`` (target >= 0.8 with 2 workers);
  - ``roi``: :func:`core.embed.embed_dataset` (``mode="roi"``, proposer
    ``--proposer``) — images *and* region embeddings, so ``roi / plain`` is
    ours against plain and ``roi / stream`` the region pass's extra compute.

  Each path is warmed up once on 4 images first; every timed call includes
  its loader's start (worker processes are started per call, as in a run).
* ``step`` — seconds per step of :func:`mitigate.train.finetune` (method
  ``standard``, streamed :func:`mitigate.data.build_train_data`, ``--workers``)
  against a bare CLIP-loss step on the same batch size (one batch
  preprocessed in memory; ``encode_image``, ``encode_text``,
  :func:`mitigate.losses.clip_loss`, backward, AdamW), ``--train-steps`` steps
  each, bare runs before and after the fine-tuning runs. The steady-state step
  is the mean over steps 2.. (step 1 also pays the loader's start and AdamW's
  state allocation; reported apart). Target: finetune / bare <= 1.3.
* ``rss`` — peak resident memory, each size in a fresh subprocess (``os.wait4``
  rusage of that child: the largest of its processes, loader workers
  included): Stage 2 as ``ravl finetune --method standard --model RN50
  --max-steps 1 --batch-size 4`` at each of ``--sizes`` fine-tuning images,
  and the embedding stage alone (``embed_dataset``, RN50, ``roi``) at each of
  ``--embed-sizes`` validation images. Ratio largest / smallest (target within
  1.2 for Stage 2). The embedding stage keeps its output (one image and R
  region embeddings per image, about 20 KiB) in memory by design; anything
  beyond that slope is the process's own growth. ``--malloc-mmap-threshold
  BYTES`` runs these subprocesses with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed
  (glibc otherwise raises the threshold as large blocks are freed, and the
  region pass's ever-changing tensor shapes then fragment the heap).

The photos are generated once into ``--cache`` (outside the repository) and
reused; each size reads a dataset folder of hard links to the first N photos.
Torch runs ``--threads`` threads (``OMP_NUM_THREADS`` etc. set to the same
before torch is imported; loader workers run one thread each, as torch sets).
Every measurement is appended as one JSON row to ``--results`` (with the
command line, commit, machine and torch version); a JSON summary is printed
and written to ``--out``.

    .venv/bin/python benchmarks/scale_stream.py --parts throughput step --out /tmp/scale_stream_perf.json
    .venv/bin/python benchmarks/scale_stream.py --parts rss --sizes 1000 16000 --embed-sizes 250 1000 \\
        --out /tmp/scale_stream_rss.json
    .venv/bin/python benchmarks/scale_stream.py --parts rss --sizes 1000 --embed-sizes 250 1000 \\
        --malloc-mmap-threshold 65536 --out /tmp/scale_stream_rss_mmap.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ravl_scale_stream"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "scale_stream.jsonl"
SHORT_SIDE = 224
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
WARMUP_IMAGES = 4


# --------------------------------------------------------------------------- context

def set_threads(n: int) -> None:
    """Before torch is imported: ``n`` threads for OpenMP/BLAS and for torch."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)


def _torch(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch


def git_commit() -> dict:
    def git(*args):
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(status)}


def context(args) -> dict:
    import torch
    return {"benchmark": "scale_stream", "command": " ".join([sys.executable, *sys.argv]), **git_commit(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpu_count": os.cpu_count()},
            "torch": torch.__version__, "threads": {"torch": torch.get_num_threads(),
                                                    **{v: os.environ.get(v) for v in THREAD_VARS}}}


class Results:
    """Appends one JSON row per measurement to a ``.jsonl`` file."""

    def __init__(self, path: Path, ctx: dict):
        self.path, self.ctx = Path(path), ctx
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, **row) -> dict:
        row = {**self.ctx, "time": datetime.datetime.now().isoformat(timespec="seconds"),
               "load_avg_1m": os.getloadavg()[0], **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in row.items() if k not in self.ctx and k not in ("time",)}
        print(f"  {json.dumps(shown)}", file=sys.stderr, flush=True)
        return row


# --------------------------------------------------------------------------- data

def scenes_setting(cache: Path, n_finetune: int, n_val: int) -> Path:
    """A cached scenes setting (224-px short side) with at least these many
    fine-tuning and validation photos; generated when none is cached."""
    cache.mkdir(parents=True, exist_ok=True)
    for d in sorted(cache.glob("scenes224-ft*-val*")):
        m = re.fullmatch(r"scenes224-ft(\d+)-val(\d+)", d.name)
        if m and (d / "setting.json").is_file() and int(m[1]) >= n_finetune and int(m[2]) >= n_val:
            return d
    from ravl_pipeline.experiments.scenes import ScenesConfig, make_scenes_setting
    out = cache / f"scenes224-ft{n_finetune}-val{n_val}"
    cfg = ScenesConfig(n_pretrain=10, n_finetune=n_finetune, n_val=n_val, n_test=10, short_side=SHORT_SIDE, seed=0)
    print(f"generating {n_finetune} + {n_val} scenes photos into {out} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    make_scenes_setting(out, cfg)
    print(f"  generated in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return out


def subset_dir(setting: Path, dataset: str, split: str | None, n: int, cache: Path) -> Path:
    """A dataset folder with the first ``n`` rows of ``setting/dataset``
    (``split`` only), its images hard links to the setting's."""
    out = cache / "subsets" / f"{setting.name}-{dataset}-{split or 'all'}-{n}"
    if (out / "manifest.parquet").is_file():
        return out
    import pyarrow.compute as pc
    from ravl_pipeline.io.manifest import read_manifest, write_manifest
    src = setting / dataset
    table = read_manifest(src)
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows < n:
        raise SystemExit(f"{src}: only {table.num_rows} rows{f' in split {split}' if split else ''}, need {n}")
    table = table.slice(0, n)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in table.column("path").to_pylist():
        (tmp / p).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / p, tmp / p)
    write_manifest(tmp, table)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- part 1: throughput

def with_workers(lm, workers: int):
    from ravl_pipeline.compute import Compute
    return dataclasses.replace(lm, compute=Compute("cpu", "fp32", workers=workers))


def plain_pass(torch, lm, paths: list[str], batch_size: int) -> None:
    from PIL import Image
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            pixels = torch.stack([lm.preprocess(Image.open(p).convert("RGB")) for p in paths[s:s + batch_size]])
            lm.model.encode_image(pixels)


def stream_pass(torch, lm, ds, batch_size: int) -> None:
    from ravl_pipeline.core.embed import ImageItem
    from ravl_pipeline.core.loader import stream
    with torch.inference_mode():
        for batch in stream(ds, ImageItem(lm.preprocess), batch_size=batch_size, compute=lm.compute):
            lm.model.encode_image(torch.stack(batch))


def roi_pass(torch, lm, ds, batch_size: int, proposer: str) -> int:
    from ravl_pipeline.core.embed import embed_dataset
    return embed_dataset(lm, ds, proposer=proposer, mode="roi", batch_size=batch_size, progress=False).n_regions


def timed(fn) -> tuple[float, float, object]:
    """Wall and main-process CPU seconds of ``fn()``, and its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_throughput(args, results: Results, setting: Path, cache: Path) -> dict:
    torch = _torch(args.threads)
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.models import load_model
    ds = load_dataset(subset_dir(setting, "eval", "val", args.embed_images, cache))
    paths = [str(ds.image_path(i)) for i in range(len(ds))]
    warm = ds.subset(list(range(WARMUP_IMAGES)))
    n_boxes = sum(len(b) for b in ds.boxes)
    summary = {}
    for name in args.models:
        lm = load_model(name, seed=0)
        lm.model.eval()
        lms = {w: with_workers(lm, w) for w in args.workers}
        plain_pass(torch, lm, paths[:WARMUP_IMAGES], args.batch_size)
        stream_pass(torch, lm, warm, args.batch_size)
        roi_pass(torch, lm, warm, args.batch_size, args.proposer)
        rows: dict[str, list[dict]] = {}

        def measure(variant: str, workers: int | None, fn):
            wall, cpu, out = timed(fn)
            row = results.add(part="throughput", model=name, variant=variant, workers=workers, images=len(ds),
                              batch_size=args.batch_size, proposer=args.proposer if variant == "roi" else None,
                              regions=out if variant == "roi" else None, seconds=wall, cpu_seconds_main=cpu,
                              images_per_s=len(ds) / wall)
            rows.setdefault(f"{variant}" if workers is None else f"{variant}_w{workers}", []).append(row)

        for _ in range(args.repeats):
            for w in args.workers:
                measure("plain", None, lambda: plain_pass(torch, lm, paths, args.batch_size))
                measure("stream", w, lambda: stream_pass(torch, lms[w], ds, args.batch_size))
                measure("roi", w, lambda: roi_pass(torch, lms[w], ds, args.batch_size, args.proposer))
        measure("plain", None, lambda: plain_pass(torch, lm, paths, args.batch_size))

        plain = [r["images_per_s"] for r in rows["plain"]]
        base = statistics.mean(plain)
        model_sum = {"plain_images_per_s": base, "plain_runs": plain,
                     "plain_spread": (max(plain) - min(plain)) / base}
        for w in args.workers:
            s = statistics.median(r["images_per_s"] for r in rows[f"stream_w{w}"])
            r_ = statistics.median(r["images_per_s"] for r in rows[f"roi_w{w}"])
            model_sum[f"workers_{w}"] = {"stream_images_per_s": s, "roi_images_per_s": r_,
                                         "stream_over_plain": s / base, "roi_over_plain": r_ / base,
                                         "roi_time_over_stream_time": s / r_}
        model_sum["regions_per_image"] = n_boxes / len(ds)
        summary[name] = model_sum
        del lm, lms
    return {"images": args.embed_images, "batch_size": args.batch_size, "proposer": args.proposer, "models": summary}


# --------------------------------------------------------------------------- part 2: step time

def bare_steps(torch, lm, pixels, tokens, steps: int, cfg) -> tuple[float, list[float]]:
    """A bare CLIP-loss loop: start time and the end time of each step."""
    from ravl_pipeline.mitigate.losses import clip_loss
    model = lm.model
    model.train()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ends = []
    for _ in range(steps):
        loss = clip_loss(model.encode_image(pixels), model.encode_text(tokens), model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.item())
        ends.append(time.perf_counter())
    model.eval()
    return t0, ends


def finetune_steps(lm, data, steps: int, cfg) -> tuple[float, list[float], dict]:
    from ravl_pipeline.mitigate.train import finetune
    ends: list[float] = []
    t0 = time.perf_counter()
    history = finetune(lm, data, cfg, progress=False, on_step=lambda step, loss: ends.append(time.perf_counter()))
    return t0, ends, history


def step_figures(t0: float, ends: list[float]) -> dict:
    steady = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
    return {"first_step_s": ends[0] - t0, "steady_step_s": steady, "mean_step_s": (ends[-1] - t0) / len(ends)}


def run_step(args, results: Results, setting: Path, cache: Path) -> dict:
    torch = _torch(args.threads)
    from ravl_pipeline.config import TrainConfig
    from ravl_pipeline.experiments.synth import CAPTION_TEMPLATE
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.mitigate.data import build_train_data, captions_for
    from ravl_pipeline.models import load_model
    n = max(args.train_batch * args.train_steps, 2 * args.train_batch)
    ds = load_dataset(subset_dir(setting, "finetune", None, n, cache))
    classes = sorted(set(ds.labels))
    cfg = TrainConfig(method="standard", batch_size=args.train_batch, max_steps=args.train_steps, seed=0)
    summary = {}
    for name in args.models:
        lm = load_model(name, seed=0)
        pixels = torch.stack([lm.preprocess(ds.load_image(i)) for i in range(args.train_batch)])
        tokens = lm.tokenizer(captions_for(ds, CAPTION_TEMPLATE)[:args.train_batch])
        data = build_train_data(lm, ds, CAPTION_TEMPLATE, classes)
        # warm-up: one bare step and one streamed step
        bare_steps(torch, lm, pixels, tokens, 1, cfg)
        finetune_steps(with_workers(lm, 0), data, 1, dataclasses.replace(cfg, max_steps=1))
        rows: dict[str, list[dict]] = {}

        def record(variant: str, workers: int | None, t0, ends, extra=None):
            row = results.add(part="step", model=name, variant=variant, workers=workers, method="standard",
                              batch_size=args.train_batch, steps=len(ends), train_images=len(ds),
                              **step_figures(t0, ends), **(extra or {}))
            rows.setdefault(variant if workers is None else f"{variant}_w{workers}", []).append(row)

        for _ in range(args.repeats):
            record("bare", None, *bare_steps(torch, lm, pixels, tokens, args.train_steps, cfg))
            for w in args.workers:
                t0, ends, hist = finetune_steps(with_workers(lm, w), data, args.train_steps, cfg)
                record("finetune", w, t0, ends, {"history_seconds_per_step": hist["seconds_per_step"]})
        record("bare", None, *bare_steps(torch, lm, pixels, tokens, args.train_steps, cfg))

        bare = [r["steady_step_s"] for r in rows["bare"]]
        bare_mean = [r["mean_step_s"] for r in rows["bare"]]
        base, base_mean = statistics.mean(bare), statistics.mean(bare_mean)
        model_sum = {"bare_steady_step_s": base, "bare_runs": bare, "bare_spread": (max(bare) - min(bare)) / base,
                     "bare_mean_step_s": base_mean}
        for w in args.workers:
            ft = statistics.median(r["steady_step_s"] for r in rows[f"finetune_w{w}"])
            ft_mean = statistics.median(r["mean_step_s"] for r in rows[f"finetune_w{w}"])
            model_sum[f"workers_{w}"] = {"finetune_steady_step_s": ft, "finetune_mean_step_s": ft_mean,
                                         "steady_ratio": ft / base, "mean_ratio_incl_first_step": ft_mean / base_mean}
        summary[name] = model_sum
        del lm, data
    return {"batch_size": args.train_batch, "steps": args.train_steps, "train_images": n, "models": summary}


# --------------------------------------------------------------------------- part 3: peak RSS

def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; its exit code, wall seconds, the peak RSS (GiB) of its
    largest process (``os.wait4``) and its stdout's last line."""
    t0 = time.perf_counter()
    with log.open("w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().strip().splitlines()
    return {"rc": proc.returncode, "seconds": time.perf_counter() - t0, "max_rss_gib": usage.ru_maxrss / 2**20,
            "stdout_last": lines[-1] if lines else ""}


def finetune_has_workers_flag() -> bool:
    res = subprocess.run([sys.executable, "-m", "ravl_pipeline.cli", "finetune", "--help"], capture_output=True,
                         text=True, cwd=REPO)
    return "--workers" in res.stdout


def run_rss(args, results: Results, setting: Path, cache: Path) -> dict:
    env = {**os.environ}
    set_threads(args.rss_threads)
    env.update({v: str(args.rss_threads) for v in THREAD_VARS})
    malloc = {}
    if args.malloc_mmap_threshold is not None:  # glibc: a fixed threshold, no dynamic raising
        malloc = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
        env.update(malloc)
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stage2": {}, "embed": {}}
    workers_flag = finetune_has_workers_flag()
    for n in args.sizes:
        data = subset_dir(setting, "finetune", None, n, cache)
        out = cache / "out" / f"finetune-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "ravl_pipeline.cli", "finetune", "--method", "standard", "--model",
               args.rss_model, "--max-steps", "1", "--batch-size", "4", "--data", str(data), "--out", str(out),
               "--quiet"] + (["--workers", str(args.rss_workers)] if workers_flag else [])
        res = run_measured(cmd, logs / f"finetune-{n}.log", env)
        shutil.rmtree(out, ignore_errors=True)
        if res["rc"] != 0:
            raise SystemExit(f"finetune at N={n} failed (rc {res['rc']}); see {logs / f'finetune-{n}.log'}")
        results.add(part="rss", stage="stage2", model=args.rss_model, images=n,
                    workers=args.rss_workers if workers_flag else "default", rss_threads=args.rss_threads,
                    malloc_env=malloc, finetune_cmd=" ".join(cmd), **res)
        summary["stage2"][n] = res["max_rss_gib"]
    for n in args.embed_sizes:
        data = subset_dir(setting, "eval", "val", n, cache)
        cmd = [sys.executable, __file__, "--embed-child", str(data), "--rss-model", args.rss_model,
               "--rss-workers", str(args.rss_workers), "--threads", str(args.rss_threads),
               "--batch-size", str(args.batch_size), "--proposer", args.proposer]
        res = run_measured(cmd, logs / f"embed-{n}.log", env)
        if res["rc"] != 0:
            raise SystemExit(f"embedding at N={n} failed (rc {res['rc']}); see {logs / f'embed-{n}.log'}")
        child = json.loads(res.pop("stdout_last"))
        results.add(part="rss", stage="embed", model=args.rss_model, images=n, workers=args.rss_workers,
                    rss_threads=args.rss_threads, malloc_env=malloc, batch_size=args.batch_size,
                    proposer=args.proposer, **res, **child)
        summary["embed"][n] = {"max_rss_gib": res["max_rss_gib"], "main_rss_gib": child["main_rss_gib"],
                               "output_mib": child["output_mib"], "images_per_s": child["images_per_s"]}
    for stage in ("stage2", "embed"):
        by_n = summary[stage]
        if len(by_n) >= 2:
            lo, hi = min(by_n), max(by_n)
            get = (lambda v: v) if stage == "stage2" else (lambda v: v["max_rss_gib"])
            summary[f"{stage}_ratio_{hi}_over_{lo}"] = get(by_n[hi]) / get(by_n[lo])
    summary.update(model=args.rss_model, workers=args.rss_workers if workers_flag else "default",
                   threads=args.rss_threads, malloc_env=malloc)
    return summary


def embed_child(args) -> int:
    """The embedding stage alone over one dataset folder, in this process;
    prints one JSON line (its own peak RSS, the output's size, throughput)."""
    _torch(args.threads)
    from ravl_pipeline.compute import Compute
    from ravl_pipeline.core.embed import embed_dataset
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.models import load_model
    lm = load_model(args.rss_model, compute=Compute("cpu", "fp32", workers=args.rss_workers), seed=0)
    ds = load_dataset(args.embed_child)
    t0 = time.perf_counter()
    emb = embed_dataset(lm, ds, proposer=args.proposer, mode="roi", batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    out_bytes = emb.image_emb.nbytes + emb.region_emb.nbytes + emb.boxes.nbytes
    print(json.dumps({"regions": emb.n_regions, "embed_seconds": seconds, "images_per_s": len(ds) / seconds,
                      "output_mib": out_bytes / 2**20,
                      "main_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["throughput", "step", "rss"], choices=["throughput", "step", "rss"])
    ap.add_argument("--models", nargs="+", default=["RN50", "ViT-B-32"], help="open_clip names (random init)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts compared")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 16000], help="Stage 2 RSS: fine-tuning images")
    ap.add_argument("--embed-sizes", type=int, nargs="+", default=[250, 1000],
                    help="embedding RSS: validation images (RN50 embeds ~1 image/s on a 2-core CPU)")
    ap.add_argument("--embed-images", type=int, default=64, help="throughput: validation images per timed pass")
    ap.add_argument("--batch-size", type=int, default=32, help="embedding batch size (every path)")
    ap.add_argument("--proposer", default="boxes", help="region proposer: boxes (the COCO boxes) or quadrants")
    ap.add_argument("--train-batch", type=int, default=16, help="step: batch size")
    ap.add_argument("--train-steps", type=int, default=3, help="step: steps per timed run")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the interleaved variants")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (throughput and step)")
    ap.add_argument("--rss-model", default="RN50")
    ap.add_argument("--rss-workers", type=int, default=2, help="loader workers of the RSS runs")
    ap.add_argument("--rss-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the RSS runs")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="RSS runs: glibc MALLOC_MMAP_THRESHOLD_ (a fixed threshold; default: glibc's dynamic one)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated photos (reused between runs)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON lines, one per measurement")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    ap.add_argument("--embed-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.embed_child is not None:
        return embed_child(args)

    n_ft = max(args.sizes) if "rss" in args.parts else 0
    n_ft = max(n_ft, args.train_batch * args.train_steps, 2 * args.train_batch)
    n_val = max([args.embed_images] + (args.embed_sizes if "rss" in args.parts else []))
    setting = scenes_setting(args.cache, n_ft, n_val)
    _torch(args.threads)
    results = Results(args.results, context(args))
    summary = dict(results.ctx)
    summary["setting"] = str(setting)
    t_start = time.perf_counter()
    for part, fn in (("throughput", run_throughput), ("step", run_step), ("rss", run_rss)):
        if part in args.parts:
            t0 = time.perf_counter()
            summary[part] = fn(args, results, setting, args.cache)
            summary[part]["wall_s"] = time.perf_counter() - t0
    summary["wall_s"] = time.perf_counter() - t_start
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
