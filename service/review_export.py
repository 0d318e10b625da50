"""`glad review export`: reviewed inspections' kept images, laid out for training and
evaluation. False alarms become a folder of good images (`glad train --extra-good DIR`);
confirmed defects go under DIR/test/defect/, the MVTec test layout `glad eval` reads."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from service.media import MediaStore
from service.records import Filters, RecordStore, ReviewLabel

# The most records one export reads.
EXPORT_LIMIT = 1_000_000


@dataclass(frozen=True)
class Exported:
    written: int
    # Reviewed records whose image was never kept, or has expired.
    without_image: int


def export_reviewed(
    store: RecordStore, media: MediaStore, product: str, label: ReviewLabel, out: Path
) -> Exported:
    rows, _ = store.query(Filters(product=product, label=label), EXPORT_LIMIT, 0)
    folder = out if label is ReviewLabel.false_alarm else out / "test" / "defect"
    folder.mkdir(parents=True, exist_ok=True)
    written = missing = 0
    for row in rows:
        source = media.path(row.image_path) if row.image_path else None
        if source is None:
            missing += 1
            continue
        shutil.copyfile(source, folder / source.name)
        written += 1
    return Exported(written, missing)
