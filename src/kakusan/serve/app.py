"""The Gradio page over :class:`kakusan.serve.service.Service` (and so over :class:`kakusan.Pipeline` only).

Each generate button runs one request in a worker thread and streams what the sampler reports: the predicted
x0 every few steps and a progress bar with the steps done and the seconds left. The page's callbacks hold no
logic of their own beyond turning controls into a :class:`Request` and results into components.
"""

from __future__ import annotations

import os
import queue
import random
import sys
import threading
import time
from pathlib import Path

from ..errors import KakusanError
from .service import Limits, ModelPool, Request, Service

CSS = """
#preview img, #results img, #history img { image-rendering: pixelated; }
#progress .bar { width: 100%; height: 10px; }
"""

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def preview_picture(x0, min_side: int = 256):
    """The batch's predicted x0 (B, C, H, W) in [-1, 1] as one PIL grid, enlarged (nearest) to ``min_side``."""
    from PIL import Image

    from ..images import make_grid
    from ..data import to_uint8

    grid = make_grid(to_uint8(x0), padding=1)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, -(-min_side // max(im.size)))
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def progress_html(done: int, total: int, elapsed: float, note: str = "") -> str:
    left = elapsed / done * (total - done) if done else float("nan")
    left_text = "" if done == 0 else f" · {left:.1f} s left"
    return (f'<div id="progress-state" data-done="{done}" data-total="{total}">'
            f'<progress class="bar" value="{done}" max="{total}"></progress>'
            f'<div>step {done} / {total}{left_text} · {elapsed:.1f} s{(" · " + note) if note else ""}</div></div>')


class Page:
    """The page's callbacks, bound to one :class:`Service`."""

    def __init__(self, service: Service, preview_every: int = 0):
        self.service = service
        self.preview_every = preview_every  # 0: about ten previews per request

    def run(self, req: Request, history: list):
        """A generator of (preview, progress, results, files, history gallery, history) while ``req`` runs."""
        import gradio as gr

        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()

        def on_step(done, total, x0):
            events.put(("step", done, total, x0))

        def work():
            try:
                events.put(("done", self.service.generate(req, on_step)))
            except KakusanError as e:
                events.put(("error", str(e)))
            except Exception as e:  # noqa: BLE001 - out of memory, a bug: shown in the page, the server goes on
                import traceback

                traceback.print_exc(file=sys.stderr)
                name = type(e).__name__
                hint = " (out of memory: ask for fewer images or steps)" if "OutOfMemory" in name or \
                    "out of memory" in str(e).lower() else ""
                events.put(("error", f"the generation failed: {name}: {str(e)[:300]}{hint}"))

        threading.Thread(target=work, daemon=True).start()
        yield None, progress_html(0, 0, 0.0, "starting"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        last_shown, steps_total = 0.0, 0
        while True:
            kind, *rest = events.get()
            if kind == "step":
                done, total, x0 = rest
                steps_total = total
                every = self.preview_every or max(1, total // 10)
                now = time.perf_counter()
                due = done % every == 0 and (self.preview_every or now - last_shown > 0.1)  # auto: <= 10/s
                if done == total or due:
                    last_shown = now
                    yield (preview_picture(x0), progress_html(done, total, now - t0), gr.skip(), gr.skip(),
                           gr.skip(), gr.skip())
            elif kind == "error":
                raise gr.Error(rest[0], duration=None)
            else:
                result = rest[0]
                files = [str(p) for p in result.paths]
                captions = [_caption(r) for r in result.records]
                history = (list(zip(files, captions)) + list(history or []))[:200]
                yield (gr.skip(), progress_html(steps_total, steps_total, time.perf_counter() - t0,
                                                   f"done: {len(files)} image(s)"),
                       list(zip(files, captions)), files, history, history)
                return


def _caption(r: dict) -> str:
    cond = r.get("cond")
    what = f"prompt {cond!r}" if isinstance(cond, str) else (f"class {cond}" if cond is not None else "uncond.")
    return f"{what} · seed {r.get('seed')} · {r.get('sampler')} {r.get('steps')} steps · #{r.get('index')}"


def _unopened_components(gr):
    """gr.Image and gr.ImageEditor that hand on the uploaded files unopened, so that every upload is checked by
    :func:`kakusan.serve.service.open_upload` (bytes, pixels, format) before anything decodes it (Gradio's own
    editor decodes and re-encodes each layer, with PIL's decompression-bomb warnings silenced)."""
    from gradio.data_classes import FileData

    class UploadedImage(gr.Image):
        is_template = True  # drawn by the page as gr.Image

        def preprocess(self, payload):
            return None if payload is None or payload.path is None else str(payload.path)

    class UploadedEditor(gr.ImageEditor):
        is_template = True

        def convert_and_format_image(self, file, flatten_on_white: bool = False):
            if file is None:
                return None
            if not isinstance(file, FileData):
                raise gr.Error("inpaint: the image came in a form this page does not take; upload it again")
            return str(file.path)

    return UploadedImage, UploadedEditor


def build_app(service: Service, preview_every: int = 0):
    """The gr.Blocks page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    UploadedImage, UploadedEditor = _unopened_components(gr)

    from ..pipeline import MASKS
    from ..samplers import SAMPLERS

    pool, lim = service.pool, service.limits
    page = Page(service, preview_every)
    first = pool.model_info(pool.names[0])
    samplers = list(SAMPLERS)

    def guidance_visible(info):
        """The guidance slider: for a conditional model (classifier-free), and for any model while a guide model
        can be chosen (autoguidance: an unconditional model too)."""
        return info.kind != "unconditional" or len(pool.names) > 1

    def class_choices(info):
        return [("one per class", -1)] + [(f"{i}: {n}" if n != str(i) else n, i)
                                          for i, n in enumerate(info.class_names)]

    def neg_choices(info):
        return [("none", -1)] + [(f"{i}: {n}" if n != str(i) else n, i) for i, n in enumerate(info.class_names)]

    with gr.Blocks(title="kakusan", analytics_enabled=False) as demo:
        gr.Markdown("## kakusan · image diffusion\nChoose a model, say what to make, press **Generate**. "
                    "Drop a kakusan PNG on *restore settings* to get back how it was made.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(pool.names, value=first.name, label="model", elem_id="model")
                with gr.Row(visible=bool(pool.loras)):
                    lora = gr.Dropdown(["none"] + pool.lora_names, value="none", label="LoRA", elem_id="lora")
                    lora_scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale")
                prompt = gr.Textbox(label="prompt", placeholder="what to draw", visible=first.kind == "text",
                                    elem_id="prompt")
                negative_prompt = gr.Textbox(label="negative prompt", visible=first.kind == "text",
                                             elem_id="negative-prompt")
                class_label = gr.Dropdown(class_choices(first), value=0 if first.num_classes else -1,
                                          label="class", visible=first.kind == "class", elem_id="class")
                negative_class = gr.Dropdown(neg_choices(first), value=-1, label="negative class",
                                             visible=first.kind == "class", elem_id="negative-class")
                with gr.Row():
                    sampler = gr.Dropdown(samplers, value=first.sampler, label="sampler", elem_id="sampler")
                    steps = gr.Slider(1, lim.max_steps, value=min(first.steps, lim.max_steps), step=1,
                                      label="steps", elem_id="steps")
                guidance = gr.Slider(0, 10, value=0 if first.kind == "unconditional" else 2.0, step=0.5,
                                     label="guidance (0: none)", elem_id="guidance",
                                     visible=guidance_visible(first))
                guide = gr.Dropdown(["none"] + pool.names, value="none", elem_id="guide", visible=len(pool.names) > 1,
                                    label="guide model (autoguidance: guidance = D_guide + w (D - D_guide); none: "
                                          "classifier-free)")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", minimum=0)
                    random_seed = gr.Button("random", elem_id="random-seed", scale=0)
                n = gr.Slider(1, lim.max_n, value=1, step=1, label="images (n)", elem_id="n")
                restore = gr.File(label="restore settings: drop a kakusan PNG here", file_types=[".png"],
                                  type="filepath", elem_id="restore")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("generate", id="tab-generate"):
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Tab("img2img", id="tab-img2img"):
                        init = UploadedImage(type="filepath", image_mode=None, label="start image", sources=["upload", "clipboard"],
                                        elem_id="init-image")
                        strength = gr.Slider(0, 1, value=0.6, step=0.05,
                                             label="strength (0: keep the image, 1: ignore it)")
                        go_img2img = gr.Button("Generate from image", variant="primary", elem_id="generate-img2img")
                    with gr.Tab("inpaint", id="tab-inpaint"):
                        editor = UploadedEditor(type="filepath", label="image: paint the region to repaint",
                                                sources=["upload", "clipboard"], format="png", layers=False,
                                                brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
                                                elem_id="inpaint-editor")
                        mask_name = gr.Dropdown(["drawn"] + list(MASKS), value="drawn", label="mask")
                        go_inpaint = gr.Button("Inpaint", variant="primary", elem_id="generate-inpaint")
                    with gr.Tab("gallery", id="tab-gallery"):
                        history_gallery = gr.Gallery(label="this session's images", columns=6,
                                                     elem_id="history")
                progress = gr.HTML("", elem_id="progress")
                preview = gr.Image(label="live preview (predicted x0)", type="pil", elem_id="preview", format="png",
                                   interactive=False)
                results = gr.Gallery(label="images", columns=4, elem_id="results", format="png")
                files = gr.File(label="download (PNG with its generation record)", file_count="multiple",
                                elem_id="files", interactive=False)

        common = [model, lora, lora_scale, prompt, negative_prompt, class_label, negative_class, sampler, steps,
                  guidance, guide, seed, n, history]
        outputs = [preview, progress, results, files, history_gallery, history]

        def request(model, lora, lora_scale, prompt, negative_prompt, class_label, negative_class, sampler, steps,
                    guidance, guide, seed, n, **extra):
            return Request(model=model, lora=lora, lora_scale=lora_scale, prompt=prompt or "",
                           negative_prompt=negative_prompt or "",
                           class_label=None if class_label in (None, -1) else class_label,
                           negative_class=None if negative_class in (None, -1) else negative_class,
                           sampler=sampler, steps=steps, guidance=guidance, guide=guide,
                           seed=0 if seed is None else seed, n=n, **extra)

        def on_generate(model, lora, lora_scale, prompt, negative_prompt, class_label, negative_class, sampler,
                        steps, guidance, guide, seed, n, history):
            yield from page.run(request(model, lora, lora_scale, prompt, negative_prompt, class_label,
                                        negative_class, sampler, steps, guidance, guide, seed, n), history)

        def on_img2img(*controls):
            *settings, history, image, strength = controls
            if image is None:
                raise gr.Error("img2img: upload a start image first")
            yield from page.run(request(*settings, init_image=image, strength=strength), history)

        def on_inpaint(*controls):
            *settings, history, edited, mask_choice = controls
            edited = edited or {}
            background, layers = edited.get("background"), edited.get("layers") or []
            if background is None:
                raise gr.Error("inpaint: upload an image first, then paint the region to repaint")
            drawn = layers[0] if layers and mask_choice in (None, "drawn") else None
            if drawn is None and mask_choice in (None, "drawn"):
                raise gr.Error("inpaint: paint the region to repaint on the image (or choose a mask)")
            yield from page.run(request(*settings, init_image=background, mask=drawn, mask_name=mask_choice),
                                history)

        workers = max(1, min(len(pool.names), lim.max_models))
        event = dict(outputs=outputs, concurrency_limit=workers, concurrency_id="generate")
        go.click(on_generate, common, api_name="generate", **event)
        go_img2img.click(on_img2img, common + [init, strength], api_name="img2img", **event)
        go_inpaint.click(on_inpaint, common + [editor, mask_name], api_name="inpaint", **event)
        random_seed.click(lambda: random.randrange(2**31), None, seed, api_name="random_seed", queue=False)

        def on_model(name):
            try:
                info = pool.model_info(name)
            except KakusanError as e:
                raise gr.Error(str(e))
            text, cls = info.kind == "text", info.kind == "class"
            return (gr.update(visible=text), gr.update(visible=text),
                    gr.update(choices=class_choices(info), value=0 if cls else -1, visible=cls),
                    gr.update(choices=neg_choices(info), value=-1, visible=cls),
                    gr.update(value=info.sampler), gr.update(value=min(info.steps, lim.max_steps)),
                    gr.update(visible=guidance_visible(info)))

        model.change(on_model, model, [prompt, negative_prompt, class_label, negative_class, sampler, steps,
                                       guidance], api_name="model_info", queue=False)

        def on_restore(path):
            if path is None:
                return [gr.skip()] * 11
            try:
                s, msg = service.restore(path)
            except KakusanError as e:
                raise gr.Error(str(e))
            up = lambda v: gr.skip() if v is None else v  # noqa: E731
            return (up(s["model"]), s["prompt"] or "", s["negative_prompt"] or "",
                    -1 if s["class_label"] is None else s["class_label"],
                    -1 if s["negative_class"] is None else s["negative_class"], up(s["sampler"]),
                    up(s["steps"]), s["guidance"] or 0, up(s["guide"]), up(s["seed"]), up(s["n"]), msg)

        restore.upload(on_restore, restore, [model, prompt, negative_prompt, class_label, negative_class, sampler,
                                             steps, guidance, guide, seed, n, status], api_name="restore")
    return demo


def serve(checkpoints, *, host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None,
          device: str = "auto", loras=None, out_dir: str | Path | None = None, preview_every: int = 0,
          block: bool = True, embeddings=None):
    """Start the page on ``host:port`` (a warning when that is not loopback). Returns gradio's (app, url)."""
    import tempfile

    limits = limits or Limits()
    pool = ModelPool(checkpoints, max_models=limits.max_models, device=device, loras=loras, embeddings=embeddings)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="kakusan-serve-"))
    service = Service(pool, limits, out)
    if host not in LOOPBACK:
        print(f"kakusan: warning: serving on {host}, not loopback: anyone who can reach this machine on port "
              f"{port} can use this page and its compute (there is no login); use --host 127.0.0.1 to keep it "
              f"local", file=sys.stderr, flush=True)
    demo = build_app(service, preview_every)
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    app, url, _ = demo.launch(server_name=host, server_port=port, max_file_size=limits.max_upload_bytes,
                              prevent_thread_lock=True, quiet=True, show_error=False, ssr_mode=False,
                              footer_links=["api"], css=CSS, inbrowser=False)
    print(f"kakusan serve: {', '.join(pool.names)} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            demo.close()
    return demo, url
