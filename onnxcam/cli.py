"""The ``onnxcam`` command line. Each command parses, calls the library, prints."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from onnxcam.bundle import GRADIENT_MODES, HEAD_SOFTMAX, HEADS, LAYOUTS, PREPROCESS_MODES
from onnxcam.engine.detections import MAX_DETECTIONS
from onnxcam.engine.maps import COLORMAPS
from onnxcam.engine.methods.base import MethodOptions
from onnxcam.engine.targets import MAX_TARGETS_PER_IMAGE
from onnxcam.errors import OnnxcamError
from onnxcam.progress import Progress, Stages
from onnxcam.words import plural

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer `head` closed
PROGRESS_DELAY = 2.0  # seconds of work before a progress line appears


@contextmanager
def reported_errors() -> Iterator[None]:
    """onnxcam's errors: one line on stderr, exit 2. Anything else is a bug: one line
    and exit 1, with the traceback under --verbose."""
    try:
        yield
    except OnnxcamError as exc:
        click.echo(f"onnxcam: error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except (click.ClickException, click.exceptions.Exit, KeyboardInterrupt):
        raise
    except BrokenPipeError:
        # The reader of stdout went away (`onnxcam layers m.onnx | head -1`): stop
        # quietly, as a writer killed by SIGPIPE would.
        discard_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except Exception as exc:
        if logging.getLogger().isEnabledFor(logging.INFO):
            raise
        click.echo(f"onnxcam: internal error: {exc.__class__.__name__}: {exc} "
                   "(run with -v for the traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush of what is still buffered, at
    exit, does not hit the closed pipe again ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a test runner's stream)
        pass


def with_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with reported_errors():
            return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress, not just warnings.")
@click.version_option(package_name="onnxcam")
def main(verbose: bool) -> None:
    """onnxcam: Grad-CAM bundles on ONNX Runtime, and the workers that run them."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="onnxcam: %(message)s",
        stream=sys.stderr,
    )


input_size_option = click.option(
    "--input-size", nargs=2, type=int, default=None, metavar="H W",
    help="Input size, for ONNX files whose size is dynamic.",
)
layout_option = click.option(
    "--layout", type=click.Choice(LAYOUTS), default=None,
    help="Input layout, only where it cannot be inferred.",
)
logits_option = click.option(
    "--logits", default=None, metavar="NAME",
    help="The output holding the class scores, for a model with several outputs.",
)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@input_size_option
@layout_option
@logits_option
@with_errors
def layers(src: Path, input_size: tuple[int, int] | None, layout: str | None,
           logits: str | None) -> None:
    """List candidate target layers of SRC; the default is marked with '*'."""
    from onnxcam.exporter import describe, list_layers

    for line in describe(list_layers(src, layout, input_size, logits)):
        click.echo(line)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Where to write the bundle (.onnx).")
@click.option("--layer", "layers", multiple=True,
              help="Target layer: Keras layer, ONNX node or tensor, or a torch module path "
                   "(layer4.1). Repeat it for a map per layer; the first is the primary one.")
@click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=None,
              help="Preprocessing embedded in the bundle. Default: a keras.applications "
                   "model's own preprocess_input, else unit.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Text file with one class label per line.")
@click.option("--gradient", type=click.Choice(("auto", *GRADIENT_MODES)), default="auto",
              show_default=True, help="Exact gradient subgraph, finite differences, or auto.")
@input_size_option
@layout_option
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--no-verify", is_flag=True, help="Skip checking the bundle against the source.")
@click.option("--input-gradients", is_flag=True,
              help="Add input_gradients (saliency, smoothgrad, integrated-gradients).")
@click.option("--guided", is_flag=True,
              help="Add guided_input_gradients (guided-backprop, guided-gradcam).")
@logits_option
@click.option("--head", type=click.Choice(HEADS), default=None,
              help="How the logits become probabilities: softmax, sigmoid (multi-label) or "
                   "none. Default: as the model ends (a Sigmoid: sigmoid, else softmax); "
                   "give it where the sigmoid is applied outside the model.")
@with_errors
def export(
    src: Path, out: Path, layers: tuple[str, ...], preprocess: str | None, labels: Path | None,
    gradient: str, input_size: tuple[int, int] | None, layout: str | None, opset: int,
    no_verify: bool, input_gradients: bool, guided: bool, logits: str | None,
    head: str | None,
) -> None:
    """Turn the classifier SRC (.keras, .h5, SavedModel folder or .onnx) into a bundle."""
    from onnxcam.exporter import export as run_export

    with Stages("export", delay=PROGRESS_DELAY) as stages:
        result = run_export(
            src, out, layer=list(layers) or None, preprocess=preprocess, labels=labels,
            gradient=gradient, input_size=input_size, layout=layout, opset=opset,
            verify=not no_verify, input_gradients=input_gradients, guided=guided,
            logits=logits, head=head, on_stage=stages.enter,
        )
    info = result.info
    check = "not verified"
    if result.report is not None:
        name, error, _ = result.report.worst
        check = f"verified, worst relative error {error:.1e} ({name})"
        if result.report.constant_logits:  # verified, and useless: zero maps
            check += ", but the logits do not depend on the input"
    others = [entry.name for entry in info.layers if entry.index]
    names = info.target_layer + (f" (and {', '.join(others)})" if others else "")
    extra = "".join(f", {name}" for name in info.input_gradients)
    click.echo(f"wrote {result.path}: layer {names}, {plural(info.num_classes, 'class')}, "
               f"{info.gradient} gradients{extra}, {check}; preprocess {info.preprocess}"
               + (f"; batch fixed at {info.batch_size}" if info.batch_size else "")
               + (f" ({result.batch_reason})" if info.batch_size and result.batch_reason
                  else "")
               + (f"; {info.head} head" if info.head != HEAD_SOFTMAX else ""))


def parse_formats(value: str) -> list[str]:
    from onnxcam.engine.outputs import FORMATS

    formats = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise click.BadParameter(f"choose from {', '.join(FORMATS)}, comma separated")
    return formats


def method_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The knobs of the sampling gradient methods, as options of a command."""
    options = [
        click.option("--samples", type=click.IntRange(1, 1000), default=MethodOptions.samples,
                     show_default=True, help="smoothgrad: noisy copies per image."),
        click.option("--noise", type=click.FloatRange(0.0), default=MethodOptions.noise,
                     show_default=True,
                     help="smoothgrad: noise std over the model input's (max - min)."),
        click.option("--steps", type=click.IntRange(1, 1000), default=MethodOptions.steps,
                     show_default=True,
                     help="integrated-gradients: steps from the zero baseline."),
        click.option("--seed", type=int, default=MethodOptions.seed, show_default=True,
                     help="smoothgrad: noise seed; randomcam: weights seed."),
        click.option("--eigen-smooth", is_flag=True,
                     help="CAM methods: the first principal component of the channel terms "
                          "instead of their sum (pytorch-grad-cam's eigen_smooth)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


MAX_DETECTIONS_HELP = "Detection bundles: detections kept per image (after suppression)."


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--target`` (repeatable) and ``--contrast``: what each image is explained for."""
    fn = click.option("--contrast", "contrasts", multiple=True, metavar="A:B",
                      help="Explain why class A rather than B (repeatable).")(fn)
    return click.option(
        "--target", "targets", multiple=True, metavar="TARGET",
        help="Class to explain, by number or label (default: top-1); repeat it for "
             "several, or give all-positive (classes over --threshold) or top:K. "
             "Detection bundles: a class's detections, or top:K (the K best); "
             "default: every detection.")(fn)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for heatmaps and overlays.")
@click.option("--method", default="gradcam", show_default=True,
              help="gradcam, gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, "
                   "eigencam, eigengradcam, fem, kpca-cam, randomcam, scorecam; "
                   "with input gradients: saliency, smoothgrad, integrated-gradients; with "
                   "--guided: guided-backprop, guided-gradcam.")
@target_options
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Segmentation bundles: a mask image (nonzero inside) the --target classes "
                   "are summed over (default: the pixels the model gives each class).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=0.5, show_default=True,
              help="all-positive: the probability a class must exceed.")
@click.option("--max-detections", type=click.IntRange(1, MAX_TARGETS_PER_IMAGE),
              default=MAX_DETECTIONS, show_default=True, help=MAX_DETECTIONS_HELP)
@click.option("--raw", "with_raw", is_flag=True, help="Also write the raw layer-resolution map.")
@click.option("--format", "formats", default="npy,png", show_default=True,
              help="Outputs to write: npy, png or both.")
@click.option("--batch-size", type=int, default=None, help="Images per session run.")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@method_options
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Overlay: the heatmap's opacity over the image.")
@click.option("--colormap", type=click.Choice(tuple(COLORMAPS)), default="jet",
              show_default=True, help="Overlay: the heatmap's colours.")
@click.option("--layers-strip", is_flag=True,
              help="Also write DIR/<stem>.layers.png: the map at each exported layer, early "
                   "to late.")
@with_errors
def explain(
    bundle: Path, images: tuple[str, ...], out: Path, method: str, targets: tuple[str, ...],
    contrasts: tuple[str, ...], mask: Path | None, threshold: float, max_detections: int,
    with_raw: bool,
    formats: str, batch_size: int | None, device: str, as_json: bool, samples: int,
    noise: float, steps: int, seed: int, eigen_smooth: bool, alpha: float, colormap: str,
    layers_strip: bool,
) -> None:
    """Explain IMAGE files with BUNDLE; write DIR/<stem>.npy and DIR/<stem>.png.

    With several targets (or all-positive, top:K, --contrast) each image gets one map
    per target, DIR/<stem>.<target>.npy and .png. A detection bundle writes one map per
    detection, DIR/<stem>.<rank>.<label>.npy and .png. Gradient methods (saliency,
    smoothgrad, integrated-gradients, guided-backprop, guided-gradcam) need a bundle
    exported with --input-gradients or --guided.
    """
    import json

    from onnxcam.engine import Explainer
    from onnxcam.engine.outputs import OverlayStyle, explain_files

    explainer = Explainer(bundle, device=device)
    target = asked_targets(explainer, targets, contrasts, mask)
    failures = 0
    options = {"samples": samples, "noise": noise, "steps": steps, "seed": seed,
               "eigen_smooth": eigen_smooth, "threshold": threshold,
               "max_detections": max_detections}
    # Silent for quick runs; a line on stderr once a run takes more than two seconds.
    progress = Progress(len(images), unit="images", delay=PROGRESS_DELAY)
    for result in explain_files(explainer, list(images), out, method, target,
                                parse_formats(formats), with_raw, batch_size, layers_strip,
                                options, progress.advance, OverlayStyle(alpha, colormap)):
        if result.error is not None:
            failures += 1
            click.echo(f"onnxcam: error: {result.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": result.image, "error": result.error.code,
                                       "message": str(result.error)}))
            continue
        if result.record.get("detections") == []:
            click.echo(f"onnxcam: note: {result.image}: no detection", err=True)
        if result.flat:
            click.echo(f"onnxcam: warning: {result.image}: the {method} map is flat (constant "
                       f"up to rounding): it shows nothing of where the model looks", err=True)
        if as_json:
            click.echo(json.dumps(result.record))
    progress.finish()
    if failures:
        sys.exit(EXIT_BAD_INPUT)


def asked_targets(explainer: Any, targets: tuple[str, ...], contrasts: tuple[str, ...],
                  mask: Path | None) -> Any:
    """What ``--target``, ``--contrast`` and ``--mask`` ask every image to be explained
    for: None (top-1), one target, or a list of them."""
    from onnxcam.engine.images import load_image
    from onnxcam.engine.targets import Region, contrast_from_text

    asked: list[Any] = list(targets)
    if mask is not None:
        if not targets:
            raise click.UsageError("--mask needs the --target classes it is a region of")
        region = load_image(str(mask), 1, explainer.limits)[..., 0]
        asked = [Region(each, region) for each in targets]
    asked += [contrast_from_text(each, explainer.info) for each in contrasts]
    if not asked:
        return None
    return asked[0] if len(asked) == 1 else asked


# -- the worker service --------------------------------------------------------------------

EXIT_NOT_DONE = 3


def _settings_help() -> str:
    from onnxcam.worker.settings import describe_settings

    return "\b\nSettings (environment variables):\n" + describe_settings()


@main.command(epilog=_settings_help())
@click.option("--concurrency", type=int, default=None,
              help="Worker processes (default: the number of CPUs).")
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(("DEBUG", "INFO", "WARNING", "ERROR")))
@click.option("--hostname", default=None, help="Node name, e.g. gpu1@%h.")
@click.option("--events", is_flag=True, help="Send task events (for Flower).")
@with_errors
def worker(concurrency: int | None, loglevel: str, hostname: str | None, events: bool) -> None:
    """Run a Celery worker that explains queued jobs (ONNXCAM_* settings below)."""
    logging.basicConfig(level=loglevel, force=True, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    from onnxcam.worker.app import QUEUE, app
    from onnxcam.worker.settings import load_settings
    from onnxcam.worker.store import Store

    store = Store(load_settings().store_url)
    # Where results go, absolute: a relative ONNXCAM_STORE_URL means a different store
    # for a client started in another folder.
    logging.getLogger("onnxcam.engine").info(
        "store: %s", store.location)
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={QUEUE}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    if events:
        argv.append("--events")
    app.worker_main(argv)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--method", default="gradcam", show_default=True, help="CAM method.")
@target_options
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=None, help="all-positive: the probability a class must exceed "
                                 "[default: 0.5].")
# Left out of the message unless given, as --threshold is: old messages keep their digest.
@click.option("--max-detections", type=click.IntRange(1, MAX_TARGETS_PER_IMAGE),
              default=None, help=f"{MAX_DETECTIONS_HELP} [default: {MAX_DETECTIONS}]")
@click.option("--chunk-size", type=int, default=None,
              help="Images per job (default: ONNXCAM_CHUNK_SIZE).")
@method_options
@with_errors
def submit(bundle: Path, images: tuple[str, ...], method: str, targets: tuple[str, ...],
           contrasts: tuple[str, ...], threshold: float | None, max_detections: int | None,
           chunk_size: int | None, samples: int, noise: float, steps: int,
           seed: int, eigen_smooth: bool) -> None:
    """Queue explain jobs; print their ids, one per line (and on stderr, where to)."""
    from onnxcam.worker.client import endpoints
    from onnxcam.worker.client import submit as submit_jobs
    from onnxcam.worker.settings import load_settings

    settings = load_settings()
    options: dict[str, Any] = {"samples": samples, "noise": noise, "steps": steps,
                               "seed": seed}
    if eigen_smooth:  # jobs from an onnxcam without the option stay as they were
        options["eigen_smooth"] = True
    asked = submitted_targets(bundle, targets, contrasts)
    every = asked if not isinstance(asked, list) else [asked] * len(images)
    job = submit_jobs(bundle, list(images), method, every, chunk_size=chunk_size,
                      settings=settings, options=options, threshold=threshold,
                      max_detections=max_detections)
    click.echo(f"onnxcam: queued {plural(len(job.ids), 'job')} of "
               f"{plural(len(images), 'image')}: {endpoints(settings)}", err=True)
    for job_id in job.ids:
        click.echo(job_id)


def submitted_targets(bundle: Path, targets: tuple[str, ...], contrasts: tuple[str, ...]
                      ) -> Any:
    """What ``--target`` and ``--contrast`` ask every image to be explained for: None
    (top-1), one target, or a list of them; classes and contrasts are checked here when
    the bundle is a file, else by the worker."""
    from onnxcam.bundle import CLASS_NUMBER, read_bundle_info
    from onnxcam.engine.targets import Contrast, contrast_from_text

    # Read only when needed: a file that is no bundle is refused by submit, naming it.
    info = read_bundle_info(bundle) if contrasts and Path(bundle).is_file() else None
    asked: list[Any] = [class_number(bundle, each) for each in targets]
    for text in contrasts:
        if info is not None:
            asked.append(contrast_from_text(text, info))
        elif text.count(":") == 1:  # no labels to tell a label's own colon from the cut
            sides = [int(side) if CLASS_NUMBER.match(side) else side
                     for side in text.split(":")]
            asked.append(Contrast(sides[0], sides[1]))
        else:
            raise click.BadParameter(f"{text!r}: give A:B with one ':' (or the bundle as a "
                                     "file, whose labels tell which ':' cuts)",
                                     param_hint="--contrast")
    if not asked:
        return None
    return asked[0] if len(asked) == 1 else asked


def class_number(bundle: Path, target: str | None) -> int | str | None:
    """``--target`` read as ``explain`` reads it, a label of the bundle's first, then
    all-positive or top:K, then a number; checked here when the bundle is a file, else
    by the worker."""
    from onnxcam.bundle import CLASS_NUMBER, read_bundle_info
    from onnxcam.worker.image_targets import is_word

    if target is None:
        return None
    if Path(bundle).is_file():
        info = read_bundle_info(bundle)
        return target if is_word(target) and target not in info.labels else \
            info.class_index(target)
    return int(target) if CLASS_NUMBER.match(target) else target


@main.command()
@click.argument("job_id")
@with_errors
def status(job_id: str) -> None:
    """Print a job's status: pending, started, done or failed (and on stderr, how many
    of its images are done)."""
    from onnxcam.worker.client import job_progress, job_status
    from onnxcam.worker.settings import load_settings

    settings = load_settings()
    click.echo(job_status(job_id, settings))
    progress = job_progress(job_id, settings)
    done = plural(progress.done, "image") if progress.total is None else \
        f"{progress.done} of {plural(progress.total, 'image')}"
    click.echo(f"onnxcam: job {job_id}: {done} done (Celery state {progress.celery_state})",
               err=True)


@main.command()
@click.argument("job_id")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Folder for the heatmaps, overlays and JSON records.")
@click.option("--wait", "wait_seconds", type=float, default=0.0,
              help="Wait up to this many seconds for the job to end.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON record per image and target (alone, without --out: no "
                   "files).")
@with_errors
def result(job_id: str, out: Path | None, wait_seconds: float, as_json: bool) -> None:
    """Write a done job's heatmaps, overlays and records to --out, or print its records
    with --json."""
    import json
    import time

    from onnxcam.errors import JobError
    from onnxcam.worker.client import download, job_error, job_records, job_status
    from onnxcam.worker.settings import load_settings
    from onnxcam.worker.store import Store

    if out is None and not as_json:
        raise click.UsageError("give --out DIR for the files, --json for the records on "
                               "stdout, or both")
    settings = load_settings()
    deadline = time.monotonic() + wait_seconds
    state = job_status(job_id, settings)
    with Stages(f"job {job_id}", delay=PROGRESS_DELAY) as waiting:
        while state in ("pending", "started") and time.monotonic() < deadline:
            waiting.enter(state)
            time.sleep(0.2)
            state = job_status(job_id, settings)
    if state == "failed":
        error = job_error(job_id, Store(settings.store_url), settings) or {
            "code": "job_error", "message": "job failed"}
        raise JobError(f"job {job_id} failed: {error['code']}: {error['message']}")
    if state != "done":
        click.echo(f"onnxcam: job {job_id} is not done yet ({state})", err=True)
        sys.exit(EXIT_NOT_DONE)
    failures = 0
    records = download(job_id, out, settings) if out is not None else \
        job_records(job_id, Store(settings.store_url))
    for record in records:
        if record["status"] != "ok":
            failures += 1
            click.echo(f"onnxcam: error: {record['error']['message']} "
                       f"({record['error']['code']})", err=True)
        elif record.get("targets") == []:
            click.echo(f"onnxcam: {record['image']}: no class passed its targets "
                       "(all-positive found none): no map", err=True)
        elif record.get("detections") == []:
            click.echo(f"onnxcam: note: {record['image']}: no detection", err=True)
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
    if failures:
        sys.exit(EXIT_BAD_INPUT)


@main.group()
def store() -> None:
    """Look after the result store (ONNXCAM_STORE_URL)."""


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    from onnxcam.worker.settings import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@store.command()
@click.option("--older-than", "older_than", required=True, callback=_duration,
              metavar="DURATION", help="Age past which ended jobs go: 30m, 12h, 7d, 2w.")
@click.option("--bundles", is_flag=True,
              help="Also remove bundles past that age that no remaining job names.")
@click.option("--dry-run", is_flag=True, help="Print what would go; remove nothing.")
@with_errors
def prune(older_than: float, bundles: bool, dry_run: bool) -> None:
    """Remove ended jobs whose newest file is older than --older-than; print each one
    removed ("job ID", "bundle SHA") and, on stderr, the bytes freed. Jobs that
    have not ended are kept, whatever their age."""
    from onnxcam.worker.retention import prune as prune_store
    from onnxcam.worker.settings import load_settings
    from onnxcam.worker.store import Store

    where = Store(load_settings().store_url)
    pruned = prune_store(where, older_than, bundles=bundles, dry_run=dry_run)
    for job_id in pruned.jobs:
        click.echo(f"job {job_id}")
    for sha in pruned.bundles:
        click.echo(f"bundle {sha}")
    verb = "would remove" if dry_run else "removed"
    gone = plural(len(pruned.jobs), "job") + (
        f" and {plural(len(pruned.bundles), 'bundle')}" if bundles else "")
    click.echo(f"onnxcam: {verb} {gone}, {pruned.bytes_freed} bytes, from "
               f"{where.location}; kept {plural(pruned.kept_jobs, 'job')} "
               f"({pruned.kept_unfinished} not ended)", err=True)


# -- the audit ---------------------------------------------------------------------------------

EXIT_INTERRUPTED = 130


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--model", required=True, type=click.Path(path_type=Path), help="The bundle.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for results.csv, summary.json, report.html and heatmaps/.")
@click.option("--broker", default=None, help="Fan out to onnxcam workers (redis://...).")
@click.option("--method", default="gradcam", show_default=True, help="CAM method.")
@click.option("--explain", "explain_mode", type=click.Choice(("label", "pred")),
              default="label", show_default=True,
              help="Class to explain: the row's label (when it has one) or the prediction "
                   "(multi-label and segmentation rows: each finding, or every class over "
                   "the threshold).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=0.5, show_default=True,
              help="Multi-label and segmentation rows: the probability over which --explain "
                   "pred explains a class and a sigmoid head's pred column names it.")
@click.option("--resume", is_flag=True, help="Carry on with the results already in --out.")
@click.option("--faithfulness", is_flag=True, help="Add RISE deletion and insertion AUCs.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows per chunk handed to the backend.")
@click.option("--flag-energy", type=float, default=0.5, show_default=True,
              help="Flag a class whose mean energy-in-box is below this.")
@click.option("--flag-lift", type=float, default=1.5, show_default=True,
              help="Flag a class whose mean energy-in-box is below this times its box area.")
@click.option("--min-boxes", type=int, default=10, show_default=True,
              help="Classes with fewer boxes or masks get a note instead of a verdict.")
@click.option("--batch-size", type=int, default=None, help="Images per session run (local).")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto",
              show_default=True)
@click.option("--label-map", type=click.Path(path_type=Path), default=None,
              help="COCO/VOC sources: a JSON object of category name -> bundle label; "
                   "categories it leaves out are not audited.")
@click.option("--clusters-sample", type=click.IntRange(min=0), default=1000,
              show_default=True,
              help="Rows per class sampled for the strategy clusters (0: no clusters).")
@with_errors
def audit(
    source: Path, model: Path, out: Path, broker: str | None, method: str, explain_mode: str,
    threshold: float, resume: bool, faithfulness: bool, chunk_size: int, flag_energy: float,
    flag_lift: float, min_boxes: int, batch_size: int | None, device: str, label_map: Path | None,
    clusters_sample: int,
) -> None:
    """Audit where the classifier MODEL looks over SOURCE: a CSV manifest (one label,
    several as 'labels', or a 'segmentation' mask of class ids per row), a folder of
    class subfolders, a COCO instances JSON or a folder of Pascal VOC XML files; for a
    detection bundle, a COCO JSON or VOC folder whose objects each detection is matched
    to. Writes results.csv, summary.json and report.html to --out."""
    from onnxcam.audit import AuditOptions, ExplainSettings, Thresholds, run_audit
    from onnxcam.audit.advice import advice_lines
    from onnxcam.audit.manifest import read_label_map

    if broker:
        from onnxcam.audit.distributed import DistributedBackend

        backend: Any = DistributedBackend(broker, model=model)
    else:
        from onnxcam.audit import LocalBackend
        from onnxcam.engine import Explainer

        backend = LocalBackend(Explainer(model, device=device), batch_size=batch_size)
    options = AuditOptions(
        settings=ExplainSettings(method=method, explain=explain_mode, faithfulness=faithfulness,
                                 threshold=threshold),
        chunk_size=chunk_size, resume=resume,
        thresholds=Thresholds(flag_energy, flag_lift, min_boxes),
        label_map=read_label_map(label_map) if label_map else None,
        clusters_sample=clusters_sample,
    )
    try:
        summary = run_audit(source, out, backend, options)
    except KeyboardInterrupt:
        click.echo(f"\nonnxcam: interrupted; the finished rows are in {out / 'results.csv'}. "
                   "Run the same command with --resume to carry on.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    data = summary.data
    accuracy = "n/a" if data["accuracy"] is None else f"{100 * data['accuracy']:.1f}%"
    if data.get("form") == "detection":
        click.echo(f"audited {plural(data['n'], 'image')} ({plural(data['errors'], 'error')})"
                   f": {plural(data['detections'], 'detection')}, {data['matched']} matched, "
                   f"{data['misses']} missed, {data['false_detections']} false; wrote "
                   f"{out / 'report.html'}")
    else:
        click.echo(f"audited {plural(data['n'], 'row')} ({plural(data['errors'], 'error')}), "
                   f"accuracy {accuracy}; wrote {out / 'report.html'}")
    for flag in data["flags"]:
        click.echo(f"flag: {flag['class']}: {flag['reason']} (mean energy-in-box "
                   f"{flag['energy_in_box_mean']:.2f} vs box area {flag['box_area_mean']:.2f})")
    for line in advice_lines(data):
        click.echo(line)
    if data["n"] and data["errors"] == data["n"]:
        # Nothing was audited: a run that only produced errors must not pass in CI.
        codes = ", ".join(f"{code} x{count}" for code, count in data["error_codes"].items())
        click.echo(f"onnxcam: error: every row failed ({codes}); see the error column of "
                   f"{out / 'results.csv'}", err=True)
        sys.exit(EXIT_BAD_INPUT)


EXIT_DIFF_FLAGGED = 3  # audit-diff: a class regressed past a threshold (CI gate)


@main.command("audit-diff")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for diff.json and diff.html (default: NEW).")
@click.option("--min-similarity", type=float, default=0.5, show_default=True,
              help="Fail when a class's mean heatmap rank correlation is below this "
                   "and its energy-in-box fell.")
@click.option("--max-energy-drop", type=float, default=0.1, show_default=True,
              help="Fail when a class's mean energy-in-box falls by more than this.")
@click.option("--max-accuracy-drop", type=float, default=0.0, show_default=True,
              help="Fail when a class's accuracy falls by more than this.")
@with_errors
def audit_diff(old: Path, new: Path, out: Path | None, min_similarity: float,
               max_energy_drop: float, max_accuracy_drop: float) -> None:
    """Compare the audits OLD and NEW of the same manifest: per class the change in
    accuracy, energy in box and pointing hits and which way each went, per row the
    heatmaps' rank correlation. Exits 3 when a class regressed past a threshold."""
    from onnxcam.audit.diff import DiffThresholds, diff_audits, flag_value, movement, write_diff

    diff = diff_audits(old, new, DiffThresholds(min_similarity, max_energy_drop,
                                                max_accuracy_drop))
    out = out or new
    write_diff(diff, out, old, new)
    data = diff.data
    mean = "n/a" if data["similarity_mean"] is None else f"{data['similarity_mean']:.3f}"
    click.echo(f"compared {data['compared']} of {plural(data['n'], 'row')}, mean similarity "
               f"{mean}; wrote {out / 'diff.html'}")
    for flag in data["flags"]:
        click.echo(f"flag: {flag['class']}: {flag['reason']} ({flag_value(flag):.3f}, "
                   f"threshold {flag['threshold']:.3f})")
    for label, figures in data["per_class"].items():
        click.echo(f"{figures['verdict']}: {label}: {movement(figures)}")
    if diff.failed:
        sys.exit(EXIT_DIFF_FLAGGED)


if __name__ == "__main__":
    main()
