"""The one ONNX Runtime session factory: provider choice (CUDA when it really runs, else CPU with explicit
threads), graph optimisation, IOBinding and CUDA graphs on GPU; records the provider actually used.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from capsbench.export.errors import ExportError, SessionError
from capsbench.export.validate import REEXPORT_ADVICE

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# cuDNN's exhaustive conv search is the fastest steady state; its cost lands in the first run, which the
# harness reports separately. TF32 off keeps fp32 results within the parity tolerance.
DEFAULT_CUDA_OPTIONS = {
    "device_id": 0,
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "do_copy_in_default_stream": "1",
    "arena_extend_strategy": "kNextPowerOfTwo",
    "use_tf32": "0",
}


@dataclass(frozen=True)
class ExecutionProvider:
    """One ONNX Runtime execution provider, everything the suite needs to know of it in one place: a new one is
    one entry in EXECUTION_PROVIDERS (and, for the C++ runner, its `--provider` branch in runner.cpp)."""

    name: str  # the --provider value, and the suffix of the timing backends (ort_<name>, ort_cpp_<name>)
    ort_name: str  # ONNX Runtime's name
    device: str  # where IOBinding keeps inputs and outputs (an OrtValue device), and torch eager runs
    runner_flag: str  # the C++ runner's --provider value
    options: dict[str, Any] = field(default_factory=dict)  # provider options (the caller's override them)
    present: Callable[[], bool] = lambda: True  # whether this machine has the device
    graphs: bool = False  # whether whole-graph capture (CUDA graphs) is offered
    iobinding: bool = False  # whether timing binds device buffers by default


_thread_limit: int | None = None  # set by `thread_limit`


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Within: `default_threads()` is `threads`, for every caller (a task given fewer cores than the machine
    has, such as a Ray task's reservation); restored on exit."""
    global _thread_limit
    saved, _thread_limit = _thread_limit, threads
    try:
        yield
    finally:
        _thread_limit = saved


def default_threads() -> int:
    """The cores this process may run on (what torch uses by default too), or those `thread_limit` set."""
    if _thread_limit is not None:
        return _thread_limit
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_device_present() -> bool:
    """Whether a CUDA GPU is visible. onnxruntime-gpu lists its CUDA provider even on machines with none."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    return Path("/dev/nvidiactl").exists()


EXECUTION_PROVIDERS: dict[str, ExecutionProvider] = {
    "cpu": ExecutionProvider("cpu", CPU, "cpu", "cpu"),
    "cuda": ExecutionProvider(
        "cuda",
        CUDA,
        "cuda",
        "cuda",
        options=DEFAULT_CUDA_OPTIONS,
        present=lambda: cuda_device_present(),  # looked up when called (tests replace it)
        graphs=True,
        iobinding=True,
    ),
}
PROVIDERS = ("auto", *EXECUTION_PROVIDERS)  # the CLI's --provider choices
_BY_ORT_NAME = {ep.ort_name: ep for ep in EXECUTION_PROVIDERS.values()}


def execution_provider(ort_name: str) -> ExecutionProvider:
    """The registry entry of a provider ONNX Runtime reports (e.g. session.get_providers()[0])."""
    return _BY_ORT_NAME[ort_name]


@dataclass
class OrtSession:
    """An InferenceSession and what it really runs on. `run` takes and returns numpy; `runner` prepares a
    zero-argument call for timing (IOBinding with device buffers on CUDA)."""

    session: ort.InferenceSession
    path: Path
    provider: str  # the provider actually used: session.get_providers()[0]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def execution_provider(self) -> ExecutionProvider:
        return execution_provider(self.provider)

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def check_input(self, shape: tuple[int, ...]) -> None:
        """ExportError naming the file when `shape` does not fit the graph's input (fixed axes must match)."""
        expected = self.session.get_inputs()[0].shape
        ok = len(shape) == len(expected) and all(
            not isinstance(e, int) or e == s for e, s in zip(expected, shape, strict=True)
        )
        if not ok:
            raise ExportError(
                f"{self.path}: input '{self.input_name}' has shape {expected} but the images are "
                f"{tuple(shape)}; use images of the model's size, or re-export the model for this input "
                f"(capsbench export --force)"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        """The first output (class capsules) for a batch of float32 images."""
        self.check_input(images.shape)
        return self.session.run(self.output_names[:1], {self.input_name: np.ascontiguousarray(images)})[0]

    def output_shapes(self, batch: int) -> list[tuple[int, ...]] | None:
        """Concrete output shapes at `batch`: axis 0 is the batch axis; None when another axis is symbolic."""
        shapes = [(batch, *o.shape[1:]) for o in self.session.get_outputs()]
        return shapes if all(isinstance(d, int) for s in shapes for d in s) else None

    def runner(
        self, images: np.ndarray, iobinding: bool | None = None
    ) -> tuple[Callable[[], Any], Callable[[], None] | None]:
        """(run_fn, sync) for the timing harness on this batch; run_fn returns the outputs' buffers.

        With IOBinding (the default on CUDA) inputs and outputs live on the session's device in fixed
        OrtValues, which CUDA graphs need, and no host<->device copy is timed; sync waits for the outputs.
        """
        self.check_input(images.shape)
        images = np.ascontiguousarray(images, dtype=np.float32)
        ep = self.execution_provider
        if not (ep.iobinding if iobinding is None else iobinding):
            feed, names = {self.input_name: images}, self.output_names
            return (lambda: self.session.run(names, feed)), None
        device = ep.device
        device_id = int((self.info.get("provider_options") or {}).get("device_id", 0))
        binding = self.session.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(images, device, device_id)
        binding.bind_ortvalue_input(self.input_name, x)
        shapes = self.output_shapes(len(images))
        outs = []
        if shapes is None:  # ORT allocates the outputs on the device (not possible with CUDA graphs)
            if self.info.get("cuda_graph"):
                raise SessionError(f"{self.path}: CUDA graphs need fixed output shapes; re-export the model")
            for name in self.output_names:
                binding.bind_output(name, device, device_id)
        else:
            outs = [
                ort.OrtValue.ortvalue_from_shape_and_type(s, np.float32, device, device_id) for s in shapes
            ]
            for name, value in zip(self.output_names, outs, strict=True):
                binding.bind_ortvalue_output(name, value)

        def run() -> list[ort.OrtValue]:
            self.session.run_with_iobinding(binding)
            return outs or binding.get_outputs()

        run.inputs = x  # type: ignore[attr-defined]  # the input buffer must outlive the binding
        return run, binding.synchronize_outputs


def _session_options(
    threads: int,
    opt_level: str,
    optimized_model_path: str | Path | None,
    profile_prefix: str | None,
    allow_spinning: bool = False,
) -> ort.SessionOptions:
    if opt_level not in OPT_LEVELS:
        raise SessionError(f"unknown opt_level {opt_level!r}; choose one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1  # a chain of ops: parallelism is inside each op
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not allow_spinning:
        # Idle pool threads sleep instead of spinning after each run: spinning threads keep the cores busy
        # while torch runs next in the same process, which slowed torch eager's timings (issue 14).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(
    path: str | Path,
    provider: str = "auto",
    threads: int | None = None,
    opt_level: str = "all",
    optimized_model_path: str | Path | None = None,
    cuda_graph: bool = False,
    cuda_options: dict[str, Any] | None = None,
    _profile_prefix: str | None = None,
    allow_spinning: bool = False,
) -> OrtSession:
    """An ONNX Runtime session for an ONNX file.

    provider: 'cpu'; 'cuda' (SessionError unless the session really runs on CUDA); 'auto' (CUDA when this
    onnxruntime has it and a GPU is present, else CPU; a CUDA attempt that falls back is recorded in
    info['fallback']). threads: CPU intra-op threads (default: this process's cores). cuda_graph: capture
    the whole graph (ONNX Runtime does so on the 2nd-3rd run: latency.graph_backend runs those before timing;
    needs every node on CUDA and fixed IOBinding buffers: use `runner`).
    allow_spinning: let idle CPU pool threads spin between runs (ORT's default; off here so that the threads
    leave the cores to whatever runs next, e.g. torch in the timing sweep).
    """
    path = Path(path)
    if provider not in PROVIDERS:
        raise SessionError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found; export the model first (capsbench export)")
    threads = threads or default_threads()
    available = ort.get_available_providers()
    if provider == "auto":  # the first accelerator this onnxruntime has and this machine has a device for
        accel = [ep for ep in EXECUTION_PROVIDERS.values() if ep.ort_name != CPU]
        want = next(
            (ep for ep in accel if ep.ort_name in available and ep.present()), EXECUTION_PROVIDERS["cpu"]
        )
    else:
        want = EXECUTION_PROVIDERS[provider]
        if want.ort_name not in available:
            raise SessionError(
                f"--provider {provider}: this onnxruntime ({ort.__version__}) has no {want.ort_name} (it has "
                f"{', '.join(available)}); install an onnxruntime build with it, or use --provider cpu"
            )
    want_cuda = want.ort_name == CUDA
    if cuda_graph and not want.graphs:
        raise SessionError("CUDA graphs need the CUDA provider; drop cuda_graph or use provider='cuda'")

    so = _session_options(threads, opt_level, optimized_model_path, _profile_prefix, allow_spinning)
    providers: list[Any] = [CPU]
    opts: dict[str, Any] = {}
    if want.ort_name != CPU:
        if want_cuda and hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch installs
            with contextlib.suppress(Exception):  # only a hint; session creation says what is missing
                ort.preload_dlls()
        opts = {**want.options, **(cuda_options or {})}
        if cuda_graph:
            opts["enable_cuda_graph"] = "1"
        providers = [(want.ort_name, {k: str(v) for k, v in opts.items()}), CPU]
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except (
        Exception
    ) as e:  # ORT raises Fail/InvalidProtobuf/InvalidGraph/...: all mean "cannot use this file"
        msg = f"{type(e).__name__}: {str(e).strip()[:1000]}"
        if want.ort_name != CPU and (want.name in msg.lower() or "graph capture" in msg):
            raise SessionError(f"{path}: could not create a {want.ort_name} session ({msg})") from e
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({msg}); {REEXPORT_ADVICE}") from e

    used = session.get_providers()[0]
    fallback = None
    if used != want.ort_name:
        fallback = f"ONNX Runtime could not create {want.ort_name} and fell back to CPU" + (
            " (CUDA 13 / cuDNN 9 libraries missing or no usable GPU; see ORT's log above)"
            if want_cuda
            else ""
        )
        if provider != "auto" or cuda_graph:
            raise SessionError(
                f"{path}: --provider {want.name} was asked for but {fallback}; use --provider cpu"
            )
    info = {
        "provider": used,
        "requested": provider,
        "providers": session.get_providers(),
        "available_providers": available,
        "fallback": fallback,
        "threads": threads if used == CPU else None,
        "opt_level": opt_level,
        "allow_spinning": allow_spinning,
        "cuda_graph": bool(cuda_graph and used == CUDA),
        "cuda_options": opts if used == CUDA else None,
        "provider_options": opts if used != CPU else None,
        "onnxruntime": ort.__version__,
    }
    return OrtSession(session=session, path=path, provider=used, info=info)


# Ops that ORT's CUDA provider may leave on CPU when they only compute shapes (ints the next kernel reads from
# host memory): harmless for CUDA graphs as long as no Memcpy node moves tensor data between the devices.
SHAPE_OPS = frozenset(
    {"Shape", "Size", "Concat", "Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "ConstantOfShape", "Range"}
)


def placement_by_op(path: str | Path, images: np.ndarray, **session_kwargs: Any) -> dict[str, dict[str, int]]:
    """provider -> op type -> kernels in one profiled run: nodes silently left on CPU show up here, by name."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        s = make_session(path, _profile_prefix=str(Path(tmp) / "placement"), **session_kwargs)
        s.run(images)
        events = json.loads(Path(s.session.end_profiling()).read_text())
    out: dict[str, dict[str, int]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            ops = out.setdefault(e["args"].get("provider", "?"), {})
            op = e["args"].get("op_name", "?")
            ops[op] = ops.get(op, 0) + 1
    return out


def node_placement(path: str | Path, images: np.ndarray, **session_kwargs: Any) -> dict[str, int]:
    """Kernels per execution provider in one profiled run."""
    return {p: sum(ops.values()) for p, ops in placement_by_op(path, images, **session_kwargs).items()}


def placement_summary(by_op: dict[str, dict[str, int]], provider: str = CUDA) -> dict[str, Any]:
    """Kernels per provider; whether every node, and every compute node, ran on `provider` (an ORT provider
    name), and if not, `problem`: one line saying what ran elsewhere (None when all compute ran there)."""
    off = {op: n for p, ops in by_op.items() if p != provider for op, n in ops.items()}
    memcpy = sum(n for ops in by_op.values() for op, n in ops.items() if op.startswith("Memcpy"))
    compute_off = {op: n for op, n in off.items() if op not in SHAPE_OPS and not op.startswith("Memcpy")}
    all_compute = not compute_off and memcpy == 0 and provider in by_op
    problem = None
    if not all_compute:
        parts = []
        if compute_off:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(compute_off.items()))
            parts.append(f"compute nodes off {provider}: {listed}")
        if memcpy:
            parts.append(f"{memcpy} Memcpy node(s) moved data between devices")
        if provider not in by_op:
            parts.append(f"no node ran on {provider}")
        problem = "; ".join(parts)
    return {
        "node_placement": {p: sum(ops.values()) for p, ops in by_op.items()},
        "ops_off_cuda" if provider == CUDA else "ops_off_provider": off,
        "memcpy_nodes": memcpy,
        "all_nodes_on_cuda" if provider == CUDA else "all_nodes_on_provider": not off and memcpy == 0,
        "all_compute_on_cuda" if provider == CUDA else "all_compute_on_provider": all_compute,
        "problem": problem,
    }
