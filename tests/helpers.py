"""Running the real `lamra-pl` console script and reading TensorBoard event files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
LAMRA = str(Path(sys.executable).parent / "lamra-pl")
FAULTS = ROOT / "tests" / "faults"  # inject.py: callbacks that inject faults into a real run


def lamra(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([LAMRA, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def fit_tiny_with_callbacks(folder: Path, callbacks: list[dict], *args: str) -> subprocess.CompletedProcess:
    """`lamra-pl fit` of the tiny stage-2 config with `trainer.callbacks` replaced by `callbacks` (class paths
    may name `inject.*`), plus `args`."""
    folder.mkdir(parents=True, exist_ok=True)
    overlay = folder / f"callbacks-{len(list(folder.glob('callbacks-*')))}.yaml"
    overlay.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    config = ("-c", "experiments/tiny/stage2_instruct.yaml", "-c", str(overlay))
    # FAULTS first, then whatever the tests run with (a checkout's src/ on PYTHONPATH stays the one under test).
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return lamra("fit", *config, *args, env={"PYTHONPATH": path})


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams_session(run_dir: Path) -> dict[str, object]:
    """The hyperparameters of the run's TensorBoard HParams session (as TensorBoard reads it), {} if it has none."""
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(run_dir))
    events.Reload()
    try:
        content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no hparams summary at all
        return {}
    if metadata.SESSION_START_INFO_TAG not in content:
        return {}
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def hparams_tab(logdir: Path) -> tuple[list[str], list[str], list[str]]:
    """What TensorBoard's HParams tab shows for `logdir` (`tensorboard --logdir`), from the hparams plugin's own
    code: the session runs, the hyperparameter columns and the metric columns (scalar tags)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    tab = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider))
    request = context.RequestContext()
    found = tab.hparams_metadata(request, "")
    experiment = tab.experiment_from_metadata(
        request, "", True, found, tab.hparams_from_data_provider(request, "", None)
    )
    sessions = sorted(run for run, tags in found.items() if metadata.SESSION_START_INFO_TAG in tags)
    return sessions, [h.name for h in experiment.hparam_infos], [m.name.tag for m in experiment.metric_infos]


def lamra_here(*args: str) -> subprocess.CompletedProcess:
    """`lamra-pl ARGS` in this process (no start-up cost): exit code and what it printed."""
    from lamra_pl.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc` if it succeeded, else a failure showing what it printed."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """`proc` failed with lamra-pl's one-line user error (exit 2, no traceback) that names every needle."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def convert_zeroshot(raw: dict[str, Path], out: Path, splits: dict[str, str] | None = None) -> dict[str, Path]:
    """`convert-zeroshot` of each raw set (`tests/fixtures/zeroshot/make_fixtures.py`) into out/<set>; returns each
    set's evaluation split folder, out/<set>/eval/<split> (`splits`: a set's split where it is not test)."""
    for name, root in raw.items():
        ok(lamra_here("convert-zeroshot", f"--set={name}", f"--root={root}", f"--out={out / name}"))
    return {name: out / name / "eval" / (splits or {}).get(name, "test") for name in raw}


def evaluate_zeroshot(model: Path, splits: dict[str, Path], runs: Path, pools: str = "[local]", *settings: str) -> Path:
    """Each converted set (`convert_zeroshot`'s split folders) indexed, retrieved in `pools` and its local run
    evaluated with `model`, into runs/<set>/ (index/, queries/, <pool>/); `settings` go to index and retrieve."""
    for name, split in splits.items():
        index, out = runs / name / "index", runs / name
        ok(lamra_here("index", f"--model={model}", f"--pool={split}/global_pool", f"--out={index}", *settings))
        queries = f"--queries={split}/*_task*"
        ok(
            lamra_here(
                "retrieve",
                f"--model={model}",
                f"--index={index}",
                queries,
                f"--out={out}",
                f"--pools={pools}",
                *settings,
            )
        )
        ok(lamra_here("evaluate", f"--runs={out / 'local'}"))
    return runs


def embeds_alone_as_in_a_batch(module: Any, items: list[Any]) -> tuple[Any, Any]:
    """(the padded batch of `items`, its embeddings) from an embedding module in eval mode (through its own
    collator), after checking that the batch is padded and that each item embeds alone as in it (float32, 1e-5)."""
    import torch

    collate = module.collator()
    batch = collate.encode(items)
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    with torch.no_grad():
        together = module.embed(batch)
        alone = torch.cat([module.embed(collate.encode([item])) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    return batch, together


def one_step_grads(backbone: Path, out: Path) -> Any:
    """run(devices, mode, dropout=0.0, strategy="ddp", loss="plain"): the loss and gradients of one training step
    (`tests/scripts/ddp_grads.py`, its arguments), computed once per argument set in a subprocess."""
    from safetensors.torch import load_file

    script = Path(__file__).parent / "scripts" / "ddp_grads.py"
    done: dict[tuple[Any, ...], Any] = {}

    def run(devices: int, mode: str, dropout: float = 0.0, strategy: str = "ddp", loss: str = "plain") -> Any:
        key = (devices, mode, dropout, strategy, loss)
        if key not in done:
            path = out / f"{devices}-{mode}-{dropout}-{strategy}-{loss}.safetensors"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            args = [str(backbone), str(path), str(devices), mode, str(dropout), strategy, loss]
            proc = subprocess.run(
                [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, env=env
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[key] = load_file(path)
        return done[key]

    return run
