"""``lcm-kit serve``: a local web page whose image follows the prompt as it is typed; see :data:`DESCRIPTION`.

The command loads the model once, draws one image to warm up, then serves :mod:`lcm_kit.commands.serve_app` with
uvicorn. Starlette and uvicorn come with the ``serve`` extra and are imported only here, when the server starts,
so ``lcm-kit --help`` and every other command work without them.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress

from ..argtypes import device_name, float_range, int_range
from ..eval.protocol import DEFAULT_GUIDANCE as TEACHER_GUIDANCE
from ..utils import DTYPES
from .generate import load_pipeline

SERVE_EXTRA = ("starlette", "uvicorn", "websockets")
INSTALL_HINT = 'pip install "lcm-kit[serve]"'

DESCRIPTION = """\
Serve a page whose image redraws as the prompt is typed (text-to-image, or image-to-image from an uploaded
image), drawn by LCMPipeline with the model loaded once. Needs the serve extra: pip install "lcm-kit[serve]".

    lcm-kit serve                                          # the shipped digits teacher, http://127.0.0.1:7860
    lcm-kit serve --lora quickstart-out/lcm-lora           # ... with the LCM-LoRA `lcm-kit quickstart` distilled
    lcm-kit serve --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora latent-consistency/lcm-lora-sdv1-5

Requests run one at a time on the device; a page's newer request replaces its older ones still waiting, so typing
never queues a backlog. Every value is checked (steps 1-8, guidance, size, prompt length, upload size and type)
and a refused one is answered with a message on the page. It listens on 127.0.0.1 only, unless --host says
otherwise: anyone who can reach the address can then use the model.
"""


def require_serve_extra():
    """Import the serve extra's modules, or stop with the command that installs them."""
    for name in SERVE_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise SystemExit(f"lcm-kit serve: error: the web server needs the serve extra ({name} is not "
                             f"installed: {err}); install it with: {INSTALL_HINT}") from err
    from . import serve_app

    return serve_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a local page whose image follows the prompt as you type",
                              description=DESCRIPTION)
    p.add_argument("--model", default=None,
                   help="diffusers folder or Hub id; without it the shipped digits teacher (32x32, prompts like 'a "
                        "handwritten 7')")
    p.add_argument("--lora", default=None,
                   help="LCM-LoRA .safetensors file, folder holding pytorch_lora_weights.safetensors (e.g. "
                        "quickstart-out/lcm-lora from `lcm-kit quickstart --out quickstart-out`) or Hub id, loaded "
                        "strictly")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but a loopback address lets other machines use the model")
    p.add_argument("--port", type=int_range(0, 65535), default=7860, help="TCP port; 0 picks a free one")
    p.add_argument("--max_side", type=int_range(8, 8192, multiple_of=8), default=None,
                   help="largest width / height a page may ask for; without it twice the model's native size")
    p.add_argument("--guidance_scale", type=float_range(0.0, 15.0), default=None,
                   help="the page's first guidance; without it 3 for the shipped digits teacher without --lora (the "
                        "CFG it is scored at) and the pipeline's default otherwise (1 with an LCM-LoRA, 8.5 for a "
                        "distilled LCM)")
    p.add_argument("--fast_inference", choices=("auto", "off"), default="auto",
                   help="auto: pipe.enable_fast_inference() (on CUDA its defaults: fp16, CUDA graphs, fused LoRA; "
                        "elsewhere without fusing the LoRA, so images equal the eager pipeline's bit for bit); "
                        "off: the eager pipeline")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="torch CPU threads of the worker that draws; without it torch's default")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, float32 otherwise")
    p.set_defaults(func=run_serve, parser=p)


def prepare_pipeline(pipe, fast_inference: str = "auto"):
    """No progress bars; the fast path when asked and available (see ``--fast_inference``)."""
    pipe.set_progress_bar_config(disable=True)
    if fast_inference == "auto" and hasattr(pipe, "enable_fast_inference"):
        if pipe.device.type == "cuda":
            pipe.enable_fast_inference()
        else:
            # Unfused LoRA: the fast loop then computes exactly what the eager pipeline computes.
            pipe.enable_fast_inference(fuse_lora=False)
    return pipe


def run_serve(args: argparse.Namespace) -> int:
    serve_app = require_serve_extra()
    try:  # the address first: a busy port should not wait for a model to load
        sock = serve_app.listen(args.host, args.port)
    except OSError as err:
        raise SystemExit(f"lcm-kit serve: error: cannot listen on {args.host}:{args.port} ({err}); pick another "
                         "--port or --host") from err
    try:
        pipe = load_pipeline(args.model, args.lora, args.device, args.dtype)
    except (OSError, ValueError) as err:
        sock.close()
        raise SystemExit(f"lcm-kit serve: error: {err}") from err
    prepare_pipeline(pipe, args.fast_inference)
    from .serve_images import RenderJob
    from .serve_requests import GenerateRequest, limits_for

    guidance = args.guidance_scale
    if guidance is None and args.model is None and args.lora is None:
        guidance = TEACHER_GUIDANCE  # a plain teacher needs real CFG; an LCM-LoRA has it distilled in
    try:
        limits = limits_for(pipe, args.max_side, guidance)
    except ValueError as err:
        sock.close()
        args.parser.error(f"--max_side: {err}")
    name = args.model or "the shipped digits teacher"
    app = serve_app.ServeApp(pipe, limits, model_name=name + (f" + {args.lora}" if args.lora else ""),
                             threads=args.threads)
    # One image before the first page connects: the first keystroke then does not pay for lazy set-up (and, on
    # CUDA, for compiling).
    side = limits.default_side
    warm = GenerateRequest(id=0, prompt="", steps=4, guidance=limits.default_guidance, seed=0, width=side,
                           height=side)
    try:
        app.worker.submit("warm-up", RenderJob(warm)).result()
    except Exception as err:
        sock.close()
        app.close()
        raise SystemExit(f"lcm-kit serve: error: the model could not draw a first image ({type(err).__name__}: "
                         f"{err})") from err
    if not is_loopback(args.host):
        print(f"lcm-kit serve: warning: listening on {args.host}, not a loopback address: anyone who can reach it "
              "can use the model")
    print(f"lcm-kit serve: {name} on {pipe.device}, {side}x{side}; open {serve_app.url_of(sock)} (Ctrl-C stops)",
          flush=True)
    try:
        serve_app.uvicorn_server(app).run(sockets=[sock])
    finally:
        sock.close()
        app.close()
    return 0
