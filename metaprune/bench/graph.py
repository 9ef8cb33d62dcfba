"""to_graph / write_back wall time and peak memory on ResNet-56 and a ResNet-50 (25.6 M params).

Each model is measured in a fresh subprocess, so one measurement's allocations cannot hide
another's. Peak memory is the process's resident-set high-water mark (VmHWM, which also sees
torch's allocations, unlike tracemalloc), reset through /proc/self/clear_refs before each phase
and reported above the resident set at the phase's start. Where the reset is not permitted, the
figure is the peak above the start of the process's life and is marked as an upper bound.
"""

import json
import subprocess
import sys
import time

from torch import nn

MODELS = ("resnet56", "resnet50")


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), projection shortcut when the shape changes."""

    def __init__(self, cin: int, width: int, stride: int):
        # cin: input channels; width: the 3x3 convolution's channels; stride: of the 3x3 conv.
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """The ImageNet ResNet-50 layout (7x7 stem, [3, 4, 6, 3] bottlenecks, 1000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(Bottleneck(cin, width, stride if index == 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def build(name: str, input_size: int):
    """(model, example_inputs) of a benchmark model."""
    import torch

    torch.manual_seed(0)
    if name == "resnet50":
        return ResNet50().eval(), (torch.randn(1, 3, input_size, input_size),)
    from metaprune import zoo

    config = zoo.default_config("resnet", input_shape=(3, 32, 32), num_classes=10, depth=56)
    return zoo.build("resnet", config).eval(), zoo.example_inputs(config, batch=1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _phase(fn):
    """Run fn(); return (result, seconds, peak MiB above the start, peak-reset worked)."""
    import gc

    gc.collect()
    exact = _reset_peak()
    start = _status_kib("VmRSS")
    began = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - began
    return result, seconds, (_status_kib("VmHWM") - start) / 1024, exact


def measure(name: str, input_size: int) -> dict:
    """Figures of one model (run inside the child process)."""
    import torch

    from metaprune.graph import to_graph

    model, inputs = build(name, input_size)
    with torch.no_grad():
        model(*inputs)  # warm-up, so the forward time below is a steady one
        began = time.perf_counter()
        model(*inputs)
        forward_s = time.perf_counter() - began
    graph, graph_s, graph_mib, exact1 = _phase(lambda: to_graph(model, inputs))
    rebuilt, back_s, back_mib, exact2 = _phase(graph.write_back)
    with torch.no_grad():
        identical = torch.equal(model(*inputs), rebuilt(*inputs))
    data = graph.data
    graph_bytes = sum(
        value.numel() * value.element_size()
        for _, value in data if isinstance(value, torch.Tensor)
    )
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "nodes": graph.num_nodes,
        "edges": graph.num_edges,
        "edge_groups": dict(zip(map(str, data.edge_group_k.tolist()),
                                data.edge_group_size.tolist())),
        "graph_tensor_mib": graph_bytes / 2**20,
        "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "forward_s": forward_s,
        "to_graph_s": graph_s,
        "to_graph_peak_mib": graph_mib,
        "write_back_s": back_s,
        "write_back_peak_mib": back_mib,
        "peak_exact": exact1 and exact2,
        "outputs_identical": identical,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models to measure (default: both)")
    parser.add_argument("--input-size", type=int, default=224,
                        help="image side of the ResNet-50 example input (default 224)")


def run(args) -> int:
    print("to_graph runs one forward pass of the model; 'forward s' is a plain one for scale.")
    print(f"{'model':<9} {'params':>11} {'nodes':>7} {'edges':>11} {'graph MiB':>9} "
          f"{'forward s':>9} {'to_graph s':>10} {'peak MiB':>8} {'write_back s':>12} "
          f"{'peak MiB':>8}  identical")
    for name in args.models:
        code = (
            "import json; from metaprune.bench.graph import measure; "
            f"print(json.dumps(measure({name!r}, {args.input_size})))"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{name}: failed\n{child.stderr[-2000:]}")
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        bound = "" if r["peak_exact"] else " (peak: upper bound)"
        print(f"{r['model']:<9} {r['params']:>11,} {r['nodes']:>7,} {r['edges']:>11,} "
              f"{r['graph_tensor_mib']:>9.1f} {r['forward_s']:>9.2f} {r['to_graph_s']:>10.2f} "
              f"{r['to_graph_peak_mib']:>8.1f} {r['write_back_s']:>12.2f} "
              f"{r['write_back_peak_mib']:>8.1f}  {r['outputs_identical']}{bound}")
        print(f"          edge groups (k: edges) {r['edge_groups']}; "
              f"parameters take {r['params_mib']:.1f} MiB")
    return 0
