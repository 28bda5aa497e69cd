"""shard.py — the device mesh and where every array lives.

One mesh with three axes, named as EasyLM and MaxText do:

    data  plain data parallelism: parameters replicated, batch split
    fsdp  fully sharded data parallelism: parameters *and* batch split, weights
          all-gathered layer by layer inside the jitted step
    tp    tensor parallelism: heads and the FFN hidden dimension split

`--mesh data=1,fsdp=-1,tp=1` (-1 takes the remaining devices; the default puts every
device on fsdp; all axes 1 means one device). One table, `PARAM_RULES`, maps each parameter to its PartitionSpec;
optimizer state follows its parameter because the rules match on the path of every
leaf (Adam's mu for `layers/q` lives at `.../mu/layers/q`). A dimension the mesh axis
does not divide stays whole (Gemma 3 270M has one KV head: it cannot be split 2 ways).

What an algorithm script calls:

    mesh = shard.make_mesh(cfg.mesh)
    model = shard.shard_model(model, mesh)                      # parameters where PARAM_RULES put them
    opt_state, param_sh, opt_sh = run.init_optimizer(tx, params, mesh)   # (tree_shardings of both)
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, ...))
    batch = shard.micro_batches(batch, mesh, grad_accum)        # this host's rows, [M, b, ...] on the mesh
"""
from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tp")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Path regex → PartitionSpec, first match wins. Letters: L layers, V vocab, D model,
# N/K query/kv heads, H head dim, F feed-forward. Layer weights carry a leading L (never split).
PARAM_RULES = [
    (r"(^|/)(embed|lm_head)$", P("tp", "fsdp")),  # [V, D]
    (r"layers/(q|k|v)$", P(None, "fsdp", "tp", None)),  # [L, D, N|K, H]
    (r"layers/o$", P(None, "tp", None, "fsdp")),  # [L, N, H, D]
    (r"layers/(gate|up)$", P(None, "fsdp", "tp")),  # [L, D, F]
    (r"layers/down$", P(None, "tp", "fsdp")),  # [L, F, D]
    (r"layers/(q|k|v)_bias$", P(None, "tp", None)),  # [L, N|K, H]
    # LoRA factors follow the weight they adapt; the rank r is never split
    (r"layers/(q|k|v|gate|up)_lora_a$", P(None, "fsdp", None)),  # [L, D, r]
    (r"layers/(q|k|v)_lora_b$", P(None, None, "tp", None)),  # [L, r, N|K, H]
    (r"layers/(gate|up)_lora_b$", P(None, None, "tp")),  # [L, r, F]
    (r"layers/o_lora_a$", P(None, "tp", None, None)),  # [L, N, H, r]
    (r"layers/down_lora_a$", P(None, "tp", None)),  # [L, F, r]
    (r"layers/(o|down)_lora_b$", P(None, None, "fsdp")),  # [L, r, D]
    (r"_(codes|scales)$", P(None, "fsdp")),  # quantized [L|V, blocks, ...]: blocks split
    # Qwen 3 MoE (moe.py): each expert split along D like the dense MLP, experts whole on every device (no
    # expert-parallel axis yet: E is not split, and F stays whole so a ragged_dot needs no tp all-reduce)
    (r"layers/expert_(gate|up)$", P(None, None, "fsdp", None)),  # [L, E, D, F]
    (r"layers/expert_down$", P(None, None, None, "fsdp")),  # [L, E, F, D]
    (r"layers/router$", P()),  # [L, D, E]: small, replicated
    # Gemma 4 (gemma4.py): one dict per layer, no L axis (layers/3/q); its own PLE tables; 26B-A4B's experts in
    # transformers' fused [E, out, in] layout, split along D on fsdp like Qwen 3 MoE's
    (r"layers/\d+/(q|k|v)$", P("fsdp", "tp", None)),  # [D, N|K, H]
    (r"layers/\d+/o$", P("tp", None, "fsdp")),  # [N, H, D]
    (r"layers/\d+/(gate|up)$", P("fsdp", "tp")),  # [D, F]
    (r"layers/\d+/down$", P("tp", "fsdp")),  # [F, D]
    (r"layers/\d+/expert_gate_up$", P(None, None, "fsdp")),  # [E, 2F, D]
    (r"layers/\d+/expert_down$", P(None, "fsdp", None)),  # [E, D, F]
    (r"layers/\d+/ple_gate$", P("fsdp", None)),  # [D, P]
    (r"layers/\d+/(q|k|v|gate|up)_lora_a$", P("fsdp", None)),  # [D, r]: LoRA as on the stacked layers, no L
    (r"layers/\d+/(q|k|v)_lora_b$", P(None, "tp", None)),  # [r, N|K, H]
    (r"layers/\d+/(gate|up)_lora_b$", P(None, "tp")),  # [r, F]
    (r"layers/\d+/o_lora_a$", P("tp", None, None)),  # [N, H, r]
    (r"layers/\d+/down_lora_a$", P("tp", None)),  # [F, r]
    (r"layers/\d+/(o|down)_lora_b$", P(None, "fsdp")),  # [r, D]
    (r"layers/\d+/ple_proj$", P(None, "fsdp")),  # [P, D]
    (r"(^|/)ple_embed$", P("tp", "fsdp")),  # [V, L·P], like the embedding
    (r"(^|/)ple_model_proj$", P("fsdp", None)),  # [D, L·P]
    (r"norm$", P()),  # [L, D], [L, H], [D]: small, replicated
    (r".*", P()),  # anything else (step counters, scalars): replicated
]


class MeshError(ValueError):
    """A --mesh string that cannot be laid out on the devices at hand."""


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """'data=1,fsdp=-1,tp=2' → {'data': 1, 'fsdp': n/2, 'tp': 2}; empty → all devices on fsdp."""
    sizes = {"data": 1, "fsdp": -1, "tp": 1}
    if spec.strip():
        sizes = {"data": 1, "fsdp": 1, "tp": 1}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in AXES:
                raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; axes are {', '.join(AXES)}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name} needs an integer size, got {value!r}") from None
            if sizes[name] == 0 or sizes[name] < -1:
                raise MeshError(f"mesh axis {name} must be a positive size or -1, got {sizes[name]}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1 in {spec!r}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n_devices % fixed:
            raise MeshError(f"mesh {spec!r}: {n_devices} devices do not divide by {fixed}")
        sizes[free[0]] = n_devices // fixed
    if int(np.prod(list(sizes.values()))) not in (1, n_devices):
        raise MeshError(f"mesh {spec!r} has {int(np.prod(list(sizes.values())))} slots for {n_devices} devices")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """The mesh of a --mesh string over all devices (or over the first one only, when every
    axis is 1: the single-device reference that sharded runs are compared with)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    if int(np.prod(list(sizes.values()))) == 1:
        devices = devices[:1]
    # Auto axes: XLA's sharding propagation places the activations; the table places the state.
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def path_str(path) -> str:
    """A pytree key path as 'layers/q' (dict keys, attributes and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    path = "/".join(parts)
    return path[:-len("/value")] if path.endswith("/value") else path  # nnx Variables end in .value


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The table's spec for a leaf, with axes that do not divide their dimension dropped."""
    spec = next(s for pattern, s in PARAM_RULES if re.search(pattern, path))
    if len(spec) != len(shape):
        return P()
    fitted = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding for every array leaf of a pytree of parameters or optimizer state."""
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(path_str(path), tuple(shape), mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree, mesh: Mesh):
    return jax.device_put(tree, tree_shardings(tree, mesh))


def shard_model(model, mesh: Mesh):
    """Move an nnx model's parameters onto the mesh as the table says (in place; returns it)."""
    from flax import nnx
    state = nnx.state(model)
    nnx.update(model, shard_tree(state, mesh))
    return model


def agreed(flag: bool) -> bool:
    """Process 0's flag on every process (a collective), so that all take the same branch: one process reading
    a file that another lacks, while the other computes with collectives, would hang both."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def gather(tree):
    """Every array of a pytree whole on every process (numpy), for process 0 to write. A collective: every
    process calls it. One process: unchanged (its arrays are all addressable already)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)


def gather_model(model):
    """gather() for an nnx model: a copy whose parameters are whole on every process (one process: the model)."""
    if jax.process_count() == 1:
        return model
    from flax import nnx
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, gather(state))


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Batches [B, T, ...]: rows (dimension `axis`) over (data, fsdp), the rest whole."""
    return NamedSharding(mesh, P(*[BATCH if d == axis else None for d in range(ndim)]))


# ----------------------------------------------------------------------------- multi-host

def start_processes(cfg) -> None:
    """Several processes (hosts) become one run: jax.distributed.initialize, before anything touches a device.

    --tpu: a TPU VM or pod slice (the runtime finds its hosts); --distributed: any cluster JAX detects (SLURM,
    Open MPI, Kubernetes, TPU); --coordinator HOST:PORT --num-processes N --process-id I: started by hand.
    A coordinator that never answers, or a process that never joins, is one line after --join-timeout
    seconds: JAX's own time-out aborts the process with a C++ stack trace, so ours fires first."""
    by_hand = bool(cfg.coordinator) or cfg.num_processes != 1 or cfg.process_id != 0
    if sum([cfg.tpu, cfg.distributed, by_hand]) > 1:
        _exit("--tpu, --distributed and --coordinator are three ways to start several processes: pick one")
    if by_hand:
        host, _, port = cfg.coordinator.rpartition(":")
        if not host or not port.isdigit():
            _exit(f"--coordinator must be HOST:PORT (process 0's address), got {cfg.coordinator!r}")
        if not 0 <= cfg.process_id < cfg.num_processes:
            _exit(f"--process-id must be in 0 .. {cfg.num_processes - 1} (--num-processes {cfg.num_processes}), "
                  f"got {cfg.process_id}")
    if cfg.tpu:
        has_tpu = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) or "TPU_WORKER_ID" in os.environ
        if not has_tpu:  # TPU VMs expose /dev/accel* (v2-v4) or /dev/vfio/* (v5+); TPU_WORKER_ID names a pod host
            _exit("--tpu given but this machine has no TPU (no /dev/accel* or /dev/vfio devices)")
    if not (cfg.tpu or cfg.distributed or by_hand):
        return
    _one_line_runtime_abort(cfg.process_id if by_hand else None)
    where = f"the coordinator {cfg.coordinator}" if by_hand else "the cluster's other processes"
    timer = threading.Timer(cfg.join_timeout, lambda: _exit(
        f"{where} did not answer, or not every process joined, within --join-timeout {cfg.join_timeout} s", now=True))
    timer.daemon = True
    timer.start()
    try:
        if by_hand:
            jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                       initialization_timeout=cfg.join_timeout + 60)
        else:
            jax.distributed.initialize(initialization_timeout=cfg.join_timeout + 60)
    except (RuntimeError, ValueError) as e:
        if not cfg.tpu:
            _exit(f"could not start several processes: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
        print(f"note: jax.distributed.initialize() skipped ({e})", file=sys.stderr)  # a one-host TPU VM needs none
    finally:
        timer.cancel()
    if cfg.tpu and {d.platform for d in jax.devices()} != {"tpu"}:
        _exit(f"--tpu given but the devices are {describe_devices()}, not TPUs")
    if several_processes():
        sys.excepthook = _stop_every_process


def _close_bars() -> None:
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):  # the line starts on its own, not after a progress bar
        bar.close()


def _stop_every_process(kind, error, traceback) -> None:
    """Several processes: an uncaught error ends this one at once. A normal exit would wait at jax.distributed's
    shutdown barrier while the others wait in a collective for it; exiting closes its connections, so their
    collectives fail and they end the same way. The other process's failure is one line; our own bug keeps its
    traceback."""
    _close_bars()
    text = str(error).strip()
    if isinstance(error, jax.errors.JaxRuntimeError) and any(
            s in text for s in ("Gloo", "Connection reset", "connection", "heartbeat", "coordination")):
        print(f"error: process {jax.process_index()}: another process of the run stopped, so this one stops too "
              f"({text.splitlines()[0][:200]}); the newest checkpoint is kept", file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(kind, error, traceback)
    leave(1)


# One of JAX's runtime log records about the other processes ("E1205 02:22:54.183301 24365 client.h:80] ...")
RUNTIME_RECORD = re.compile(rb"^[WEF]\d{4} [\d:.]+ +\d+ (coordination_\w+|preemption_sync_manager|client)\.(cc|h):\d+\] ",
                            re.M)
RUNTIME_ABORT = b"Terminating process because the JAX distributed service detected fatal errors"
HOLD_SECONDS = 2.0


def _one_line_runtime_abort(process_id: int | None) -> None:
    """When another process dies, JAX's coordination service may end this one itself, before any collective fails:
    a C++ abort that prints its log records and a stack trace, and that Python cannot catch. So stderr goes
    through a small forked process that passes everything on as it comes, except the runtime's records about
    other processes, held HOLD_SECONDS: if the abort follows they become our one line, if not they pass on."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the filter: its own session, so Ctrl-C and a scheduler's signal leave it to finish the output
        os.setsid()
        os.close(write)
        _filter_stderr(read, f"process {process_id}" if process_id is not None else "this process")
        os._exit(0)
    os.close(read)
    os.dup2(write, 2)  # sys.stderr and the runtime's C++ logging both write to fd 2
    os.close(write)

    def finish_output() -> None:  # the run's last line is out before the exit status is (a shell, a test reads it)
        sys.stderr.flush()
        # the pipe's last writer closed: the filter writes what it holds and ends. Not the terminal again: an
        # abort racing this exit would print its stack trace there
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        for _ in range(100):
            if os.waitpid(child, os.WNOHANG)[0]:
                return
            time.sleep(0.05)
    atexit.register(finish_output)  # registered before JAX's own hooks, so it runs after them
    global _finish_output
    _finish_output = finish_output


_finish_output = None


def _filter_stderr(read: int, who: str) -> None:
    held, deadline, last = b"", 0.0, b"\n"

    def write(data: bytes) -> None:
        nonlocal last
        if data:
            os.write(2, data)
            last = data[-1:]
    while True:
        ready = select.select([read], [], [], max(0.0, deadline - time.monotonic()) if held else None)[0]
        chunk = os.read(read, 1 << 16) if ready else None
        if chunk == b"":
            break
        if chunk is None:  # no abort followed: it was only a warning
            write(held)
            held = b""
            continue
        text = held + chunk
        record = RUNTIME_RECORD.search(text)
        if RUNTIME_ABORT in text:
            write(text[:record.start()] if record else b"")
            status = text.split(RUNTIME_ABORT, 1)[1].split(b"absl::Status: ", 1)[-1].split(b"\n")[0]
            reason = status.decode(errors="replace").split(". ")[0].rstrip(":.")[:200]
            write((b"" if last == b"\n" else b"\n") + f"error: {who}: another process of the run stopped, so this "
                  f"one stops too (JAX's coordination service: {reason}); the newest checkpoint is kept\n".encode())
            while os.read(read, 1 << 16):  # the runtime's stack trace
                pass
            return
        if record:
            write(text[:record.start()])
            if not held:
                deadline = time.monotonic() + HOLD_SECONDS
            held = text[record.start():]
        else:
            write(text)
            held = b""
    ours = [line for line in held.splitlines(keepends=True) if line.startswith(b"error: ")]
    write(b"".join(ours) if ours else held)  # the run ended with our line: the records before it said the same


def several_processes() -> bool:
    """Whether this run has several processes (without starting JAX's runtime when it has not started)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def leave(status: int) -> None:
    """Exit with `status`; with several processes at once, as _stop_every_process explains."""
    sys.stdout.flush()
    sys.stderr.flush()
    if several_processes():
        if _finish_output:
            _finish_output()
        os._exit(status)
    sys.exit(status)


def _exit(message: str, now: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if now:  # from another thread, or with the runtime half started: no interpreter shutdown, no atexit hooks
        if _finish_output:
            _finish_output()
        os._exit(2)
    sys.exit(2)


def describe_devices() -> str:
    devices = jax.devices()
    return f"{len(devices)} x {devices[0].platform}" if devices else "none"


def is_main_process() -> bool:
    """Only process 0 logs and writes files; every process takes part in the computation."""
    return jax.process_index() == 0


def host_rows(global_batch: int) -> slice:
    """The rows of a global batch that this host loads (each host reads only its slice)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} does not divide over {n} hosts")
    per = global_batch // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def micro_batches(batch: dict, mesh: Mesh | None, count: int) -> dict:
    """A global batch {name: [B, ...]} that every host holds → this host's rows as `count` micro-batches
    [count, B / count, ...] (per host), assembled into global arrays on the mesh (rows over data and fsdp);
    mesh None: unsharded, on the default device."""
    if mesh is None:
        return {k: jnp.asarray(v).reshape(count, -1, *v.shape[1:]) for k, v in batch.items()}
    micro = {k: np.asarray(v).reshape(count, -1, *v.shape[1:]) for k, v in batch.items()}
    rows = host_rows(next(iter(micro.values())).shape[1])  # each host feeds its share of every micro-batch,
    return {k: global_batch(v[:, rows], mesh, axis=1) for k, v in micro.items()}  # so each equals one host's


def global_batch(local: np.ndarray, mesh: Mesh | None, axis: int = 0) -> jax.Array:
    """Assemble the per-host slices (rows along `axis`) into one global array sharded as
    batch_sharding(mesh, local.ndim, axis); mesh None: unsharded, on the default device."""
    if mesh is None:
        return jnp.asarray(local)
    global_shape = list(local.shape)
    global_shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim, axis), local, tuple(global_shape))
