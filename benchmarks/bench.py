"""unclip-jax and diffusers (PyTorch) timed side by side, in one run: `python benchmarks/bench.py ...`.

Two measurements, each on random weights at the real Stable unCLIP sizes (speed does not depend on
the values; nothing is downloaded):

  unet      one UNet step of stable-diffusion-2-1-unclip (guidance batch 2, 512x512 -> 64x64 latents)
  pipeline  the whole text-to-image StableUnCLIPPipeline (Karlo prior + 2-1-unclip-small decoder),
            `--steps` prior and decoder steps, after compilation; JAX's first call (compilation) apart

Each side runs in its own worker process (so peak RSS is per side) pinned to the same `--threads`
cores, and the repetitions alternate JAX, PyTorch, JAX, ... so that load from other processes on a
shared machine falls on both alike; medians and the JAX / diffusers ratio are printed. When the two
pipelines would not fit in memory together they run one after the other (said in the output).
`--tiny` uses the toy configs of `unclip_jax.tiny` (seconds; what CI runs). The real configs are read
from `--configs` (default: benchmarks/configs beside this file). It runs against whichever unclip_jax is
importable (a checkout on PYTHONPATH, or an installed wheel).

PyTorch, diffusers and transformers are imported only by the diffusers worker (`--jax-only` needs none),
and jax only by the JAX worker: each side's imports sit inside its functions, so that neither the parent
nor the other side starts a framework (threads, memory) that would skew the measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from unclip_jax.cli import OneLineParser, UsageError, silence_torch_advice

# Real component configs (file names in --configs): the unCLIP UNet of (a), the pipeline of (b).
_UNET_REAL = "unet_sd21_unclip.json"
_PIPELINE_REAL = {
    "prior_text_encoder": "clip_text_karlo_vit_l_proj.json",
    "prior": "prior_karlo.json",
    "image_normalizer": "image_normalizer_l.json",
    "text_encoder": "clip_text_sd2_openclip_h.json",
    "unet": "unet_sd21_unclip_small.json",
    "vae": "vae_sd.json",
}
_MODELS = tuple(_PIPELINE_REAL)
_PROMPT = "a photo of an astronaut riding a horse"
_DEFAULT_CONFIGS = Path(__file__).resolve().parent / "configs"
PROG = "python benchmarks/bench.py"


# --------------------------------------------------------------------------------------------- configs


def _pipeline_configs(args) -> dict[str, dict]:
    """Component name -> config (schedulers included) for the text-to-image pipeline."""
    from unclip_jax.tiny import CONFIGS  # noqa: PLC0415

    configs = dict(CONFIGS["unclip"][1])  # schedulers and wiring; tiny model sizes
    if not args.tiny:
        for name, file in _PIPELINE_REAL.items():
            configs[name] = _read_config(args.configs, file)
    return configs


def _unet_config(args) -> dict:
    if args.tiny:
        return _pipeline_configs(args)["unet"]
    return _read_config(args.configs, _UNET_REAL)


def _read_config(folder: str, file: str) -> dict:
    return json.loads((Path(folder) / file).read_text())


def _check_configs(folder: str) -> None:
    """Every real config file is in --configs and is a JSON object (checked before any worker starts)."""
    for file in (_UNET_REAL, *_PIPELINE_REAL.values()):
        path = Path(folder) / file
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--configs {folder}: {file} not found (benchmarks/configs holds the real "
                             "config.json files)") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--configs {folder}: {file} is unreadable ({e})") from None
        if not isinstance(config, dict):
            raise UsageError(f"--configs {folder}: {file} is not a JSON object")


def _latent_size(args) -> int:
    """Latent height = width for --size: the VAE's downsampling, checked against the UNet's."""
    configs = _pipeline_configs(args)
    vae = 2 ** (len(configs["vae"].get("block_out_channels", (64,))) - 1)
    unet = 2 ** (len(_unet_config(args).get("block_out_channels", (0,) * 4)) - 1)
    if args.size <= 0 or args.size % (vae * unet):
        raise UsageError(f"--size must be a positive multiple of {vae * unet} (the VAE's and UNet's "
                         f"downsampling); got {args.size}")
    return args.size // vae


def _unet_inputs(config: dict, batch: int, latent: int, seed: int = 0):
    """numpy (sample [B, h, w, C], timesteps [B], context [B, 77, D], class_labels [B, P] or None)."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    dim = config.get("cross_attention_dim", 1280)
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    sample = rng.standard_normal((batch, latent, latent, config.get("in_channels", 4)), np.float32)
    context = rng.standard_normal((batch, 77, dim), np.float32)
    labels = None
    if config.get("class_embed_type") == "projection":
        labels = rng.standard_normal((batch, config["projection_class_embeddings_input_dim"]), np.float32)
    return sample, np.full((batch,), 500.0, np.float32), context, labels


# ------------------------------------------------------------------------------------------- JAX side


def _device_params(abstract, dtype):
    """Params of the abstract tree's shapes from `unclip_jax.tiny`'s host draw (scales 1, biases 0,
    weights N(0, 1 / fan_in): activations stay O(1), so no denormals or overflow skew the timing),
    placed on the default device in `dtype`. No compilation, and one leaf in flight at a time."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from unclip_jax.tiny import random_params as host_draw  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))  # the draw's rule reads the leaf's name only
        return jnp.asarray(host_draw({name: leaf}, rng)[name], dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


class _JaxUNet:
    def __init__(self, args):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        from unclip_jax.weights.components import build  # noqa: PLC0415
        from unclip_jax.weights.convert import abstract_params  # noqa: PLC0415

        dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
        config = _unet_config(args)
        built = build(config, dtype)
        params = _device_params(abstract_params(built.module, *built.dummy_inputs), dtype)
        latent = _latent_size(args)
        inputs = [None if x is None else jnp.asarray(x, dtype)
                  for x in _unet_inputs(config, args.unet_batch, latent)]

        def step(params, sample, t, context, labels):
            return built.module.apply({"params": params}, sample, t, context, labels)

        t0 = time.perf_counter()
        self.compiled = jax.jit(step).lower(params, *inputs).compile()
        self.info = {"compile_s": time.perf_counter() - t0, **_jax_versions()}
        memory = self.compiled.memory_analysis()
        if memory is not None:
            self.info.update(xla_temp_mb=memory.temp_size_in_bytes / 2**20,
                             xla_args_mb=memory.argument_size_in_bytes / 2**20,
                             xla_out_mb=memory.output_size_in_bytes / 2**20)
        self.args = (params, *inputs)

    def run(self):
        self.compiled(*self.args).block_until_ready()


class _JaxPipeline:
    def __init__(self, args):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        from unclip_jax.pipelines.stable_unclip import StableUnCLIPPipeline  # noqa: PLC0415
        from unclip_jax.schedulers import scheduler_from_config  # noqa: PLC0415
        from unclip_jax.weights.components import build  # noqa: PLC0415
        from unclip_jax.weights.convert import abstract_params  # noqa: PLC0415

        dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
        configs = _pipeline_configs(args)
        components, self.params = _tokenizers(), {}
        for name, config in configs.items():
            if name.endswith("scheduler"):
                components[name] = scheduler_from_config(config)
                continue
            built = build(config, dtype)
            components[name] = built.module
            param_dtype = jnp.float32 if name == "image_normalizer" else dtype
            self.params[name] = _device_params(abstract_params(built.module, *built.dummy_inputs), param_dtype)
        self.pipe = StableUnCLIPPipeline(**components)
        self.kwargs = dict(height=args.size, width=args.size, num_inference_steps=args.steps,
                           prior_num_inference_steps=args.steps, output_type="np")
        self.prompts = [_PROMPT] * args.images
        self.key = jax.random.key(0)
        self.info = _jax_versions()
        self.calls = 0

    def run(self):
        import numpy as np  # noqa: PLC0415

        before = _COMPILES[0]
        out = self.pipe(self.prompts, params=self.params, key=self.key, **self.kwargs)
        np.asarray(out.images)
        self.calls += 1
        if self.calls > 1:
            # Later calls with the same static configuration must hit the compiled programs: XLA compiles
            # counted through jax.monitoring's backend-compile event.
            self.info["recompiles"] = self.info.get("recompiles", 0) + _COMPILES[0] - before


_COMPILES = [0]  # XLA compilations in this worker process (jax.monitoring's backend-compile event)


def _count_compiles() -> None:
    import jax  # noqa: PLC0415

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            _COMPILES[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)


def _jax_versions() -> dict:
    import jax  # noqa: PLC0415

    return {"versions": {"jax": jax.__version__, "backend": jax.default_backend(),
                         "device": jax.devices()[0].device_kind}}


def _tokenizers():
    """The two CLIP tokenizers (prior: OpenAI's, EOS padding; decoder: SD 2.x's, "!" padding)."""
    from unclip_jax.tokenizer import load_tokenizer, write_clip_tokenizer  # noqa: PLC0415

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pad in (("prior_tokenizer", "<|endoftext|>"), ("tokenizer", "!")):
            write_clip_tokenizer(os.path.join(tmp, name), pad_token=pad)
            out[name] = load_tokenizer(os.path.join(tmp, name))
    return out


# --------------------------------------------------------------------------------------- PyTorch side


def _torch_setup(args):
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.torch_dtype]
    return torch, device, dtype


def _torch_versions(torch) -> dict:
    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}}


def _to(model, device: str, dtype):
    # Models are built in float32 on the CPU; moving them otherwise only when asked keeps diffusers
    # from warning about casts that do not happen.
    import torch  # noqa: PLC0415

    return model if (device, dtype) == ("cpu", torch.float32) else model.to(device, dtype)


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


class _TorchUNet:
    def __init__(self, args):
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        torch, self.device, dtype = _torch_setup(args)
        self.torch = torch
        config = _unet_config(args)
        self.model = _to(UNet2DConditionModel.from_config(config).eval(), self.device, dtype)
        latent = _latent_size(args)
        sample, t, context, labels = _unet_inputs(config, args.unet_batch, latent)
        self.inputs = dict(
            sample=torch.from_numpy(sample).permute(0, 3, 1, 2).contiguous().to(self.device, dtype),
            timestep=torch.from_numpy(t).to(self.device),
            encoder_hidden_states=torch.from_numpy(context).to(self.device, dtype),
            class_labels=None if labels is None else torch.from_numpy(labels).to(self.device, dtype))
        self.info = _torch_versions(torch)

    def run(self):
        with self.torch.inference_mode():
            self.model(**self.inputs, return_dict=False)
        _sync(self.torch, self.device)


class _TorchPipeline:
    def __init__(self, args):
        import diffusers  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        torch, self.device, dtype = _torch_setup(args)
        self.torch = torch
        configs = _pipeline_configs(args)
        components = _tokenizers()
        for name, config in configs.items():
            cls_name = config.get("_class_name") or config["architectures"][0]
            if name.endswith("scheduler"):
                components[name] = getattr(diffusers, cls_name).from_config(config)
            elif "architectures" in config:
                cls = getattr(transformers, cls_name)
                config_cls = transformers.CLIPTextConfig
                # Real configs record torch_dtype float16; the benchmark chooses the dtype itself.
                components[name] = cls(config_cls.from_dict(config)).float().eval()
            elif cls_name == "StableUnCLIPImageNormalizer":
                from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (  # noqa: PLC0415
                    StableUnCLIPImageNormalizer)
                components[name] = StableUnCLIPImageNormalizer.from_config(config)
            else:
                components[name] = getattr(diffusers, cls_name).from_config(config).eval()
        self.pipe = _to(diffusers.StableUnCLIPPipeline(**components), self.device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.kwargs = dict(height=args.size, width=args.size, num_inference_steps=args.steps,
                           prior_num_inference_steps=args.steps, output_type="np")
        self.prompts = [_PROMPT] * args.images
        self.info = _torch_versions(torch)

    def run(self):
        with self.torch.inference_mode():
            self.pipe(self.prompts, generator=self.torch.Generator().manual_seed(0), **self.kwargs)
        _sync(self.torch, self.device)


_SIDES = {("jax", "unet"): _JaxUNet, ("jax", "pipeline"): _JaxPipeline,
          ("diffusers", "unet"): _TorchUNet, ("diffusers", "pipeline"): _TorchPipeline}


# ------------------------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _worker(conn, side: str, what: str, args) -> None:
    """One side of one measurement: build, then time `run` on each request."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        if args.threads < len(cores):
            os.sched_setaffinity(0, cores[:args.threads])
        if side == "jax":
            silence_torch_advice()  # the JAX side runs without torch
            _count_compiles()
        t0 = time.perf_counter()
        bench = _SIDES[side, what](args)
        conn.send(("ready", time.perf_counter() - t0))
        while True:
            msg = conn.recv()
            if msg == "run":
                t0 = time.perf_counter()
                bench.run()
                conn.send(("time", (time.perf_counter() - t0, _peak_rss_mb())))
            else:
                conn.send(("info", {**bench.info, "peak_rss_mb": _peak_rss_mb()}))
                return
    except BaseException:  # noqa: BLE001  (reported to the parent, which stops)
        conn.send(("error", traceback.format_exc()))


class _Side:
    def __init__(self, ctx, side: str, what: str, args):
        self.name = side
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, side, what, args), daemon=True)
        self.proc.start()
        self.build_s = self._get("ready")
        self.times: list[float] = []

    def _get(self, kind: str):
        got, value = self.conn.recv()
        if got == "error":
            self.proc.join()
            raise RuntimeError(f"{self.name} worker failed:\n{value}")
        assert got == kind, (got, kind)
        return value

    def run(self) -> float:
        self.conn.send("run")
        seconds, self.peak_rss_mb = self._get("time")
        return seconds

    def finish(self) -> dict:
        self.conn.send("info")
        info = self._get("info")
        self.proc.join()
        return info


def _timed(workers: list[_Side], reps: int, firsts: dict, result: dict) -> None:
    for _ in range(reps):
        for w in workers:
            w.times.append(w.run())
    for w in workers:
        info = w.finish()
        result[w.name] = dict(info, build_s=w.build_s, first_s=firsts[w.name], times_s=w.times,
                              median_s=statistics.median(w.times))


def _measure(what: str, args, sides: tuple[str, ...], reps: int) -> tuple[dict, bool]:
    """A warm-up call then `reps` timed calls per side, alternating sides; (results, interleaved).

    The second side starts once the first is built and warm; if the memory then available is less
    than the first side's peak RSS (the other's will be alike), the first runs its repetitions alone
    and exits before the second starts."""
    ctx = mp.get_context("spawn")
    first = _Side(ctx, sides[0], what, args)
    firsts = {first.name: first.run()}
    avail = _available_memory_mb()
    interleave = len(sides) > 1 and not args.sequential and (
        avail is None or args.device != "cpu" or avail > 1.2 * first.peak_rss_mb + 2048)
    result: dict = {}
    if interleave:
        second = _Side(ctx, sides[1], what, args)
        firsts[second.name] = second.run()
        _timed([first, second], reps, firsts, result)
    else:
        _timed([first], reps, firsts, result)
        for side in sides[1:]:
            w = _Side(ctx, side, what, args)
            firsts[w.name] = w.run()
            _timed([w], reps, firsts, result)
    return result, interleave or len(sides) == 1


# -------------------------------------------------------------------------------------------- report


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _report(what: str, res: dict, label: str, interleave: bool) -> list[str]:
    jax_r = res["jax"]
    lines = [f"{label}"]
    line = f"  jax {jax_r['median_s']:.3f} s"
    if "diffusers" in res:
        d = res["diffusers"]
        line += f"   diffusers {d['median_s']:.3f} s   ratio jax/diffusers {jax_r['median_s'] / d['median_s']:.2f}"
        if not interleave:
            line += "   (sides ran one after the other: --sequential, or too little memory for both)"
    lines.append(line + "   (medians)")
    if what == "unet":
        lines.append(f"  jax compile {jax_r['compile_s']:.1f} s; XLA memory: temp {_fmt_mb(jax_r.get('xla_temp_mb', 0))}, "
                     f"arguments {_fmt_mb(jax_r.get('xla_args_mb', 0))}")
    else:
        compile_s = jax_r["first_s"] - jax_r["median_s"]
        lines.append(f"  jax first call {jax_r['first_s']:.1f} s (compilation ~{compile_s:.1f} s); "
                     f"recompiles on later calls: {jax_r.get('recompiles', 'n/a')}")
    mem = f"  peak RSS: jax {_fmt_mb(jax_r['peak_rss_mb'])}"
    if "diffusers" in res:
        mem += f", diffusers {_fmt_mb(res['diffusers']['peak_rss_mb'])}"
    lines.append(mem)
    for side, r in res.items():
        lines.append(f"  {side} times: " + " ".join(f"{t:.3f}" for t in r["times_s"]) + f"   (min {min(r['times_s']):.3f})")
    return lines


def _available_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def parse_args(argv):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="unet,pipeline", help="comma-separated: unet, pipeline (default both)")
    p.add_argument("--tiny", action="store_true", help="toy configs: runs in seconds (CI)")
    p.add_argument("--size", type=int, default=None, help="image height = width (default 512; tiny: 32)")
    p.add_argument("--steps", type=int, default=2, help="prior and decoder steps of the pipeline (default 2)")
    p.add_argument("--images", type=int, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--unet-batch", type=int, default=2, help="UNet batch (default 2: one image with guidance)")
    p.add_argument("--reps", type=int, default=3, help="timed UNet steps per side (default 3)")
    p.add_argument("--pipeline-reps", type=int, default=2, help="timed pipeline calls per side (default 2)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores for each side (default 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="JAX compute/param dtype")
    p.add_argument("--torch-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="diffusers dtype (default: fp32, or fp16 with --device gpu)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where diffusers runs (JAX uses its default backend)")
    p.add_argument("--jax-only", action="store_true", help="skip the diffusers side (no torch needed)")
    p.add_argument("--sequential", action="store_true", help="run the pipeline sides one after the other")
    p.add_argument("--configs", default=str(_DEFAULT_CONFIGS), help="folder of the real config.json files")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 512)
    args.torch_dtype = args.torch_dtype or ("fp16" if args.device == "gpu" else "fp32")
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in whats if w not in ("unet", "pipeline")]
    if bad or not whats:
        p.error(f"--what: unknown {bad or args.what!r}; choose from unet, pipeline")
    args.whats = whats
    if not args.jax_only:
        missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"the diffusers side needs {' and '.join(missing)}, not installed here (pip install "
                             "-e '.[test]'); or pass --jax-only")
    if not args.tiny:
        _check_configs(args.configs)
    _latent_size(args)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sides = ("jax",) if args.jax_only else ("jax", "diffusers")
    header = (f"unclip-jax benchmark: {'tiny' if args.tiny else 'real-size'} configs, {args.size}x{args.size}, "
              f"jax {args.dtype}" + ("" if args.jax_only else f" vs diffusers {args.torch_dtype} ({args.device})")
              + f", {args.threads} threads/side; timed calls alternate sides")
    print(header, flush=True)
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "whats"}}
    for what in args.whats:
        res, interleaved = _measure(what, args, sides, args.reps if what == "unet" else args.pipeline_reps)
        if what == "unet":
            label = f"unet step (batch {args.unet_batch}, {_latent_size(args)}x{_latent_size(args)} latents)"
        else:
            label = f"pipeline txt2img ({args.images} image(s), {args.steps} prior + {args.steps} decoder steps)"
        results[what] = res
        print("\n".join(_report(what, res, label, interleaved)), flush=True)
    versions = {k: v for r in (results.get("unet") or results["pipeline"]).values() for k, v in r["versions"].items()}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    results["versions"] = versions
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
