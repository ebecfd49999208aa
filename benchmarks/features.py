"""Benchmark of ``asign_sc.tl.extract_features`` on her2st patient C (C2-C6, ~910 spots).

1. Encoder throughput per level (spot 224 px, region 512 px, global 1024 px windows, all
   resized to 224 px): images/s of ``extract_features``' inner loop (uint8 antialiased
   resize, batch norms folded into convolutions, channels-last, bf16 autocast where the CPU
   has it) against a plain batched torch loop over the same crops (float resize, the
   module as loaded, NCHW, float32), measured in the same run. Ratio = ours / plain.
2. bf16 vs fp32: cosine similarity of the pooled and token features on the real crops.
3. End to end: ``extract_features`` on the 5 sections (image reads from the pyramid,
   cropping, encoding, writing), wall and CPU seconds, peak resident memory above the level
   before the call (sampled every 5 ms); then the same call again with ``cache_dir`` (cache
   hit: images are read and cropped, features loaded).
4. Stain normalisation: ``extract_features(stain_normalization="macenko")`` against the
   plain call, alternated (plain, Macenko, plain, Macenko) in one run; ratio of the best
   of each. And the transform alone on one section's pixels (megapixels/s).
5. Encoders and the two-view ensemble: ``extract_features`` with EfficientNet-Lite0, Lite1,
   Lite2 and Lite0 with Macenko normalisation, alternated (two rounds, best of each), wall
   seconds and the ratio to Lite0 as scanned; the two views of the accuracy report's
   'ASIGN, two feature views' (Lite0 + Macenko, Lite2) against the default's one.

The machine is shared: the load average is printed next to the timings, and CPU seconds
(process time / threads) tell what the same work costs on idle cores.

Run from the repository root: ``python benchmarks/features.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


class PeakRSS:
    """Largest resident set size seen while the block runs, minus the size before it."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.delta_gb = (self.peak - self.before) / 1e9


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result, wall seconds, CPU seconds) of the best of ``repeat`` calls."""
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[1]:
            best = (out, wall, cpu)
    return best


def level_crops(sdata, level: int, windows, input_size: int, n: int) -> np.ndarray:
    """Up to ``n`` uint8 windows of one level, cut as extract_features cuts them."""
    from asign_sc._stack import resolve_stack
    from asign_sc.pp import crop_windows
    from asign_sc.tl._features import _read_plan

    stack = resolve_stack(sdata)
    out, per = [], int(np.ceil(n / len(stack)))
    for section in stack:
        plan = _read_plan(section, tuple(float(w) for w in windows), input_size)
        max_side = next(m for m, lv in plan.items() if ("spot", "region", "global")[level] in lv)
        image, scale = stack.image(section.name, max_side=max_side)
        size = (windows[level] * scale[0], windows[level] * scale[1])
        crops, _ = crop_windows(image, section.spatial[:per] * scale, size)
        out.append(crops)
    return np.concatenate(out)[:n]


def plain_loop(module, mean, std, crops: np.ndarray, batch_size: int, input_size: int):
    """What a first implementation writes: float resize, normalise, forward, mean-pool."""
    import torch
    import torch.nn.functional as F

    mean_t = torch.tensor(mean)[:, None, None]
    std_t = torch.tensor(std)[:, None, None]
    pooled = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(crops[start : start + batch_size]).permute(0, 3, 1, 2).float()
            x = F.interpolate(
                x / 255.0, size=(input_size, input_size), mode="bilinear", antialias=True
            )
            features = module((x - mean_t) / std_t)
            pooled.append(features.mean((-2, -1)))
    return torch.cat(pooled).numpy()


def ours(extractor, crops: np.ndarray):
    vectors, tokens = [], []
    for start in range(0, len(crops), extractor.batch_size):
        vec, tok = extractor(crops[start : start + extractor.batch_size])
        vectors.append(vec)
        tokens.append(tok)
    return np.concatenate(vectors), np.concatenate(tokens)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HER2ST)
    parser.add_argument("--encoder", default="default", help="'default' or 'resnet50'")
    parser.add_argument("--n-crops", type=int, default=192, help="crops per level, part 1-2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--parts", nargs="+", type=int, default=[1, 3, 4, 5], help="1: encoder (and 2), 3-5"
    )
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"her2st data not found at {args.data}; nothing to benchmark.")
        return

    import torch

    import asign_sc.tl
    from asign_sc.io import read_her2st
    from asign_sc.models.encoders import get_encoder
    from asign_sc.tl._features import _Extractor, cpu_supports_bf16

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16: "
        f"{cpu_supports_bf16()}, load average at start {os.getloadavg()[0]:.1f} "
        f"({os.cpu_count()} CPUs)"
    )
    start = time.perf_counter()
    sdata = read_her2st(args.data, "C")
    table = sdata.tables["table"]
    print(
        f"read patient C: {table.n_obs} spots, {len(sdata.images)} sections "
        f"({time.perf_counter() - start:.1f} s)"
    )
    kwargs = {} if args.encoder == "default" else {"weights": None}  # timing needs no weights
    encoder = get_encoder(args.encoder, **kwargs)
    windows, size = (224, 512, 1024), encoder.input_size
    device = torch.device("cpu")
    ext = {
        dtype: _Extractor(
            encoder,
            device=device,
            precision="bfloat16" if dtype == torch.bfloat16 else "float32",
            input_size=size,
            grid=(3, 3),
            batch_size=args.batch_size,
        )
        for dtype in (torch.float32, torch.bfloat16)
    }

    if 1 in args.parts:
        # 1-2. per level: ours (fp32, bf16) vs the plain loop; bf16 vs fp32 closeness.
        print(
            f"\n1-2. encoder {encoder.name}, {args.n_crops} crops per level, "
            f"batch {args.batch_size}"
        )
        print(
            f"{'level':7s} {'crop px':>7s} {'plain img/s':>11s} {'ours fp32':>9s} "
            f"{'ours bf16':>9s} "
            f"{'ratio fp32':>10s} {'ratio bf16':>10s} {'cos pooled':>15s} {'cos tokens':>15s}"
        )
        for level, name in enumerate(("spot", "region", "global")):
            crops = level_crops(sdata, level, windows, size, args.n_crops)
            ours(ext[torch.float32], crops[: args.batch_size])  # warm-up (oneDNN primitives)
            plain_loop(encoder.module, encoder.mean, encoder.std, crops[:4], 4, size)
            base, t_plain, _ = timed(
                plain_loop, encoder.module, encoder.mean, encoder.std, crops, args.batch_size, size
            )
            (p32, k32), t32, _ = timed(ours, ext[torch.float32], crops)
            (p16, k16), t16, _ = timed(ours, ext[torch.bfloat16], crops)
            n = len(crops)
            agree = cosine(p32, base).min()  # uint8 vs float resize differ by rounding only
            cp, ck = cosine(p32, p16), cosine(k32.astype(np.float32), k16.astype(np.float32))
            print(
                f"{name:7s} {crops.shape[1]:7d} {n / t_plain:11.1f} {n / t32:9.1f} {n / t16:9.1f} "
                f"{t_plain / t32:10.2f} {t_plain / t16:10.2f} "
                f"{cp.mean():.4f}/{cp.min():.4f} {ck.mean():.4f}/{ck.min():.4f}"
            )
            assert agree > 0.99, f"ours (fp32) and the plain loop disagree: min cosine {agree:.4f}"
        print(
            "(cos: bf16 vs fp32, mean/min over spots; tokens: over every token of every spot. "
            "Ours fp32 vs plain loop: min cosine > 0.99 checked)"
        )

    def features(**kwargs):
        """``extract_features`` on patient C as a user calls it, with ``kwargs``."""
        asign_sc.tl.extract_features(
            sdata, encoder=encoder, n_jobs=args.threads, show_progress_bar=False, **kwargs
        )

    if 3 in args.parts:
        # 3. end to end, then a cache hit.
        print(f"\n3. end to end, patient C, load average {os.getloadavg()[0]:.1f}")
        with tempfile.TemporaryDirectory() as cache:
            for label in ("first call", "cached call"):
                with PeakRSS() as mem:
                    _, wall, cpu = timed(features, cache_dir=cache)
                record = table.uns["asign"]["features"]
                print(
                    f"{label:12s} wall {wall:7.1f} s  CPU {cpu / args.threads:7.1f} s/thread  "
                    f"peak +{mem.delta_gb:.2f} GB  precision {record['precision']}  "
                    f"cache hits {record['cache_hits']} ({record['tiles']} tiles)  "
                    f"windows {3 * table.n_obs}"
                )

    if 4 in args.parts:
        # 4. stain normalisation: the whole step with and without it, and the transform alone.
        print(f"\n4. stain normalisation, patient C, load average {os.getloadavg()[0]:.1f}")
        best = {}
        for stain in (None, "macenko", None, "macenko"):
            _, wall, cpu = timed(features, stain_normalization=stain)
            best[stain] = min(best.get(stain, np.inf), wall)
            label = stain or "as scanned"
            print(f"{label:12s} wall {wall:7.1f} s  CPU {cpu / args.threads:7.1f} s/thread")
        print(f"macenko / as scanned (best of 2 each): {best['macenko'] / best[None]:.2f}")
        from asign_sc._stack import resolve_stack
        from asign_sc.tl._stain import fit_stain_transforms

        stack = resolve_stack(sdata)
        transforms = fit_stain_transforms(stack, "macenko")
        name = stack.names[0]
        pixels = np.asarray(stack.image(name, max_side=4096)[0])[..., :3]
        _, wall, _ = timed(transforms[name], pixels, repeat=3)
        print(
            f"transform alone: {pixels.shape[1]} x {pixels.shape[0]} px section {name}, "
            f"{pixels.size / 3 / wall / 1e6:.0f} megapixels/s (best of 3)"
        )
    if 5 in args.parts:
        # 5. encoders and the two views: the whole step per setting, alternated.
        print(f"\n5. encoders, patient C, load average {os.getloadavg()[0]:.1f}")
        settings = {
            "efficientnet_lite0": {"encoder": "efficientnet_lite0"},
            "efficientnet_lite1": {"encoder": "efficientnet_lite1"},
            "efficientnet_lite2": {"encoder": "efficientnet_lite2"},
            "efficientnet_lite0, Macenko": {
                "encoder": "efficientnet_lite0",
                "stain_normalization": "macenko",
            },
        }
        best = {}
        for _ in range(2):
            for label, kwargs in settings.items():
                _, wall, _ = timed(
                    asign_sc.tl.extract_features,
                    sdata,
                    n_jobs=args.threads,
                    show_progress_bar=False,
                    **kwargs,
                )
                best[label] = min(best.get(label, np.inf), wall)
        base = best["efficientnet_lite0"]
        for label, wall in best.items():
            print(f"{label:28s} wall {wall:7.1f} s (best of 2)  ratio to Lite0 {wall / base:.2f}")
        views = best["efficientnet_lite0, Macenko"] + best["efficientnet_lite2"]
        print(
            f"two views (Lite0 + Macenko, Lite2): {views:.1f} s, {views / base:.2f} x the "
            f"default's features; load average {os.getloadavg()[0]:.1f}"
        )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
