"""Time the XMem network's three calls on one frame size, without the memory.

    python -m benchmarks.xmem_network_stages --size 854x480 --objects 1 --threads 2
    python -m benchmarks.xmem_network_stages --channels-last --winograd --keep-freed-memory
    python -m benchmarks.xmem_network_stages --channels-last --bf16 --keep-freed-memory
    python -m benchmarks.xmem_network_stages --channels-last --int8 --keep-freed-memory

Prints the median and minimum seconds of encode_key, encode_value (deep update) and segment
(with the hidden-state update), the GFLOP each executes and the rate achieved, and the network's
share of a frame at the default settings (every frame: encode_key + segment; every 5th frame
also encode_value). Beside them, the rate of a large matrix product in the same precision (with
--int8 in bf16 and in int8): what this CPU does on a large regular product, so how far doing the
same work faster can go. The readout is random:
speed does not depend on values, and the synthetic weights of the equivalence fixtures stand in
for the official checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.common import counting_flops, synthetic_checkpoint
from xmem_label.model.allocator import keep_freed_memory
from xmem_label.model.xmem.checkpoint import build_network, load_state_dict
from xmem_label.model.xmem.conv3x3 import use_int8, use_narrow, use_winograd


def padded(size: int) -> int:
    return (size + 15) // 16 * 16


def matmul_gflops(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """Median GFLOP/s of a (size x size) @ (size x size) product in `dtype`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def int8_matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Median GFLOP/s (a multiply-add counted as two) of a (size x size) uint8 @ int8 product
    on oneDNN's quantised kernel, returning bfloat16: what the int8 convolutions run on."""
    weight = torch.randint(-127, 128, (size, size), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(weight, [size, size])
    scales, zero_points = torch.full((size,), 0.01), torch.zeros(size, dtype=torch.long)
    x = torch.randint(0, 256, (size, size), dtype=torch.uint8)

    def product() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            x, 0.01, 0, packed, scales, zero_points, None, 1.0, 0, torch.bfloat16, "none", [], ""
        )

    product()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="854x480", help="WIDTHxHEIGHT before padding")
    parser.add_argument("--objects", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="torch.autocast('cpu', bfloat16)")
    parser.add_argument(
        "--int8", action="store_true", help="bf16 with the wide 3x3 convolutions in int8"
    )
    parser.add_argument(
        "--winograd", action="store_true", help="float32 with exact mode's Winograd convolutions"
    )
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="model/allocator.py's glibc tuning"
    )
    args = parser.parse_args()
    bf16 = args.bf16 or args.int8
    if bf16 and args.winograd:
        parser.error("--winograd is float32 only (exact mode)")
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc")

    torch.set_num_threads(args.threads)
    width, height = (padded(int(v)) for v in args.size.split("x"))
    network = build_network(load_state_dict(synthetic_checkpoint()))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    if args.int8:
        use_int8(network)
    if args.winograd:  # exact mode's kernels, as the engine prepares them
        use_winograd(network)
        use_narrow(network.decoder)
    objects, h, w = args.objects, height // 16, width // 16
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, height, width, generator=generator)
    image = image.contiguous(memory_format=memory_format)
    masks = torch.rand(1, objects, height, width, generator=generator)
    hidden = torch.zeros(1, objects, network.hidden_dim, h, w)
    readout = torch.randn(1, objects, network.value_dim, h, w, generator=generator)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    stages = {
        "encode_key": lambda: network.encode_key(image, need_shrinkage=True, need_selection=True),
        "encode_value": lambda: network.encode_value(
            image, features.f16, hidden, masks, deep_update=True
        ),
        "segment": lambda: network.segment(features, readout, hidden, update_hidden=True),
    }
    times: dict[str, list[float]] = {name: [] for name in stages}
    gflop: dict[str, float] = {}
    with torch.inference_mode(), precision:
        features = stages["encode_key"]()
        for name, stage in stages.items():
            with counting_flops() as counter:
                stage()
            gflop[name] = counter.get_total_flops() / 1e9
        for _ in range(args.repeats):
            for name, stage in stages.items():
                start = time.perf_counter()
                stage()
                times[name].append(time.perf_counter() - start)
    mode = "int8" if args.int8 else "bf16" if args.bf16 else "fp32"
    mode += " winograd" if args.winograd else ""
    mode += " channels-last" if args.channels_last else ""
    mode += " keep-freed-memory" if args.keep_freed_memory else ""
    print(f"{width}x{height} padded, {objects} object(s), {args.threads} threads, {mode}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"  {name:13s} median {median[name]:.3f} s   min {min(values):.3f} s   "
            f"{gflop[name]:.0f} GFLOP, {gflop[name] / median[name]:.0f} GFLOP/s"
        )
    per_frame = median["encode_key"] + median["segment"] + median["encode_value"] / 5
    frame_gflop = gflop["encode_key"] + gflop["segment"] + gflop["encode_value"] / 5
    print(
        f"  network per frame with a memory frame every 5: {per_frame:.3f} s, "
        f"{frame_gflop:.0f} GFLOP, {frame_gflop / per_frame:.0f} GFLOP/s"
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"  4096^3 matrix product in {dtype}: {matmul_gflops(dtype):.0f} GFLOP/s")
    if args.int8:  # the key encoder and the narrow convolutions stay in bf16
        print(f"  4096^3 matrix product in int8: {int8_matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
