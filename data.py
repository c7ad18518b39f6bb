"""Image-caption datasets in the JSONL format both scales share (DESIGN §5).

A dataset is a folder with `train.jsonl`, `val.jsonl` (the shapes world adds `test.jsonl` and
`bench.jsonl`); each line is {"image": "relative/path.png", "caption": "...", ...extra fields}. A stage that
needs no caption (RL on images, Unified-Bench sources) also reads lines without one, or a plain folder of
images (read_records). Images are read per batch (load_images), in any size, mode and format, and made
RGB (transparency over white) and square (shorter side resized, centre crop), so memory never depends on
the dataset's size. Bad input is reported with the file and line number, never skipped.
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image


class DataError(ValueError):
    pass


def write_json(path: str, obj) -> None:
    """Write JSON under a temporary name and rename it into place: a reader (or the speedrun's check for
    a finished stage) sees the whole file or none."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp")  # those of the released Unified-Bench scorer


def read_records(path: str, need_caption: bool = True) -> list[dict]:
    """A JSONL file (read_jsonl) or a folder of images (sorted by name, no captions)."""
    if not os.path.isdir(path):
        return read_jsonl(path, need_caption)
    if need_caption:
        raise DataError(f"{path}: a folder of images has no captions, and this stage needs them: give a JSONL file")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    root = os.path.abspath(path)
    return [{"image": n, "image_path": os.path.join(root, n), "where": os.path.join(path, n)} for n in names]


def jsonl_lines(path: str, kind: str = "dataset"):
    """(file:line, parsed JSON) of each non-blank line of a JSONL file; a missing file (`kind` says what it
    should be) and a line that is not UTF-8 or not JSON are errors naming them."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {kind} file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"JSONL files are UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            yield f"{path}:{lineno}", row


def read_jsonl(path: str, need_caption: bool = True, need_images: bool = False) -> list[dict]:
    """Records of a JSONL file, each with its absolute image path in `image_path` and its file:line in
    `where`. need_caption=False: lines without a caption are fine (a caption given must still be text).
    need_images: every image file must exist now (for a stage that reads images per step, which would otherwise
    stop at the first missing one, midway); its contents are checked when it is read (load_image)."""
    root, records = os.path.dirname(os.path.abspath(path)), []
    for where, record in jsonl_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"].strip():
            raise DataError(f"{where}: each line needs an \"image\" string")
        if (need_caption or "caption" in record) and not (isinstance(record.get("caption"), str) and record["caption"].strip()):
            raise DataError(f"{where}: missing or empty \"caption\"")
        record["image_path"] = os.path.join(root, record["image"])
        if need_images and not os.path.isfile(record["image_path"]):
            raise DataError(f"{where}: cannot read image {record['image_path']} (no such file)")
        record["where"] = where
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def caption_mix(spec: str) -> dict[str, float]:
    """'field:weight,...' -> {field: probability}; weights must be positive, each field named once."""
    mix = {}
    for item in spec.split(","):
        field, _, weight = item.strip().partition(":")
        try:
            value = float(weight or 1)
        except ValueError:
            raise ValueError(f"'{item}' is not field:weight (e.g. caption:0.4,short_caption:0.6)") from None
        if not field or not 0 < value < math.inf or field in mix:
            raise ValueError(f"'{item}' needs a field name (each once) and a positive weight (e.g. caption:0.4,short_caption:0.6)")
        mix[field] = value
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def load_image(record: dict, size: int | None = None, over_white: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB: any mode (transparency composited over white, grey and palette expanded;
    over_white=False drops the alpha as PIL's convert("RGB") does, the released scorer's reading); with
    `size`, the shorter side resized to it (bicubic) and the centre cropped square."""
    try:
        with Image.open(record["image_path"]) as im:
            im.load()
            if over_white and (im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, "white")
                im.alpha_composite(rgba)
            im = im.convert("RGB")
    except (OSError, ValueError) as e:  # missing file, truncated or not an image
        raise DataError(f"{record['where']}: cannot read image {record['image_path']} ({e})") from None
    if size is not None and im.size != (size, size):
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.array(im)  # writable: torch.from_numpy in the processors warns on read-only arrays


def load_images(records: list[dict], size: int | None = None) -> torch.Tensor:
    """The images of `records` (one batch) as an (N, 3, H, W) uint8 tensor. Without `size` they must share
    one: the first that does not is named."""
    arrays = [load_image(r, size) for r in records]
    for r, a in zip(records, arrays):
        if a.shape != arrays[0].shape:
            raise DataError(f"{r['where']}: image {r['image_path']} is {a.shape[1]}x{a.shape[0]}, the batch's first "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: set image_size to resize them on load")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_uint8_hwc(image) -> np.ndarray:
    """One image as (H, W, 3) uint8, from (H, W, 3) or (3, H, W) arrays/tensors, uint8 or float in [0, 1]."""
    if isinstance(image, torch.Tensor):  # numpy has no bfloat16: widen float tensors first
        image = image.detach().cpu()
        image = (image if image.dtype == torch.uint8 else image.float()).numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return image


def save_grid(rows: list[tuple], path: str, text_width: int = 320):
    """A PNG a person can look at: one row per example, images (uint8 HWC or float CHW tensors)
    side by side, each followed by its caption when the row holds (image, caption) pairs."""
    from PIL import ImageDraw
    cells = [[c if isinstance(c, str) else Image.fromarray(to_uint8_hwc(c)) for c in row] for row in rows]
    size = max(c.size[0] for row in cells for c in row if not isinstance(c, str))
    widths = [text_width if isinstance(c, str) else size for c in cells[0]]
    canvas = Image.new("RGB", (sum(widths), size * len(cells)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(cells):
        x = 0
        for c, w in zip(row, widths):
            if isinstance(c, str):  # wrap the caption into the text column
                lines = [""]
                for word in c.split():
                    joined = (lines[-1] + " " + word).strip()
                    if draw.textlength(joined) < w - 8 or not lines[-1]:
                        lines[-1] = joined
                    else:
                        lines.append(word)
                draw.multiline_text((x + 4, r * size + 2), "\n".join(lines), fill="black", spacing=1)
            else:
                canvas.paste(c.resize((size, size)), (x, r * size))
            x += w
    canvas.save(path)


def plot_curve(values: list[float], path: str, title: str = "", width: int = 480, height: int = 240):
    """A line plot as PNG (PIL only: the design card has no matplotlib): raw values in grey, a
    moving average (window = 10% of the run) in blue, min/max on the axis."""
    from PIL import ImageDraw
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        window = max(1, len(values) // 10)
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        to_xy = lambda i, v: (40 + i * (width - 50) / max(1, len(values) - 1), height - 20 - (v - lo) / span * (height - 40))
        for series, colour in ((values, (190, 190, 190)), (smooth, (30, 80, 200))):
            if len(series) > 1:
                draw.line([to_xy(i, v) for i, v in enumerate(series)], fill=colour, width=2)
        draw.text((2, 14), f"{hi:.3f}", fill="black")
        draw.text((2, height - 28), f"{lo:.3f}", fill="black")
    draw.text((40, 2), f"{title} ({len(values)} steps)", fill="black")
    image.save(path)
