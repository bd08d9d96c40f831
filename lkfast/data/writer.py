"""Render a folder of images into the official ImageNet-C / ImageNet-P layouts.

    SRC/<wnid>/<image>.JPEG   (ImageNet-val sorted into class folders; PNG/JPEG/BMP/WebP accepted)
      -> ImageNet-C: DST/<corruption>/<severity>/<wnid>/<image>.JPEG   224x224, JPEG quality 85
      -> ImageNet-P: DST/<perturbation>/<wnid>/<image>.mp4              224x224 frames, H.264
         (the 10 of mFR and the release's 4 validation perturbations; noise sequences also at
         difficulty 2 and 3, as DST/gaussian_noise_2/..., like the release;
         with format="npy" (--format npy) <image>.npy, the frames as a lossless uint8 array)

    python -m lkfast.corrupt SRC DST --benchmark c|p      (the command's code is ``main`` here)
    >>> from lkfast.data.writer import render
    >>> render("val", "imagenet-c", "c", names=["fog"], levels=[3])

Preprocessing as in the release: resize the short side to 256 (bilinear, Pillow), centre crop
224; corrupted pixels are truncated to 8 bits (the release's np.uint8; ``to_uint8``), and come
out of lkfast.corrupt already rounded where the release rounded (ImageMagick's motion blur and
snow flakes, OpenCV's tilt, Pillow's pixelate). ImageNet-P's geometric sequences (translate,
rotate, tilt, scale, zoom blur, shear: ``lkfast.corrupt.GEOMETRIC_PERTURBATIONS``) move the whole resized
image, one image at a time, and keep its central 224x224, as the release: a zoom-out shows the
picture out to its edges and black only beyond them; the others work on the 224x224 crop itself.

Resumable: a file is written under a temporary name and renamed when complete; complete files
already present are skipped, files cut short (a killed copy, an older writer) are written again,
and temporary files of killed runs are removed. Each batch of images ("chunk": up to batch_size
consecutive files of one class, in sorted order) uses its own generator seeded from (seed, name,
level, wnid, chunk index), so a resumed run corrupts the images exactly as an uninterrupted one
would have, on the CPU or a GPU: ImageNet-C's JPEGs come out byte for byte the same. ImageNet-P's
frames do too, but libx264 (through PyAV) was seen to encode the same frames differently from one
call to the next in a process that had run torch (decoded pixels up to 38/255 apart on a noise
sequence, also with the encoder on one thread and YUV frames given directly; cause not found).
``format="npy"`` writes the frames themselves, (T, 224, 224, 3) uint8 arrays the evaluation's
ImageNet-P reader takes as it takes mp4s: byte for byte the same on every run, without the codec's
losses, at 4.67 MB a 31-frame sequence (uncompressed).
The seed, the batch size, the corruptions' version and (P) the format are recorded in
DST/.lkfast-render.json; a rerun with others is refused (it would mix two renderings).

A source image that cannot be decoded (truncated, not an image) is skipped with a warning naming
it, as the evaluation's readers skip such files: it keeps its place in its chunk as a black image
whose outputs are not written, every other file is written as usual, and a rerun tries it again.
The command counts the skipped sources and exits with status 1 when there were any, because the
tree then lacks their files.

The corruptions themselves are lkfast.corrupt's pure tensor functions; this module is the file
side (reading SRC, encoding, writing DST), which is why it lives in lkfast.data: lkfast.data uses
lkfast.corrupt, never the other way round.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from lkfast.corrupt import (CORRUPTIONS, GEOMETRIC_PERTURBATIONS, NOISE_PERTURBATIONS, PERTURBATION_SUBSETS, PERTURBATIONS,
                            SUBSETS, corrupt, perturbation_sequence)
from lkfast.corrupt.utils import center_crop

from .io import (X264_PRESETS, check_x264_preset, encode_jpeg, encode_mp4, encode_npy, is_complete, list_images,
                 load_image, temporary_files, to_uint8, write_atomic)

RESIZE = 256
CROP = 224
JPEG_QUALITY = 85


def chunk_seed(seed: int, name: str, level: int, wnid: str, chunk: int) -> int:
    """The 63-bit seed of one chunk: the first 8 bytes of sha256("seed/name/level/wnid/chunk")."""
    key = f"{seed}/{name}/{level}/{wnid}/{chunk}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def chunk_generator(seed: int, name: str, level: int, wnid: str, chunk: int, device="cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with chunk_seed(seed, name, level, wnid, chunk): the
    generator ``render`` hands to the corruption of that chunk. ``render`` asks for it on the CPU
    whatever device corrupts the images (lkfast.corrupt draws on the generator's device and moves
    the numbers): a CUDA generator draws other numbers for the same seed, so a GPU render was
    another dataset than a CPU one, and a resume on the other device mixed the two."""
    g = torch.Generator(device=device)
    g.manual_seed(chunk_seed(seed, name, level, wnid, chunk))
    return g


def _jobs(benchmark: str, names: Sequence[str], levels: Sequence[int]) -> List[Tuple[str, int, str]]:
    """(name, level, output folder name) for every requested rendering."""
    if benchmark == "c":
        return [(n, s, f"{n}/{s}") for n in names for s in levels]
    jobs = []
    for n in names:
        for d in (levels if n in NOISE_PERTURBATIONS else (1,)):
            jobs.append((n, d, n if d == 1 else f"{n}_{d}"))
    return jobs


def warn_unreadable(path: Path, error: Exception) -> None:
    """The default ``on_unreadable`` of :func:`render`: a warning naming the file and the error."""
    warnings.warn(f"skipping unreadable source image {str(path)!r} ({type(error).__name__}: {error}); "
                  "its outputs are not written", stacklevel=2)


def _load_chunk(paths: Sequence[Path],
                on_unreadable: Callable[[Path, Exception], None]) -> Tuple[List[torch.Tensor], Set[int]]:
    """(the images resized to a short side of 256, whole, each (3, h, w); positions of the files that
    could not be decoded). An unreadable file keeps its position as a black image, so the chunk's
    layout does not depend on it."""
    images, unreadable = [], set()
    for i, path in enumerate(paths):
        try:
            image = load_image(path, RESIZE)
        except Exception as error:  # any decoder failure (OSError, PIL.UnidentifiedImageError, ...)
            on_unreadable(path, error)
            unreadable.add(i)
            image = torch.zeros(3, RESIZE, RESIZE)
        images.append(image)
    return images, unreadable


def _check_destination(src: Path, dst: Path) -> None:
    """ValueError for a DST that is a file, or is SRC or inside it (its folders would become
    classes of the source: the next evaluation of SRC fails on them)."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"DST {dst} is a file: give a folder for the rendered benchmark")
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents:
        raise ValueError(f"DST {dst} is inside SRC {src}: its folders would become class folders of the source; "
                         "choose a folder outside it")


SETTINGS_FILE = ".lkfast-render.json"  # hidden: the readers pass over it


P_FORMATS = ("mp4", "npy")
# What the writer itself does to ImageNet-P frames beyond lkfast.corrupt (recorded with the settings):
# 2: tilt at the whole resized image's focal length (1: the 256 window's); 3: the geometric sequences move
# the whole resized image, the others the 224 crop (2: both the central 256x256).
P_WRITER_VERSION = 3


def _settings(seed: int, batch_size: int, benchmark: str = "c", format: str = "mp4") -> dict:
    """What a rendered file depends on beside its source and its name and level: the seed, the chunks
    the batch size cuts (each draws from its own generator) and the corruptions' code version; for
    ImageNet-P the file format too (one tree holding x.mp4 and x.npy would be read as two sequences)."""
    from lkfast.corrupt import VERSION

    return {"seed": seed, "batch_size": batch_size, "lkfast.corrupt VERSION": VERSION,
            **({"format": format, "writer": P_WRITER_VERSION} if benchmark == "p" else {})}


def _keep_settings(dst: Path, benchmark: str, settings: dict) -> None:
    """Record ``settings`` for ``benchmark`` in DST/.lkfast-render.json; ValueError where DST holds a
    rendering of ``benchmark`` recorded with others: a rerun would keep its complete files and write
    the rest otherwise, one tree of two renderings (a tree from before the record is taken as it
    is); a record that cannot be read is refused too."""
    import json

    from lkfast.tables import write_text_atomic

    path = dst / SETTINGS_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
        recorded = record.get(benchmark)
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"cannot read {path} ({error}): it records the settings DST was rendered with; delete it "
                         "only if the files under DST were rendered with this command's settings") from None
    if benchmark == "p" and isinstance(recorded, dict):  # recorded before --format / the writer's version:
        recorded = {"format": "mp4", "writer": 1, **recorded}  # mp4, the only format then; writer 1
    if recorded is None:
        record[benchmark] = settings
        dst.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    differ = [f"{k} {recorded.get(k)!r} (this command: {v!r})" for k, v in settings.items() if recorded.get(k) != v]
    if differ:
        raise ValueError(f"{dst} holds ImageNet-{benchmark.upper()} files rendered with other settings: "
                         f"{'; '.join(differ)}. Its complete files would be kept and the rest rendered otherwise: "
                         f"rerun with the recorded --seed"
                         f"{', --batch-size and --format' if benchmark == 'p' else ' and --batch-size'}, "
                         f"or give another DST (after a change of lkfast.corrupt's VERSION or the writer's, render "
                         f"into a new DST)")


def _check_collisions(classes, suffix: str) -> None:
    """ValueError where two source images of a class share a name but for the suffix (x.JPEG, x.png):
    both would be written to one file, one rendering lost."""
    for wnid, files in classes:
        seen = {}
        for p in files:
            if p.stem in seen:
                raise ValueError(f"{seen[p.stem]} and {p} would both be written as {p.stem}{suffix} in every "
                                 f"rendered {wnid}/ folder: rename or remove one of them")
            seen[p.stem] = p


def render(src, dst, benchmark: str = "c", names: Optional[Iterable[str]] = None,
           levels: Optional[Iterable[int]] = None, batch_size: int = 32, seed: int = 0,
           device: str = "cpu", preset: str = "veryslow", progress: bool = True,
           on_unreadable: Optional[Callable[[Path, Exception], None]] = None,
           counts: Optional[dict] = None, format: Optional[str] = None) -> int:
    """Render SRC into DST (see the module docstring) and return the number of files written.

    ``names`` default to all 19 corruptions (``benchmark="c"``) or all 14 perturbations ("p": the
    10 of mFR and the release's 4 validation perturbations);
    ``levels`` are severities (C, default 1..5) or noise difficulties (P, default 1..3).
    ``device`` is where images are corrupted; ``preset`` the libx264 preset of P videos (the
    release's veryslow by default; ``encode_mp4`` says what a faster one changes).
    ``format`` (P only): "mp4" (H.264, as the release; the default) or "npy" (the frames, lossless and
    reproducible).
    ``on_unreadable(path, error)`` is called once for each source image that cannot be decoded
    (default: :func:`warn_unreadable`); such an image is skipped, its outputs are not written.
    ``counts``, when given, gets "written" and "complete" (files already complete, kept as they are).
    Raises ValueError for an unknown benchmark, name, level or format, no name or no level, a batch_size below 1, a SRC
    that is not laid out as SRC/<wnid>/<image>, two sources of a class with one name but for the
    suffix, a DST that is a file or inside SRC, or a DST rendered with another seed, batch size, format or
    version of the corruptions (recorded in DST/.lkfast-render.json: the batch size cuts the chunks,
    each drawing from its own generator, so it changes the random corruptions' files).
    """
    from tqdm.auto import tqdm

    if benchmark not in ("c", "p"):
        raise ValueError(f"benchmark must be 'c' (ImageNet-C) or 'p' (ImageNet-P); got {benchmark!r}")
    valid = tuple(CORRUPTIONS) if benchmark == "c" else tuple(PERTURBATIONS)
    names = list(valid if names is None else names)
    kind = "corruption" if benchmark == "c" else "perturbation"
    level_word = "severities" if benchmark == "c" else "difficulties"
    if not names:
        raise ValueError(f"no {kind} names given: name at least one (or pass None for all {len(valid)})")
    for n in names:
        if n not in valid:
            raise ValueError(f"unknown {kind} {n!r}; "
                             f"valid names are: {', '.join(valid)}")
    names = list(dict.fromkeys(names))  # once each, in the order given ("fog,fog" rendered once, counted once)
    levels = list(levels if levels is not None else ((1, 2, 3, 4, 5) if benchmark == "c" else (1, 2, 3)))
    top = 5 if benchmark == "c" else 3
    if not levels:
        raise ValueError(f"no {level_word} given: name at least one of "
                         f"1..{top} (or pass None for all)")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= top:
            raise ValueError(f"{level_word} must be integers in 1..{top}; got {level!r}")
    levels = list(dict.fromkeys(levels))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if format is not None and benchmark == "c":
        raise ValueError(f"format {format!r} is for ImageNet-P ({' or '.join(P_FORMATS)}); ImageNet-C is written as "
                         "JPEG, as the release")
    format = format or P_FORMATS[0]
    if format not in P_FORMATS:
        raise ValueError(f"unknown ImageNet-P format {format!r}; valid formats are: {', '.join(P_FORMATS)}")
    if benchmark == "p" and format == "mp4":  # before any work, not at the first video
        check_x264_preset(preset)
    on_unreadable = on_unreadable or warn_unreadable
    dst = Path(dst)
    _check_destination(Path(src), dst)
    classes = list_images(src)
    jobs = _jobs(benchmark, names, levels)
    suffix = ".JPEG" if benchmark == "c" else f".{format}"
    _check_collisions(classes, suffix)
    try:  # an unusable device before anything is written (it was found at the first chunk to render)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"{(str(error).splitlines() or [''])[0]} (device {device!r}: use cpu, or cuda / cuda:N on a "
                         f"machine with a GPU)") from None
    _keep_settings(dst, benchmark, _settings(seed, batch_size, benchmark, format))
    total = sum(len(files) for _, files in classes) * len(jobs)
    written = complete = 0
    swept = set()
    with tqdm(total=total, disable=not progress, unit="file",
              desc=f"ImageNet-{benchmark.upper()} -> {dst}") as bar:
        for wnid, files in classes:
            for chunk, start in enumerate(range(0, len(files), batch_size)):
                paths = files[start:start + batch_size]
                images, unreadable = None, set()
                for name, level, folder in jobs:
                    out_dir = dst / folder / wnid
                    if out_dir not in swept:  # leftovers of a killed run, once per folder
                        swept.add(out_dir)
                        for leftover in temporary_files(out_dir):
                            leftover.unlink(missing_ok=True)
                    targets = [out_dir / (p.stem + suffix) for p in paths]
                    todo = [i for i, t in enumerate(targets) if not is_complete(t)]
                    complete += len(targets) - len(todo)
                    if todo and images is None:
                        whole, unreadable = _load_chunk(paths, on_unreadable)
                        images = torch.stack([center_crop(image, (CROP, CROP)) for image in whole]).to(device)
                    todo = [i for i in todo if i not in unreadable]
                    if todo:
                        generator = chunk_generator(seed, name, level, wnid, chunk)  # CPU: see there
                        if benchmark == "c":
                            out = to_uint8(corrupt(images, name, level, generator)).cpu()
                            for i in todo:
                                write_atomic(targets[i], encode_jpeg(out[i], JPEG_QUALITY))
                        else:
                            if name in GEOMETRIC_PERTURBATIONS:  # deterministic: image by image, whole
                                frames = {i: to_uint8(perturbation_sequence(whole[i][None].to(device), name, level,
                                                                            crop=CROP))[0].cpu() for i in todo}
                            else:
                                frames = to_uint8(perturbation_sequence(images, name, level, generator)).cpu()
                            for i in todo:
                                write_atomic(targets[i], encode_npy(frames[i]) if format == "npy" else
                                             encode_mp4(frames[i], name in NOISE_PERTURBATIONS, preset))
                        written += len(todo)
                    bar.update(len(paths))
    if counts is not None:
        counts.update(written=written, complete=complete)
    return written


# ------------------------------------------------------------------------------------ command
def _names(text, benchmark):
    """--names as a list (empty items skipped: "fog,,snow," is fog and snow; a subset name, alone or in
    the list, stands for its corruptions or perturbations: "noise,blur" for C, "extra" for P);
    ValueError when it names nothing."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--names {text!r} names nothing: give comma-separated names, or leave --names out for all")
    subsets = SUBSETS if benchmark == "c" else PERTURBATION_SUBSETS
    return [n for t in names for n in (subsets[t] if t in subsets else (t,))]


def _levels(text):
    """--levels as a list of ints (empty items skipped: "1,,3," is 1 and 3); ValueError for an item that
    is no integer and when it names nothing (main: exit status 2, as for any bad argument)."""
    if text is None:
        return None
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--levels takes comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if not levels:
        raise ValueError(f"--levels {text!r} names no level: give comma-separated integers, or leave --levels out "
                         "for all")
    return levels


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m lkfast.corrupt`` (``main``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lkfast.corrupt",
        description="Render a folder of images laid out like ImageNet-val (SRC/<wnid>/<image>.JPEG) "
                    "into the ImageNet-C layout (DST/<corruption>/<severity>/<wnid>/*.JPEG, 224 px, "
                    "JPEG quality 85) or the ImageNet-P layout (DST/<perturbation>/<wnid>/*.mp4, or *.npy). "
                    "Resumable: complete files already written are skipped.",
        epilog="Exit status: 0 done; 1 if some source images could not be decoded (each is named in a warning "
               "and left out, everything else is written; fix or remove them and rerun); 2 on a bad argument, "
               "source layout or a DST it cannot write; 130 after Ctrl-C and 143 after SIGTERM (rerun the same "
               "command to go on).")
    parser.add_argument("src", help="source folder: one sub-folder per class holding images")
    parser.add_argument("dst", help="output root (created if missing)")
    parser.add_argument("--benchmark", choices=("c", "p"), required=True, help="c: ImageNet-C, p: ImageNet-P")
    parser.add_argument("--names", default=None,
                        help="comma-separated corruptions/perturbations or subsets (C: "
                             f"{', '.join(SUBSETS)}; P: {', '.join(PERTURBATION_SUBSETS)}, where common is the 10 "
                             f"of mFR and extra the release's validation perturbations); default: all 19 (C) or all "
                             f"{len(PERTURBATIONS)} (P)")
    parser.add_argument("--levels", default=None,
                        help="comma-separated severities for C (default 1,2,3,4,5) or noise difficulties "
                             "for P (default 1,2,3; written as gaussian_noise, gaussian_noise_2, ...)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images corrupted together (default 32); each batch draws from its own generator, so "
                             "it is part of what the random corruptions write, recorded with --seed in "
                             "DST/.lkfast-render.json")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the corruption, e.g. cuda (default cpu)")
    parser.add_argument("--format", choices=P_FORMATS, default=None,
                        help="P only: mp4 (default; H.264 as the release, though libx264 may encode the same frames "
                             "differently from run to run) or npy (the frames as lossless uint8 arrays, the same "
                             "bytes every run, 4.67 MB a sequence)")
    parser.add_argument("--x264-preset", default="veryslow", choices=X264_PRESETS, metavar="PRESET",
                        help="libx264 preset for P videos: " + ", ".join(X264_PRESETS) + " (default veryslow, the "
                             "release's; medium encodes 2.6-4x faster, with slightly different losses)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    """``python -m lkfast.corrupt SRC DST --benchmark c|p [options]``: returns the exit status
    (0 done; 1 if some source images could not be read: everything else is written, and they are
    counted and named on stderr; 2 on a bad argument or layout, with the reason on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unreadable: List[Path] = []
    counts: dict = {}

    def note_unreadable(path, error):
        unreadable.append(path)
        warn_unreadable(path, error)

    from lkfast.interrupt import how_stopped, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt() as terminated:
            written = render(args.src, args.dst, args.benchmark, _names(args.names, args.benchmark),
                             _levels(args.levels), batch_size=args.batch_size, seed=args.seed,
                             device=args.device, preset=args.x264_preset, progress=not args.quiet,
                             on_unreadable=note_unreadable, counts=counts, format=args.format)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM
        stopped, status = how_stopped(terminated)
        print(f"\n{stopped}: complete files are kept under {args.dst}; rerun the same command (same --seed and "
              f"--batch-size) to go on", file=sys.stderr)
        return status
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # DST not writable: read-only, full, a file in the way (nothing partial is left)
        print(f"error: cannot write under {args.dst}: {error.strerror or error}"
              f"{f' ({error.filename})' if error.filename else ''}; free space or fix the folder, then rerun the "
              f"same command (complete files are kept)", file=sys.stderr)
        return 2
    complete = counts.get("complete", 0)
    print(f"wrote {written} files under {args.dst}" + (f"; {complete} were already complete (kept)" if complete else ""))
    if unreadable:
        shown = ", ".join(str(p) for p in unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        print(f"error: skipped {len(unreadable)} unreadable source image(s) ({shown}): their files are missing "
              f"under {args.dst}. Fix or remove them and rerun (complete files are kept)", file=sys.stderr)
        return 1
    return 0


__all__ = ["render", "main", "build_parser", "warn_unreadable", "chunk_seed", "chunk_generator", "RESIZE", "CROP", "JPEG_QUALITY"]
