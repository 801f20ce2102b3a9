"""Video data: indexes, clip sampling, decoding, augmentation, subsets and loaders."""

from kdhar.data.check import CheckReport, check_crop_in_frames, check_dataset, format_report
from kdhar.data.dataset import VideoClipDataset, collate_clips, make_loader
from kdhar.data.index import (
    DatasetError,
    DatasetIndex,
    MissingVideosError,
    SplitFileError,
    VideoSample,
    fingerprint,
    load_index,
)
from kdhar.data.subsets import class_balanced_subset, group_holdout
from kdhar.data.transforms import ClipAugParams, apply_params, draw_params
from kdhar.data.video import VideoError, frame_count, read_frames, write_video

__all__ = [
    "CheckReport",
    "ClipAugParams",
    "DatasetError",
    "DatasetIndex",
    "MissingVideosError",
    "SplitFileError",
    "VideoClipDataset",
    "VideoError",
    "VideoSample",
    "apply_params",
    "check_crop_in_frames",
    "check_dataset",
    "class_balanced_subset",
    "collate_clips",
    "draw_params",
    "fingerprint",
    "format_report",
    "frame_count",
    "group_holdout",
    "load_index",
    "make_loader",
    "read_frames",
    "write_video",
]
