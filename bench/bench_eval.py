"""Evaluation benchmark at val2017 scale (issues 3 and 15).

    .venv/bin/python bench/bench_eval.py [--images 5000] [--dets 20] [--repeats 1]

Generates ground truth (5,000 images, ~11,000 person annotations) and predictions (~20 per
image), then times keypoints + boxes together, side by side in one run:
  (a) the reference scripts' way (torchvision references' CocoEvaluator): pycocotools
      COCOeval.evaluate per batch of 1 image as predictions arrive, keypoint records without
      boxes (COCO's keypoint results format), then merge + accumulate;
  (b) dist_kp's evaluate_distributed at 1 and 2 processes (torchrun, gloo), each backend, with
      the time per phase of rank 0 (ground truth, detections, matching, gather, merge);
  (c) `python -m dist_kp.evaluate --annotations --results` as a whole process, each backend, and
      its phases in one process (imports, JSON load, ground truth, checks, matching, merge);
  (d) result records from model outputs: per 100,000 detections, numpy over a batch against
      the per-detection Python it replaced.
Every variant's stats are checked against (a): pycocotools bit for bit, faster_coco_eval
within 1e-12 (see dist_kp.evaluation for what "exact" means).

    .venv/bin/python bench/bench_eval.py --gather [--before /path/to/old/checkout] [--backend NAME]

is the focused mode of issue 23 item 5: (a) as a process of its own, then evaluate_distributed at 1
and 2 processes from this checkout (and, with --before, from the old one, side by side on the same
files). Each rank reads only its own shard's results file; reported: wall time of
evaluate_distributed, rank 0's time in matching, gather_objects (waiting for the other rank and
receiving), rebuilding the other ranks' records and merge, and every process's peak RSS (the
reference's from os.wait4, with torch and torchvision imported as in the reference scripts; a
rank's from getrusage right after evaluate_distributed; each with what its imports alone took).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_eval")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOLERANCE = 1e-12


def make_data(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON

    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        w, h = (640, 480) if rng.random() < 0.6 else (480, 640)
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        people = []
        for _ in range(int(rng.choice([1, 1, 2, 2, 3, 4]))):
            bw, bh = rng.uniform(30, 250), rng.uniform(60, 400)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            kps = np.stack([rng.uniform(x, x + bw, 17), rng.uniform(y, y + bh, 17), rng.choice([0, 1, 2], 17)], 1)
            kps[kps[:, 2] == 0] = 0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": round(bw * bh * 0.6, 2),
                         "keypoints": kps.round(2).reshape(-1).tolist(), "num_keypoints": int((kps[:, 2] > 0).sum())})
            people.append(anns[-1])
        for d in range(dets_per_image):
            src = people[d % len(people)]
            x, y, bw, bh = src["bbox"]
            jitter = rng.uniform(0, 40) if d >= len(people) else rng.uniform(0, 6)
            kps = np.asarray(src["keypoints"], float).reshape(17, 3)
            kps[:, :2] += rng.normal(0, jitter, (17, 2))
            kps[:, 2] = 1
            results.append({"image_id": image_id, "category_id": 1, "score": round(float(rng.uniform(0.05, 1)), 4),
                            "bbox": [round(x + rng.normal(0, jitter), 2), round(y + rng.normal(0, jitter), 2),
                                     round(bw, 2), round(bh, 2)],
                            "keypoints": kps.round(2).reshape(-1).tolist()})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}]}
    return gt, results


def reference_style(gt_path: Path, results: list[dict]) -> dict[str, list[float]]:
    """torchvision references' CocoEvaluator: evaluate per batch of 1 image, merge, accumulate."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        stats = {}
        for iou_type in ("keypoints", "bbox"):
            by_image: dict[int, list[dict]] = {}
            for r in results:  # the reference's prepare_for_coco_keypoint gives no box
                by_image.setdefault(r["image_id"], []).append(
                    {k: v for k, v in r.items() if k != "bbox"} if iou_type == "keypoints" else r)
            evaluator = COCOeval(gt, iouType=iou_type)
            img_ids, eval_imgs = [], []
            for image_id in sorted(gt.getImgIds()):
                dt = gt.loadRes(copy.deepcopy(by_image[image_id])) if image_id in by_image else COCO()
                batch = COCOeval(gt, dt, iou_type)
                batch.params.imgIds = [image_id]
                batch.evaluate()
                img_ids.append(image_id)
                eval_imgs.append(np.asarray(batch.evalImgs).reshape(-1, len(batch.params.areaRng), 1))
            merged = np.concatenate(eval_imgs, 2)
            order = np.argsort(img_ids)
            evaluator.evalImgs = list(merged[:, :, order].flatten())
            evaluator.params.imgIds = sorted(img_ids)
            evaluator._paramsEval = copy.deepcopy(evaluator.params)
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(s) for s in evaluator.stats]
    return stats


def timed(phases: dict[str, float], name: str, call, *args, **kwargs):
    start = time.perf_counter()
    value = call(*args, **kwargs)
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return value


def worker(gt_path: str, results_path: str, backend: str, out: str) -> None:
    """One rank: its shard of the images and their results; evaluate_distributed, then the same phase by phase."""
    from dist_kp import distributed
    from dist_kp.data.index import load_index
    from dist_kp.evaluation.backends import STAT_NAMES, backend_for, detection_sets
    from dist_kp.evaluation.evaluator import evaluate_distributed
    from dist_kp.evaluation.results import check_sigmas, ground_truth
    from dist_kp.storage import Storage

    distributed.init_distributed("cpu")
    index = load_index(gt_path, Storage())
    results = json.loads(Path(results_path).read_text())
    rank, world = distributed.get_rank(), distributed.get_world_size()
    positions = np.arange(rank, len(index), world)
    mine = {int(index.image_ids[i]) for i in positions}
    local = [r for r in results if r["image_id"] in mine]
    distributed.barrier()
    start = time.perf_counter()
    output = evaluate_distributed(index, positions, local, backend, None)
    elapsed = time.perf_counter() - start
    # The calls evaluate_distributed makes, one timer each (rank 0's times).
    distributed.barrier()
    phases: dict[str, float] = {}
    library, sigmas = backend_for(backend), check_sigmas(None, index.meta.num_keypoints)
    gt = timed(phases, "ground truth", lambda: library.coco(ground_truth(index, positions)))
    dts = timed(phases, "detections", detection_sets, library, gt, local, tuple(STAT_NAMES))
    ids = [int(index.image_ids[i]) for i in positions]
    parts = timed(phases, "matching", lambda: {t: library.match(gt, dts[t], t, sigmas, ids) for t in STAT_NAMES})
    gathered = timed(phases, "gather", distributed.gather_objects, (parts, local))
    if gathered is not None:
        timed(phases, "merge", lambda: {t: library.merge(t, [p[t] for p, _ in gathered]) for t in STAT_NAMES})
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": elapsed, "metrics": output.metrics, "phases": phases}))
    distributed.cleanup()


def run_dist_kp(nproc: int, backend: str, gt_path: Path, results_path: Path, tmp: Path) -> dict:
    out = tmp / f"{backend}_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", str(gt_path), str(results_path), backend, str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    return json.loads(out.read_text())


def cli_phases(gt_path: Path, results_path: Path, backend: str) -> dict[str, float]:
    """The phases of `evaluate --annotations --results`, in this process (imports measured apart)."""
    from dist_kp.data.index import load_index
    from dist_kp.evaluate import read_results
    from dist_kp.evaluation.backends import STAT_NAMES, backend_for, detection_sets
    from dist_kp.evaluation.results import check_results, check_sigmas, ground_truth
    from dist_kp.storage import Storage

    phases: dict[str, float] = {}
    results = timed(phases, "JSON load", read_results, str(results_path), Storage())
    index = timed(phases, "ground truth", load_index, str(gt_path), Storage())
    dataset = timed(phases, "ground truth", ground_truth, index)
    timed(phases, "checks", check_results, results, "results", set(index.image_ids.tolist()), 1, 17)
    library, sigmas = backend_for(backend), check_sigmas(None, 17)
    gt = timed(phases, "ground truth", library.coco, dataset)
    dts = timed(phases, "matching", detection_sets, library, gt, results, tuple(STAT_NAMES))
    ids = sorted(gt.getImgIds())
    parts = timed(phases, "matching", lambda: {t: library.match(gt, dts[t], t, sigmas, ids) for t in STAT_NAMES})
    timed(phases, "merge", lambda: {t: library.merge(t, [parts[t]]) for t in STAT_NAMES})
    return phases


def run_cli(gt_path: Path, results_path: Path, backend: str, tmp: Path) -> tuple[float, dict]:
    out = tmp / f"cli_{backend}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dist_kp.evaluate", "--annotations", str(gt_path), "--results",
                    str(results_path), "--backend", backend, "--out", str(out)], check=True, cwd=REPO,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    return time.perf_counter() - start, json.loads((out / "metrics.json").read_text())


def import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dist_kp.evaluate"], check=True, cwd=REPO,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - start


def record_building(num: int = 100_000, per_image: int = 20) -> tuple[float, float]:
    """Seconds to turn `num` detections of model outputs into result records: numpy batch, per detection."""
    from dist_kp.evaluation.results import outputs_to_results
    from tests.test_eval_records import fake_output, per_detection_reference

    rng = np.random.default_rng(0)
    outputs = [fake_output(rng, per_image, ties=False) for _ in range(num // per_image)]
    ids = list(range(len(outputs)))
    start = time.perf_counter()
    new = [r for i in range(0, len(outputs), 2) for r in outputs_to_results(outputs[i:i + 2], ids[i:i + 2], 1)]
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    old = per_detection_reference(outputs, ids, 1)
    old_s = time.perf_counter() - start
    assert json.dumps(new) == json.dumps(old)
    return batch_s, old_s


def agrees(metrics: dict[str, float], baseline: dict[str, float], backend: str) -> str:
    if backend == "pycocotools":
        return "bit for bit" if metrics == baseline else "NO"
    worst = max(abs(metrics[k] - baseline[k]) for k in baseline) if metrics.keys() == baseline.keys() else 1.0
    return f"within {TOLERANCE:g} (max diff {worst:.1e})" if worst <= TOLERANCE else f"NO (max diff {worst:.1e})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_process(gt_path: str, results_path: str, out: str) -> None:
    """(a) in a process of its own, for its peak RSS; with torch and torchvision imported, as in the
    reference scripts, where CocoEvaluator runs inside the training (or evaluation) process."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    Path(out).with_suffix(".imports").write_text(str(peak_rss_mb()))
    results = json.loads(Path(results_path).read_text())
    Path(out).write_text(json.dumps(reference_style(Path(gt_path), results)))


def timing(phases: dict[str, float], name: str, call):
    @functools.wraps(call)
    def timed_call(*args, **kwargs):
        return timed(phases, name, call, *args, **kwargs)
    return timed_call


def gather_worker(checkout: str, gt_path: str, shard_dir: str, backend: str, out: str) -> None:
    """One rank of --gather: evaluate_distributed of `checkout` on this rank's shard, phases timed where they run."""
    sys.path.insert(0, checkout)
    from dist_kp import distributed
    from dist_kp.data.index import load_index
    from dist_kp.evaluation import backends, evaluator
    from dist_kp.storage import Storage

    assert Path(distributed.__file__).is_relative_to(checkout), distributed.__file__
    imports_mb = peak_rss_mb()
    phases: dict[str, float] = {}
    distributed.gather_objects = timing(phases, "gather", distributed.gather_objects)
    backends.EvalBackend.match = timing(phases, "matching", backends.EvalBackend.match)
    backends.EvalBackend.merge = timing(phases, "merge", backends.EvalBackend.merge)
    if hasattr(backends.EvalBackend, "from_columns"):  # the columnar version: rank 0 rebuilds, the others pack
        backends.EvalBackend.from_columns = timing(phases, "rebuild", backends.EvalBackend.from_columns)
        evaluator.ResultColumns.records = timing(phases, "rebuild", evaluator.ResultColumns.records)
        backends.EvalBackend.columns = timing(phases, "pack", backends.EvalBackend.columns)
        evaluator.ResultColumns.from_records = timing(phases, "pack", evaluator.ResultColumns.from_records)
    distributed.init_distributed("cpu")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    index = load_index(gt_path, Storage())
    positions = np.arange(rank, len(index), world)
    local = json.loads((Path(shard_dir) / f"{rank}_of_{world}.json").read_text())
    assert {r["image_id"] for r in local} <= set(index.image_ids[positions].tolist())
    distributed.barrier()
    start = time.perf_counter()
    output = evaluator.evaluate_distributed(index, positions, local, backend, None)
    seconds = time.perf_counter() - start
    phases["other"] = seconds - sum(phases.values())
    report = {"rank": rank, "seconds": seconds, "phases": phases, "peak_mb": peak_rss_mb(), "imports_mb": imports_mb,
              "metrics": output.metrics, "results": len(output.results or [])}
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))
    distributed.cleanup()


def run_gather(checkout: Path, nproc: int, backend: str, gt_path: Path, shard_dir: Path, tmp: Path) -> list[dict]:
    out = tmp / f"gather_{checkout.name}_{backend}_{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--gather-worker", str(checkout), str(gt_path), str(shard_dir), backend, str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    return [json.loads(out.with_suffix(f".rank{rank}.json").read_text()) for rank in range(nproc)]


def gather_main(args: argparse.Namespace) -> None:
    """--gather: time and peak RSS of 1 and 2 processes against the reference, before and after."""
    from dist_kp.evaluation.backends import metrics_dict

    gt, results = make_data(args.images, args.dets)
    log.info("%d images, %d person annotations, %d detections, backend %s (times under whatever else runs "
             "on this machine)", len(gt["images"]), len(gt["annotations"]), len(results), args.backend)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gt_path, results_path, shard_dir = tmp / "gt.json", tmp / "results.json", tmp / "shards"
        shard_dir.mkdir()
        gt_path.write_text(json.dumps(gt))
        results_path.write_text(json.dumps(results))
        for world in (1, 2):
            for rank in range(world):
                mine = {image["id"] for image in gt["images"][rank::world]}
                (shard_dir / f"{rank}_of_{world}.json").write_text(
                    json.dumps([r for r in results if r["image_id"] in mine]))
        del gt, results
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, __file__, "--reference", str(gt_path), str(results_path),
                                    str(tmp / "reference.json")], env=dict(os.environ, OMP_NUM_THREADS="1"))
        _, status, usage = os.wait4(process.pid, 0)
        base_s, base_mb = time.perf_counter() - start, usage.ru_maxrss / 1024
        assert os.waitstatus_to_exitcode(status) == 0
        base_imports_mb = float((tmp / "reference.imports").read_text())
        baseline = metrics_dict(json.loads((tmp / "reference.json").read_text()))
        log.info("| variant | seconds | vs 1 process | rank 0: matching, gather, rebuild, merge, other (s) | peak RSS "
                 "MB per rank (imports alone) | vs reference's RSS | stats against (a) |")
        log.info("|---|---|---|---|---|---|---|")
        log.info("| (a) reference, own process | %.1f | - | - | %.0f (%.0f) | 1.00 | - |", base_s, base_mb,
                 base_imports_mb)
        checkouts = ([("before", args.before.resolve())] if args.before else []) + [("after", REPO)]
        for label, checkout in checkouts:
            one = None
            for nproc in (1, 2):
                ranks = run_gather(checkout, nproc, args.backend, gt_path, shard_dir, tmp)
                seconds, phases = ranks[0]["seconds"], ranks[0]["phases"]
                one = one or seconds
                log.info("| %s, %d process%s | %.1f | %.2fx | %s | %s | %s | %s |", label, nproc,
                         "es" if nproc > 1 else "", seconds, seconds / one,
                         ", ".join(f"{phases.get(k, 0.0):.2f}" for k in ("matching", "gather", "rebuild", "merge", "other")),
                         ", ".join(f"{r['peak_mb']:.0f} ({r['imports_mb']:.0f})" for r in ranks),
                         ", ".join(f"{r['peak_mb'] / base_mb:.2f}" for r in ranks),
                         agrees(ranks[0]["metrics"], baseline, args.backend))
                for r in ranks[1:]:
                    log.info("|   rank %d phases | %.1f | | %s | | | |", r["rank"], r["seconds"],
                             ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--gather-worker":
        gather_worker(*sys.argv[2:7])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        reference_process(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each dist_kp variant (median reported)")
    parser.add_argument("--gather", action="store_true", help="only the focused mode of issue 23 item 5")
    parser.add_argument("--before", type=Path, help="--gather: checkout of the code before the change, run too")
    parser.add_argument("--backend", default="faster_coco_eval", help="--gather: the evaluation backend")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.gather:
        gather_main(args)
        return
    from dist_kp.evaluation.backends import metrics_dict

    gt, results = make_data(args.images, args.dets)
    log.info("%d images, %d person annotations, %d detections", len(gt["images"]), len(gt["annotations"]), len(results))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gt_path, results_path = tmp / "gt.json", tmp / "results.json"
        gt_path.write_text(json.dumps(gt))
        results_path.write_text(json.dumps(results))
        start = time.perf_counter()
        baseline = metrics_dict(reference_style(gt_path, results))
        base_s = time.perf_counter() - start
        log.info("| variant | seconds | speed-up vs (a) | stats against (a) | phases (rank 0, s) |")
        log.info("|---|---|---|---|---|")
        log.info("| (a) reference: pycocotools per 1-image batch | %.1f | 1.0x | - | - |", base_s)
        whole = {}
        for backend in ("pycocotools", "faster_coco_eval"):
            for nproc in (1, 2):
                runs = [run_dist_kp(nproc, backend, gt_path, results_path, tmp) for _ in range(args.repeats)]
                seconds = statistics.median(r["seconds"] for r in runs)
                whole[backend, nproc] = seconds
                phases = ", ".join(f"{k} {v:.2f}" for k, v in runs[0]["phases"].items())
                log.info("| (b) dist_kp %s, %d process%s | %.1f | %.1fx | %s | %s |", backend, nproc,
                         "es" if nproc > 1 else "", seconds, base_s / seconds,
                         agrees(runs[0]["metrics"], baseline, backend), phases)
        imports = import_seconds()
        for backend in ("pycocotools", "faster_coco_eval"):
            seconds, metrics = run_cli(gt_path, results_path, backend, tmp)
            phases = {"imports": imports, **cli_phases(gt_path, results_path, backend)}
            log.info("| (c) evaluate --results, %s, whole process | %.1f | %.1fx | %s | %s |", backend, seconds,
                     base_s / seconds, agrees(metrics, baseline, backend),
                     ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        batch_s, old_s = record_building()
        log.info("(d) result records per 100,000 detections: %.2f s numpy over batches of 2 images, %.2f s per "
                 "detection (%.1fx)", batch_s, old_s, old_s / batch_s)
        for backend in ("pycocotools", "faster_coco_eval"):
            log.info("%s: 2 processes take %.2fx the time of 1", backend, whole[backend, 2] / whole[backend, 1])


if __name__ == "__main__":
    main()
