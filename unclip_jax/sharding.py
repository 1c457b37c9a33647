"""Sharded sampling: where a pipeline's arrays live on a `jax.sharding.Mesh`.

A mesh names one or two axes:

- `data` (required): the batch is split over it. Each device denoises its own rows; the UNet, prior and
  VAE are per-sample, so no step needs communication.
- `fsdp` (optional): params are sharded over it, FSDP-style (each param of at least `MIN_FSDP_SIZE`
  elements along its largest dim that the axis divides; the rest replicated), and the batch is split
  over it too, so every device of the mesh holds distinct rows. XLA gathers each weight where it is used.
  Without an `fsdp` axis (or with one of size 1) params are replicated.

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    out = pipe(prompts, params=params, key=key, mesh=mesh)

Batches that the mesh's batch devices do not divide are padded with copies of their last row and the
outputs trimmed, so any batch runs on any mesh and gives the rows a single device gives. Random draws made
inside the compiled loops come from `jax.random` with partitionable threefry (JAX's default), whose
numbers for a row do not depend on the rows after it, so padding changes none of them.

Classifier-free guidance runs the model on [uncond_0, cond_0, uncond_1, cond_1, ...] (see
`common.cfg_batch`): split over `data`, each device holds both halves of its own rows, and neither
forming the doubled batch nor guiding moves data between devices.

Several hosts: start every process with the same arguments and call `jax.distributed.initialize()`
(on a cluster manager such as SLURM or a Cloud TPU pod it finds its peers itself; otherwise
`jax.distributed.initialize(coordinator_address="host0:1234", num_processes=N, process_id=i)`), build
the mesh over `jax.devices()` (all hosts' devices) and call the pipeline with the same prompts, key and
params on every process. Host inputs are identical everywhere, so each process supplies its own shards of
them (`place`); the images come back to every process (`to_host`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
MIN_FSDP_SIZE = 1024  # params smaller than this stay replicated: sharding them saves nothing worth a gather


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (`data`, `fsdp`) mesh over `devices` (default: every device of every process), `fsdp` of them
    per param shard group."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), (DATA, FSDP))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a pipeline call uses `mesh`: batch rows over `data` (and `fsdp`), params replicated or FSDP.
    Hashable, so it is a static argument of the compiled pieces."""

    mesh: Mesh

    def __post_init__(self):
        names = tuple(self.mesh.axis_names)
        unknown = set(names) - {DATA, FSDP}
        if DATA not in names or unknown:
            raise ValueError(f"a pipeline mesh has a {DATA!r} axis and optionally an {FSDP!r} axis; got axes {names}")

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in (DATA, FSDP) if a in self.mesh.axis_names)

    @property
    def batch_devices(self) -> int:
        """How many ways the batch is split."""
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    @property
    def fsdp(self) -> int:
        return self.mesh.shape.get(FSDP, 1)

    def padded(self, batch: int) -> int:
        """The smallest multiple of the batch devices that holds `batch` rows."""
        return -(-batch // self.batch_devices) * self.batch_devices

    # ---------------------------------------------------------------- shardings

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch(self, axis: int = 0) -> NamedSharding:
        """Rows (dim `axis`) split over the batch axes, other dims whole."""
        return NamedSharding(self.mesh, P(*([None] * axis), self.batch_axes))

    def param(self, shape: tuple[int, ...]) -> NamedSharding:
        """FSDP: a large param split along its largest dim that the `fsdp` axis divides (the last such
        one on ties: the output features of kernels); otherwise replicated."""
        n = self.fsdp
        if n == 1 or math.prod(shape) < MIN_FSDP_SIZE:
            return self.replicated()
        dims = [d for d in range(len(shape)) if shape[d] % n == 0]
        if not dims:
            return self.replicated()
        dim = max(dims, key=lambda d: (shape[d], d))
        return NamedSharding(self.mesh, P(*([None] * dim), FSDP))

    # ---------------------------------------------------------------- placing

    def put_params(self, params):
        return jax.tree.map(lambda x: place(x, self.param(np.shape(x))), params)

    def put_inputs(self, inputs: dict[str, Any], batch_axis: dict[str, int], batch: int) -> dict[str, Any]:
        """Inputs on the mesh: those named in `batch_axis` (name -> the dim of their rows) padded to
        `padded(batch)` rows with copies of the last row and split over the batch axes, the rest
        replicated. None stays None."""
        rows = self.padded(batch)
        out = {}
        for name, x in inputs.items():
            if x is None:
                out[name] = None
            elif name in batch_axis:
                out[name] = place(pad_rows(x, rows, batch_axis[name]), self.batch(batch_axis[name]))
            else:
                out[name] = place(x, self.replicated())
        return out

    def process_rows(self, n: int) -> list[int]:
        """The rows of an `n`-row batch (split as `batch()`) that this process's devices hold, in order;
        every row on one process."""
        rows = set()
        for index in self.batch().addressable_devices_indices_map((n,)).values():
            rows.update(range(*index[0].indices(n)))
        return sorted(rows)

    def put_rows(self, x, rows: list[int], n: int) -> jax.Array:
        """The `n`-row global batch split as `batch()`, from this process's rows `rows` of it (`x` holds
        them in that order, as `process_rows` lists them): each process supplies only its own rows."""
        x = np.asarray(x)
        if len(rows) != len(x):
            raise ValueError(f"{len(x)} local rows for the {len(rows)} rows this process holds")
        if len(rows) == n:
            return place(x, self.batch())
        at = {r: k for k, r in enumerate(rows)}
        return jax.make_array_from_callback(
            (n, *x.shape[1:]), self.batch(),
            lambda index: x[[at[r] for r in range(*index[0].indices(n))]][(slice(None), *index[1:])])

    def put_replicated(self, tree):
        return jax.tree.map(lambda x: place(x, self.replicated()), tree)

    def constrain(self, x: jax.Array, axis: int = 0) -> jax.Array:
        """Inside a compiled piece: keep `x`'s rows on the batch axes."""
        return jax.lax.with_sharding_constraint(x, self.batch(axis))


def layout_of(mesh: Mesh | None) -> Layout | None:
    return None if mesh is None else Layout(mesh)


def shard_call(mesh: Mesh | None, params, names: tuple[str, ...], inputs: dict[str, Any], batch_axis: dict[str, int],
               batch: int):
    """(layout, params, inputs) for a pipeline's compiled pieces: on a mesh, the params of the models `names`
    placed (`Layout.put_params`) and the inputs padded and placed (`Layout.put_inputs`); without one, all
    as given (layout None)."""
    layout = layout_of(mesh)
    if layout is None:
        return None, params, inputs
    return layout, layout.put_params({k: params[k] for k in names}), layout.put_inputs(inputs, batch_axis, batch)


def replicate(layout: Layout | None, tree):
    """`tree` (scheduler state, keys) on every device of `layout`; as it is without one."""
    return tree if layout is None else layout.put_replicated(tree)


def constrain(layout: Layout | None, x: jax.Array, axis: int = 0) -> jax.Array:
    """`layout.constrain`, or `x` itself on one device."""
    return x if layout is None else layout.constrain(x, axis)


def pad_rows(x, rows: int, axis: int = 0):
    """`x` with dim `axis` grown to `rows` by repeating its last entry (differentiable; the copies'
    outputs are trimmed, so they send no gradient back)."""
    n = np.shape(x)[axis]
    if n == rows:
        return x
    widths = [(0, 0)] * np.ndim(x)
    widths[axis] = (0, rows - n)
    return jnp.pad(jnp.asarray(x), widths, mode="edge")


def place(x, sharding: NamedSharding):
    """`x` (a host or device array, or a PRNG key) laid out as `sharding`, also across processes (each
    process fills its own shards from its copy of `x`, which must be the same everywhere)."""
    if isinstance(x, jax.core.Tracer) or jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def local_copy(x):
    """`x` whole on this process: `x` itself if this process holds all of it, a local replica if it is
    replicated, otherwise gathered from the other processes to the host (a collective: every process
    must call it, in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if x.is_fully_replicated:
        return x.addressable_data(0)
    return to_host(x)


def process_any(flags) -> np.ndarray:
    """bool [N]: the elementwise OR of every process's `flags` (a collective; `flags` as given with one
    process)."""
    flags = np.asarray(flags, bool)
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(flags.astype(np.int32))).reshape(-1, flags.size).any(0)


def shard_params(params, mesh: Mesh):
    """Params placed as a pipeline call on `mesh` wants them (replicated, or FSDP over `fsdp`): place them
    once and every call reuses them in place."""
    return Layout(mesh).put_params(params)
