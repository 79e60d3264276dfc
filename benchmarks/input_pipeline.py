r"""Input pipeline throughput of lrs3_manifest: mp4 storage vs decoded frames, CPU.

  python benchmarks/input_pipeline.py [--clips 300] [--runs 5] [--crf 23]

Builds a synthetic LRS3-like tree (``lrs3_layout.synthetic_clips``: 96x96
mouth clips of 58-75 frames, h264 yuv420p at --crf, 23 being ffmpeg's default
lossy quality like real LRS3 crops), prepares it with both storages, then
times one pass over the train split in a fixed shuffled order: read the
record (``as_data_source``), ``decode_record`` (the mp4 decode for "mp4"),
and AV-HuBERT's train preprocessing (random crop 88 + flip + normalise). One
process, one thread: the figures are per core. A third row reads the mp4
files named by the manifest directly (VSP-LLM's way: a file open per sample).
Prints JSON lines: the setup, then per reader the median clips/s over --runs
timed passes (after one warm-up pass; rounds interleave the readers), the
runs, clips per CPU-second (steadier on a shared machine), bytes on disk per
clip, and ratios against the frames storage measured in the same run.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _dir_bytes(path, prefix=""):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path)
             for f in names if f.startswith(prefix))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clips", type=int, default=300)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--crf", type=int, default=23)
  p.add_argument("--workdir", default="", help="default: a temporary directory")
  a = p.parse_args()

  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data import avhubert_preprocess as pre
  from vsrllm_jax.data.synthetic import lrs3_layout
  from vsrllm_jax.data.datasets import lrs3
  from vsrllm_jax.data import video_io
  # pylint: enable=g-import-not-at-top

  work = a.workdir or tempfile.mkdtemp(prefix="lrs3_bench_")
  manual = os.path.join(work, "manual")
  t0 = time.perf_counter()
  clips = lrs3_layout.synthetic_clips(a.clips, task_names=("vsr", "vst_es", "vst_fr"))
  tree = lrs3_layout.write_lrs3_like_tree(manual, clips, "train", crf=a.crf)
  frames = [len(c[1]) for c in clips]
  print(json.dumps({"setup": "synthetic LRS3-like tree", "clips": a.clips, "crf": a.crf,
                    "mean_frames": round(float(np.mean(frames)), 1),
                    "frames_range": [int(min(frames)), int(max(frames))], "size": 96,
                    "tree_seconds": round(time.perf_counter() - t0, 1),
                    "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()}), flush=True)

  order = np.random.default_rng(0).permutation(a.clips)
  passes, info = {}, {}
  data_dir = tempfile.mkdtemp(prefix="data_", dir=work)  # fresh: the build is timed too
  for storage in ("mp4", "frames"):
    opts = lrs3.Lrs3ManifestOptions(manual_dir=manual, splits=(("train", "train"),),
                                             storage=storage, build_threads=1)
    t0 = time.perf_counter()
    builder = lrs3.prepare(opts, data_dir)
    build_s = time.perf_counter() - t0
    source = builder.as_data_source(split="train")
    assert len(source) == a.clips, len(source)

    def one_pass(source=source):
      rng = np.random.default_rng(1)
      for i in order:
        video = lrs3.decode_record(source[int(i)])["video"]
        pre.preprocess(video, rng, train=True)
    passes[storage] = one_pass
    info[storage] = {"bytes_per_clip": round(_dir_bytes(builder.data_dir, "lrs3_manifest-")
                                             / a.clips),
                     "build_clips_per_s": round(a.clips / build_s, 1)}

  def files_pass():
    rng = np.random.default_rng(1)
    for i in order:
      pre.preprocess(video_io.read_video(tree["videos"][int(i)])[..., None], rng, train=True)
  passes["manifest_mp4_files"] = files_pass
  info["manifest_mp4_files"] = {"bytes_per_clip": round(
      sum(os.path.getsize(v) for v in tree["videos"]) / a.clips)}

  # Rounds interleave the three readers, so a load change on a shared machine
  # hits all of them alike; CPU time (process_time) is reported beside wall time.
  wall = {name: [] for name in passes}
  cpu = {name: [] for name in passes}
  for name, fn in passes.items():
    fn()  # warm-up: page cache, lazy imports
  for _ in range(a.runs):
    for name, fn in passes.items():
      w0, c0 = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - w0)
      cpu[name].append(time.process_time() - c0)
  rate = {name: a.clips / statistics.median(wall[name]) for name in passes}
  cpu_rate = {name: a.clips / statistics.median(cpu[name]) for name in passes}
  base = info["frames"]["bytes_per_clip"]
  for name in passes:
    print(json.dumps({
        "storage": name, "clips_per_s": round(rate[name], 1),
        "runs_clips_per_s": [round(a.clips / t, 1) for t in wall[name]],
        "clips_per_cpu_s": round(cpu_rate[name], 1), **info[name],
        "ratio_vs_frames": round(rate[name] / rate["frames"], 3),
        "cpu_ratio_vs_frames": round(cpu_rate[name] / cpu_rate["frames"], 3),
        "disk_ratio_vs_frames": round(info[name]["bytes_per_clip"] / base, 4)}), flush=True)


if __name__ == "__main__":
  main()
