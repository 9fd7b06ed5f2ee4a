"""Media benchmark: decode + feature extraction on generated 10 s clips, and the
counterfactual builder on a synthetic 10,000-row manifest.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_media.py --clips 4 --rows 10000

Clips are generated with PyAV like AudioCaps clips (h264 + AAC 44.1 kHz stereo, textured
frames so decoding costs what real video costs). Stages are timed separately: decode
(`load_media`), video features (`processing.patchify_video`, Qwen2.5-Omni pixel budget) and
audio features (`processing.audio_features`, 128 mels). Not a test: prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # media_factory generates the clips

SUBJECTS = ["a dog", "a man", "a woman", "a baby", "a car", "a train", "birds", "a cat", "an engine", "a crowd",
            "rain", "wind", "a siren", "a bell", "water", "a motorcycle", "people", "a child", "a helicopter", "a duck"]
ACTIONS = ["barks", "speaks", "cries", "passes by", "rumbles", "chirps", "meows", "idles", "cheers", "falls",
           "blows", "wails", "rings", "trickles", "revs", "laugh", "sings", "whirs", "quacks", "hums"]
CONTEXTS = ["", " in the distance", " loudly", " while music plays", " as wind blows", " followed by silence",
            " near a road", " indoors", " with an echo", " repeatedly", " over static", " and then stops",
            " as people talk", " in the rain", " under a bridge", " during a storm", " at a park",
            " beside water", " while a bell rings", " with footsteps"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """AudioCaps-like captions (two clauses, ~10 words), nearly all distinct as real ones are."""
    rng = random.Random(seed)

    def clause() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}{rng.choice(CONTEXTS)}"

    return [f"{clause()}, then {clause()}" for _ in range(n)]


def bench_decode(n_clips: int, seconds: float, size: tuple[int, int], fps: int, workdir: Path) -> dict:
    from media_factory import make_video

    from avprobe.media import processing
    from avprobe.media.decode import load_media
    from avprobe.types import Sample

    spec = processing.VisionSpec()
    t0 = time.perf_counter()
    paths = [
        make_video(workdir / f"clip{i}.mp4", seconds=seconds, fps=fps, size=size, audio_rate=44_100,
                   audio_freqs=(220.0 * (i + 1), 330.0 * (i + 1)), texture=True)
        for i in range(n_clips)
    ]
    gen_s = time.perf_counter() - t0
    # Warm-up, untimed: first-use imports (scipy.signal, the feature extractor) cost ~1 s once.
    warm = load_media(Sample("warm", video=str(paths[0]), audio_captions=("x",)))
    processing.audio_features(warm.waveform, 128)
    t_dec = t_vid = t_aud = 0.0
    shapes = None
    for i, p in enumerate(paths):
        t = time.perf_counter()
        media = load_media(Sample(f"c{i}", video=str(p), audio_captions=("x",)), fps=spec.fps, max_frames=spec.max_frames)
        t_dec += time.perf_counter() - t
        t = time.perf_counter()
        pixels, grid = processing.patchify_video(media.frames, spec)
        t_vid += time.perf_counter() - t
        t = time.perf_counter()
        feats, _ = processing.audio_features(media.waveform, 128)
        t_aud += time.perf_counter() - t
        shapes = {"frames": list(media.frames.shape), "video_grid_thw": grid[0].tolist(),
                  "pixel_values_videos": list(pixels.shape), "input_features": list(feats.shape)}
    total = t_dec + t_vid + t_aud
    return {
        "clips": n_clips,
        "clip": f"{seconds:g} s, {size[1]}x{size[0]} @ {fps} fps h264 + AAC 44.1 kHz stereo",
        "generate_s": round(gen_s, 2),
        "decode_s_per_clip": round(t_dec / n_clips, 3),
        "video_features_s_per_clip": round(t_vid / n_clips, 3),
        "audio_features_s_per_clip": round(t_aud / n_clips, 3),
        "clips_per_s_decode_only": round(n_clips / t_dec, 2),
        "clips_per_s_decode_and_features": round(n_clips / total, 2),
        "shapes": shapes,
    }


def bench_builder(rows: int, n: int, workdir: Path) -> dict:
    from avprobe.media.counterfactual import build_counterfactuals
    from avprobe.media.manifest import load_manifest, write_manifest
    from avprobe.types import Sample

    caps = synthetic_captions(rows)
    samples = [Sample(f"r{i:05d}", video=f"clips/r{i:05d}.mp4", audio_captions=(c,)) for i, c in enumerate(caps)]
    path = write_manifest(samples, workdir / "big.jsonl")
    t = time.perf_counter()
    loaded = load_manifest(path)
    t_load = time.perf_counter() - t
    from avprobe import embedding

    t = time.perf_counter()
    embedding._load()
    t_model = time.perf_counter() - t
    t = time.perf_counter()
    cf, report = build_counterfactuals(loaded, n, 0)
    t_build = time.perf_counter() - t
    return {
        "rows": rows,
        "unique_captions": len(set(caps)),
        "n": n,
        "built": report.built,
        "manifest_load_s": round(t_load, 2),
        "model_load_s": round(t_model, 2),
        "build_s (embed + match)": round(t_build, 2),
        "chosen_similarity_mean": round(report.chosen.mean, 3),
        "random_similarity_mean": round(report.random.mean, 3),
        "chosen_similarity_max": round(report.chosen.max, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="360x640", help="HxW of the generated clips")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--rows", type=int, default=10_000, help="rows of the synthetic manifest (0 skips)")
    ap.add_argument("--n", type=int, default=250)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    h, w = (int(v) for v in args.size.split("x"))
    out = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as d:
        if args.clips:
            out["decode"] = bench_decode(args.clips, args.seconds, (h, w), args.fps, Path(d))
        if args.rows:
            out["builder"] = bench_builder(args.rows, args.n, Path(d))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
