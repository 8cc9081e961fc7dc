"""`cna-dist`: a thin click layer. Exit 0 success, 2 bad input, 1 failure at run time (spec §2)."""

from __future__ import annotations

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
    """Check MANIFEST's schema and every local path it names; write nothing."""
    from cna_dist import manifest as manifestmod
    from cna_dist.validate import validate as run_validate

    checked = run_validate(manifestmod.load(manifest), check_remote=check_remote)
    counts = ", ".join(f"{k}: {len(p.texts)}" for k, p in checked.prompts.items())
    model = (f"{checked.model.architecture} {checked.model.n_layers}x{checked.model.intermediate_size}"
             if checked.model else "not opened (remote)")
    click.echo(f"ok: {manifest} (model {model}; prompts {counts or 'not opened (remote)'})")
    for uri in checked.skipped_remote:
        click.echo(f"  not opened: {uri} (use --check-remote)")


def ray_options(fn: Callable) -> Callable:
    fn = click.option("--address", envvar="RAY_ADDRESS", default=None,
                      help="Ray cluster to use (or RAY_ADDRESS); without it a local Ray is started.")(fn)
    fn = click.option("--replicas", type=int, default=None, help="Replica actors (default: from the cluster).")(fn)
    fn = click.option("--in-process", is_flag=True, help="No Ray: capture and reduce in this process.")(fn)
    return fn


def run_mine(manifest_path: Path, *, address: str | None, replicas: int | None, in_process: bool, progress: bool,
             summary: Path | None = None) -> Any:
    """Validate first (exit 2 before Ray starts or anything is written), then mine on Ray or in process."""
    from cna_dist import manifest as manifestmod
    from cna_dist.pipeline import mine as pipeline_mine
    from cna_dist.validate import validate as run_validate

    m = manifestmod.load(manifest_path)
    checked = run_validate(m, check_remote=True)
    if in_process:
        result = pipeline_mine(m, progress=progress, checked=checked)
    else:
        from cna_dist.driver import RayExecutor

        with RayExecutor(address, replicas=replicas) as executor:
            result = pipeline_mine(m, progress=progress, executor=executor, checked=checked)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.summary, indent=1, default=str) + "\n")
    return result


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the run summary JSON (timings, throughput, retries, reused shards) here.")
@ray_options
@handled
def mine(manifest: Path, quiet: bool, summary: Path | None, address: str | None, replicas: int | None,
         in_process: bool) -> None:
    """Capture, reduce and publish MANIFEST's circuit; prints the circuit URI last."""
    result = run_mine(manifest, address=address, replicas=replicas, in_process=in_process, progress=not quiet,
                      summary=summary)
    click.echo(result.circuit.summary())
    s = result.summary
    click.echo(f"shards: {s['shards_captured']} captured, {s['shards_reused']} reused, {s['retries']} retried; "
               f"replicas: {s['replicas']}")
    if result.published.status == "unchanged":
        click.echo(f"unchanged, v{result.published.version}")
    click.echo(result.published.uri)


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("cna-demo"),
              show_default=True, help="Folder for the model, prompts, manifest, store and registry.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@ray_options
@handled
def demo(out: Path, quiet: bool, address: str | None, replicas: int | None, in_process: bool) -> None:
    """Build a planted model, mine its circuit and show what it found; no GPU, no network."""
    from cna_dist.demo import run_demo

    run_demo(out, progress=not quiet, echo=click.echo,
             mine=lambda path: run_mine(path, address=address, replicas=replicas, in_process=in_process,
                                        progress=not quiet, summary=out / "run-summary.json"))


def store_report(uri: str) -> dict[str, Any] | None:
    """Runs, rows, committed and missing shards and bytes of an activation store; None if URI is not one."""
    from cna_dist.store import ActivationStore

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
        report["runs"].append({"run": run_name, "model": meta.model_uri, "fingerprint": meta.fingerprint[:16],
                               "shape": [meta.n_layers, meta.intermediate_size], "dtype": meta.dtype,
                               "rows": sum(len(r) for r in committed.values()), "committed_shards": len(committed),
                               "missing_shards": sorted(set(range(slots)) - set(committed)),
                               "bytes": run.nbytes()})
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
            click.echo(f"  run {r['run']}: {r['model']} ({r['shape'][0]}x{r['shape'][1]}, {r['dtype']}), "
                       f"{r['rows']} rows, {r['committed_shards']} committed shards, "
                       f"missing shards {r['missing_shards'] or 'none'}, {r['bytes'] / 2**20:.1f} MiB")
        return
    c = circuitmod.load(uri)
    if as_json:
        click.echo(json.dumps({"name": c.name, "version": c.version, "neurons": len(c.neurons),
                               "universal": len(c.universal), "per_layer": c.stats.get("per_layer", {})}))
    else:
        click.echo(c.summary())


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
    from cna_dist import model as modelmod

    if not re.match(r"^[A-Za-z0-9._-]+$", name):
        raise BadInput(f"not a slug: {name!r}", field="--name")
    info = modelmod.inspect(model_uri)
    ref = circuitmod.ModelRef(uri=model_uri, architecture=info.architecture, n_layers=info.n_layers,
                              intermediate_size=info.intermediate_size, fingerprint=modelmod.fingerprint(model_uri))
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON ({exc.msg})", source=str(file)) from None
    c = circuitmod.from_reference(data, str(file), name=name, model=ref)
    out.write_text(c.to_json())
    click.echo(str(out))


if __name__ == "__main__":
    main()
