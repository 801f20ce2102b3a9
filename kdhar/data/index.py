"""Dataset indexes: which videos belong to a split, with their labels and groups.

Three layouts are understood:

* ``ucf101``: ``<root>/<Class>/v_<Class>_gNN_cNN.avi`` with the official ``classInd.txt``,
  ``trainlistNN.txt`` and ``testlistNN.txt`` (CRLF line endings, 1-based labels).
* ``hmdb51``: ``<root>/<class>/<video>.avi`` with ``<class>_test_splitN.txt`` files whose lines
  read ``<video> <0|1|2>`` (1 = train, 2 = test, 0 = unused).
* ``folder``: ``<root>/<class>/<video>.<ext>``, optionally described by ``<root>/manifest.csv``
  with the columns ``path,label[,split][,group]`` (``label`` is the class name).

Labels are 0-based. ``group`` ties videos cut from the same source (UCF101's ``gNN``) so that
train and test never share one.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("ucf101", "hmdb51", "folder")
SUBSETS = ("train", "test")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm")
MANIFEST_NAME = "manifest.csv"
# Share of groups a folder without a manifest puts in the test split: HMDB51's 70/30 ratio.
FOLDER_TEST_FRACTION = 0.3
# How many missing paths an error message names; more only buries the advice.
_MISSING_SHOWN = 3

_UCF_GROUP = re.compile(r"_(g\d+)_c\d+$")
logger = logging.getLogger(__name__)
_GAPS_SAID: set[Path] = set()  # class files whose numbering gaps were already reported


class DatasetError(ValueError):
    """A dataset folder or split file that cannot be used as given."""


class SplitFileError(DatasetError):
    """A split, class or manifest file that is absent or malformed."""


class MissingVideosError(DatasetError):
    """Videos listed by the split files are absent on disk."""


@dataclass(frozen=True)
class VideoSample:
    """One video: its file, 0-based label and source group."""

    path: Path
    label: int
    group: str


@dataclass(frozen=True)
class DatasetIndex:
    """The videos of one split subset, the class names (by label) and how many were missing."""

    samples: list[VideoSample]
    classes: list[str]
    root: Path
    missing: int = 0


def load_index(
    dataset: str,
    root: str | Path,
    split: int = 1,
    subset: str = "train",
    on_missing: str = "error",
    split_dir: str | Path | None = None,
) -> DatasetIndex:
    """Lists the videos of one split subset and checks that they exist.

    Args:
        dataset: "ucf101", "hmdb51" or "folder".
        root: folder holding one sub-folder per class.
        split: official split number, 1-3.
        subset: "train" or "test".
        on_missing: "error" raises on listed videos absent from disk; "skip" leaves them out and
            counts them in `missing`.
        split_dir: where the split files are, if not under `root`.

    Raises:
        MissingVideosError: listed videos are absent and `on_missing` is "error".
        SplitFileError: a split file is absent or has a malformed line.
        DatasetError: another unusable argument or folder.
    """
    if on_missing not in ("error", "skip"):
        raise DatasetError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    listed, classes = read_split(dataset, root, split, subset, split_dir)
    present = [s for s in listed if s.path.is_file()]
    missing = len(listed) - len(present)
    if missing and on_missing == "error":
        absent = [str(s.path) for s in listed if not s.path.is_file()][:_MISSING_SHOWN]
        raise MissingVideosError(
            f"{missing} of {len(listed)} {subset} videos of {dataset} split {split} are missing under "
            f"{root} (e.g. {', '.join(absent)}). Finish the download, or pass on_missing='skip' "
            f"(--on-missing skip) to train on the videos that are there."
        )
    return DatasetIndex(samples=present, classes=classes, root=Path(root), missing=missing)


def read_split(
    dataset: str,
    root: str | Path,
    split: int = 1,
    subset: str = "train",
    split_dir: str | Path | None = None,
) -> tuple[list[VideoSample], list[str]]:
    """Parses the split files without touching the videos; returns (listed samples, classes)."""
    root = Path(root)
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if subset not in SUBSETS:
        raise DatasetError(f"subset must be 'train' or 'test', got {subset!r}")
    if split not in (1, 2, 3):
        raise DatasetError(f"split must be 1, 2 or 3, got {split!r}")
    if root.exists() and not root.is_dir():
        raise DatasetError(f"dataset root {root} is a file, not a folder; give the folder that holds the videos")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; check the root path")
    split_dir = Path(split_dir) if split_dir is not None else None
    if dataset == "ucf101":
        return _read_ucf101(root, split, subset, split_dir)
    if dataset == "hmdb51":
        return _read_hmdb51(root, split, subset, split_dir)
    return _read_folder(root, split, subset, split_dir)


# Bytes read from each end of every video for the fingerprint: a re-encoded or replaced file of the
# same size changes its container header or its last frames. The 720 synthetic training videos take
# 0.1 s here (files in the page cache), so UCF101's 13k take a few seconds where hashing every byte
# (6.5 GB) would take minutes.
FINGERPRINT_BYTES = 16 * 1024


def fingerprint(index: DatasetIndex) -> str:
    """A short hash of the classes and of every video's relative path, label, size and content (its
    first and last FINGERPRINT_BYTES).

    Two runs with the same fingerprint saw the same files, whatever folder the data sat in; a file
    rewritten with other content of the same size changes it.
    """
    digest = hashlib.sha256()
    digest.update("\n".join(index.classes).encode())
    for sample in sorted(index.samples, key=lambda s: str(s.path)):
        rel = sample.path.relative_to(index.root) if sample.path.is_relative_to(index.root) else sample.path
        size = sample.path.stat().st_size if sample.path.is_file() else -1
        digest.update(f"\n{rel.as_posix()}\t{sample.label}\t{size}\t".encode())
        if size > 0:
            with sample.path.open("rb") as f:
                digest.update(f.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def _lines(path: Path) -> list[tuple[int, str]]:
    # The official lists use CRLF; splitlines() handles both, and blank lines are harmless.
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SplitFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise SplitFileError(f"{path} is empty; restore the split file (the official lists have one video per line)")
    return lines


def _find_file(name: str, places: list[Path]) -> Path:
    for place in places:
        if (place / name).is_file():
            return place / name
    raise SplitFileError(
        f"split file {name} not found in {', '.join(str(p) for p in places)}; "
        f"pass --split-dir <folder holding {name}>"
    )


def _read_ucf101(
    root: Path, split: int, subset: str, split_dir: Path | None
) -> tuple[list[VideoSample], list[str]]:
    # The two official downloads unpack side by side: UCF-101/ (videos) and ucfTrainTestlist/.
    places = [split_dir] if split_dir is not None else [root, root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist"]
    class_file = _find_file("classInd.txt", places)
    classes: list[str] = []
    numbers: list[int] = []  # the file's own class numbers; a subset keeps the official ones
    for n, line in _lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or (numbers and int(parts[0]) <= numbers[-1]) or int(parts[0]) < 1:
            raise SplitFileError(
                f"{class_file}:{n}: expected '<number> <ClassName>' with numbers rising from 1 or more, got {line!r}"
            )
        numbers.append(int(parts[0]))
        classes.append(parts[1])
    if numbers != list(range(1, len(numbers) + 1)) and class_file not in _GAPS_SAID:
        _GAPS_SAID.add(class_file)
        logger.warning("%s numbers its %d classes %s..%s with gaps (a class subset): labels follow the file's order",
                    class_file, len(numbers), numbers[0], numbers[-1])
    official = {name: number for name, number in zip(classes, numbers)}
    by_name = {name: i for i, name in enumerate(classes)}

    list_file = _find_file(f"{subset}list{split:02d}.txt", places)
    samples = []
    for n, line in _lines(list_file):
        parts = line.split()
        expected = 2 if subset == "train" else 1
        if len(parts) != expected or "/" not in parts[0]:
            form = "<Class>/<video>.avi <label>" if subset == "train" else "<Class>/<video>.avi"
            raise SplitFileError(f"{list_file}:{n}: expected '{form}', got {line!r}")
        rel = parts[0]
        class_name = rel.split("/")[0]
        if class_name not in by_name:
            raise SplitFileError(f"{list_file}:{n}: class {class_name!r} is not in {class_file}")
        label = by_name[class_name]
        if subset == "train" and (not parts[1].isdigit() or int(parts[1]) != official[class_name]):
            raise SplitFileError(
                f"{list_file}:{n}: label {parts[1]} does not match class {class_name!r} "
                f"(number {official[class_name]} in {class_file})"
            )
        match = _UCF_GROUP.search(Path(rel).stem)
        if match is None:
            raise SplitFileError(f"{list_file}:{n}: {rel!r} is not named v_<Class>_gNN_cNN.avi")
        samples.append(VideoSample(path=root / rel, label=label, group=match.group(1)))
    return samples, classes


def _read_hmdb51(
    root: Path, split: int, subset: str, split_dir: Path | None
) -> tuple[list[VideoSample], list[str]]:
    folder = split_dir if split_dir is not None else root / "testTrainMulti_7030_splits"
    suffix = f"_test_split{split}.txt"
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not files:
        raise SplitFileError(f"no *{suffix} files in {folder}; pass --split-dir <folder with the HMDB51 splits>")
    classes = [f.name[: -len(suffix)] for f in files]
    wanted = "1" if subset == "train" else "2"
    samples = []
    for label, (class_name, split_file) in enumerate(zip(classes, files)):
        for n, line in _lines(split_file):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise SplitFileError(f"{split_file}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] == wanted:
                path = root / class_name / parts[0]
                samples.append(VideoSample(path=path, label=label, group=_hmdb_group(path.stem)))
    return samples, classes


def _read_folder(
    root: Path, split: int, subset: str, split_dir: Path | None
) -> tuple[list[VideoSample], list[str]]:
    manifest = (split_dir if split_dir is not None else root) / MANIFEST_NAME
    if manifest.is_file():
        rows = _read_manifest(manifest, root)
    else:
        rows = [
            (path, path.parent.name, None, path.stem)
            for path in sorted(root.glob("*/*"))
            # Dot-files are partial writes (write_video's temporary names) or OS metadata.
            if path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")
        ]
        if not rows:
            raise DatasetError(
                f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in the class folders of {root} and no "
                f"{MANIFEST_NAME}; expected <root>/<class>/<video>"
            )
    classes = sorted({class_name for _, class_name, _, _ in rows})
    by_name = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, class_name, row_split, group in rows:
        in_subset = row_split == subset if row_split is not None else _folder_split(group, split) == subset
        if in_subset:
            samples.append(VideoSample(path=path, label=by_name[class_name], group=group))
    return samples, classes


def _read_manifest(manifest: Path, root: Path) -> list[tuple[Path, str, str | None, str]]:
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "path" not in header or "label" not in header:
            raise SplitFileError(f"{manifest}:1: header must name 'path,label[,split][,group]', got {header}")
        rows = []
        for row in reader:
            n = reader.line_num
            if not row.get("path") or not row.get("label"):
                raise SplitFileError(f"{manifest}:{n}: empty path or label")
            row_split = row.get("split") or None
            if row_split is not None and row_split not in SUBSETS:
                raise SplitFileError(f"{manifest}:{n}: split must be 'train' or 'test', got {row_split!r}")
            path = root / row["path"]
            rows.append((path, row["label"], row_split, row.get("group") or path.stem))
    if not rows:
        raise SplitFileError(f"{manifest}: no rows after the header")
    return rows


def _hmdb_group(stem: str) -> str:
    # HMDB51 names carry no group field, but videos named like UCF101's (`..._gNN_cNN`, as the
    # synthetic set writes them) share a source; keep those together so holdouts do not leak.
    match = _UCF_GROUP.search(stem)
    return match.group(1) if match else stem


def _folder_split(group: str, split: int) -> str:
    # A hash of the group alone decides, so adding videos never moves existing ones between
    # subsets, and every video of a group lands on the same side.
    value = int.from_bytes(hashlib.sha256(f"{split}/{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if value < FOLDER_TEST_FRACTION else "train"
