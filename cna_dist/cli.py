"""`cna-dist`: a thin click layer. Exit 0 success, 2 bad input, 1 failure at run time (spec §2)."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cna_dist.errors import BadInput


def handled(fn: Callable) -> Callable:
    """Map BadInput to exit 2 and any other failure to exit 1, each with a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: report, exit 1
            click.echo(f"failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.version_option(package_name="cna-dist")
def main() -> None:
    """Mine Contrastive Neuron Attribution circuits, publish them, steer with them."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check-remote", is_flag=True, help="Also open remote URIs (model, prompts).")
@handled
def validate(manifest: Path, check_remote: bool) -> None:
    """Check MANIFEST's schema and every local path it names (each manifest of a nightly list); write nothing."""
    from cna_dist import manifest as manifestmod
    from cna_dist.validate import is_nightly_list, validate_list
    from cna_dist.validate import validate as run_validate

    if is_nightly_list(manifest):
        results = validate_list(manifest, check_remote=check_remote)
        for path, outcome in results:
            click.echo(f"error: {outcome}" if isinstance(outcome, BadInput) else f"ok: {path}")
        bad = sum(isinstance(outcome, BadInput) for _, outcome in results)
        if bad:
            raise BadInput(f"{bad} of {len(results)} manifests are bad (listed above)", source=str(manifest))
        return
    m = manifestmod.load(manifest)
    checked = run_validate(manifestmod.pin_model(m) if check_remote else m, check_remote=check_remote)
    counts = ", ".join(f"{k}: {len(p.texts)}" for k, p in checked.prompts.items())
    model = (
        f"{checked.model.architecture} {checked.model.n_layers}x{checked.model.intermediate_size}"
        if checked.model
        else "not opened (remote)"
    )
    click.echo(f"ok: {manifest} (model {model}; prompts {counts or 'not opened (remote)'})")
    for uri in checked.skipped_remote:
        click.echo(f"  not opened: {uri} (use --check-remote)")


def ray_options(fn: Callable) -> Callable:
    fn = click.option(
        "--address",
        envvar="RAY_ADDRESS",
        default=None,
        help="Ray cluster to use (or RAY_ADDRESS); without it a local Ray is started.",
    )(fn)
    fn = click.option("--replicas", type=int, default=None, help="Replica actors (default: from the cluster).")(fn)
    fn = click.option("--in-process", is_flag=True, help="No Ray: capture and reduce in this process.")(fn)
    return fn


def executor(address: str | None, replicas: int | None, in_process: bool) -> contextlib.closing:
    """The executor for a command, closed (replicas killed, a Ray it started shut down) when the command ends."""
    from cna_dist.runtime.executor import open_executor

    return contextlib.closing(open_executor(address, replicas, in_process))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--summary",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the run summary JSON (timings, throughput, retries, reused shards) here.",
)
@ray_options
@handled
def mine(
    manifest: Path, quiet: bool, summary: Path | None, address: str | None, replicas: int | None, in_process: bool
) -> None:
    """Capture, reduce and publish MANIFEST's circuit; prints the circuit URI last."""
    from cna_dist.commands import mine as command

    with executor(address, replicas, in_process) as ex:
        result = command.run(manifest, ex, progress=not quiet, summary=summary)
    for line in command.report_lines(result):
        click.echo(line)


@main.command()
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cna-demo"),
    show_default=True,
    help="Folder for the model, prompts, manifest, store and registry.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@ray_options
@handled
def demo(out: Path, quiet: bool, address: str | None, replicas: int | None, in_process: bool) -> None:
    """Build a planted model, mine its circuit and show what it found; no GPU, no network."""
    from cna_dist.commands import eval as eval_command
    from cna_dist.commands import mine as mine_command
    from cna_dist.commands.demo import run_demo

    with executor(address, replicas, in_process) as ex:
        run_demo(
            out,
            progress=not quiet,
            echo=click.echo,
            mine=lambda path: mine_command.run(path, ex, progress=not quiet, summary=out / "run-summary.json"),
            evaluate=lambda path, uri: eval_command.run(path, uri, ex, out=str(out / "eval"), progress=not quiet),
        )


@main.command()
@click.argument("nightly_list", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--report",
    default="./",
    show_default=True,
    help="JSON report path or URI; one ending in / gets nightly-<UTC time>.json inside it.",
)
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster for every mine (or RAY_ADDRESS).")
@click.option("--in-process", is_flag=True, help="Mine without Ray (each manifest still in its own process).")
@handled
def nightly(nightly_list: Path, report: str, address: str | None, in_process: bool) -> None:
    """Mine every manifest of NIGHTLY_LIST, each isolated; exit 1 if any failed. Prints the report path last."""
    import tempfile
    from datetime import UTC, datetime

    from cna_dist.commands import nightly as nightlymod
    from cna_dist.store import uri as urimod

    if report.endswith("/"):
        report = urimod.join(report, f"nightly-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    mine_args = ["--in-process"] if in_process else (["--address", address] if address else [])
    with tempfile.TemporaryDirectory(prefix="cna-nightly-") as work:
        result = nightlymod.refresh(nightly_list, report, mine_args, Path(work), echo=click.echo)
    click.echo(f"{len(result.entries)} manifests: " + ", ".join(f"{n} {k}" for k, n in result.counts.items()))
    click.echo(report)
    if not result.ok:
        sys.exit(1)


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"expected comma-separated numbers, got {text!r}", field=option) from None
    if not values:
        raise BadInput("no values given", field=option)
    odd = [x for x in values if x != x or x in (float("inf"), float("-inf"))]
    if odd:
        raise BadInput(f"expected finite numbers, got {odd[0]} in {text!r}", field=option)
    return values


@main.command("eval")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--circuit", "circuit_uri", required=True, help="Circuit file to verify (URI).")
@click.option("--multipliers", default=None, help="Comma-separated, e.g. 0,0.25,0.5,1,2 (default: the manifest's).")
@click.option("--out", default=None, help="Folder (or URI) for eval.json and its plots [eval-NAME-vN].")
@click.option("--caa/--no-caa", default=None, help="Also run the CAA baseline (default: the manifest's eval.caa).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None)
@click.option(
    "--capability",
    default=None,
    help="Comma-separated lm-eval tasks (names or task YAML paths) scored under every condition; needs the "
    "capability extra.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@ray_options
@handled
def eval_command(
    manifest: Path,
    circuit_uri: str,
    multipliers: str | None,
    out: str | None,
    caa: bool | None,
    max_new_tokens: int | None,
    capability: str | None,
    quiet: bool,
    address: str | None,
    replicas: int | None,
    in_process: bool,
) -> None:
    """Steer with the circuit at each multiplier (and the controls); write eval.json + plots, print its path."""
    values = parse_floats(multipliers, "--multipliers") if multipliers else None
    from cna_dist.commands import eval as command
    from cna_dist.eval.capability import parse as parse_tasks

    tasks = parse_tasks(capability) if capability is not None else None

    with executor(address, replicas, in_process) as ex:
        uri = command.run(
            manifest,
            circuit_uri,
            ex,
            out=out,
            multipliers=values,
            caa=caa,
            max_new_tokens=max_new_tokens,
            capability_tasks=tasks,
            progress=not quiet,
        )
    for line in command.result_lines(uri):
        click.echo(line)


@main.command()
@click.option("--model", "model_uri", required=True, help="Checkpoint folder or object-store URI.")
@click.option("--circuit", "circuit_uri", required=True, help="Circuit file (URI).")
@click.option("--multiplier", type=float, default=0.0, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto")
@click.argument("prompt")
@handled
def steer(model_uri: str, circuit_uri: str, multiplier: float, max_new_tokens: int, dtype: str, prompt: str) -> None:
    """Generate for PROMPT with and without the circuit scaled by --multiplier, side by side."""
    from cna_dist.commands.steer import side_by_side

    click.echo(side_by_side(model_uri, circuit_uri, multiplier, max_new_tokens, dtype, prompt))


@main.command()
@click.option("--circuit", "circuit_uri", required=True, help="Circuit file (URI).")
@click.option("--multiplier", type=float, required=True, help="M: each circuit neuron's column is multiplied by it.")
@click.option("--out", "out_uri", required=True, help="Folder (or object-store URI) for the baked checkpoint.")
@click.option("--model", "model_uri", default=None, help="Source checkpoint [the circuit's own model.uri].")
@click.option("--format", "fmt", type=click.Choice(["safetensors"]), default="safetensors", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Convert floats.")
@handled
def bake(circuit_uri: str, multiplier: float, out_uri: str, model_uri: str | None, fmt: str, dtype: str | None) -> None:
    """Write a checkpoint with the circuit's neurons scaled by M in the weights; print its URI."""
    from cna_dist.commands import bake as command

    uri, stats = command.run(circuit_uri, multiplier, out_uri, model_uri, dtype)
    if stats is None:
        click.echo(f"already baked: {uri}", err=True)
    else:
        click.echo(
            f"rewrote {len(stats.rewritten)} weight files, copied {len(stats.copied)} files"
            f" ({len(stats.server_side)} more server-side), {len(stats.skipped)} finished before;"
            f" read {stats.bytes_read / 2**20:.1f} MiB, wrote {stats.bytes_written / 2**20:.1f} MiB",
            err=True,
        )
    click.echo(uri)


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", is_flag=True, help="Also read every committed chunk of a store (checksums, missing rows).")
@handled
def inspect(uri: str, as_json: bool, verify: bool) -> None:
    """Summarise a circuit file or an activation store; exit 1 when the store has damaged objects (listed)."""
    from cna_dist.commands.inspect import render

    text, problems = render(uri, as_json, verify)
    click.echo(text)
    if problems:
        click.echo(f"failed: {problems} damaged object{'s' if problems > 1 else ''} in {uri} (listed above)", err=True)
        sys.exit(1)


@main.command()
@click.argument("uri_a")
@click.argument("uri_b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the two circuits' layer histograms side by side to this PNG.",
)
@handled
def diff(uri_a: str, uri_b: str, as_json: bool, png: Path | None) -> None:
    """Compare two circuits: Jaccard overlap, per-layer counts, rank correlation of shared deltas."""
    from cna_dist.circuit import diff as diffmod
    from cna_dist.circuit import file as circuitmod

    a, b = circuitmod.load(uri_a), circuitmod.load(uri_b)
    report = diffmod.compare(a, b)
    if png is not None:
        from cna_dist.eval.plots import layer_histogram

        labels = (f"A: {a.name} v{a.version}", f"B: {b.name} v{b.version}")
        report["png"] = layer_histogram({labels[0]: a, labels[1]: b}, png, title="neurons per layer")
    click.echo(json.dumps(report, indent=1) if as_json else diffmod.render_text(report))
    if png is not None and not as_json:
        click.echo(str(png))


@main.command("export-ref")
@click.argument("uri")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@handled
def export_ref(uri: str, out: Path) -> None:
    """Write circuit URI in the reference implementation's JSON format (NeuronSteerer Circuit.load)."""
    from cna_dist.commands import reference

    reference.export(uri, out)
    click.echo(str(out))


@main.command("import-ref")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True, help="Circuit name (a slug).")
@click.option("--model", "model_uri", required=True, help="The checkpoint the circuit belongs to.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@handled
def import_ref(file: Path, name: str, model_uri: str, out: Path) -> None:
    """Convert a reference-format circuit into a cna-circuit/1 file."""
    from cna_dist.commands import reference

    reference.import_(file, name, model_uri, out)
    click.echo(str(out))


if __name__ == "__main__":
    main()
