#!/usr/bin/env python
"""FID of N "generated" images two ways, in one process: the reference reports' PNG round trip vs gancore in memory.

    python bench/fid_speed.py [--n 10000] [--extractor lenet_mnist|inception|...] [--device cpu|cuda]

(a) reference: write every generated image as PNG to a temp folder, then
    torch_fidelity.calculate_metrics(input1=that folder, input2=real PNG folder, fid=True) with the real folder's
    statistics already in torch-fidelity's cache (as a reference run that evaluated before would have them);
(b) gancore: metrics.evaluate(..., metrics=("fid",)) on the uint8 tensor, real statistics already cached.
Both start with warm real statistics and a loaded extractor; only the generated side is timed.
"Generated" images are MNIST test digits with Gaussian pixel noise (sigma 20), repeated with fresh noise past 10k.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def fake_generated(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, 28, 28): held-out MNIST test digits + N(0, 20^2) pixel noise, clipped."""
    from gancore.config import DataConfig
    from gancore.data import load_images

    x, _ = load_images(DataConfig(name="mnist", split="test"))
    reps = -(-n // len(x))
    g = torch.Generator().manual_seed(seed)
    x = x.repeat(reps, 1, 1, 1)[:n].float()
    return (x + 20 * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def write_pngs(x: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x.numpy()):
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="generated (and real) images")
    ap.add_argument("--extractor", default="lenet_mnist", help="lenet_mnist (CPU default) | inception")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path, interleaved")
    args = ap.parse_args()
    os.environ.setdefault("GANCORE_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

    import torch_fidelity

    # torch-fidelity asks for 4 DataLoader workers on this 2-core machine; that is its path, measured as it is
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    from gancore.config import load_config
    from gancore.metrics import evaluate
    from gancore.metrics.classifier import ensure_classifier
    from gancore.metrics.extractors import TF_INCEPTION, inception_weights
    from gancore.metrics.fidelity import real_images

    cfg = load_config(None, [f"eval.batch_size={args.batch_size}", f"eval.extractor={args.extractor}"])
    device = torch.device(args.device)
    gen = fake_generated(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="fid_speed_"))
    tf_name = TF_INCEPTION if args.extractor == "inception" else args.extractor
    tf_kwargs = dict(fid=True, feature_extractor=tf_name, cuda=device.type == "cuda", batch_size=args.batch_size,
                     cache_root=str(tmp / "tf_cache"), verbose=False)
    if args.extractor == "inception":
        tf_kwargs["feature_extractor_weights_path"] = str(inception_weights(cfg.eval.inception_weights))
    else:
        tf_kwargs["feature_extractor_weights_path"] = str(ensure_classifier(args.extractor))

    # --- setup, untimed: real PNG folder, both real-statistics caches warm, extractors loaded once
    write_pngs(real_images(cfg, args.n), tmp / "real")
    warm_gen = tmp / "warm"
    write_pngs(gen[:100], warm_gen)
    torch_fidelity.calculate_metrics(input1=str(warm_gen), input2=str(tmp / "real"),
                                     input2_cache_name=f"bench-real-{args.n}", **tf_kwargs)
    evaluate(cfg, lambda b: gen[:b].to(device), device, n=min(args.n, 100), metrics=("fid",))  # loads extractor
    evaluate(cfg, lambda b: gen[:b].to(device), device, n=args.n, metrics=("fid",))  # caches real stats for n

    def reference() -> dict:
        """(a): PNG round trip + torch-fidelity on the folder."""
        shutil.rmtree(tmp / "gen", ignore_errors=True)
        write_pngs(gen, tmp / "gen")
        return torch_fidelity.calculate_metrics(input1=str(tmp / "gen"), input2=str(tmp / "real"),
                                                input2_cache_name=f"bench-real-{args.n}", **tf_kwargs)

    def gancore() -> dict:
        """(b): batches of the uint8 tensor straight into the extractor."""
        pos = [0]

        def sample(b: int) -> torch.Tensor:
            out = gen[pos[0]: pos[0] + b].to(device)
            pos[0] += b
            return out

        return evaluate(cfg, sample, device, n=args.n, metrics=("fid",))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # interleaved repeats; the minimum is the run least disturbed by other work on the machine
    t_ref, t_ours = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = reference()
        t_ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = gancore()
        sync()
        t_ours.append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    key = next(iter(ours))
    fid_ref = ref["frechet_inception_distance"]
    print(f"N={args.n} extractor={args.extractor} device={device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"(a) PNG folder + torch-fidelity : min {min(t_ref):7.2f} s  median {statistics.median(t_ref):7.2f} s"
          f"   FID {fid_ref:.6f}")
    print(f"(b) gancore in memory           : min {min(t_ours):7.2f} s  median {statistics.median(t_ours):7.2f} s"
          f"   {key} {ours[key]:.6f}")
    print(f"speed-up (a)/(b)                : min/min {min(t_ref) / min(t_ours):.2f} x   median/median "
          f"{statistics.median(t_ref) / statistics.median(t_ours):.2f} x   FID rel. diff "
          f"{abs(ours[key] - fid_ref) / abs(fid_ref):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
