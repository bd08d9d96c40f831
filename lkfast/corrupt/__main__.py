"""python -m lkfast.corrupt SRC DST --benchmark c|p : render ImageNet-C / ImageNet-P from a folder of images."""
from __future__ import annotations

import argparse
import sys

from . import PERTURBATIONS, SUBSETS
from .writer import render


def _names(text, benchmark):
    if text is None:
        return None
    if benchmark == "c" and text in SUBSETS:
        return list(SUBSETS[text])
    return [t.strip() for t in text.split(",") if t.strip()]


def _levels(text):
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: --levels takes comma-separated integers, e.g. 1,2,3; got {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lkfast.corrupt",
        description="Render a folder of images laid out like ImageNet-val (SRC/<wnid>/<image>.JPEG) "
                    "into the ImageNet-C layout (DST/<corruption>/<severity>/<wnid>/*.JPEG, 224 px, "
                    "JPEG quality 85) or the ImageNet-P layout (DST/<perturbation>/<wnid>/*.mp4). "
                    "Resumable: files already written are skipped.")
    parser.add_argument("src", help="source folder: one sub-folder per class holding images")
    parser.add_argument("dst", help="output root (created if missing)")
    parser.add_argument("--benchmark", choices=("c", "p"), required=True, help="c: ImageNet-C, p: ImageNet-P")
    parser.add_argument("--names", default=None,
                        help="comma-separated corruptions/perturbations, or for C a subset "
                             f"({', '.join(SUBSETS)}); default: all 19 (C) or all {len(PERTURBATIONS)} (P)")
    parser.add_argument("--levels", default=None,
                        help="comma-separated severities for C (default 1,2,3,4,5) or noise difficulties "
                             "for P (default 1,2,3; written as gaussian_noise, gaussian_noise_2, ...)")
    parser.add_argument("--batch-size", type=int, default=32, help="images corrupted together (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the corruption, e.g. cuda (default cpu)")
    parser.add_argument("--x264-preset", default="medium", help="libx264 preset for P videos (default medium)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        written = render(args.src, args.dst, args.benchmark, _names(args.names, args.benchmark),
                         _levels(args.levels), batch_size=args.batch_size, seed=args.seed,
                         device=args.device, preset=args.x264_preset, progress=not args.quiet)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written} files under {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
