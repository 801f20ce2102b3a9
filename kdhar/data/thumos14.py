"""THUMOS14 temporal action detection: the annotation format, read from a real copy or written by
the synthetic untrimmed generator.

THUMOS14 trains detectors on its *validation* videos and tests them on its *test* videos, so kdhar's
subset "train" reads the validation files and "test" the test files. A copy is laid out as

    <root>/validation/video_validation_0000051.mp4        training videos
    <root>/test/video_test_0000004.mp4                    test videos (TH14_test_set_mp4/ is read too)
    <root>/annotations/<Class>_val.txt, <Class>_test.txt   one segment a line: '<video> <start> <end>'
    <root>/annotations/Ambiguous_val.txt, Ambiguous_test.txt
    <root>/annotations/detclasslist.txt                   '<id> <Class>', the 20 detection classes

Start and end are seconds. The annotation files may also sit in `<root>/annotation/`, in `<root>`, in
the folders the official archives unpack to, or wherever `annotation_dir` says. Without
`detclasslist.txt` the classes are the `<Class>_val.txt`/`<Class>_test.txt` files found, sorted (the
official list is alphabetical too).

"Ambiguous" segments are not a class. As in the official evaluation (TH14evalDet), they are kept per
video: a detection overlapping one is neither a true nor a false positive, and training leaves their
steps out of the background.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kdhar.data.index import FINGERPRINT_BYTES, VIDEO_EXTENSIONS, DatasetError, MissingVideosError, SplitFileError

AMBIGUOUS = "Ambiguous"
CLASS_LIST = "detclasslist.txt"
# kdhar's subset -> the suffix of THUMOS14's annotation files and the folders holding the videos.
ANNOTATION_SUFFIX = {"train": "val", "test": "test"}
VIDEO_FOLDERS = {"train": ("validation",), "test": ("test", "TH14_test_set_mp4")}
# Where the official archives unpack their annotations, relative to the root.
_ANNOTATION_PLACES = (
    "annotations",
    "annotation",
    ".",
    "TH14_Temporal_annotations_validation/annotation",
    "TH14_Temporal_Annotations_Test/annotations/annotation",
    "TH14_Temporal_annotations_test/annotation",
)


class AnnotationError(SplitFileError):
    """An annotation or class-list file that is absent or has a malformed line."""


@dataclass(frozen=True)
class Segment:
    """One annotated action: its 0-based class and its start and end in seconds."""

    label: int
    start: float
    end: float


@dataclass(frozen=True)
class UntrimmedVideo:
    """One untrimmed video, its segments and its Ambiguous spans (start, end) in seconds.

    `source` is the annotation file and line that first names the video, for error messages.
    """

    name: str
    path: Path
    segments: tuple[Segment, ...]
    ambiguous: tuple[tuple[float, float], ...]
    source: str


@dataclass(frozen=True)
class DetectionIndex:
    """The videos of one subset, the class names (by label) and how many listed videos were missing.

    Label `len(classes)` is the background: a step in no segment.
    """

    videos: list[UntrimmedVideo]
    classes: list[str]
    root: Path
    subset: str
    missing: int = 0

    @property
    def background(self) -> int:
        return len(self.classes)

    @property
    def samples(self) -> list[UntrimmedVideo]:
        """The videos, under the name a recognition index gives its samples, so that what counts a
        run's training, validation and test videos reads either kind of index."""
        return self.videos

    def ground_truth(self) -> tuple[dict[str, list[tuple[int, float, float]]], dict[str, list[tuple[float, float]]]]:
        """What `kdhar.detection.evaluate_detections` scores against: each video's (label, start, end)
        and its Ambiguous (start, end), in seconds, for every video of the subset."""
        truth = {v.name: [(s.label, s.start, s.end) for s in v.segments] for v in self.videos}
        return truth, {v.name: list(v.ambiguous) for v in self.videos}


def load_detection_index(
    root: str | Path, subset: str = "train", annotation_dir: str | Path | None = None, on_missing: str = "error"
) -> DetectionIndex:
    """Reads the annotations of one subset and checks that every video they name is on disk.

    Args:
        root: the copy's folder (see the module docstring).
        subset: "train" (THUMOS14's validation videos) or "test".
        annotation_dir: the folder of the annotation files, when not one of the usual places.
        on_missing: "error" raises on a named video absent from disk; "skip" leaves it out and
            counts it in `missing`.

    Raises:
        AnnotationError: an annotation or class file is absent or has a malformed line.
        MissingVideosError: a video is absent and `on_missing` is "error"; the message names the
            annotation line that lists it.
    """
    if on_missing not in ("error", "skip"):
        raise DatasetError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    listed, classes = read_annotations(root, subset, annotation_dir)
    present = [v for v in listed if v.path.is_file()]
    absent = [v for v in listed if not v.path.is_file()]
    if absent and on_missing == "error":
        first = absent[0]
        folders = " or ".join(str(Path(root) / f) for f in VIDEO_FOLDERS[subset])
        raise MissingVideosError(
            f"{first.source}: video {first.name} is not in {folders} ({len(absent)} of {len(listed)} {subset} "
            f"videos are missing); finish the download, or pass on_missing='skip' to use the videos that are there"
        )
    return DetectionIndex(present, classes, Path(root), subset, missing=len(absent))


def detection_fingerprint(index: DetectionIndex) -> str:
    """A short hash of the classes and of every video's relative path, size, content (its first
    and last FINGERPRINT_BYTES), segments and Ambiguous spans: as `kdhar.data.index.fingerprint` for clips,
    so two detection runs with one fingerprint saw the same files and the same annotations."""
    digest = hashlib.sha256()
    digest.update(("detection\n" + "\n".join(index.classes)).encode())
    for video in sorted(index.videos, key=lambda v: str(v.path)):
        rel = video.path.relative_to(index.root) if video.path.is_relative_to(index.root) else video.path
        size = video.path.stat().st_size if video.path.is_file() else -1
        digest.update(f"\n{rel.as_posix()}\t{size}\t{video.segments}\t{video.ambiguous}\t".encode())
        if size > 0:
            with video.path.open("rb") as f:
                digest.update(f.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def read_annotations(
    root: str | Path, subset: str = "train", annotation_dir: str | Path | None = None
) -> tuple[list[UntrimmedVideo], list[str]]:
    """Parses one subset's annotation files without opening a video; returns (videos, classes).

    Videos are those any class file or the Ambiguous file names, in the order first named.
    """
    root = Path(root)
    if subset not in ANNOTATION_SUFFIX:
        raise DatasetError(f"subset must be 'train' or 'test', got {subset!r}")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; check the root path")
    places = _places(root, annotation_dir)
    classes = read_class_list(places)
    suffix = ANNOTATION_SUFFIX[subset]
    segments: dict[str, list[Segment]] = {}
    ambiguous: dict[str, list[tuple[float, float]]] = {}
    sources: dict[str, str] = {}
    for label, name in enumerate(classes):
        for video, start, end, source in _read_segments(_find(f"{name}_{suffix}.txt", places)):
            sources.setdefault(video, source)
            segments.setdefault(video, []).append(Segment(label, start, end))
    ambiguous_file = _find(f"{AMBIGUOUS}_{suffix}.txt", places, required=False)
    for video, start, end, source in _read_segments(ambiguous_file) if ambiguous_file else ():
        sources.setdefault(video, source)
        ambiguous.setdefault(video, []).append((start, end))
    videos = [
        UntrimmedVideo(name, video_path(root, subset, name), tuple(segments.get(name, ())),
                       tuple(ambiguous.get(name, ())), source)
        for name, source in sources.items()
    ]
    return videos, classes


def video_path(root: Path, subset: str, name: str) -> Path:
    """Where the video `name` of `subset` is: the first existing file among the subset's folders and
    the video extensions, else the .mp4 path in the first folder (which the missing check reports)."""
    for folder in VIDEO_FOLDERS[subset]:
        for ext in VIDEO_EXTENSIONS:
            path = root / folder / f"{name}{ext}"
            if path.is_file():
                return path
    return root / VIDEO_FOLDERS[subset][0] / f"{name}.mp4"


def read_class_list(places: list[Path]) -> list[str]:
    """The detection classes: `detclasslist.txt` ('<id> <Class>' a line) in file order, else the
    class annotation files found in the first place holding any, sorted."""
    class_file = _find(CLASS_LIST, places, required=False)
    if class_file is None:
        return _classes_from_files(places)
    classes = []
    for n, line in _numbered_lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] == AMBIGUOUS or parts[1] in classes:
            raise AnnotationError(
                f"{class_file}:{n}: expected '<id> <ClassName>' with a new class name (not {AMBIGUOUS}), got {line!r}"
            )
        classes.append(parts[1])
    if not classes:
        raise AnnotationError(f"{class_file} lists no class; restore it (THUMOS14's lists the 20 detection classes)")
    return classes


def _classes_from_files(places: list[Path]) -> list[str]:
    for place in places:
        names = {f.name.rsplit("_", 1)[0] for pattern in ("*_val.txt", "*_test.txt") for f in place.glob(pattern)}
        names.discard(AMBIGUOUS)
        if names:
            return sorted(names)
    raise AnnotationError(
        f"no {CLASS_LIST} and no <Class>_val.txt or <Class>_test.txt annotation files in "
        f"{', '.join(str(p) for p in places)}; pass the folder that holds them (--split-dir)"
    )


def _places(root: Path, annotation_dir: str | Path | None) -> list[Path]:
    if annotation_dir is not None and str(annotation_dir) != "":
        folder = Path(annotation_dir)
        if not folder.is_dir():
            raise AnnotationError(f"annotation folder {folder} does not exist; check --split-dir")
        return [folder]
    return [root / p for p in _ANNOTATION_PLACES if (root / p).is_dir()]


def _find(name: str, places: list[Path], required: bool = True) -> Path | None:
    for place in places:
        if (place / name).is_file():
            return place / name
    if not required:
        return None
    raise AnnotationError(
        f"annotation file {name} not found in {', '.join(str(p) for p in places) or 'the root'}; "
        f"pass --split-dir <folder holding {name}>"
    )


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_segments(path: Path) -> list[tuple[str, float, float, str]]:
    """(video, start, end, 'file:line') for every line of an annotation file; an empty file is no
    segment (a class absent from a small subset)."""
    rows = []
    for n, line in _numbered_lines(path):
        parts = line.split()
        try:
            start, end = float(parts[1]), float(parts[2])
            well_formed = len(parts) == 3 and 0.0 <= start <= end
        except (IndexError, ValueError):
            well_formed = False
        if not well_formed:
            raise AnnotationError(
                f"{path}:{n}: expected '<video> <start> <end>' in seconds with 0 <= start <= end, got {line!r}"
            )
        rows.append((parts[0], start, end, f"{path}:{n}"))
    return rows


def write_annotations(
    folder: str | Path,
    classes: list[str],
    subset: str,
    videos: list[tuple[str, list[Segment], list[tuple[float, float]]]],
) -> None:
    """Writes one subset's `<Class>_<val|test>.txt` files (one for every class, empty when no video
    holds it) and its `Ambiguous_<val|test>.txt`, in THUMOS14's line format.

    Args:
        folder: where the files go.
        classes: class names by label.
        subset: "train" or "test".
        videos: (video name, segments, Ambiguous spans) per video.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ANNOTATION_SUFFIX[subset]
    per_class: list[list[str]] = [[] for _ in classes]
    ambiguous: list[str] = []
    for name, segments, spans in videos:
        for seg in segments:
            per_class[seg.label].append(_line(name, seg.start, seg.end))
        ambiguous.extend(_line(name, start, end) for start, end in spans)
    for name, lines in zip(classes, per_class):
        (folder / f"{name}_{suffix}.txt").write_text("".join(lines))
    (folder / f"{AMBIGUOUS}_{suffix}.txt").write_text("".join(ambiguous))


def write_class_list(folder: str | Path, classes: list[str]) -> None:
    """Writes `detclasslist.txt` numbering the classes from 1."""
    Path(folder, CLASS_LIST).write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes, 1)))


def _line(video: str, start: float, end: float) -> str:
    # Milliseconds: a frame boundary at 25 or 30 fps is then within 0.02 frames.
    return f"{video} {start:.3f} {end:.3f}\n"
