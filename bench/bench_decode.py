"""Image decoding: torchvision.io.decode_image (deprecated in torchvision 0.29) vs TorchCodec (issue 14).

    .venv/bin/python bench/bench_decode.py [--images 64] [--repeats 5]
    PYTHONPATH=DIR .venv/bin/python bench/bench_decode.py     # DIR: pip install --no-deps --target DIR torchcodec

Decodes the synthetic set's JPEGs (dist_kp.data.synthetic) and 640x480 photographic JPEGs from
the same bytes in memory, one thread, as one data-loading worker does, and prints images/s of
each decoder (the best of --repeats passes) and whether both give the same pixels.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synthetic_jpegs(count: int) -> list[torch.Tensor]:
    from dist_kp.data.synthetic import generate

    root = generate(Path(tempfile.mkdtemp(prefix="bench_decode-")), train=count, val=0, seed=0)
    return [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in sorted((root / "train2017").glob("*.jpg"))]


def photo_jpegs(count: int) -> list[torch.Tensor]:
    """640x480 crops of matplotlib's sample photograph, quality 90 (COCO's size and content type)."""
    from matplotlib import cbook
    from PIL import Image

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((1024, 1200))
    out = []
    for i in range(count):
        x, y = (i * 37) % (1024 - 640), (i * 53) % (1200 - 480)
        buffer = io.BytesIO()
        photo.crop((x, y, x + 640, y + 480)).save(buffer, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    return out


def images_per_s(decode: Callable[[torch.Tensor], torch.Tensor], data: list[torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for encoded in data:
            decode(encoded)
        best = min(best, time.perf_counter() - start)
    return len(data) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from torchvision.io import ImageReadMode, decode_image

    decoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torchvision.io.decode_image": lambda data: decode_image(data, mode=ImageReadMode.RGB)}
    try:
        from torchcodec.decoders import decode_image as codec_decode
    except ImportError as error:
        print(f"torchcodec not importable ({error}); torchvision only")
    else:
        decoders["torchcodec.decoders.decode_image"] = lambda data: codec_decode(data, mode="RGB")
    print("| pictures | " + " | ".join(f"{name} img/s" for name in decoders) + " | same pixels |")
    print("|---|" + "---|" * (len(decoders) + 1))
    for label, data in (("synthetic set", synthetic_jpegs(args.images)), ("640x480 photos", photo_jpegs(args.images))):
        rates = [images_per_s(decode, data, args.repeats) for decode in decoders.values()]
        decoded = [[decode(d) for d in data[:8]] for decode in decoders.values()]
        same = all(torch.equal(a, b) for other in decoded[1:] for a, b in zip(decoded[0], other))
        size = "x".join(map(str, decoded[0][0].shape[1:]))
        print(f"| {label} ({size}) | " + " | ".join(f"{r:.0f}" for r in rates) + f" | {same} |")


if __name__ == "__main__":
    main()
