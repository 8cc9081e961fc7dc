"""`cna-dist`: a thin click layer. Exit 0 success, 2 bad input, 1 failure at run time (spec §2)."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
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
    """Check MANIFEST's schema and every local path it names; write nothing."""
    from cna_dist import manifest as manifestmod
    from cna_dist.validate import validate as run_validate

    checked = run_validate(manifestmod.load(manifest), check_remote=check_remote)
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


@contextlib.contextmanager
def executor(address: str | None, replicas: int | None, in_process: bool) -> Iterator[Any]:
    """The Ray driver (joins `address` or starts a local Ray, closed afterwards), or None for --in-process."""
    if in_process:
        yield None
        return
    from cna_dist.runtime.ray_executor import RayExecutor

    with RayExecutor(address, replicas=replicas) as ray_executor:
        yield ray_executor


def run_mine(manifest_path: Path, ex: Any, *, progress: bool, summary: Path | None = None) -> Any:
    """Validate first (exit 2 before anything is written), then mine with `ex` (None: in this process)."""
    from cna_dist import manifest as manifestmod
    from cna_dist.commands.mine import mine as pipeline_mine
    from cna_dist.validate import validate as run_validate

    m = manifestmod.load(manifest_path)
    checked = run_validate(m, check_remote=True)
    result = pipeline_mine(m, progress=progress, executor=ex, checked=checked)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.summary, indent=1, default=str) + "\n")
    return result


def run_eval(
    manifest_path: Path,
    circuit_uri: str,
    ex: Any,
    *,
    out: str | None = None,
    multipliers: list[float] | None = None,
    caa: bool | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> str:
    """Steering checks on the replicas of `ex` (None: one replica in this process); returns eval.json's URI."""
    from cna_dist import circuit as circuitmod
    from cna_dist import manifest as manifestmod
    from cna_dist.commands import eval as eval_run

    m = manifestmod.load(manifest_path)
    circuit = circuitmod.load(circuit_uri, m.output.storage_options)
    return eval_run.run_eval(
        m,
        circuit,
        out or f"eval-{circuit.name}-v{circuit.version}",
        ex if ex is not None else eval_run.LocalReplica(),
        multipliers=multipliers,
        caa=caa,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )


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
    with executor(address, replicas, in_process) as ex:
        result = run_mine(manifest, ex, progress=not quiet, summary=summary)
    click.echo(result.circuit.summary())
    s = result.summary
    click.echo(
        f"shards: {s['shards_captured']} captured, {s['shards_reused']} reused, {s['retries']} retried; "
        f"replicas: {s['replicas']}"
    )
    if result.published.status == "unchanged":
        click.echo(f"unchanged, v{result.published.version}")
    click.echo(result.published.uri)


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
    from cna_dist.commands.demo import run_demo

    with executor(address, replicas, in_process) as ex:
        run_demo(
            out,
            progress=not quiet,
            echo=click.echo,
            mine=lambda path: run_mine(path, ex, progress=not quiet, summary=out / "run-summary.json"),
            evaluate=lambda path, uri: run_eval(path, uri, ex, out=str(out / "eval"), progress=not quiet),
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
    from cna_dist.io import uri as urimod

    if report.endswith("/"):
        report = urimod.join(report, f"nightly-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    mine_args = ["--in-process"] if in_process else (["--address", address] if address else [])
    with tempfile.TemporaryDirectory(prefix="cna-nightly-") as work:
        result = nightlymod.refresh(nightly_list, report, mine_args, Path(work), echo=click.echo)
    click.echo(f"{len(result['manifests'])} manifests: " + ", ".join(f"{n} {k}" for k, n in result["counts"].items()))
    click.echo(report)
    if not result["ok"]:
        sys.exit(1)


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"expected comma-separated numbers, got {text!r}", field=option) from None
    if not values:
        raise BadInput("no values given", field=option)
    return values


@main.command("eval")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--circuit", "circuit_uri", required=True, help="Circuit file to verify (URI).")
@click.option("--multipliers", default=None, help="Comma-separated, e.g. 0,0.25,0.5,1,2 (default: the manifest's).")
@click.option("--out", default=None, help="Folder (or URI) for eval.json and its plots [eval-NAME-vN].")
@click.option("--caa/--no-caa", default=None, help="Also run the CAA baseline (default: the manifest's eval.caa).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None)
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
    quiet: bool,
    address: str | None,
    replicas: int | None,
    in_process: bool,
) -> None:
    """Steer with the circuit at each multiplier (and the controls); write eval.json + plots, print its path."""
    values = parse_floats(multipliers, "--multipliers") if multipliers else None
    with executor(address, replicas, in_process) as ex:
        path = run_eval(
            manifest,
            circuit_uri,
            ex,
            out=out,
            multipliers=values,
            caa=caa,
            max_new_tokens=max_new_tokens,
            progress=not quiet,
        )
    from cna_dist.io import uri as urimod

    fs, local = urimod.filesystem(path)
    for r in json.loads(fs.cat_file(local))["results"]:
        click.echo(
            f"{r['method']:>6} m={r['multiplier']:<5g} refusal {r['refusal_rate']:.0%}  "
            f"quality {r['quality']:.3f}  (n={r['n']})"
        )
    click.echo(path)


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
    from cna_dist import circuit as circuitmod
    from cna_dist.core import metrics as evaluate
    from cna_dist.model import checkpoint as modelmod
    from cna_dist.model import prompts as promptsmod
    from cna_dist.model import steer as steermod
    from cna_dist.model.generate import generate

    c = circuitmod.load(circuit_uri)
    fingerprint = modelmod.fingerprint(model_uri)
    if fingerprint != c.model.fingerprint:
        raise BadInput(f"circuit {c.name} v{c.version} was mined on {c.model.uri}, not this model", field="--model")
    model, tokenizer = modelmod.load(modelmod.localize(model_uri), dtype=dtype)
    chat = promptsmod.use_chat_template(tokenizer, None)
    ids = [promptsmod.encode(tokenizer, promptsmod.render(tokenizer, prompt, chat), chat)]
    (plain,) = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    with steermod.steered(model, c.pairs(), multiplier):
        (steered,) = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    click.echo(f"prompt: {prompt}")
    click.echo(f"--- m=1 (no intervention){' [refusal]' if evaluate.is_refusal(plain) else ''}\n{plain.strip()}")
    click.echo(
        f"--- m={multiplier:g} ({len(c.neurons)} neurons){' [refusal]' if evaluate.is_refusal(steered) else ''}"
        f"\n{steered.strip()}"
    )


def _lease_holder(store: Any, run: str) -> str | None:
    holder = store.lease(run).holder()
    return None if holder is None else f"{holder.get('host')}:{holder.get('pid')}"


def store_report(uri: str) -> dict[str, Any] | None:
    """Runs, rows, committed and missing shards and bytes of an activation store; None if URI is not one."""
    from cna_dist.io.store import ActivationStore

    store = ActivationStore(uri)
    runs = store.runs()
    if not runs:
        return None
    report: dict[str, Any] = {"store": uri, "runs": []}
    for run_name in runs:
        meta = store.load_meta(run_name)
        if meta is None:
            continue
        run = store.open_run(meta, create=False)
        committed = run.committed()
        capacity = run.array(mode="r").shape[0]
        slots = -(-capacity // meta.shard_rows) if meta.shard_rows else 0
        report["runs"].append(
            {
                "run": run_name,
                "model": meta.model_uri,
                "fingerprint": meta.fingerprint[:16],
                "shape": [meta.n_layers, meta.intermediate_size],
                "dtype": meta.dtype,
                "rows": sum(len(r) for r in committed.values()),
                "committed_shards": len(committed),
                "missing_shards": sorted(set(range(slots)) - set(committed)),
                "bytes": run.nbytes(),
                "capturing": _lease_holder(store, run_name),
            }
        )
    return report


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def inspect(uri: str, as_json: bool) -> None:
    """Summarise a circuit file or an activation store."""
    from cna_dist import circuit as circuitmod

    report = store_report(uri) if not uri.endswith(".json") else None
    if report is not None:
        if as_json:
            click.echo(json.dumps(report, indent=1))
            return
        click.echo(f"store {uri}")
        for r in report["runs"]:
            click.echo(
                f"  run {r['run']}: {r['model']} ({r['shape'][0]}x{r['shape'][1]}, {r['dtype']}), "
                f"{r['rows']} rows, {r['committed_shards']} committed shards, "
                f"missing shards {r['missing_shards'] or 'none'}, {r['bytes'] / 2**20:.1f} MiB"
                + (f", being captured by {r['capturing']}" if r["capturing"] else "")
            )
        return
    c = circuitmod.load(uri)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": c.name,
                    "version": c.version,
                    "neurons": len(c.neurons),
                    "universal": len(c.universal),
                    "per_layer": c.stats.get("per_layer", {}),
                }
            )
        )
    else:
        click.echo(c.summary())


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
    from cna_dist import circuit as circuitmod
    from cna_dist.core import diff as diffmod

    a, b = circuitmod.load(uri_a), circuitmod.load(uri_b)
    report = diffmod.compare(a, b)
    if png is not None:
        from cna_dist.report.plots import layer_histogram

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
    from cna_dist import circuit as circuitmod

    out.write_text(json.dumps(circuitmod.to_reference(circuitmod.load(uri)), indent=2) + "\n")
    click.echo(str(out))


@main.command("import-ref")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True, help="Circuit name (a slug).")
@click.option("--model", "model_uri", required=True, help="The checkpoint the circuit belongs to.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@handled
def import_ref(file: Path, name: str, model_uri: str, out: Path) -> None:
    """Convert a reference-format circuit into a cna-circuit/1 file."""
    import re

    from cna_dist import circuit as circuitmod
    from cna_dist.model import checkpoint as modelmod

    if not re.match(r"^[A-Za-z0-9._-]+$", name):
        raise BadInput(f"not a slug: {name!r}", field="--name")
    info = modelmod.inspect(model_uri)
    ref = circuitmod.ModelRef(
        uri=model_uri,
        architecture=info.architecture,
        n_layers=info.n_layers,
        intermediate_size=info.intermediate_size,
        fingerprint=modelmod.fingerprint(model_uri),
    )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON ({exc.msg})", source=str(file)) from None
    c = circuitmod.from_reference(data, str(file), name=name, model=ref)
    out.write_text(c.to_json())
    click.echo(str(out))


if __name__ == "__main__":
    main()
